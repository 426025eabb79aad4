"""The systems perf/compare measures: how to configure, start and stop each one on loopback.

Every system exposes the three warren-load backends (sink, echo, http) on three public ports.
`start()` returns once a probe round trip works through each public port.
"""

import json
import os
import re
import shutil
import subprocess
import time

from common import Proc, log, sh, wait_functional

BACKENDS = ("sink", "echo", "http")
TOKEN = "warren-perf-token-0123456789abcdef"


class System:
    name = "?"
    label = "?"
    tunnel = True  # has tunnel processes whose CPU and RSS we measure

    def __init__(self, ctx):
        self.ctx = ctx  # dict: tools, warren, backends {kind: port}, tmp
        self.procs = []
        self.public = {}

    def available(self):
        return None  # or a reason string why not

    def pids(self):
        return [p.pid for p in self.procs]

    def _dir(self, base_port):
        d = os.path.join(self.ctx["tmp"], f"{self.name}-{base_port}")
        os.makedirs(d, exist_ok=True)
        return d

    def start(self, base_port):
        """base_port: a free block of 10 ports; [0] control, [1..3] public sink/echo/http."""
        self.public = {k: base_port + 1 + i for i, k in enumerate(BACKENDS)}
        self.dir = self._dir(base_port)
        self._start(base_port)
        if not wait_functional(self.public, timeout=30, procs=self.procs):
            logs = "\n".join(f"--- {p.name}\n{p.log_text()[-1500:]}" for p in self.procs)
            self.stop()
            raise RuntimeError(f"{self.name} did not come up\n{logs}")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        self.procs = []
        self._cleanup()

    def _cleanup(self):
        pass

    def tool(self, name):
        p = os.path.join(self.ctx["tools"], "bin", name)
        return p if os.path.exists(p) else None


def start_awake_spin(system):
    """Starts `awake_spin` (perf/src/bin/awake_spin.rs: a SCHED_IDLE thread spinning on each CPU,
    so no vCPU halts) as one of `system`'s processes; returns once it says it is ready."""
    p = Proc(f"{system.name}-awake-spin", [system.ctx["awake_spin"]], system.dir)
    system.procs.append(p)
    end = time.time() + 10
    while time.time() < end:
        if '"ready"' in p.log_text():
            return
        if not p.alive():
            break
        time.sleep(0.05)
    text = p.log_text()[-500:]
    system.stop()
    raise RuntimeError(f"{system.name}: awake_spin did not start\n{text}")


def awake_spin_missing(ctx):
    b = ctx.get("awake_spin")
    return None if b and os.path.exists(b) else "awake_spin not built (cargo build --release -p warren-perf)"


class Direct(System):
    name, label, tunnel = "direct", "direct (no tunnel)", False

    def start(self, base_port):
        self.public = dict(self.ctx["backends"])


class DirectAwake(System):
    """The direct connection with `awake_spin` running: no tunnel, and no CPU ever halts. Any
    tunnel's keep-awake threads can give its visitors and backends at best what this gives the
    direct connection, so its round-trip latency is a floor for every tunnel's; not a tunnel."""
    name, tunnel = "direct-awake", False
    label = "direct, every CPU kept awake (awake_spin; a floor, not a tunnel)"

    def available(self):
        return awake_spin_missing(self.ctx)

    def start(self, base_port):
        self.public = dict(self.ctx["backends"])
        self.dir = self._dir(base_port)
        start_awake_spin(self)


class KernelNat(System):
    name, label, tunnel = "nat", "kernel NAT (nftables redirect)", False
    TABLE = "warren_perf"

    def available(self):
        if os.geteuid() != 0:
            return "needs root"
        if not shutil.which("nft"):
            return "nft not installed"
        r = sh(["nft", "list", "tables"])
        if r.returncode != 0:
            return f"nft unusable: {r.stderr.strip()[:200]}"
        return None

    def _start(self, base_port):
        sh(["nft", "delete", "table", "ip", self.TABLE])
        rules = [f"add table ip {self.TABLE}",
                 f"add chain ip {self.TABLE} out {{ type nat hook output priority -100 ; }}"]
        for k, pub in self.public.items():
            rules.append(f"add rule ip {self.TABLE} out ip daddr 127.0.0.1 tcp dport {pub} "
                         f"redirect to :{self.ctx['backends'][k]}")
        r = subprocess.run(["nft", "-f", "-"], input="\n".join(rules) + "\n", text=True,
                           capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"nft: {r.stderr.strip()}")

    def _cleanup(self):
        sh(["nft", "delete", "table", "ip", self.TABLE])


