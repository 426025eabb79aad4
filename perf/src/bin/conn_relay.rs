//! `conn_relay`: the cheapest user-space TCP relay this crate knows how to write, to measure the
//! least CPU any user-space tunnel spends per connection (perf/floor's connection-rate floor).
//!
//! `conn_relay --listen 127.0.0.1:P --to 127.0.0.1:Q` accepts visitors on P and, for each, opens a
//! connection to Q and copies bytes both ways until both directions have ended: no framing, no
//! protocol, and by default one thread. Per visitor: `accept4(SOCK_NONBLOCK)` (TCP_NODELAY is set
//! once on the listener; accepted sockets inherit it), a non-blocking `socket` + `connect` to Q,
//! two `epoll_ctl(ADD)`, then `recv`/`send` through a 16 KiB buffer per direction; a peer's EOF
//! becomes `shutdown(SHUT_WR)` on the other side, and once both directions have ended both fds are
//! closed (the last direction's FIN is sent by that `close`, which saves its `shutdown`). The only
//! per-connection memory is a slab entry, reused through a free list.
//!
//! Readiness: one epoll set per event loop, every connection fd registered once, edge-triggered,
//! for `EPOLLIN|EPOLLOUT|EPOLLRDHUP`, so nothing is ever re-armed (`EPOLL_CTL_MOD`) or re-polled;
//! the listener is level-triggered and drained up to a batch per wake-up. With `EPOLLRDHUP` known,
//! a `recv` that returns less than it asked for means the socket is empty (nginx's rule with
//! `EPOLLRDHUP`): a new edge will come with new data, so no `recv` is spent on `EAGAIN`; and when
//! the peer's FIN had already been seen, that short `recv` is the last one (no `recv` of 0). A
//! 32-byte echo then costs 14 syscalls per connection plus a share of `epoll_wait` and of the
//! accept batch's final `EAGAIN`: `accept4`, `socket`, `connect`, 2 `epoll_ctl`, 2 `recv` + 2
//! `send` of data, 2 `recv` of EOF, 1 `shutdown`, 2 `close`.
//!
//! Threads: `--threads N` runs N independent event loops, each in its own thread with its own
//! epoll set, slab and listener, all bound to `--listen` with SO_REUSEPORT, so the kernel spreads
//! new visitors across the loops' accept queues (by a hash of the connection's addresses) and a
//! connection lives and dies in the loop that accepted it: the loops share no lock and no
//! connection, only their counters (each written by its own loop alone, read by reports).
//! `--pin` pins loop i to the i-th CPU the process may run on (`sched_getaffinity`; wrapping
//! around when there are more loops than CPUs). `--threads 1`, the default, is the relay
//! described above exactly: one listener, no SO_REUSEPORT, no other thread.
//!
//! Splice: `--splice` moves each direction's bytes through a pipe of its own (`pipe2`, sized with
//! `F_SETPIPE_SZ` to `--pipe-bytes`) with non-blocking `splice(2)` (socket -> pipe, pipe ->
//! socket) instead of `recv`/`send` through the buffer: no byte is copied to user space, as on
//! warren's plain-TCP splice path. The pipe is emptied into the destination before the source is
//! read again, and the source is read until `EAGAIN` (a short splice may mean a pipe full by
//! slots rather than an empty socket, so the short-read rule is not used). Two such relays in a
//! chain (perf/compare's `splice-floor`) are the least a two-process plaintext tunnel does per
//! byte: two splice hops, no framing, no session, no flow control of its own.
//!
//! Why epoll and not io_uring: what is left is the kernel's TCP work (handshakes, FINs, loopback
//! delivery, socket setup and teardown), which is the same either way; io_uring would only batch
//! the syscall entries, and each of its socket ops that finds the socket not ready is parked on
//! an internal poll and retried from task work, which is epoll's readiness work plus request
//! bookkeeping. Edge-triggered epoll with the short-read rule issues no speculative op at all.
//!
//! CPU: `getrusage(RUSAGE_SELF)`, every thread of the process (exact: the kernel scales it to the
//! scheduler's run time). The relay prints one JSON line on stdout when it is ready, one with its
//! cumulative counters and CPU on `SIGUSR1` (keeps running), and a final one on `SIGTERM`/`SIGINT`
//! (exits 0); `--report-every N` adds one every N completed connections (of one loop: each loop
//! reports after every N of its own). Reports sum the loops' counters. Signals are blocked in every
//! thread and arrive through a signalfd in loop 0's epoll set, so a report is never written from a
//! signal handler or in the middle of that loop's step; a connection is counted as completed before
//! the `close` that sends its last FIN, so a report asked for once the visitor has seen that FIN
//! includes it, whichever loop served it. Failures (a reset peer, a refused upstream) close that
//! connection's two fds, are counted, and the first 20 of the process are printed on stderr. See
//! perf/README.md (perf/floor, conn_relay).

