"""Shared helpers of perf/compare and perf/profile (python3 stdlib only)."""

import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TOOLS = os.path.join(os.path.expanduser("~"), ".cache", "warren-perf-tools")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print("[perf]", *a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), text=True, capture_output=True, **kw)


def git_commit():
    r = sh(["git", "-C", REPO, "rev-parse", "--short=10", "HEAD"])
    c = r.stdout.strip() or "unknown"
    dirty = sh(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    return c, bool(dirty)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tcp_congestion_control():
    """The system's default TCP congestion control (every socket that does not choose its own).
    It moves loopback results a lot: BBR paces each send (internally, with an hrtimer, when `lo`
    has no fq qdisc), see perf/results/2026-12-07-loopback-cc/."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def set_tcp_congestion_control(name):
    """Sets the system default (root); returns the previous one, for the caller to restore."""
    before = tcp_congestion_control()
    with open("/proc/sys/net/ipv4/tcp_congestion_control", "w") as f:
        f.write(name)
    return before


def stamp():
    commit, dirty = git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "commit": commit,
        "dirty_worktree": dirty,
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "day": now.strftime("%Y-%m-%d"),
        "rustc": sh(["rustc", "--version"]).stdout.strip(),
        "tcp_cc": tcp_congestion_control(),
    }


def raise_nofile(n=65536):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(n, hard) if hard != resource.RLIM_INFINITY else n
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def build_release():
    """Builds warren and every bin of warren-perf (release: warren-load, conn_relay, mux_relay,
    splice_relay, awake_spin); returns the paths of warren and warren-load (the other warren-perf bins are next
    to it)."""
    log("building warren and warren-perf (release: warren-load, conn_relay, mux_relay, splice_relay, awake_spin)")
    r = subprocess.run(
        ["nice", "-n", "19", "cargo", "build", "--release", "-p", "warren", "-p", "warren-perf"],
        cwd=REPO,
    )
    if r.returncode != 0:
        sys.exit("perf: cargo build --release failed")
    meta = sh(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=REPO)
    target = json.loads(meta.stdout)["target_directory"] if meta.returncode == 0 else os.path.join(REPO, "target")
    return os.path.join(target, "release", "warren"), os.path.join(target, "release", "warren-load")


def mimalloc_path():
    """Where build_mimalloc puts the mimalloc build of warren."""
    return os.path.join(REPO, "target", "mimalloc", "release", "warren")


def build_mimalloc():
    """Builds warren with `--features mimalloc` (mimalloc as the global allocator instead of the
    system allocator) into its own target directory, for the allocator comparison. Returns the
    binary's path."""
    log("building warren with mimalloc (release, --features mimalloc)")
    r = subprocess.run(
        ["nice", "-n", "19", "cargo", "build", "--release", "-p", "warren", "--features", "mimalloc",
         "--target-dir", os.path.join(REPO, "target", "mimalloc")],
        cwd=REPO,
    )
    if r.returncode != 0:
        sys.exit("perf: cargo build --release --features mimalloc failed")
    return mimalloc_path()


class Proc:
    """A process we spawned; stopped by its own PID (its own process group)."""

    def __init__(self, name, argv, logdir, env=None):
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        self.logf = open(self.log_path, "ab")
        self.p = subprocess.Popen(
            argv, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
        self.pid = self.p.pid

    def alive(self):
        return self.p.poll() is None

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        if self.p.poll() is None:
            try:
                self.p.send_signal(sig)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
            except ProcessLookupError:
                pass
        self.logf.close()


def proc_cpu_seconds(pid):
    """utime + stime of the whole process (all threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ephemeral_range():
    """The kernel's ephemeral port range (outgoing connections take their local port from it)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
            return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def ports_free(host, first, count):
    """True when every port in first..first+count-1 can be bound right now (with SO_REUSEADDR,
    as the tunnels bind them; TIME_WAIT leftovers do not count as busy)."""
    for p in range(first, first + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, p))
        except OSError:
            return False
        finally:
            s.close()
    return True


def wait_port(host, port, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def probe(kind, port, host="127.0.0.1"):
    """One functional round trip through a public port to a warren-load backend."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            if kind == "echo":
                s.sendall(b"x")
                return _recv_exact(s, 1) == b"x"
            if kind == "sink":
                s.sendall(bytes([0]) + (1).to_bytes(8, "big"))
                return len(_recv_exact(s, 1)) == 1
            if kind == "http":
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    c = s.recv(4096)
                    if not c:
                        break
                    data += c
                return data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
    except OSError:
        return False
    return False


def wait_functional(ports, timeout=30.0, procs=()):
    """Waits until every (kind, port) answers a probe; False on timeout or a dead process."""
    end = time.time() + timeout
    pending = dict(ports)
    while pending and time.time() < end:
        for kind, port in list(pending.items()):
            if probe(kind, port):
                del pending[kind]
        for p in procs:
            if not p.alive():
                return False
        if pending:
            time.sleep(0.1)
    return not pending


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