class Warren(System):
    """warren with a given session transport and data plane.

    `backend` is passed as `--backend` to both processes: "uring" (the Linux data plane, the
    default systems `warren-tcp` / `warren-tls`) or "compat" (`warren-compat-tcp`). `binary`
    names the ctx key of the executable: "warren" (the shipped build, system allocator) or
    "warren_mimalloc" (built with `--features mimalloc`), for the allocator comparison
    (`warren-mimalloc-tcp`), or "warren_other" (perf/compare `--other-warren PATH`: another build,
    e.g. of an earlier commit, as `warren-other-tcp` / `warren-other-tls`)."""

    # Tuning variants measured beside the shipped defaults: name suffix -> (label note, server
    # tuning lines, client tuning lines). "spread": the client's shards on the server's cores in
    # reverse order, so on one host a session's two ends run on different cores. "nopoll":
    # busy_poll_us = 0 (sleep as soon as the ring is empty). "ownpoll": busy_poll_other_cores =
    # false (only the shards with traffic poll; the others sleep). "awake": busy_poll_other_cores =
    # true (keep-awake threads whatever the start-up probe would say; the default is "auto").
    # "occupy": busy_poll_other_cores = "occupy" (no busy polls; nice-19 threads occupy the other
    # shards' cores during light traffic).
    # "poll100", "poll200":
    # busy_poll_us = 100 / 200. "otherpoll": busy_poll_sched_idle = false (busy polls run as
    # SCHED_OTHER, so threads the shard wakes are placed on other cores). "rustls":
    # tls_own_records = false (rustls seals and opens every record, as before warren's own
    # record layer; TLS systems only). "win256k": the initial stream window of 256 KiB that was
    # the default until 2026-12-07 (1 MiB since).
    VARIANTS = {
        "spread": ("client cores reversed", [], ["cores = @REVERSED@"]),
        "nopoll": ("busy_poll_us = 0", ["busy_poll_us = 0"], ["busy_poll_us = 0"]),
        "ownpoll": ("busy_poll_other_cores = false", ["busy_poll_other_cores = false"],
                    ["busy_poll_other_cores = false"]),
        "awake": ("busy_poll_other_cores = true", ["busy_poll_other_cores = true"],
                  ["busy_poll_other_cores = true"]),
        "occupy": ("busy_poll_other_cores = \"occupy\"", ["busy_poll_other_cores = \"occupy\""],
                   ["busy_poll_other_cores = \"occupy\""]),
        "poll100": ("busy_poll_us = 100", ["busy_poll_us = 100"], ["busy_poll_us = 100"]),
        "poll200": ("busy_poll_us = 200", ["busy_poll_us = 200"], ["busy_poll_us = 200"]),
        "otherpoll": ("busy_poll_sched_idle = false", ["busy_poll_sched_idle = false"],
                      ["busy_poll_sched_idle = false"]),
        "rustls": ("records by rustls", ["tls_own_records = false"], ["tls_own_records = false"]),
        "win256k": ("initial_stream_window_bytes = 256 KiB, the default before 2026-12-07",
                    ["initial_stream_window_bytes = 262144"], ["initial_stream_window_bytes = 262144"]),
        "syscc": ("loopback sockets keep the system congestion control",
                  ['loopback_congestion_control = ""'], ['loopback_congestion_control = ""']),
    }

    def __init__(self, ctx, transport, backend="uring", binary="warren", variant=None):
        super().__init__(ctx)
        self.transport = transport
        self.backend = backend
        self.binary = binary
        self.variant = variant
        if variant:
            self.name = f"warren-{variant}-{transport}"
            self.label = f"warren io_uring ({transport}, {self.VARIANTS[variant][0]})"
        elif binary == "warren_mimalloc":
            self.name = f"warren-mimalloc-{transport}"
            self.label = f"warren {backend} ({transport}, mimalloc)"
        elif binary == "warren_other":
            self.name = f"warren-other-{transport}"
            self.label = f"warren {'io_uring' if backend == 'uring' else backend} ({transport}, --other-warren binary)"
        elif backend == "uring":
            self.name = f"warren-{transport}"
            self.label = f"warren io_uring ({transport})"
        else:
            self.name = f"warren-{backend}-{transport}"
            self.label = f"warren {backend} ({transport})"

    def available(self):
        b = self.ctx.get(self.binary)
        if not b and self.binary == "warren_other":
            return "no --other-warren binary given"
        return None if b and os.path.exists(b) else f"{self.binary} binary missing"

    def _start(self, base_port):
        d = self.dir
        srv = [f"[server]\nbind_addr = \"127.0.0.1:{base_port}\"\ntransport = \"{self.transport}\"\n"
               f"state_dir = \"{d}/state\"\n\n[server.clients.perf]\ntoken = \"{TOKEN}\"\n"]
        cli = [f"[client]\nserver_addr = \"127.0.0.1:{base_port}\"\nname = \"perf\"\ntoken = \"{TOKEN}\"\n"
               f"transport = \"{self.transport}\"\n@FP@\n"]
        # Experiment hook: WARREN_PERF_CLIENT_CORES="1,0" pins the client's shards to other
        # cores than the server's (on one host a session's two ends otherwise share a core).
        cores = os.environ.get("WARREN_PERF_CLIENT_CORES")
        # Experiment hook: WARREN_PERF_TUNING="busy_poll_us = 0; pipe_size_bytes = 65536" adds
        # those keys to both [server.tuning] and [client.tuning].
        extra = [x.strip() for x in os.environ.get("WARREN_PERF_TUNING", "").split(";") if x.strip()]
        cli_tuning = ([f"cores = [{cores}]"] if cores else []) + extra
        srv_tuning = list(extra)
        if self.variant:
            _, vs, vc = self.VARIANTS[self.variant]
            cpus = sorted(os.sched_getaffinity(0))
            rev = "[" + ", ".join(str(c) for c in reversed(cpus)) + "]"
            srv_tuning += vs
            cli_tuning += [x.replace("@REVERSED@", rev) for x in vc]
        if cli_tuning:
            cli.append("[client.tuning]\n" + "\n".join(cli_tuning) + "\n")
        if srv_tuning:
            srv.append("[server.tuning]\n" + "\n".join(srv_tuning) + "\n")
        for k in BACKENDS:
            srv.append(f"[server.services.{k}]\nbind_addr = \"127.0.0.1:{self.public[k]}\"\n")
            cli.append(f"[client.services.{k}]\nlocal_addr = \"127.0.0.1:{self.ctx['backends'][k]}\"\n")
        with open(f"{d}/server.toml", "w") as f:
            f.write("\n".join(srv))
        exe = self.ctx[self.binary]
        s = Proc(f"{self.name}-server",
                 [exe, "server", "-c", f"{d}/server.toml", "--backend", self.backend], d)
        self.procs.append(s)
        fp = ""
        if self.transport == "tls":
            end = time.time() + 20
            m = None
            while time.time() < end and s.alive():
                m = re.search(r'server_fingerprint = \\?"(sha256:[0-9A-Fa-f:]+)', s.log_text())
                if m:
                    break
                time.sleep(0.1)
            if not m:
                raise RuntimeError(f"warren tls: no fingerprint in server log:\n{s.log_text()[-1500:]}")
            fp = f'server_fingerprint = "{m.group(1)}"'
        with open(f"{d}/client.toml", "w") as f:
            f.write("\n".join(cli).replace("@FP@", fp))
        from common import wait_port
        wait_port("127.0.0.1", base_port, 15)
        self.procs.append(Proc(f"{self.name}-client",
                               [exe, "client", "-c", f"{d}/client.toml", "--backend", self.backend], d))