// Raw epoll, signalfd, accept4, socket, connect, recv/send, sched_setaffinity and getrusage are all
// FFI calls that need `unsafe`, which the workspace denies by default.
#![allow(unsafe_code)]

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("conn_relay: Linux only (epoll, signalfd, accept4)");
    std::process::ExitCode::from(2)
}

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    linux::main()
}

#[cfg(target_os = "linux")]
#[path = "../relay_sys.rs"]
mod relay_sys;

#[cfg(target_os = "linux")]
mod linux {
    use crate::relay_sys::{cvt, ep_add, set_int, so_error, sockaddr};
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::net::{SocketAddr, TcpListener};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Instant;

    use anyhow::{ensure, Context, Result};
    use clap::Parser;
    use serde_json::json;
    use warren_perf::clock::now;

    /// Bytes buffered per direction of a connection (inline in its slab entry).
    const BUF: usize = 16 << 10;
    /// Listen backlog (capped by net.core.somaxconn).
    const BACKLOG: libc::c_int = 4096;
    /// Most connections accepted per listener wake-up before looking at other events.
    const ACCEPT_BATCH: usize = 64;
    /// Events taken per epoll_wait.
    const EVENTS: usize = 256;
    /// Failures printed on stderr; later ones are only counted.
    const MAX_PRINTED: u64 = 20;
    /// Tokens of the two fds that are not connection sides (connection generations start at 1).
    const TOKEN_LISTENER: u64 = 0;
    const TOKEN_SIGNAL: u64 = 1;
    const VISITOR: usize = 0;
    const UPSTREAM: usize = 1;
    const SIDE: [&str; 2] = ["visitor", "upstream"];
    const ET: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

    /// Minimal epoll TCP relay (one event loop per thread) that reports its own CPU per connection.
    #[derive(Debug, Parser)]
    #[command(about)]
    struct Cli {
        /// Address visitors connect to.
        #[arg(long)]
        listen: SocketAddr,
        /// Address each visitor is relayed to.
        #[arg(long)]
        to: SocketAddr,
        /// Also set TCP_NODELAY on each upstream socket (one more syscall per connection). Not
        /// needed when each side writes once and waits for the answer: Nagle only holds a small
        /// segment while earlier data is unacknowledged, and never holds a FIN.
        #[arg(long)]
        upstream_nodelay: bool,
        /// Print a report line every N completed connections (0: only on SIGUSR1 and at exit).
        #[arg(long, default_value_t = 0)]
        report_every: u64,
        /// Independent event loops, one per thread, each with its own epoll set and its own
        /// listener on `--listen` (SO_REUSEPORT: the kernel spreads visitors across them).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Pin loop i to the i-th CPU this process may run on (wrapping around).
        #[arg(long)]
        pin: bool,
        /// Move payloads with splice(2) through a pipe per direction instead of recv/send.
        #[arg(long)]
        splice: bool,
        /// Capacity asked of each splice pipe (F_SETPIPE_SZ; the kernel caps it at
        /// fs.pipe-max-size without CAP_SYS_RESOURCE).
        #[arg(long, default_value_t = 1 << 20)]
        pipe_bytes: usize,
    }

