import os, socket, fcntl, sys, threading
size = int(sys.argv[1]); chunk = int(sys.argv[2])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
c = socket.create_connection(ls.getsockname()); s, _ = ls.accept()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
r, w = os.pipe2(os.O_NONBLOCK)
got = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
c.setblocking(False)
sent = 0
buf = b"x" * chunk
try:
    while sent < 8 << 20:
        sent += c.send(buf)
except BlockingIOError: pass
import time; time.sleep(0.2)
total = 0
while True:
    try:
        n = os.splice(s.fileno(), w, 1 << 22, flags=os.SPLICE_F_NONBLOCK)
    except BlockingIOError:
        break
    if n == 0: break
    total += n
import array
av = array.array('i', [0]); fcntl.ioctl(s.fileno(), 0x541B, av)
print(f"pipe {got} chunk {chunk}: spliced {total} before EAGAIN, socket still has {av[0]}, sent {sent}")