class Rathole(System):
    def __init__(self, ctx, noise):
        super().__init__(ctx)
        self.noise = noise
        self.name = "rathole-noise" if noise else "rathole"
        self.label = "rathole 0.5.0 (Noise)" if noise else "rathole 0.5.0 (TCP)"

    def available(self):
        return None if self.tool("rathole") else "rathole not installed"

    def _start(self, base_port):
        d, bin_ = self.dir, self.tool("rathole")
        st = ct = "[server.transport]\ntype = \"tcp\"\n"
        ct = "[client.transport]\ntype = \"tcp\"\n"
        if self.noise:
            out = sh([bin_, "--genkey"]).stdout
            keys = re.findall(r"^\s*([A-Za-z0-9+/=]{40,})\s*$", out, re.M)
            if len(keys) < 2:
                raise RuntimeError(f"rathole --genkey: unexpected output {out!r}")
            priv, pub = keys[0], keys[1]
            st = f"[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{priv}\"\n"
            ct = f"[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{pub}\"\n"
        srv = [f"[server]\nbind_addr = \"127.0.0.1:{base_port}\"\ndefault_token = \"{TOKEN}\"\n", st]
        cli = [f"[client]\nremote_addr = \"127.0.0.1:{base_port}\"\ndefault_token = \"{TOKEN}\"\n", ct]
        for k in BACKENDS:
            srv.append(f"[server.services.{k}]\nbind_addr = \"127.0.0.1:{self.public[k]}\"\n")
            cli.append(f"[client.services.{k}]\nlocal_addr = \"127.0.0.1:{self.ctx['backends'][k]}\"\n")
        with open(f"{d}/server.toml", "w") as f:
            f.write("\n".join(srv))
        with open(f"{d}/client.toml", "w") as f:
            f.write("\n".join(cli))
        env = dict(os.environ, RUST_LOG="warn")
        self.procs.append(Proc(f"{self.name}-server", [bin_, "--server", f"{d}/server.toml"], d, env))
        from common import wait_port
        wait_port("127.0.0.1", base_port, 15)
        self.procs.append(Proc(f"{self.name}-client", [bin_, "--client", f"{d}/client.toml"], d, env))