    pub fn main() -> ExitCode {
        match run(&Cli::parse()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("conn_relay: FAILED: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    fn run(cli: &Cli) -> Result<()> {
        ensure!(cli.threads >= 1, "--threads must be at least 1");
        ensure!(
            (4096..=1 << 30).contains(&cli.pipe_bytes),
            "--pipe-bytes must be between 4096 and 2^30"
        );
        // First, while this is the only thread: every thread started later inherits the blocked
        // signals, so they only ever arrive through the signalfd.
        let sig = signal_fd().context("signalfd")?;
        let cpus = if cli.pin {
            allowed_cpus().context("sched_getaffinity")?
        } else {
            Vec::new()
        };
        let shared = Arc::new(Shared::new(cli.threads));
        let mut addr = cli.listen;
        let mut relays = Vec::with_capacity(cli.threads);
        for me in 0..cli.threads {
            let listener = listener(addr, cli.threads > 1)?;
            // With port 0 the first listener picks the port; the other loops join it.
            addr = listener.local_addr().context("getsockname")?;
            // SAFETY: epoll_create1 has no memory preconditions.
            let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize)
                .context("epoll_create1")?;
            // SAFETY: epoll_create1 returned a new fd that nothing else owns.
            let ep = unsafe { OwnedFd::from_raw_fd(ep as RawFd) };
            let lfd = listener.as_raw_fd();
            ep_add(ep.as_raw_fd(), lfd, libc::EPOLLIN as u32, TOKEN_LISTENER)
                .context("epoll add")?;
            relays.push(Relay::new(cli, me, Arc::clone(&shared), ep, listener));
        }
        let mut first = relays.remove(0);
        ep_add(
            first.ep,
            sig.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_SIGNAL,
        )
        .context("epoll add")?;
        let cpu = |me: usize| (!cpus.is_empty()).then(|| cpus[me % cpus.len()]);
        let (tx, rx) = mpsc::channel();
        for (me, mut relay) in (1..).zip(relays) {
            let (tx, cpu) = (tx.clone(), cpu(me));
            thread::Builder::new()
                .name(format!("conn_relay-{me}"))
                .spawn(move || {
                    let pinned = cpu.map_or(Ok(()), pin);
                    let ok = pinned.is_ok();
                    let _ = tx.send(pinned.with_context(|| format!("pin thread {me}")));
                    drop(tx);
                    if ok {
                        if let Err(e) = serve(&mut relay, None) {
                            // A dead loop's listener would still take its share of visitors.
                            eprintln!("conn_relay: FAILED: thread {me}: {e:#}");
                            std::process::exit(1);
                        }
                    }
                })
                .context("spawn thread")?;
        }
        drop(tx);
        if let Some(c) = cpu(0) {
            pin(c).context("pin thread 0")?;
        }
        for r in rx {
            r?; // Every other loop has pinned itself (or failed to).
        }
        let pinned: Vec<usize> = (0..cli.threads).filter_map(cpu).collect();
        let pinned = if cli.pin {
            format!(", pinned to CPUs {pinned:?}")
        } else {
            String::new()
        };
        eprintln!(
            "conn_relay: relaying {addr} -> {} (epoll, edge-triggered, {} thread(s){pinned}, {}); \
             SIGUSR1 prints a report, SIGTERM/SIGINT a final one and exit",
            cli.to,
            cli.threads,
            if cli.splice {
                format!("splice through {}-byte pipes", cli.pipe_bytes)
            } else {
                "recv/send".to_string()
            }
        );
        shared.report("ready");
        serve(&mut first, Some(sig.as_raw_fd()))
    }

    /// One event loop until SIGTERM/SIGINT (only the loop given the signalfd returns).
    fn serve(relay: &mut Relay, sig: Option<RawFd>) -> Result<()> {
        // SAFETY: epoll_event is plain old data, all-zero is a valid value.
        let mut events: [libc::epoll_event; EVENTS] = unsafe { zeroed() };
        loop {
            // SAFETY: `events` is valid for EVENTS entries for the duration of the call.
            let n = unsafe {
                libc::epoll_wait(relay.ep, events.as_mut_ptr(), EVENTS as libc::c_int, -1)
            };
            let n = match cvt(n as isize) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            };
            for ev in &events[..n] {
                let (token, flags) = (ev.u64, ev.events);
                match (token, sig) {
                    (TOKEN_LISTENER, _) => relay.accept_batch(),
                    (TOKEN_SIGNAL, Some(sig)) => {
                        if relay.signals(sig)? {
                            relay.shared.report("exit");
                            return Ok(());
                        }
                    }
                    _ => relay.on_event(token, flags),
                }
            }
        }
    }

    /// One direction of a connection: bytes read from side `i` waiting to be sent to `1 - i`.
    #[derive(Debug)]
    struct Dir {
        buf: [u8; BUF],
        start: usize,
        end: usize,
        /// The source's EOF has been read.
        eof: bool,
        /// The EOF has been passed on (shutdown(SHUT_WR) of the destination).
        shut: bool,
        /// With `--splice`: this direction's pipe (read end, write end; -1 without) and the
        /// bytes in it.
        pipe: [RawFd; 2],
        piped: usize,
    }

