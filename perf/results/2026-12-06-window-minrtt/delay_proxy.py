#!/usr/bin/env python3
"""A TCP proxy that holds every byte DELAY_MS before passing it on, each way: a long path on
loopback for a kernel without netem (this one has no sch_netem). Bounded: at most 64 MiB
waits per direction, beyond that reading pauses.
usage: delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS"""
import asyncio, collections, sys, time

LIMIT = 64 * 1024 * 1024


async def pump(reader, writer, delay):
    q = collections.deque()
    held = 0
    more = asyncio.Event()
    room = asyncio.Event()
    room.set()
    done = False

    async def read_side():
        nonlocal held, done
        while True:
            await room.wait()
            data = await reader.read(1 << 20)
            if not data:
                break
            q.append((time.monotonic() + delay, data))
            held += len(data)
            if held >= LIMIT:
                room.clear()
            more.set()
        done = True
        more.set()

    async def write_side():
        nonlocal held
        while True:
            if not q:
                if done:
                    break
                more.clear()
                await more.wait()
                continue
            due, data = q[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            q.popleft()
            held -= len(data)
            if held < LIMIT:
                room.set()
            writer.write(data)
            await writer.drain()
        try:
            writer.write_eof()
        except OSError:
            pass

    await asyncio.gather(read_side(), write_side(), return_exceptions=True)


async def handle(cr, cw, target, delay):
    try:
        tr, tw = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        cw.close()
        return
    await asyncio.gather(pump(cr, tw, delay), pump(tr, cw, delay), return_exceptions=True)
    for w in (cw, tw):
        w.close()


async def main():
    listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
    srv = await asyncio.start_server(lambda r, w: handle(r, w, target, delay), "127.0.0.1", listen)
    print("ready", flush=True)
    async with srv:
        await srv.serve_forever()


asyncio.run(main())