class Bore(System):
    name, label = "bore", "bore 0.6.0"

    def available(self):
        return None if self.tool("bore") else "bore not installed"

    def _start(self, base_port):
        d, bin_ = self.dir, self.tool("bore")
        env = dict(os.environ, RUST_LOG="warn")
        # bore's control port is fixed (7835); public ports come from --min-port..--max-port.
        self.procs.append(Proc("bore-server",
                               [bin_, "server", "--bind-addr", "127.0.0.1", "--min-port", str(base_port + 1),
                                "--max-port", str(base_port + 3), "--secret", TOKEN], d, env))
        from common import wait_port
        wait_port("127.0.0.1", 7835, 15)
        for k in BACKENDS:
            self.procs.append(Proc(f"bore-client-{k}",
                                   [bin_, "local", str(self.ctx["backends"][k]), "--local-host", "127.0.0.1", "--to", "127.0.0.1",
                                    "--port", str(self.public[k]), "--secret", TOKEN], d, env))


class Ferro(System):
    """FerroTunnel's TCP ingress routes every connection of a server's one `--tcp-bind` listener
    to its (first) client, so each service gets its own server + client pair."""
    name, label = "ferrotunnel", "FerroTunnel 1.5.2"

    def available(self):
        return None if self.tool("ferrotunnel") else "ferrotunnel not installed"

    def _start(self, base_port):
        d, bin_ = self.dir, self.tool("ferrotunnel")
        env = dict(os.environ, RUST_LOG="warn")
        tok = os.path.join(d, "token")
        with open(tok, "w") as f:
            f.write(TOKEN + "\n")
        from common import wait_port
        for i, k in enumerate(BACKENDS):
            ctl = base_port if i == 0 else base_port + 3 + i  # base, base+4, base+5
            http = base_port + 6 + i                           # HTTP ingress, unused
            self.procs.append(Proc(f"ferrotunnel-server-{k}",
                                   [bin_, "server", "--bind", f"127.0.0.1:{ctl}", "--token-file", tok,
                                    "--http-bind", f"127.0.0.1:{http}",
                                    "--tcp-bind", f"127.0.0.1:{self.public[k]}"], d, env))
            wait_port("127.0.0.1", ctl, 15)
            self.procs.append(Proc(f"ferrotunnel-client-{k}",
                                   [bin_, "client", "--server", f"127.0.0.1:{ctl}", "--token", TOKEN,
                                    "--local-addr", f"127.0.0.1:{self.ctx['backends'][k]}",
                                    "--no-dashboard"], d, env))