    /// A slab entry: one visitor and its upstream connection.
    #[derive(Debug)]
    struct Conn {
        /// 0 while the slot is free; bumped on every use, so stale events are recognised.
        gen: u32,
        id: u64,
        fd: [RawFd; 2],
        connected: bool,
        /// Edge-triggered readiness as last seen: readable, writable, peer's FIN seen, error seen.
        rd: [bool; 2],
        wr: [bool; 2],
        rdhup: [bool; 2],
        err: [bool; 2],
        /// `dir[i]` moves side i's bytes to side 1 - i.
        dir: [Dir; 2],
    }

    /// Why a connection was torn down.
    #[derive(Debug)]
    struct Fail {
        op: &'static str,
        side: usize,
        err: io::Error,
    }

    fn fail(op: &'static str, side: usize) -> impl FnOnce(io::Error) -> Fail {
        move |err| Fail { op, side, err }
    }

    enum Step {
        Open,
        Done,
    }

    /// One event loop's counters. Each is written by its own loop only (a plain load and store:
    /// no locked read-modify-write on the connection path) and read by reports; aligned so that
    /// two loops' counters never share a cache line.
    #[derive(Debug, Default)]
    #[repr(align(128))]
    struct Counters {
        accepted: AtomicU64,
        completed: AtomicU64,
        failed: AtomicU64,
        accept_errors: AtomicU64,
        open: AtomicU64,
        max_open: AtomicU64,
    }

    /// What the event loops share: their counters, and how many failures and accept errors the
    /// process has seen (only the first MAX_PRINTED of each are printed).
    #[derive(Debug)]
    struct Shared {
        loops: Vec<Counters>,
        failures_seen: AtomicU64,
        accept_errors_seen: AtomicU64,
        started: Instant,
    }

    impl Shared {
        fn new(threads: usize) -> Shared {
            Shared {
                loops: (0..threads).map(|_| Counters::default()).collect(),
                failures_seen: AtomicU64::new(0),
                accept_errors_seen: AtomicU64::new(0),
                started: now(),
            }
        }

        /// Prints one JSON line of cumulative counters (summed over the loops; `max_open` is the
        /// sum of each loop's peak, so with several loops it can exceed the process's) and this
        /// process's CPU (all threads) on stdout.
        fn report(&self, event: &str) {
            // SAFETY: rusage is plain old data, all-zero is a valid value.
            let mut ru: libc::rusage = unsafe { zeroed() };
            // SAFETY: ru is a valid out-parameter.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let (user, sys) = (secs(ru.ru_utime), secs(ru.ru_stime));
            let sum = |f: fn(&Counters) -> &AtomicU64| self.loops.iter().map(|c| get(f(c))).sum();
            let completed: u64 = sum(|c| &c.completed);
            let per_conn = (completed > 0).then(|| (user + sys) * 1e6 / completed as f64);
            let per_thread: Vec<_> = self
                .loops
                .iter()
                .map(|c| json!({"accepted": get(&c.accepted), "completed": get(&c.completed)}))
                .collect();
            emit(
                &json!({
                    "event": event, "accepted": sum(|c| &c.accepted), "completed": completed,
                    "failed": sum(|c| &c.failed), "accept_errors": sum(|c| &c.accept_errors),
                    "open": sum(|c| &c.open), "max_open": sum(|c| &c.max_open),
                    "cpu_s": user + sys, "user_s": user, "sys_s": sys,
                    "cpu_us_per_conn": per_conn, "nvcsw": ru.ru_nvcsw, "nivcsw": ru.ru_nivcsw,
                    "wall_s": self.started.elapsed().as_secs_f64(),
                    "threads": self.loops.len(), "per_thread": per_thread,
                })
                .to_string(),
            );
        }
    }

    /// One event loop: its epoll set, listener and connections.
    struct Relay {
        ep: RawFd,
        lfd: RawFd,
        to: libc::sockaddr_storage,
        to_len: libc::socklen_t,
        family: libc::c_int,
        upstream_nodelay: bool,
        report_every: u64,
        /// `--splice`: the pipe capacity asked for; None moves bytes with recv/send.
        splice: Option<usize>,
        slab: Vec<Conn>,
        free: Vec<u32>,
        /// This loop's index in `shared.loops` (and in messages).
        me: usize,
        shared: Arc<Shared>,
        /// Keep `ep` and `lfd` open for as long as the loop exists.
        _fds: (OwnedFd, TcpListener),
    }