class RelayFloor(System):
    """`conn_relay` (perf/src/bin/conn_relay.rs) on each public port, forwarding to its backend: one
    process per backend kind, each with one event loop per CPU this process may run on
    (`--threads`, SO_REUSEPORT listeners). One relay hop with nothing a tunnel adds (a tunnel has
    at least two hops, plus framing and a session): a floor for every workload, not a tunnel."""
    name = "relay-floor"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.threads = len(os.sched_getaffinity(0))
        n = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        self.label = f"conn_relay (minimal epoll relay, {n}; a floor, not a tunnel)"

    def available(self):
        b = self.ctx.get("conn_relay")
        return None if b and os.path.exists(b) else "conn_relay not built (cargo build --release -p warren-perf)"

    def _start(self, base_port):
        for k in BACKENDS:
            self.procs.append(Proc(f"{self.name}-{k}",
                                   [self.ctx["conn_relay"], "--listen", f"127.0.0.1:{self.public[k]}",
                                    "--to", f"127.0.0.1:{self.ctx['backends'][k]}",
                                    "--threads", str(self.threads)], self.dir))


class RelayFloorAwake(RelayFloor):
    """relay-floor with `awake_spin` running (no CPU ever halts): the one-hop floor with the best
    a keep-awake scheme can give it. The spinner's CPU is not counted as the relay's."""
    name = "relay-floor-awake"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.label = self.label.replace("; a floor", ", every CPU kept awake; a floor")

    def available(self):
        return super().available() or awake_spin_missing(self.ctx)

    def _start(self, base_port):
        start_awake_spin(self)
        super()._start(base_port)

    def pids(self):
        return [p.pid for p in self.procs if not p.name.endswith("-awake-spin")]


class SpliceFloor(System):
    """Two `conn_relay --splice` processes in a chain on each public port: public port -> relay A ->
    an internal port -> relay B -> backend. Each relay moves bytes with non-blocking splice(2)
    through a pipe per direction (1 MiB, as warren's default `pipe_size_bytes`) and has one epoll
    loop per allowed CPU (SO_REUSEPORT). Two processes and two splice hops, as a plain-TCP warren
    (server and client), with nothing else: no framing, no session (one upstream connection per
    visitor), no flow control beyond TCP's. The least any two-process plaintext tunnel spends per
    byte: a floor for bulk throughput and CPU per GB, not a tunnel."""
    name = "splice-floor"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.threads = len(os.sched_getaffinity(0))
        self.label = (f"2 x conn_relay --splice in a chain ({self.threads} epoll loops each; "
                      "two processes, two splice hops, no session; a floor, not a tunnel)")

    def available(self):
        b = self.ctx.get("conn_relay")
        return None if b and os.path.exists(b) else "conn_relay not built (cargo build --release -p warren-perf)"

    def _start(self, base_port):
        from common import wait_port
        for i, k in enumerate(BACKENDS):
            inner = base_port + 4 + i  # [4..6] of the block: the hop between the two relays
            for name, listen, to in ((f"{self.name}-{k}-b", inner, self.ctx["backends"][k]),
                                     (f"{self.name}-{k}-a", self.public[k], inner)):
                self.procs.append(Proc(name, [self.ctx["conn_relay"], "--splice",
                                              "--listen", f"127.0.0.1:{listen}", "--to", f"127.0.0.1:{to}",
                                              "--threads", str(self.threads)], self.dir))
                wait_port("127.0.0.1", listen, 15)