    impl Relay {
        fn new(
            cli: &Cli,
            me: usize,
            shared: Arc<Shared>,
            ep: OwnedFd,
            listener: TcpListener,
        ) -> Relay {
            let (to, to_len) = sockaddr(&cli.to);
            let family = if cli.to.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            Relay {
                ep: ep.as_raw_fd(),
                lfd: listener.as_raw_fd(),
                to,
                to_len,
                family,
                upstream_nodelay: cli.upstream_nodelay,
                report_every: cli.report_every,
                splice: cli.splice.then_some(cli.pipe_bytes),
                slab: Vec::new(),
                free: Vec::new(),
                me,
                shared,
                _fds: (ep, listener),
            }
        }

        fn stats(&self) -> &Counters {
            &self.shared.loops[self.me]
        }

        /// Reads pending signals; true when the relay should exit.
        fn signals(&self, fd: RawFd) -> Result<bool> {
            let mut exit = false;
            loop {
                // SAFETY: signalfd_siginfo is plain old data, all-zero is a valid value.
                let mut si: libc::signalfd_siginfo = unsafe { zeroed() };
                let len = size_of::<libc::signalfd_siginfo>();
                // SAFETY: si is valid for len bytes.
                let r = unsafe { libc::read(fd, (&raw mut si).cast(), len) };
                match cvt(r) {
                    Ok(_) if si.ssi_signo == libc::SIGUSR1 as u32 => self.shared.report("usr1"),
                    Ok(_) => exit = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(exit),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("read signalfd"),
                }
            }
        }

        fn accept_batch(&mut self) {
            for _ in 0..ACCEPT_BATCH {
                let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
                let (addr, len) = (std::ptr::null_mut(), std::ptr::null_mut());
                // SAFETY: accept4 on our listener; null address pointers are allowed.
                let fd = unsafe { libc::accept4(self.lfd, addr, len, flags) };
                if fd < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => return,
                        Some(libc::EINTR | libc::ECONNABORTED) => continue,
                        _ => {
                            // Out of fds or memory: say so, and let the level-triggered listener
                            // bring us back here once connections have closed.
                            bump(&self.stats().accept_errors);
                            let seen = &self.shared.accept_errors_seen;
                            if seen.fetch_add(1, Ordering::Relaxed) < MAX_PRINTED {
                                eprintln!("conn_relay: {}accept4: {e}", self.at());
                            }
                            return;
                        }
                    }
                }
                let id = bump(&self.stats().accepted);
                if let Err(f) = self.open_conn(id, fd) {
                    self.note_failure(id, &f);
                }
            }
        }

        /// Connects upstream for a visitor just accepted and registers both fds.
        fn open_conn(&mut self, id: u64, vfd: RawFd) -> Result<(), Fail> {
            let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            // SAFETY: socket has no memory preconditions.
            let ufd = unsafe { libc::socket(self.family, ty, 0) };
            if ufd < 0 {
                close(vfd);
                return Err(fail("socket", UPSTREAM)(io::Error::last_os_error()));
            }
            let fds = [vfd, ufd];
            let connected = self
                .connect(ufd)
                .inspect_err(|_| fds.iter().for_each(|&f| close(f)))?;
            let slot = match self.free.pop() {
                Some(s) => s as usize,
                None => {
                    self.slab.push(Conn::empty());
                    self.slab.len() - 1
                }
            };
            let c = &mut self.slab[slot];
            c.gen = c.gen.wrapping_add(1).max(1);
            c.reset(id, fds, connected);
            let gen = c.gen;
            let stats = &self.shared.loops[self.me];
            let open = bump(&stats.open);
            if open > get(&stats.max_open) {
                stats.max_open.store(open, Ordering::Relaxed);
            }
            if let Some(size) = self.splice {
                for side in [VISITOR, UPSTREAM] {
                    match new_pipe(size) {
                        Ok(p) => self.slab[slot].dir[side].pipe = p,
                        Err(e) => {
                            self.release(slot);
                            return Err(fail("pipe", side)(e));
                        }
                    }
                }
            }
            for side in [VISITOR, UPSTREAM] {
                if let Err(e) = ep_add(self.ep, fds[side], ET, token(slot, gen, side)) {
                    self.release(slot);
                    return Err(fail("epoll_ctl", side)(e));
                }
            }
            Ok(())
        }

        /// Starts the non-blocking connect; true if it completed at once.
        fn connect(&self, ufd: RawFd) -> Result<bool, Fail> {
            if self.upstream_nodelay {
                set_int(ufd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
                    .map_err(fail("TCP_NODELAY", UPSTREAM))?;
            }
            let addr = (&raw const self.to).cast::<libc::sockaddr>();
            // SAFETY: `to` holds a valid sockaddr of `to_len` bytes.
            if unsafe { libc::connect(ufd, addr, self.to_len) } == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINPROGRESS) => Ok(false),
                _ => Err(fail("connect", UPSTREAM)(e)),
            }
        }

        fn on_event(&mut self, token: u64, events: u32) {
            let (slot, gen, side) = untoken(token);
            let Some(c) = self.slab.get_mut(slot) else {
                return;
            };
            if c.gen != gen || gen == 0 {
                return; // An event for a connection closed earlier in this batch.
            }
            let has = |m: libc::c_int| events & m as u32 != 0;
            let (hup, err) = (has(libc::EPOLLHUP), has(libc::EPOLLERR));
            c.rd[side] |= has(libc::EPOLLIN | libc::EPOLLRDHUP) || hup || err;
            c.wr[side] |= has(libc::EPOLLOUT) || hup || err;
            c.rdhup[side] |= has(libc::EPOLLRDHUP);
            c.err[side] |= err;
            if side == UPSTREAM && !c.connected {
                if err || hup {
                    let e = so_error(c.fd[UPSTREAM]);
                    let (id, f) = (c.id, fail("connect", UPSTREAM)(e));
                    self.release(slot);
                    self.note_failure(id, &f);
                    return;
                }
                c.connected = has(libc::EPOLLOUT);
            }
            if !c.connected {
                return; // The visitor's bytes wait in its socket until upstream is up.
            }
            let step = c.pump(VISITOR).and_then(|s| match s {
                Step::Open => c.pump(UPSTREAM),
                Step::Done => Ok(Step::Done),
            });
            match step {
                Ok(Step::Open) => {}
                Ok(Step::Done) => {
                    // Counted before the close that sends the last FIN (see the module doc).
                    let done = bump(&self.stats().completed);
                    self.release(slot);
                    if self.report_every > 0 && done % self.report_every == 0 {
                        self.shared.report("every");
                    }
                }
                Err(f) => {
                    let id = c.id;
                    self.release(slot);
                    self.note_failure(id, &f);
                }
            }
        }

        /// Closes both fds of a slot (which also removes them from the epoll set) and frees it.
        fn release(&mut self, slot: usize) {
            let c = &mut self.slab[slot];
            for fd in c.fd {
                close(fd);
            }
            c.fd = [-1, -1];
            for d in &mut c.dir {
                for fd in d.pipe {
                    close(fd);
                }
                (d.pipe, d.piped) = ([-1, -1], 0);
            }
            let open_slot = c.gen != 0;
            c.gen = c.gen.wrapping_add(1).max(1);
            self.free.push(slot as u32);
            if open_slot {
                let open = &self.stats().open;
                open.store(get(open).saturating_sub(1), Ordering::Relaxed);
            }
        }

        fn note_failure(&mut self, id: u64, f: &Fail) {
            bump(&self.stats().failed);
            let seen = self.shared.failures_seen.fetch_add(1, Ordering::Relaxed) + 1;
            if seen <= MAX_PRINTED {
                eprintln!(
                    "conn_relay: {}connection {id}: {} ({}): {}",
                    self.at(),
                    f.op,
                    SIDE[f.side],
                    f.err
                );
                if seen == MAX_PRINTED {
                    eprintln!("conn_relay: further failures are only counted");
                }
            }
        }

        /// "thread N: " in messages when there are several loops (connection ids are per loop).
        fn at(&self) -> String {
            match self.shared.loops.len() {
                1 => String::new(),
                _ => format!("thread {}: ", self.me),
            }
        }
    }

    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// Adds one to a counter that only the calling loop writes; returns the new value.
    fn bump(a: &AtomicU64) -> u64 {
        let v = get(a) + 1;
        a.store(v, Ordering::Relaxed);
        v
    }

    impl Conn {
        fn empty() -> Conn {
            let dir = || Dir {
                buf: [0; BUF],
                start: 0,
                end: 0,
                eof: false,
                shut: false,
                pipe: [-1, -1],
                piped: 0,
            };
            Conn {
                gen: 0,
                id: 0,
                fd: [-1, -1],
                connected: false,
                rd: [false; 2],
                wr: [false; 2],
                rdhup: [false; 2],
                err: [false; 2],
                dir: [dir(), dir()],
            }
        }

        fn reset(&mut self, id: u64, fd: [RawFd; 2], connected: bool) {
            (self.id, self.fd, self.connected) = (id, fd, connected);
            (self.rd, self.wr, self.rdhup, self.err) =
                ([false; 2], [false; 2], [false; 2], [false; 2]);
            for d in &mut self.dir {
                (d.start, d.end, d.eof, d.shut) = (0, 0, false, false);
            }
        }

        /// Moves side `src`'s bytes to the other side until one of them would block; passes the
        /// EOF on. `Done` when both directions have ended (the caller closes both fds, and that
        /// close sends the last FIN).
        fn pump(&mut self, src: usize) -> Result<Step, Fail> {
            if self.dir[src].pipe[0] >= 0 {
                return self.pump_splice(src);
            }
            let dst = 1 - src;
            let other_done = self.dir[dst].shut;
            let d = &mut self.dir[src];
            loop {
                if d.start < d.end {
                    if !self.wr[dst] {
                        return Ok(Step::Open);
                    }
                    let (p, len) = (d.buf[d.start..].as_ptr(), d.end - d.start);
                    // SAFETY: p is valid for len initialised bytes of the buffer.
                    let r = unsafe { libc::send(self.fd[dst], p.cast(), len, libc::MSG_NOSIGNAL) };
                    match cvt(r) {
                        Ok(n) => d.start += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wr[dst] = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(fail("send", dst)(e)),
                    }
                    if d.start == d.end {
                        (d.start, d.end) = (0, 0);
                    }
                    continue;
                }
                if d.eof {
                    return d.pass_eof(other_done, self.fd[dst], dst);
                }
                if !self.rd[src] {
                    return Ok(Step::Open);
                }
                let p = d.buf.as_mut_ptr();
                // SAFETY: p is valid for BUF writable bytes.
                match cvt(unsafe { libc::recv(self.fd[src], p.cast(), BUF, 0) }) {
                    Ok(0) => d.eof = true,
                    Ok(n) => {
                        d.end = n;
                        if n < BUF {
                            // Short read: the socket is empty now. If its FIN had already been
                            // seen (and no error), nothing more can come: that was the EOF.
                            self.rd[src] = false;
                            d.eof = self.rdhup[src] && !self.err[src];
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.rd[src] = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(fail("recv", src)(e)),
                }
            }
        }
    }

    impl Dir {
        /// The source's EOF has been read and every byte before it sent: pass it on once
        /// (`shutdown(SHUT_WR)` of the destination `dst_fd`, side `dst`), or report the
        /// connection done when the other direction had already ended (the caller's close then
        /// sends the FIN).
        fn pass_eof(&mut self, other_done: bool, dst_fd: RawFd, dst: usize) -> Result<Step, Fail> {
            if self.shut {
                return Ok(Step::Open);
            }
            self.shut = true;
            if other_done {
                return Ok(Step::Done);
            }
            // SAFETY: shutdown on an fd this connection owns.
            let r = unsafe { libc::shutdown(dst_fd, libc::SHUT_WR) };
            cvt(r as isize).map_err(fail("shutdown", dst))?;
            Ok(Step::Open)
        }
    }

    impl Conn {
        /// `pump` with `--splice`: side `src` -> its pipe -> the other side, the pipe emptied
        /// before the source is read again; the source is read until `EAGAIN`.
        fn pump_splice(&mut self, src: usize) -> Result<Step, Fail> {
            let dst = 1 - src;
            let other_done = self.dir[dst].shut;
            let d = &mut self.dir[src];
            let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
            loop {
                if d.piped > 0 {
                    if !self.wr[dst] {
                        return Ok(Step::Open);
                    }
                    match splice(d.pipe[0], self.fd[dst], d.piped, flags) {
                        Ok(n) => d.piped -= n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wr[dst] = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(fail("splice to", dst)(e)),
                    }
                    continue;
                }
                if d.eof {
                    return d.pass_eof(other_done, self.fd[dst], dst);
                }
                if !self.rd[src] {
                    return Ok(Step::Open);
                }
                // The pipe is empty here, so EAGAIN means the socket is.
                match splice(self.fd[src], d.pipe[1], 1 << 30, flags) {
                    Ok(0) => d.eof = true,
                    Ok(n) => d.piped = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.rd[src] = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(fail("splice from", src)(e)),
                }
            }
        }
    }

    /// Non-blocking splice(2) of up to `len` bytes between two fds (one of them a pipe).
    fn splice(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
        let null = std::ptr::null_mut();
        // SAFETY: both fds belong to the connection; null offsets (streams), no memory passed.
        cvt(unsafe { libc::splice(from, null, to, null, len, flags) })
    }

    /// A non-blocking pipe (read end, write end) with `size` bytes of capacity asked for.
    fn new_pipe(size: usize) -> io::Result<[RawFd; 2]> {
        let mut p = [-1 as libc::c_int; 2];
        // SAFETY: p is a valid out-parameter of two c_ints.
        cvt(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } as isize)?;
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on the pipe just created. A refusal (above fs.pipe-max-size without
        // CAP_SYS_RESOURCE) leaves the default capacity: still a working pipe.
        unsafe { libc::fcntl(p[1], libc::F_SETPIPE_SZ, size) };
        Ok(p)
    }

    /// Stdout carries only the JSON reports; messages go to stderr.
    #[allow(clippy::print_stdout)]
    fn emit(s: &str) {
        println!("{s}");
    }

    /// Epoll data of a connection side: generation (32 bits), slot (31 bits), side (1 bit). The
    /// generation of a used slot is never 0, so tokens 0 and 1 are free for listener and signals.
    fn token(slot: usize, gen: u32, side: usize) -> u64 {
        (u64::from(gen) << 32) | ((slot as u64) << 1) | side as u64
    }

    fn untoken(t: u64) -> (usize, u32, usize) {
        (
            ((t & 0xffff_ffff) >> 1) as usize,
            (t >> 32) as u32,
            (t & 1) as usize,
        )
    }

    /// Blocks SIGTERM, SIGINT and SIGUSR1 and returns a non-blocking signalfd for them.
    fn signal_fd() -> io::Result<OwnedFd> {
        // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { zeroed() };
        // SAFETY: set is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: set is initialised. Called before any other thread starts, so every thread
        // inherits this mask.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let flags = libc::SFD_NONBLOCK | libc::SFD_CLOEXEC;
        // SAFETY: -1 asks for a new signalfd; set is initialised.
        let fd = cvt(unsafe { libc::signalfd(-1, &set, flags) } as isize)?;
        // SAFETY: signalfd returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// A non-blocking listener on `addr` with TCP_NODELAY (accepted sockets inherit it) and
    /// SO_REUSEADDR (as std's bind: TIME_WAIT leftovers on the port do not block it); with
    /// `reuseport`, SO_REUSEPORT too, so every loop binds the same address with its own accept
    /// queue and the kernel spreads new connections across them.
    fn listener(addr: SocketAddr, reuseport: bool) -> Result<TcpListener> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: socket has no memory preconditions.
        let fd = cvt(unsafe { libc::socket(family, ty, 0) } as isize).context("socket")?;
        // SAFETY: socket returned a new fd that nothing else owns.
        let listener = unsafe { TcpListener::from_raw_fd(fd as RawFd) };
        let lfd = listener.as_raw_fd();
        set_int(lfd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).context("SO_REUSEADDR")?;
        if reuseport {
            set_int(lfd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1).context("SO_REUSEPORT")?;
        }
        set_int(lfd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).context("TCP_NODELAY")?;
        let (ss, len) = sockaddr(&addr);
        // SAFETY: ss holds a valid sockaddr of `len` bytes.
        let r = unsafe { libc::bind(lfd, (&raw const ss).cast(), len) };
        cvt(r as isize).with_context(|| format!("bind {addr}"))?;
        // SAFETY: listen on a bound socket we own.
        cvt(unsafe { libc::listen(lfd, BACKLOG) } as isize).context("listen")?;
        Ok(listener)
    }

    /// The CPUs this process may run on, in increasing order.
    fn allowed_cpus() -> io::Result<Vec<usize>> {
        // SAFETY: cpu_set_t is plain old data, all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { zeroed() };
        let len = size_of::<libc::cpu_set_t>();
        // SAFETY: set is a valid out-parameter of `len` bytes; pid 0 is the calling thread.
        cvt(unsafe { libc::sched_getaffinity(0, len, &mut set) } as isize)?;
        let cpus = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET reads the set; every index is below CPU_SETSIZE.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect();
        Ok(cpus)
    }

    /// Pins the calling thread to one CPU.
    fn pin(cpu: usize) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain old data, all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { zeroed() };
        // SAFETY: cpu came from allowed_cpus, so it is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        let len = size_of::<libc::cpu_set_t>();
        // SAFETY: set is initialised and `len` bytes long; pid 0 is the calling thread.
        cvt(unsafe { libc::sched_setaffinity(0, len, &set) } as isize).map(drop)
    }

    fn close(fd: RawFd) {
        if fd >= 0 {
            // SAFETY: the fd belongs to a connection being torn down; nothing uses it afterwards.
            unsafe { libc::close(fd) };
        }
    }
}