class MuxFloor(System):
    """`mux_relay` (perf/src/bin/mux_relay.rs) on each public port: a server process that starts its
    own client process, the two joined by one session that carries every visitor as a stream
    (8-byte frames, one epoll loop per process). One per backend kind, as relay-floor. The cheapest
    multiplexed two-process tunnel: a floor for warren-like tunnels, not a tunnel (no flow control
    beyond TCP's, no authentication)."""
    name = "mux-floor"
    label = "mux_relay (minimal multiplexed tunnel: server + client process, 1 session; a floor, not a tunnel)"

    def available(self):
        b = self.ctx.get("mux_relay")
        return None if b and os.path.exists(b) else "mux_relay not built (cargo build --release -p warren-perf)"

    extra = []

    def _start(self, base_port):
        for k in BACKENDS:
            self.procs.append(Proc(f"{self.name}-{k}",
                                   [self.ctx["mux_relay"], "--listen", f"127.0.0.1:{self.public[k]}",
                                    "--to", f"127.0.0.1:{self.ctx['backends'][k]}"] + self.extra, self.dir))

    def pids(self):
        """Each mux_relay's server process and the client process it started: the tunnel's CPU and
        RSS are both processes'."""
        pids = []
        for p in self.procs:
            pids.append(p.pid)
            c = self._client_pid(p)
            if c:
                pids.append(c)
        return pids

    @staticmethod
    def _client_pid(p):
        """The client's pid from the server's ready line (`client_pid`), checked against
        /proc/PID/stat's parent; else the server's only child in /proc."""
        if getattr(p, "client_pid", None):
            return p.client_pid
        pid = None
        for line in p.log_text().splitlines():
            if line.startswith("{") and '"ready"' in line:
                try:
                    pid = json.loads(line).get("client_pid")
                except ValueError:
                    pass
                break
        if not pid:
            try:
                with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                pid = kids[0] if len(kids) == 1 else None
            except (OSError, ValueError):
                pid = None
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
            if pid and int(st[st.rindex(")") + 2:].split()[1]) == p.pid:
                p.client_pid = pid
                return pid
        except (OSError, ValueError, TypeError):
            pass
        log(f"{p.name}: client process not found; its CPU and RSS are not counted")
        return None


class MuxFloorTls(MuxFloor):
    """mux-floor with its session over TLS 1.3 (`mux_relay --tls`: rustls's buffered API, ring,
    AES-128-GCM, as warren's `transport = "tls"`): the floor of a TLS-multiplexed tunnel on
    warren's TLS stack."""
    name = "mux-floor-tls"
    label = "mux_relay --tls (minimal multiplexed tunnel over one rustls TLS 1.3 session; a floor, not a tunnel)"
    extra = ["--tls"]


def all_systems(ctx):
    return [Direct(ctx), DirectAwake(ctx), KernelNat(ctx), Rathole(ctx, False), Rathole(ctx, True), Ferro(ctx),
            Bore(ctx), Warren(ctx, "tcp"), Warren(ctx, "tls"), Warren(ctx, "tcp", "compat"),
            Warren(ctx, "tls", "compat"), Warren(ctx, "tcp", "uring", "warren_mimalloc"),
            Warren(ctx, "tcp", variant="spread"), Warren(ctx, "tls", variant="spread"),
            Warren(ctx, "tcp", variant="nopoll"), Warren(ctx, "tcp", variant="ownpoll"),
            Warren(ctx, "tcp", variant="awake"), Warren(ctx, "tcp", variant="occupy"),
            Warren(ctx, "tcp", variant="poll100"), Warren(ctx, "tcp", variant="poll200"),
            Warren(ctx, "tcp", variant="otherpoll"),
            Warren(ctx, "tls", variant="rustls"), Warren(ctx, "tcp", variant="syscc"),
            Warren(ctx, "tcp", variant="win256k"), Warren(ctx, "tls", variant="win256k"),
            Warren(ctx, "tcp", "uring", "warren_other"), Warren(ctx, "tls", "uring", "warren_other"),
            RelayFloor(ctx), RelayFloorAwake(ctx), SpliceFloor(ctx), MuxFloor(ctx), MuxFloorTls(ctx)]
