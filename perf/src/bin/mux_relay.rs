//! `mux_relay`: the cheapest multiplexed two-process TCP tunnel this crate knows how to write, to
//! measure the least CPU any tunnel that carries visitor connections as streams of one session
//! between a server process and a client process spends per connection (as `conn_relay` is the
//! floor of a one-process relay). See perf/README.md (mux_relay).
//!
//! `mux_relay --listen 127.0.0.1:P --to 127.0.0.1:Q [--sessions N]` binds the public listener P
//! and a session listener on 127.0.0.1:0, then starts itself again as a second OS process (the
//! "client": `--role client --server <session listener> --to Q`, hidden options), which dials the
//! session listener N times (default 1) and connects to Q once per stream. The first process (the
//! "server") accepts visitors on P, gives each a stream id and carries it over a session (several
//! sessions: new streams take them in turn). Each process is one thread with one edge-triggered
//! epoll set; no tokio, no flow control beyond TCP's, no authentication (the session listener
//! takes the first N connections to it).
//!
//! Framing: every frame starts with the same 8-byte header
//!
//! ```text
//!   byte 0     kind: OPEN = 1, DATA = 2, FIN = 3, RST = 4
//!   bytes 1-3  payload length, u24 big-endian (DATA only; 0 for the others)
//!   bytes 4-7  stream id, u32 big-endian
//! ```
//!
//! followed, for DATA, by that many payload bytes (at most 64 KiB here: one `recv`). OPEN goes
//! server -> client (connect to Q for this id); DATA both ways; FIN ends one direction (the
//! receiver passes it on as `shutdown(SHUT_WR)` of its local socket once that socket has taken
//! every byte queued for it); RST aborts the stream (the receiver closes its local socket with
//! `SO_LINGER` 0, so the visitor or backend sees a reset, not a clean end). A stream is freed on
//! each side when both directions have ended there (it read its local socket's EOF and sent FIN,
//! and it received FIN and passed it on; the last of the two is the `close`, which sends the FIN:
//! no `shutdown` then), or on RST. Stream ids are assigned by the server in increasing order
//! (wrapping; an id still in use is skipped), and each side maps them to its slots with a hash
//! map, so an id comes back only after 2^32 streams, not while the other side may still hold it.
//!
//! Per batch of events (one `epoll_wait`), each process appends every frame it produces for a
//! session to that session's output buffer and sends the buffer once, at the end of the batch
//! (partial writes and `EAGAIN` wait for the session's next `EPOLLOUT` edge). A visitor's first
//! bytes are read right after `accept4`, before its fd is added to the epoll set, so they leave
//! in the same session write as its OPEN (as warren's server does). Reading a session: `recv`
//! into a 256 KiB buffer, parse every complete frame, keep a partial one for the next read.
//!
//! Local sockets (visitors on the server, backend connections on the client): non-blocking,
//! registered once, edge-triggered for `EPOLLIN|EPOLLOUT|EPOLLRDHUP` (nothing is ever re-armed),
//! read with `recv` of up to 64 KiB straight into the session output behind a DATA header (no
//! intermediate copy), with conn_relay's short-read rule: a `recv` shorter than asked means the
//! socket is empty, and if the peer's FIN had already been reported that was its EOF. DATA for a
//! local socket is sent at once; what the socket does not take is queued on the stream and sent
//! on its next `EPOLLOUT` edge. On the client, OPEN starts a non-blocking `connect`; DATA that
//! arrives before it completes is queued; a failed connect sends RST.
//!
//! Memory: this is a floor, not a product, but big transfers must not balloon. A session's output
//! buffer stops the reading of local sockets while it holds 1 MiB or more (they resume once the
//! session has taken it), and a stream whose queue for its local socket exceeds 1 MiB stops the
//! reading of its whole session until the queue has drained: TCP's own flow control on the
//! session then pushes back to the peer. That second rule is head-of-line blocking (one slow
//! reader stalls every stream of its session; warren has per-stream windows instead), fine for
//! independent streams like the load tool's. Memory is then bounded per stream (about 1 MiB of
//! queue) and per session (about 1 MiB of output plus its 256 KiB input), but not in total: there
//! is no limit on the number of streams, so many visitors at once can still use a lot.
//!
//! Reports, as `conn_relay`'s: JSON lines on stdout, one when ready, one per `SIGUSR1`, a last
//! one at `SIGTERM`/`SIGINT` (exit 0); messages on stderr. CPU covers both processes: the server's
//! `getrusage(RUSAGE_SELF)` plus the client's, which the client reports over a control socket (its
//! stdin/stdout, a Unix socket pair) when the server asks for a report, and at exit the client's
//! exact total from `wait4`. `cpu_s`, `user_s`, `sys_s`, `nvcsw`, `nivcsw` are the sums of the
//! two; `server_*` and `client_*` give each process's own. The client dies with the server
//! (`PR_SET_PDEATHSIG`), ignores SIGINT and SIGUSR1 (Ctrl-C in a terminal reaches the whole
//! process group; the server decides), and is stopped and reaped by the server on SIGTERM/SIGINT
//! (the server closes the control socket; the client answers with its last counters and exits).
//! A session that ends or fails ends both processes (exit 1): there is no reconnection.
//!
//! `--tls` runs every session over TLS 1.3 (rustls's buffered API, ring, AES-128-GCM: the
//! provider and the suite two warren peers negotiate), the floor of a TLS-multiplexed tunnel. The server makes a self-signed
//! certificate at start and hands it to the client process on its command line (the client
//! trusts exactly that one); each session's handshake runs on the blocking socket before the
//! event loop, with no session tickets. Reading a session: `recv` into the 256 KiB buffer as in
//! plain mode, fed to `read_tls` + `process_new_packets`, the plaintext copied into the frame
//! input. Writing: the batch's frames go to `writer()` (encrypted into records) once rustls has
//! sent its previous records, and `write_tls` sends them with `writev` until `EAGAIN`.

// Raw epoll, signalfd, accept4, socket, connect, recv/send, prctl, wait4 and getrusage are all FFI
// calls that need `unsafe`, which the workspace denies by default.
#![allow(unsafe_code)]

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("mux_relay: Linux only (epoll, signalfd, accept4, prctl)");
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
    use std::collections::HashMap;
    use std::io;
    use std::mem::{size_of, take, zeroed};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, ExitCode, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use clap::{Parser, ValueEnum};
    use serde_json::{json, Value};
    use warren_perf::clock::now;

    /// Frame header bytes (every kind).
    const HDR: usize = 8;
    const OPEN: u8 = 1;
    const DATA: u8 = 2;
    const FIN: u8 = 3;
    const RST: u8 = 4;
    /// Most bytes one `recv` of a local socket takes: one DATA frame's payload.
    const CHUNK: usize = 64 << 10;
    /// A session's input buffer (a partial frame is kept and completed by the next read).
    const SESSION_IN: usize = 256 << 10;
    /// Local sockets are not read while their session's output holds this much.
    const OUT_HIGH: usize = 1 << 20;
    /// A session is not read while one of its streams has this much queued for its local socket.
    const WQ_HIGH: usize = 1 << 20;
    /// Listen backlog (capped by net.core.somaxconn).
    const BACKLOG: libc::c_int = 4096;
    /// Most visitors accepted per listener wake-up before looking at other events.
    const ACCEPT_BATCH: usize = 64;
    /// Events taken per epoll_wait.
    const EVENTS: usize = 256;
    /// Failures printed on stderr (per process); later ones are only counted.
    const MAX_PRINTED: u64 = 20;
    /// How long the server waits for the client: its sessions at start, a report, its exit.
    const CHILD_TIMEOUT: Duration = Duration::from_secs(10);
    /// Tokens of the fds that are not streams (stream tokens carry a generation >= 1 in their
    /// upper 32 bits); session i has TOKEN_SESSION + i.
    const TOKEN_LISTENER: u64 = 0;
    const TOKEN_SIGNAL: u64 = 1;
    const TOKEN_CTRL: u64 = 2;
    const TOKEN_SESSION: u64 = 16;
    const ET: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

    /// Minimal multiplexed two-process TCP tunnel (server + client process, one session by
    /// default) that reports both processes' CPU per connection.
    #[derive(Debug, Parser)]
    #[command(about)]
    struct Cli {
        /// Address visitors connect to (the server process's public listener).
        #[arg(long, required_unless_present = "role")]
        listen: Option<SocketAddr>,
        /// Address the client process connects each stream to.
        #[arg(long)]
        to: SocketAddr,
        /// Sessions between the two processes; new streams take them in turn.
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        /// Print a report line every N completed connections (0: only on SIGUSR1 and at exit).
        #[arg(long, default_value_t = 0)]
        report_every: u64,
        /// Internal: the role of this process (the server starts the client itself).
        #[arg(long, hide = true, value_enum)]
        role: Option<Role>,
        /// Internal (client): the server's session listener.
        #[arg(long, hide = true)]
        server: Option<SocketAddr>,
        /// Run the sessions over TLS 1.3 (rustls, AES-128-GCM), as warren's `transport = "tls"`.
        #[arg(long)]
        tls: bool,
        /// Internal (client, with --tls): the server's certificate, DER in hex.
        #[arg(long, hide = true)]
        tls_cert: Option<String>,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
    enum Role {
        Client,
    }

    pub fn main() -> ExitCode {
        let cli = Cli::parse();
        let (who, r) = match cli.role {
            Some(Role::Client) => ("mux_relay (client)", run_client(&cli)),
            None => ("mux_relay", run_server(&cli)),
        };
        match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{who}: FAILED: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    // ------------------------------------------------------------------------------ processes

    fn run_server(cli: &Cli) -> Result<()> {
        ensure!(cli.sessions >= 1, "--sessions must be at least 1");
        let listen = cli.listen.context("--listen is required")?;
        // First: the client is started after this, and reports must never come from a handler.
        let sig = signal_fd().context("signalfd")?;
        let public = listener(listen)?;
        let addr = public.local_addr().context("getsockname")?;
        let session_listener = TcpListener::bind("127.0.0.1:0").context("bind session listener")?;
        let session_addr = session_listener.local_addr().context("getsockname")?;
        let tls = cli.tls.then(tls::server).transpose()?;
        let cert = tls.as_ref().map(|(_, der)| tls::hex(der));
        let mut child = ChildLink::spawn(cli, session_addr, cert.as_deref())?;
        let mut sessions = Vec::with_capacity(cli.sessions);
        for i in 0..cli.sessions {
            let mut s = child
                .accept(&session_listener)
                .with_context(|| format!("session {i} from the client process"))?;
            let conn = tls
                .as_ref()
                .map(|(cfg, _)| tls::server_session(cfg, &mut s, i))
                .transpose()?;
            sessions.push((s, conn));
        }
        drop(session_listener);
        let ep = epoll()?;
        ep_add(
            ep.as_raw_fd(),
            public.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_LISTENER,
        )
        .context("epoll add")?;
        ep_add(
            ep.as_raw_fd(),
            sig.as_raw_fd(),
            libc::EPOLLIN as u32,
            TOKEN_SIGNAL,
        )
        .context("epoll add")?;
        let pid = child.pid;
        let mut mux = Mux::new(ep, sessions, None)?;
        mux.server = Some(Server {
            lfd: public.as_raw_fd(),
            sig: sig.as_raw_fd(),
            child,
            next_id: 0,
            rr: 0,
            report_every: cli.report_every,
            accept_errors: 0,
        });
        eprintln!(
            "mux_relay: relaying {addr} -> {} over {} session(s) to client process {pid} (epoll, \
             edge-triggered, one thread per process); SIGUSR1 prints a report, SIGTERM/SIGINT a \
             final one and exit",
            cli.to, cli.sessions
        );
        mux.report("ready")?;
        mux.serve()?;
        mux.report("exit")?;
        drop(public);
        Ok(())
    }

    fn run_client(cli: &Cli) -> Result<()> {
        let server = cli
            .server
            .context("--server is required with --role client")?;
        // The server blocked these before starting us (the mask survives exec): take them back,
        // and leave SIGINT and SIGUSR1 to the server (a terminal's Ctrl-C reaches both).
        // SAFETY: sigset_t is plain old data; sigemptyset initialises it; the calls have no
        // other preconditions.
        unsafe {
            let mut set: libc::sigset_t = zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGUSR1, libc::SIG_IGN);
        }
        let mut sessions = Vec::with_capacity(cli.sessions);
        let tls = match (cli.tls, cli.tls_cert.as_deref()) {
            (true, Some(cert)) => Some(tls::client(cert)?),
            (true, None) => bail!("--tls needs --tls-cert in the client role"),
            (false, _) => None,
        };
        for i in 0..cli.sessions {
            let mut s = TcpStream::connect(server)
                .with_context(|| format!("session {i}: connect {server}"))?;
            let conn = tls
                .as_ref()
                .map(|cfg| tls::client_session(cfg, &mut s, i))
                .transpose()?;
            sessions.push((s, conn));
        }
        let ep = epoll()?;
        // The control socket is our stdin (and stdout); read with MSG_DONTWAIT.
        ep_add(
            ep.as_raw_fd(),
            0,
            libc::EPOLLIN as u32 | libc::EPOLLET as u32,
            TOKEN_CTRL,
        )
        .context("epoll add control socket")?;
        let mut mux = Mux::new(ep, sessions, Some(&cli.to))?;
        mux.serve()?;
        // The server closed the control socket: our last counters, then exit.
        client_reply(&mux, "exit");
        Ok(())
    }

    /// The server's handle on the client process: its pid and the control socket.
    #[derive(Debug)]
    struct ChildLink {
        pid: libc::pid_t,
        ctrl: OwnedFd,
        /// The client's exit status and rusage once reaped.
        reaped: Option<(libc::c_int, libc::rusage)>,
    }

    impl ChildLink {
        fn spawn(cli: &Cli, session_addr: SocketAddr, tls_cert: Option<&str>) -> Result<ChildLink> {
            let mut fds = [-1 as libc::c_int; 2];
            let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
            // SAFETY: fds is a valid out-parameter of two c_ints.
            cvt(unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) } as isize)
                .context("socketpair")?;
            // SAFETY: socketpair returned two new fds that nothing else owns.
            let (ours, theirs) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let theirs_out = theirs.try_clone().context("dup")?;
            let exe = std::env::current_exe().context("current_exe")?;
            // SAFETY: getpid has no preconditions.
            let parent = unsafe { libc::getpid() };
            let mut cmd = Command::new(exe);
            cmd.args(["--role", "client", "--server", &session_addr.to_string()])
                .args([
                    "--to",
                    &cli.to.to_string(),
                    "--sessions",
                    &cli.sessions.to_string(),
                ])
                .args(tls_cert.map_or(vec![], |c| vec!["--tls", "--tls-cert", c]))
                .stdin(Stdio::from(theirs))
                .stdout(Stdio::from(theirs_out))
                .stderr(Stdio::inherit());
            // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
            // calls (prctl, getppid).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The server may have died before the prctl: then nobody would kill us.
                    if libc::getppid() != parent {
                        return Err(io::Error::other("the server process is gone"));
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().context("start the client process")?;
            let pid = child.id() as libc::pid_t;
            drop(child); // Reaped with wait4 (for its rusage), not through std.
            Ok(ChildLink {
                pid,
                ctrl: ours,
                reaped: None,
            })
        }

        /// Accepts one session, giving up when the client process exits or takes too long.
        fn accept(&mut self, l: &TcpListener) -> Result<TcpStream> {
            let deadline = now() + CHILD_TIMEOUT;
            loop {
                if poll_in(l.as_raw_fd(), 100)? {
                    let (s, _) = l.accept().context("accept")?;
                    return Ok(s);
                }
                if let Some((status, _)) = self.try_reap()? {
                    bail!("the client process exited ({})", describe_status(status));
                }
                ensure!(
                    now() < deadline,
                    "no session from the client process within {CHILD_TIMEOUT:?}"
                );
            }
        }

        /// The client's report: one JSON line for each request byte.
        fn request(&mut self) -> Result<Value> {
            let r = b"r";
            // SAFETY: r is valid for 1 byte.
            let n = unsafe {
                libc::send(
                    self.ctrl.as_raw_fd(),
                    r.as_ptr().cast(),
                    1,
                    libc::MSG_NOSIGNAL,
                )
            };
            cvt(n).context("ask the client process for a report")?;
            self.read_line()
        }

        /// Ends the client: closes our side of the control socket (the client answers with its
        /// last counters and exits), reaps it, and returns those counters (None if it did not
        /// answer in time: then it is killed) and its exact total rusage.
        fn finish(&mut self) -> Result<(Option<Value>, libc::rusage)> {
            // SAFETY: shutdown of the control socket we own.
            unsafe { libc::shutdown(self.ctrl.as_raw_fd(), libc::SHUT_WR) };
            let last = match self.read_line() {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("mux_relay: client process: {e:#}; killing it");
                    self.kill();
                    None
                }
            };
            let (status, ru) = self.reap()?;
            if last.is_some() && status != 0 {
                eprintln!(
                    "mux_relay: client process ended with {}",
                    describe_status(status)
                );
            }
            Ok((last, ru))
        }

        fn read_line(&mut self) -> Result<Value> {
            let deadline = now() + CHILD_TIMEOUT;
            let mut line = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                if let Some(i) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(i);
                    return serde_json::from_slice(&line).context("client report");
                }
                let left = deadline.saturating_duration_since(now());
                ensure!(
                    !left.is_zero(),
                    "no report from the client process within {CHILD_TIMEOUT:?}"
                );
                if !poll_in(self.ctrl.as_raw_fd(), left.as_millis() as libc::c_int + 1)? {
                    continue;
                }
                // SAFETY: buf is valid for its length.
                let n = unsafe {
                    libc::recv(self.ctrl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                match cvt(n) {
                    Ok(0) => bail!("the client process closed its control socket"),
                    Ok(n) => line.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("read the client's report"),
                }
            }
        }

        fn kill(&self) {
            if self.reaped.is_none() {
                // SAFETY: kill of our own child, not yet reaped (so its pid is still ours).
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
        }

        fn try_reap(&mut self) -> Result<Option<(libc::c_int, libc::rusage)>> {
            self.wait(libc::WNOHANG)
        }

        fn reap(&mut self) -> Result<(libc::c_int, libc::rusage)> {
            Ok(self.wait(0)?.expect("a blocking wait4 returns the child"))
        }

        fn wait(&mut self, flags: libc::c_int) -> Result<Option<(libc::c_int, libc::rusage)>> {
            if let Some(r) = self.reaped {
                return Ok(Some(r));
            }
            let mut status = 0;
            // SAFETY: rusage is plain old data, all-zero is a valid value.
            let mut ru: libc::rusage = unsafe { zeroed() };
            loop {
                // SAFETY: status and ru are valid out-parameters.
                let r = unsafe { libc::wait4(self.pid, &mut status, flags, &mut ru) };
                match cvt(r as isize) {
                    Ok(0) => return Ok(None),
                    Ok(_) => {
                        self.reaped = Some((status, ru));
                        return Ok(self.reaped);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("wait4 client process"),
                }
            }
        }
    }

    impl Drop for ChildLink {
        /// On any way out of the server, the client goes too.
        fn drop(&mut self) {
            if self.reaped.is_none() {
                self.kill();
                let _ = self.reap();
            }
        }
    }

    fn describe_status(status: libc::c_int) -> String {
        if libc::WIFEXITED(status) {
            format!("exit status {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("signal {}", libc::WTERMSIG(status))
        } else {
            format!("wait status {status}")
        }
    }

    /// The client's answer to a report request: its counters and its own CPU.
    fn client_reply(mux: &Mux, event: &str) {
        let ru = rusage_self();
        let c = &mux.counters;
        let line = json!({
            "event": event, "opened": c.accepted, "completed": c.completed, "failed": c.failed,
            "open": c.open, "max_open": c.max_open,
            "user_s": secs(ru.ru_utime), "sys_s": secs(ru.ru_stime),
            "nvcsw": ru.ru_nvcsw, "nivcsw": ru.ru_nivcsw,
        })
        .to_string()
            + "\n";
        let mut b = line.as_bytes();
        while !b.is_empty() {
            // SAFETY: b is valid for its length; fd 1 is the control socket.
            let n = unsafe { libc::send(1, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
            match cvt(n) {
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // The server is gone; so are we, soon.
            }
        }
    }

    // --------------------------------------------------------------------------- the data plane

    /// One stream: a local socket (visitor or backend connection) and its state.
    #[derive(Debug)]
    struct Stream {
        /// 0 while the slot is free; bumped on every use and every release, so stale events and
        /// stale entries of a session's paused list are recognised.
        gen: u32,
        id: u32,
        fd: RawFd,
        sess: usize,
        /// The local socket is connected (always on the server; on the client once the
        /// non-blocking connect has completed).
        connected: bool,
        /// Edge-triggered readiness as last seen: readable, writable, peer's FIN seen, error seen.
        rd: bool,
        wr: bool,
        rdhup: bool,
        err: bool,
        /// The local socket's EOF has been read and FIN framed.
        eof_sent: bool,
        /// The other side's FIN has arrived.
        fin_in: bool,
        /// That FIN has been passed on (the queue had drained).
        shut: bool,
        /// In its session's paused list (waiting for the session output to drain).
        paused: bool,
        /// Counted in its session's `over_high`.
        over: bool,
        /// DATA the local socket has not taken yet, from `wpos`.
        wq: Vec<u8>,
        wpos: usize,
    }

    /// One session between the two processes.
    #[derive(Debug)]
    struct Session {
        fd: RawFd,
        rd: bool,
        wr: bool,
        /// Received bytes; `start..end` not yet parsed (a partial frame at most, between reads).
        inb: Vec<u8>,
        start: usize,
        end: usize,
        /// Frames for the other side, sent from `out_pos` at the end of the batch.
        out: Vec<u8>,
        out_pos: usize,
        /// Streams that stopped reading their local socket because `out` was full.
        paused: Vec<(usize, u32)>,
        /// Streams with more than WQ_HIGH queued; the session is not read while there are any.
        over_high: usize,
        accepted: u64,
        completed: u64,
        /// `--tls`: the session's rustls connection; `inb` then holds plaintext, and `cipher`
        /// the records received and not yet given to rustls.
        tls: Option<Box<rustls::Connection>>,
        cipher: Vec<u8>,
        cipher_at: usize,
        cipher_len: usize,
        _sock: TcpStream,
    }

    impl Session {
        fn pending(&self) -> usize {
            self.out.len() - self.out_pos
        }

        /// Worth reading: the socket may have bytes, or (TLS) received bytes wait in rustls.
        fn readable(&mut self) -> bool {
            self.rd || (self.tls.is_some() && tls::pending_input(self))
        }
    }

    /// Counters of one process. Server: visitors accepted, completed, failed. Client: streams
    /// opened (OPEN frames), completed, failed.
    #[derive(Debug, Default)]
    struct Counters {
        accepted: u64,
        completed: u64,
        failed: u64,
        open: u64,
        max_open: u64,
    }

    /// What only the server has.
    #[derive(Debug)]
    struct Server {
        lfd: RawFd,
        sig: RawFd,
        child: ChildLink,
        next_id: u32,
        rr: usize,
        report_every: u64,
        accept_errors: u64,
    }

    /// One process's event loop (server or client).
    #[derive(Debug)]
    struct Mux {
        ep: OwnedFd,
        streams: Vec<Stream>,
        free: Vec<u32>,
        ids: HashMap<u32, usize>,
        sessions: Vec<Session>,
        counters: Counters,
        failures_seen: u64,
        started: Instant,
        /// The server's part (None in the client).
        server: Option<Server>,
        /// The client's backend address (None in the server).
        to: Option<(libc::sockaddr_storage, libc::socklen_t, libc::c_int)>,
        /// A report that failed inside a step (`--report-every`); ends the loop.
        fatal: Option<anyhow::Error>,
        /// "mux_relay" or "mux_relay (client)", for messages.
        who: &'static str,
        /// "visitor" or "backend": what the local sockets are, for messages.
        local: &'static str,
    }

    /// Why a stream was aborted.
    #[derive(Debug)]
    struct Fail {
        op: &'static str,
        err: io::Error,
    }

    fn fail(op: &'static str) -> impl FnOnce(io::Error) -> Fail {
        move |err| Fail { op, err }
    }

    impl Mux {
        fn new(
            ep: OwnedFd,
            socks: Vec<(TcpStream, Option<rustls::Connection>)>,
            to: Option<&SocketAddr>,
        ) -> Result<Mux> {
            let mut sessions = Vec::with_capacity(socks.len());
            for (i, (s, tls)) in socks.into_iter().enumerate() {
                s.set_nodelay(true).context("session TCP_NODELAY")?;
                s.set_nonblocking(true).context("session O_NONBLOCK")?;
                let fd = s.as_raw_fd();
                ep_add(ep.as_raw_fd(), fd, ET, TOKEN_SESSION + i as u64)
                    .context("epoll add session")?;
                sessions.push(Session {
                    fd,
                    rd: false,
                    wr: true,
                    inb: vec![0; SESSION_IN],
                    start: 0,
                    end: 0,
                    out: Vec::with_capacity(SESSION_IN),
                    out_pos: 0,
                    paused: Vec::new(),
                    over_high: 0,
                    accepted: 0,
                    completed: 0,
                    cipher: if tls.is_some() {
                        vec![0; SESSION_IN]
                    } else {
                        Vec::new()
                    },
                    cipher_at: 0,
                    cipher_len: 0,
                    tls: tls.map(Box::new),
                    _sock: s,
                });
            }
            let to = to.map(|a| {
                let (ss, len) = sockaddr(a);
                let family = if a.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                (ss, len, family)
            });
            let client = to.is_some();
            Ok(Mux {
                ep,
                streams: Vec::new(),
                free: Vec::new(),
                ids: HashMap::new(),
                sessions,
                counters: Counters::default(),
                failures_seen: 0,
                started: now(),
                server: None,
                to,
                fatal: None,
                who: if client {
                    "mux_relay (client)"
                } else {
                    "mux_relay"
                },
                local: if client { "backend" } else { "visitor" },
            })
        }

        /// The event loop: until SIGTERM/SIGINT (server) or the control socket's EOF (client).
        fn serve(&mut self) -> Result<()> {
            // SAFETY: epoll_event is plain old data, all-zero is a valid value.
            let mut events: [libc::epoll_event; EVENTS] = unsafe { zeroed() };
            loop {
                // SAFETY: `events` is valid for EVENTS entries for the duration of the call.
                let n = unsafe {
                    libc::epoll_wait(
                        self.ep.as_raw_fd(),
                        events.as_mut_ptr(),
                        EVENTS as libc::c_int,
                        -1,
                    )
                };
                let n = match cvt(n as isize) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("epoll_wait"),
                };
                let mut exit = false;
                for ev in &events[..n] {
                    let (token, flags) = (ev.u64, ev.events);
                    match token {
                        TOKEN_LISTENER => self.accept_batch(),
                        TOKEN_SIGNAL => exit |= self.signals()?,
                        TOKEN_CTRL => exit |= self.control()?,
                        t if t >> 32 == 0 => {
                            self.session_event(t.wrapping_sub(TOKEN_SESSION) as usize, flags)?;
                        }
                        t => self.stream_event(t, flags),
                    }
                }
                self.end_batch()?;
                if let Some(e) = self.fatal.take() {
                    return Err(e);
                }
                if exit {
                    return Ok(());
                }
            }
        }

        /// Server: reads pending signals; true when it should exit.
        fn signals(&mut self) -> Result<bool> {
            let fd = self.server.as_ref().map_or(-1, |s| s.sig);
            let mut exit = false;
            loop {
                // SAFETY: signalfd_siginfo is plain old data, all-zero is a valid value.
                let mut si: libc::signalfd_siginfo = unsafe { zeroed() };
                let len = size_of::<libc::signalfd_siginfo>();
                // SAFETY: si is valid for len bytes.
                let r = unsafe { libc::read(fd, (&raw mut si).cast(), len) };
                match cvt(r) {
                    Ok(_) if si.ssi_signo == libc::SIGUSR1 as u32 => self.report("usr1")?,
                    Ok(_) => exit = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(exit),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("read signalfd"),
                }
            }
        }

        /// Client: answers report requests on the control socket; true at its EOF (exit).
        fn control(&mut self) -> Result<bool> {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: buf is valid for its length; fd 0 is the control socket.
                let r = unsafe {
                    libc::recv(0, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                };
                match cvt(r) {
                    Ok(0) => return Ok(true),
                    Ok(n) => (0..n).for_each(|_| client_reply(self, "usr1")),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("read control socket"),
                }
            }
        }

        /// Server: prints one JSON line with both processes' counters and CPU.
        fn report(&mut self, event: &str) -> Result<()> {
            let srv = self.server.as_mut().expect("reports are the server's");
            let me = rusage_self();
            let (client, cru) = if event == "exit" {
                let (last, ru) = srv.child.finish()?;
                (last.unwrap_or(Value::Null), Some(ru))
            } else {
                (srv.child.request()?, None)
            };
            let f64_of = |k: &str| client.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            let i64_of = |k: &str| client.get(k).and_then(Value::as_i64).unwrap_or(0);
            // At exit the client's CPU is wait4's (its whole life, exact); else its own report.
            let (cu, cs, cv, civ) = match &cru {
                Some(ru) => (
                    secs(ru.ru_utime),
                    secs(ru.ru_stime),
                    ru.ru_nvcsw,
                    ru.ru_nivcsw,
                ),
                None => (
                    f64_of("user_s"),
                    f64_of("sys_s"),
                    i64_of("nvcsw"),
                    i64_of("nivcsw"),
                ),
            };
            let (su, ss) = (secs(me.ru_utime), secs(me.ru_stime));
            let c = &self.counters;
            let per = |cpu: f64| (c.completed > 0).then(|| cpu * 1e6 / c.completed as f64);
            let per_session: Vec<_> = self
                .sessions
                .iter()
                .map(|s| json!({"accepted": s.accepted, "completed": s.completed}))
                .collect();
            let client_counters = json!({
                "opened": client.get("opened"), "completed": client.get("completed"),
                "failed": client.get("failed"), "open": client.get("open"),
                "max_open": client.get("max_open"),
            });
            let (cpu, scpu, ccpu) = (su + ss + cu + cs, su + ss, cu + cs);
            emit(
                &json!({
                    "event": event, "accepted": c.accepted, "completed": c.completed,
                    "failed": c.failed, "accept_errors": srv.accept_errors,
                    "open": c.open, "max_open": c.max_open,
                    "cpu_s": cpu, "user_s": su + cu, "sys_s": ss + cs,
                    "cpu_us_per_conn": per(cpu),
                    "nvcsw": me.ru_nvcsw + cv, "nivcsw": me.ru_nivcsw + civ,
                    "wall_s": self.started.elapsed().as_secs_f64(),
                    "threads": 1, "processes": 2, "sessions": self.sessions.len(),
                    "tls": self.sessions.first().is_some_and(|s| s.tls.is_some()),
                    "client_pid": srv.child.pid,
                    "server_cpu_s": scpu, "server_user_s": su, "server_sys_s": ss,
                    "server_cpu_us_per_conn": per(scpu),
                    "server_nvcsw": me.ru_nvcsw, "server_nivcsw": me.ru_nivcsw,
                    "client_cpu_s": ccpu, "client_user_s": cu, "client_sys_s": cs,
                    "client_cpu_us_per_conn": per(ccpu),
                    "client_nvcsw": cv, "client_nivcsw": civ,
                    "client": client_counters, "per_session": per_session,
                })
                .to_string(),
            );
            Ok(())
        }

        fn accept_batch(&mut self) {
            let Some(srv) = self.server.as_ref() else {
                return;
            };
            let lfd = srv.lfd;
            for _ in 0..ACCEPT_BATCH {
                let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
                let (addr, len) = (std::ptr::null_mut(), std::ptr::null_mut());
                // SAFETY: accept4 on our listener; null address pointers are allowed.
                let fd = unsafe { libc::accept4(lfd, addr, len, flags) };
                if fd < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => return,
                        Some(libc::EINTR | libc::ECONNABORTED) => continue,
                        _ => {
                            // Out of fds or memory: say so, and let the level-triggered listener
                            // bring us back here once streams have closed.
                            let srv = self.server.as_mut().expect("server");
                            srv.accept_errors += 1;
                            if srv.accept_errors <= MAX_PRINTED {
                                eprintln!("mux_relay: accept4: {e}");
                            }
                            return;
                        }
                    }
                }
                self.counters.accepted += 1;
                let srv = self.server.as_mut().expect("server");
                let sess = srv.rr;
                srv.rr = (srv.rr + 1) % self.sessions.len();
                let mut id = srv.next_id;
                loop {
                    id = id.wrapping_add(1);
                    if id != 0 && !self.ids.contains_key(&id) {
                        break;
                    }
                }
                srv.next_id = id;
                let slot = self.alloc(id, fd, sess, true);
                self.sessions[sess].accepted += 1;
                put_hdr(&mut self.sessions[sess].out, OPEN, id, 0);
                // The visitor's first bytes, if already there, leave with the OPEN. Read before
                // the fd joins the epoll set: an empty socket then brings no EPOLLIN edge.
                let gen = self.streams[slot].gen;
                self.pump_read(slot);
                if self.live(slot, gen) {
                    if let Err(e) = ep_add(self.ep.as_raw_fd(), fd, ET, token(slot, gen)) {
                        self.abort(slot, &fail("epoll_ctl")(e), true);
                    }
                }
            }
        }

        /// Client: OPEN from the server: a non-blocking connect to the backend.
        fn open_upstream(&mut self, sess: usize, id: u32) -> Result<()> {
            ensure!(
                !self.ids.contains_key(&id),
                "session {sess}: OPEN of stream {id}, which is open"
            );
            let (ss, len, family) = self.to.expect("client");
            self.counters.accepted += 1;
            self.sessions[sess].accepted += 1;
            let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            // SAFETY: socket has no memory preconditions.
            let fd = unsafe { libc::socket(family, ty, 0) };
            if fd < 0 {
                let f = fail("socket")(io::Error::last_os_error());
                self.note_failure(id, &f);
                put_hdr(&mut self.sessions[sess].out, RST, id, 0);
                return Ok(());
            }
            // SAFETY: ss holds a valid sockaddr of `len` bytes.
            let r = unsafe { libc::connect(fd, (&raw const ss).cast(), len) };
            let connected = r == 0;
            let slot = self.alloc(id, fd, sess, connected);
            let gen = self.streams[slot].gen;
            self.streams[slot].rd = false; // Nothing to read before the backend has answered.
            if !connected {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINPROGRESS) {
                    self.abort(slot, &fail("connect")(e), true);
                    return Ok(());
                }
            }
            if let Err(e) = ep_add(self.ep.as_raw_fd(), fd, ET, token(slot, gen)) {
                self.abort(slot, &fail("epoll_ctl")(e), true);
            }
            Ok(())
        }

        /// A slab entry for a new stream whose fd is `fd`.
        fn alloc(&mut self, id: u32, fd: RawFd, sess: usize, connected: bool) -> usize {
            let slot = match self.free.pop() {
                Some(s) => s as usize,
                None => {
                    self.streams.push(Stream {
                        gen: 0,
                        id: 0,
                        fd: -1,
                        sess: 0,
                        connected: false,
                        rd: false,
                        wr: false,
                        rdhup: false,
                        err: false,
                        eof_sent: false,
                        fin_in: false,
                        shut: false,
                        paused: false,
                        over: false,
                        wq: Vec::new(),
                        wpos: 0,
                    });
                    self.streams.len() - 1
                }
            };
            let st = &mut self.streams[slot];
            st.gen = st.gen.wrapping_add(1).max(1);
            (st.id, st.fd, st.sess, st.connected) = (id, fd, sess, connected);
            // A server's visitor is read at once (its first bytes) and a new socket is writable.
            (st.rd, st.wr, st.rdhup, st.err) = (connected, connected, false, false);
            (st.eof_sent, st.fin_in, st.shut, st.paused, st.over) =
                (false, false, false, false, false);
            st.wpos = 0;
            self.ids.insert(id, slot);
            let c = &mut self.counters;
            c.open += 1;
            c.max_open = c.max_open.max(c.open);
            slot
        }

        fn live(&self, slot: usize, gen: u32) -> bool {
            self.streams[slot].gen == gen
        }

        fn session_event(&mut self, i: usize, events: u32) -> Result<()> {
            ensure!(i < self.sessions.len(), "epoll: unknown token");
            let has = |m: libc::c_int| events & m as u32 != 0;
            let (hup, err) = (has(libc::EPOLLHUP), has(libc::EPOLLERR));
            let s = &mut self.sessions[i];
            s.rd |= has(libc::EPOLLIN | libc::EPOLLRDHUP) || hup || err;
            s.wr |= has(libc::EPOLLOUT) || hup || err;
            self.read_session(i) // Its output is sent at the end of the batch.
        }

        fn stream_event(&mut self, token: u64, events: u32) {
            let (slot, gen) = ((token & 0xffff_ffff) as usize, (token >> 32) as u32);
            let Some(st) = self.streams.get_mut(slot) else {
                return;
            };
            if st.gen != gen {
                return; // An event for a stream closed earlier in this batch.
            }
            let has = |m: libc::c_int| events & m as u32 != 0;
            let (hup, err) = (has(libc::EPOLLHUP), has(libc::EPOLLERR));
            st.rd |= has(libc::EPOLLIN | libc::EPOLLRDHUP) || hup || err;
            st.wr |= has(libc::EPOLLOUT) || hup || err;
            st.rdhup |= has(libc::EPOLLRDHUP);
            st.err |= err;
            if !st.connected {
                if err || hup {
                    let e = so_error(st.fd);
                    self.abort(slot, &fail("connect")(e), true);
                    return;
                }
                st.connected = has(libc::EPOLLOUT);
                if !st.connected {
                    return;
                }
            }
            self.drain(slot);
            if self.live(slot, gen) {
                self.pump_read(slot);
            }
        }

        /// Reads a session and handles every complete frame, until it is empty or one of its
        /// streams has too much queued.
        fn read_session(&mut self, i: usize) -> Result<()> {
            loop {
                let s = &mut self.sessions[i];
                if !s.readable() || s.over_high > 0 {
                    return Ok(());
                }
                if s.start > 0 {
                    s.inb.copy_within(s.start..s.end, 0);
                    (s.start, s.end) = (0, s.end - s.start);
                }
                let room = s.inb.len() - s.end;
                if s.tls.is_some() {
                    if tls::read(s, room).with_context(|| format!("session {i}: TLS"))? == 0 {
                        continue; // s.rd is false now: the socket is empty.
                    }
                    let inb = take(&mut self.sessions[i].inb);
                    let r = self.parse(i, &inb);
                    self.sessions[i].inb = inb;
                    r?;
                    continue;
                }
                // SAFETY: inb[end..] is valid for `room` writable bytes.
                let r = unsafe { libc::recv(s.fd, s.inb[s.end..].as_mut_ptr().cast(), room, 0) };
                match cvt(r) {
                    Ok(0) => bail!("session {i} closed by the other process"),
                    Ok(n) => {
                        s.end += n;
                        if n < room {
                            s.rd = false; // Short read: the socket is empty.
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        s.rd = false;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).with_context(|| format!("session {i}: recv")),
                }
                // Handle the frames with the buffer taken out, so that they may use all of self.
                let inb = take(&mut self.sessions[i].inb);
                let r = self.parse(i, &inb);
                self.sessions[i].inb = inb;
                r?;
            }
        }

        fn parse(&mut self, i: usize, inb: &[u8]) -> Result<()> {
            let (mut at, end) = (self.sessions[i].start, self.sessions[i].end);
            while end - at >= HDR {
                let h = &inb[at..at + HDR];
                let kind = h[0];
                let len = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                ensure!(HDR + len <= inb.len(), "session {i}: frame of {len} bytes");
                if end - at < HDR + len {
                    break;
                }
                let payload = &inb[at + HDR..at + HDR + len];
                at += HDR + len;
                let slot = self.ids.get(&id).copied();
                match (kind, slot) {
                    (OPEN, _) if self.to.is_some() => self.open_upstream(i, id)?,
                    (DATA, Some(slot)) => self.deliver(slot, payload),
                    (FIN, Some(slot)) => {
                        self.streams[slot].fin_in = true;
                        self.drain(slot);
                    }
                    (RST, Some(slot)) => {
                        let e = io::Error::other("reset by the other process");
                        self.abort(
                            slot,
                            &Fail {
                                op: "stream",
                                err: e,
                            },
                            false,
                        );
                    }
                    // A stream this side has aborted (its RST is on the way): drop.
                    (DATA | FIN | RST, None) => {}
                    _ => bail!("session {i}: unexpected frame kind {kind} (stream {id})"),
                }
            }
            let s = &mut self.sessions[i];
            (s.start, s.end) = if at == end { (0, 0) } else { (at, end) };
            Ok(())
        }

        /// DATA for a stream's local socket: sent at once if it can be, else queued.
        fn deliver(&mut self, slot: usize, mut data: &[u8]) {
            let st = &mut self.streams[slot];
            if st.fin_in {
                return; // The other side cannot send after its FIN; ignore rather than corrupt.
            }
            if st.connected && st.wr && st.wpos == st.wq.len() {
                while !data.is_empty() {
                    // SAFETY: data is valid for its length.
                    let r = unsafe {
                        libc::send(st.fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL)
                    };
                    match cvt(r) {
                        Ok(n) => data = &data[n..],
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            st.wr = false;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            self.abort(slot, &fail("send")(e), true);
                            return;
                        }
                    }
                }
                if data.is_empty() {
                    return;
                }
            }
            if st.wpos == st.wq.len() {
                st.wq.clear();
                st.wpos = 0;
            }
            st.wq.extend_from_slice(data);
            if !st.over && st.wq.len() - st.wpos > WQ_HIGH {
                st.over = true;
                self.sessions[st.sess].over_high += 1;
            }
        }

        /// Sends a stream's queue to its local socket; then passes the other side's FIN on.
        fn drain(&mut self, slot: usize) {
            let st = &mut self.streams[slot];
            if !st.connected {
                return;
            }
            while st.wpos < st.wq.len() {
                if !st.wr {
                    return;
                }
                let rest = &st.wq[st.wpos..];
                // SAFETY: rest is valid for its length.
                let r = unsafe {
                    libc::send(st.fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL)
                };
                match cvt(r) {
                    Ok(n) => st.wpos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.wr = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.abort(slot, &fail("send")(e), true);
                        return;
                    }
                }
            }
            st.wq.clear();
            st.wpos = 0;
            if st.wq.capacity() > 2 * WQ_HIGH {
                st.wq = Vec::new();
            }
            if st.over {
                st.over = false;
                self.sessions[st.sess].over_high -= 1; // Read again at the end of the batch.
            }
            if st.fin_in && !st.shut {
                st.shut = true;
                if st.eof_sent {
                    self.complete(slot); // Its close sends the FIN.
                    return;
                }
                // SAFETY: shutdown of a socket this stream owns.
                if let Err(e) = cvt(unsafe { libc::shutdown(st.fd, libc::SHUT_WR) } as isize) {
                    self.abort(slot, &fail("shutdown")(e), true);
                }
            }
        }

        /// Reads a stream's local socket straight into its session's output, behind DATA headers,
        /// until the socket is empty or the output is full; frames FIN at its EOF.
        fn pump_read(&mut self, slot: usize) {
            loop {
                let st = &mut self.streams[slot];
                if st.eof_sent || !st.rd || !st.connected {
                    return;
                }
                let s = &mut self.sessions[st.sess];
                if s.pending() >= OUT_HIGH {
                    if !st.paused {
                        st.paused = true;
                        s.paused.push((slot, st.gen));
                    }
                    return;
                }
                let at = s.out.len();
                put_hdr(&mut s.out, DATA, st.id, 0);
                s.out.reserve(CHUNK);
                let spare = s.out.spare_capacity_mut();
                // SAFETY: spare is valid for at least CHUNK writable bytes (reserved above).
                let r = unsafe { libc::recv(st.fd, spare.as_mut_ptr().cast(), CHUNK, 0) };
                let eof = match cvt(r) {
                    Ok(0) => true,
                    Ok(n) => {
                        // SAFETY: recv initialised the first n bytes of the spare capacity.
                        unsafe { s.out.set_len(at + HDR + n) };
                        s.out[at + 1..at + 4].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
                        if n < CHUNK {
                            // Short read: the socket is empty now. If its FIN had already been
                            // seen (and no error), nothing more can come: that was the EOF.
                            st.rd = false;
                            st.rdhup && !st.err
                        } else {
                            false
                        }
                    }
                    Err(e) => {
                        s.out.truncate(at);
                        match e.kind() {
                            io::ErrorKind::WouldBlock => st.rd = false,
                            io::ErrorKind::Interrupted => {}
                            _ => {
                                self.abort(slot, &fail("recv")(e), true);
                                return;
                            }
                        }
                        false
                    }
                };
                if eof {
                    if r == 0 {
                        s.out.truncate(at);
                    }
                    put_hdr(&mut s.out, FIN, st.id, 0);
                    st.eof_sent = true;
                    st.rd = false;
                    if st.shut {
                        self.complete(slot); // Its close sends the FIN.
                    }
                    return;
                }
            }
        }

        /// A stream whose two directions have ended: counted, then closed (the close sends the
        /// last FIN, so a report asked for once the visitor has seen it includes this stream).
        fn complete(&mut self, slot: usize) {
            self.counters.completed += 1;
            self.sessions[self.streams[slot].sess].completed += 1;
            self.release(slot, false);
            let done = self.counters.completed;
            let every = self.server.as_ref().map_or(0, |s| s.report_every);
            if every > 0 && done % every == 0 {
                if let Err(e) = self.report("every") {
                    self.fatal.get_or_insert(e);
                }
            }
        }

        /// Ends a stream on a failure: tells the other side (`rst`) unless it told us, and resets
        /// the local socket.
        fn abort(&mut self, slot: usize, f: &Fail, rst: bool) {
            let (id, sess) = (self.streams[slot].id, self.streams[slot].sess);
            if rst {
                put_hdr(&mut self.sessions[sess].out, RST, id, 0);
            }
            self.note_failure(id, f);
            self.release(slot, true);
        }

        fn note_failure(&mut self, id: u32, f: &Fail) {
            self.counters.failed += 1;
            self.failures_seen += 1;
            if self.failures_seen <= MAX_PRINTED {
                eprintln!(
                    "{}: stream {id}: {} ({}): {}",
                    self.who, f.op, self.local, f.err
                );
                if self.failures_seen == MAX_PRINTED {
                    eprintln!("{}: further failures are only counted", self.who);
                }
            }
        }

        /// Closes a stream's fd (which also removes it from the epoll set; `reset`: with
        /// SO_LINGER 0, so the peer sees a reset) and frees its slot.
        fn release(&mut self, slot: usize, reset: bool) {
            let st = &mut self.streams[slot];
            if reset {
                let lg = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                let len = size_of::<libc::linger>() as libc::socklen_t;
                // SAFETY: lg is a valid linger of `len` bytes for the call.
                unsafe {
                    libc::setsockopt(
                        st.fd,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const lg).cast(),
                        len,
                    )
                };
            }
            close(st.fd);
            st.fd = -1;
            self.ids.remove(&st.id);
            if st.over {
                st.over = false;
                self.sessions[st.sess].over_high -= 1;
            }
            st.gen = st.gen.wrapping_add(1).max(1);
            st.wq.clear();
            st.wpos = 0;
            if st.wq.capacity() > 2 * WQ_HIGH {
                st.wq = Vec::new();
            }
            self.free.push(slot as u32);
            self.counters.open -= 1;
        }

        /// End of a batch: each session's output goes out in one send; streams paused on a full
        /// output and a session paused on a full stream queue resume when they can.
        fn end_batch(&mut self) -> Result<()> {
            loop {
                let mut again = false;
                for i in 0..self.sessions.len() {
                    if self.sessions[i].over_high == 0 && self.sessions[i].readable() {
                        self.read_session(i)?;
                    }
                    self.flush(i)?;
                    let s = &mut self.sessions[i];
                    if !s.paused.is_empty() && s.pending() < OUT_HIGH {
                        for (slot, gen) in take(&mut s.paused) {
                            if self.live(slot, gen) {
                                self.streams[slot].paused = false;
                                self.pump_read(slot);
                            }
                        }
                        again = true;
                    }
                }
                if !again {
                    return Ok(());
                }
            }
        }

        /// Sends a session's output until it is empty or the socket is full.
        fn flush(&mut self, i: usize) -> Result<()> {
            let s = &mut self.sessions[i];
            if s.tls.is_some() {
                return tls::flush(s).with_context(|| format!("session {i}: TLS send"));
            }
            while s.out_pos < s.out.len() {
                if !s.wr {
                    return Ok(());
                }
                let rest = &s.out[s.out_pos..];
                // SAFETY: rest is valid for its length.
                let r = unsafe {
                    libc::send(s.fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL)
                };
                match cvt(r) {
                    Ok(n) => s.out_pos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.wr = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).with_context(|| format!("session {i}: send")),
                }
            }
            s.out.clear();
            s.out_pos = 0;
            if s.out.capacity() > 4 * OUT_HIGH {
                s.out.shrink_to(SESSION_IN);
            }
            Ok(())
        }
    }

    /// Appends a frame header.
    fn put_hdr(out: &mut Vec<u8>, kind: u8, id: u32, len: usize) {
        let l = (len as u32).to_be_bytes();
        let id = id.to_be_bytes();
        out.extend_from_slice(&[kind, l[1], l[2], l[3], id[0], id[1], id[2], id[3]]);
    }

    fn rusage_self() -> libc::rusage {
        // SAFETY: rusage is plain old data, all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { zeroed() };
        // SAFETY: ru is a valid out-parameter.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        ru
    }

    fn secs(t: libc::timeval) -> f64 {
        t.tv_sec as f64 + t.tv_usec as f64 / 1e6
    }

    /// Stdout carries only the JSON reports; messages go to stderr.
    #[allow(clippy::print_stdout)]
    fn emit(s: &str) {
        println!("{s}");
    }

    /// Epoll data of a stream: generation (32 bits, never 0 for a used slot), slot (32 bits).
    fn token(slot: usize, gen: u32) -> u64 {
        (u64::from(gen) << 32) | slot as u64
    }

    fn epoll() -> Result<OwnedFd> {
        // SAFETY: epoll_create1 has no memory preconditions.
        let ep = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) } as isize)
            .context("epoll_create1")?;
        // SAFETY: epoll_create1 returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(ep as RawFd) })
    }

    /// Waits up to `ms` for `fd` to be readable.
    fn poll_in(fd: RawFd, ms: libc::c_int) -> Result<bool> {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: p is a valid pollfd for the call.
        match cvt(unsafe { libc::poll(&mut p, 1, ms) } as isize) {
            Ok(n) => Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e).context("poll"),
        }
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
        // SAFETY: set is initialised; this process has one thread.
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
    /// SO_REUSEADDR (as std's bind: TIME_WAIT leftovers on the port do not block it).
    fn listener(addr: SocketAddr) -> Result<TcpListener> {
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
        set_int(lfd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).context("TCP_NODELAY")?;
        let (ss, len) = sockaddr(&addr);
        // SAFETY: ss holds a valid sockaddr of `len` bytes.
        let r = unsafe { libc::bind(lfd, (&raw const ss).cast(), len) };
        cvt(r as isize).with_context(|| format!("bind {addr}"))?;
        // SAFETY: listen on a bound socket we own.
        cvt(unsafe { libc::listen(lfd, BACKLOG) } as isize).context("listen")?;
        Ok(listener)
    }

    fn close(fd: RawFd) {
        if fd >= 0 {
            // SAFETY: the fd belongs to a stream being torn down; nothing uses it afterwards.
            unsafe { libc::close(fd) };
        }
    }

    /// `--tls`: rustls for the sessions (see the module docs).
    mod tls {
        use super::{cvt, Session, OUT_HIGH, SESSION_IN};
        use anyhow::{bail, Context, Result};
        use rustls::client::danger::{
            HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
        };
        use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
        use rustls::{DigitallySignedStruct, SignatureScheme};
        use std::io::{self, BufRead, Write};
        use std::net::TcpStream;
        use std::os::fd::RawFd;
        use std::sync::Arc;

        /// ring with TLS 1.3 AES-128-GCM only: what two warren peers negotiate (warren offers it
        /// first and keeps the other suites for other peers; this floor talks only to itself).
        fn provider() -> Arc<CryptoProvider> {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
            Arc::new(p)
        }

        /// A fresh self-signed certificate: the server's config and the certificate's DER.
        pub(super) fn server() -> Result<(Arc<rustls::ServerConfig>, Vec<u8>)> {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                .context("self-signed certificate")?;
            let der = ck.cert.der().to_vec();
            let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der())
                .map_err(|e| anyhow::anyhow!("private key: {e}"))?;
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .context("TLS 1.3")?
                .with_no_client_auth()
                .with_single_cert(vec![CertificateDer::from(der.clone())], key)
                .context("server certificate")?;
            cfg.send_tls13_tickets = 0;
            Ok((Arc::new(cfg), der))
        }

        /// The client's config: trusts exactly the certificate `hex_der`.
        pub(super) fn client(hex_der: &str) -> Result<Arc<rustls::ClientConfig>> {
            let der = unhex(hex_der).context("--tls-cert is not hex")?;
            let provider = provider();
            let verifier = Pinned {
                der,
                algorithms: provider.signature_verification_algorithms,
            };
            let cfg = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .context("TLS 1.3")?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            Ok(Arc::new(cfg))
        }

        /// Session `i`'s TLS, server side: the handshake on the (still blocking) socket.
        pub(super) fn server_session(
            cfg: &Arc<rustls::ServerConfig>,
            sock: &mut TcpStream,
            i: usize,
        ) -> Result<rustls::Connection> {
            let conn =
                rustls::ServerConnection::new(cfg.clone()).context("TLS server connection")?;
            handshake(conn.into(), sock).with_context(|| format!("session {i}: TLS handshake"))
        }

        /// Session `i`'s TLS, client side (the server's name does not matter: the pin decides).
        pub(super) fn client_session(
            cfg: &Arc<rustls::ClientConfig>,
            sock: &mut TcpStream,
            i: usize,
        ) -> Result<rustls::Connection> {
            let name = ServerName::try_from("localhost").expect("a valid DNS name");
            let conn = rustls::ClientConnection::new(cfg.clone(), name)
                .context("TLS client connection")?;
            handshake(conn.into(), sock).with_context(|| format!("session {i}: TLS handshake"))
        }

        /// Runs the handshake on the (still blocking) session socket.
        fn handshake(
            mut conn: rustls::Connection,
            sock: &mut TcpStream,
        ) -> Result<rustls::Connection> {
            // The batch's frames are encrypted at once; rustls's 64 KiB default would refuse them.
            conn.set_buffer_limit(None);
            while conn.is_handshaking() {
                conn.complete_io(sock)?;
            }
            while conn.wants_write() {
                conn.write_tls(sock)?;
            }
            Ok(conn)
        }

        /// Moves plaintext into `s.inb[s.end..]` (at most `room` bytes): what rustls holds,
        /// else the records in `s.cipher`, else a new `recv` of the socket. Returns the bytes
        /// added; 0 means the socket is empty (`s.rd` is then false).
        pub(super) fn read(s: &mut Session, room: usize) -> Result<usize> {
            let tls = s.tls.as_mut().expect("a TLS session");
            loop {
                let mut reader = tls.reader();
                match reader.fill_buf() {
                    Ok(chunk) if !chunk.is_empty() => {
                        let n = chunk.len().min(room);
                        s.inb[s.end..s.end + n].copy_from_slice(&chunk[..n]);
                        reader.consume(n);
                        s.end += n;
                        return Ok(n);
                    }
                    Ok(_) => bail!("the peer sent close_notify"),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
                if s.cipher_at < s.cipher_len {
                    let mut rest = &s.cipher[s.cipher_at..s.cipher_len];
                    let n = tls.read_tls(&mut rest)?;
                    s.cipher_at += n;
                    tls.process_new_packets()?;
                    continue;
                }
                if !s.rd {
                    return Ok(0);
                }
                // SAFETY: cipher is valid for SESSION_IN writable bytes.
                let r = unsafe { libc::recv(s.fd, s.cipher.as_mut_ptr().cast(), SESSION_IN, 0) };
                match cvt(r) {
                    Ok(0) => bail!("closed by the other process"),
                    Ok(n) => {
                        (s.cipher_at, s.cipher_len) = (0, n);
                        if n < SESSION_IN {
                            s.rd = false; // Short read: the socket is empty.
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.rd = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("recv"),
                }
            }
        }

        /// Bytes are still waiting in rustls or in `s.cipher` (the session must be read even
        /// though its socket is empty).
        pub(super) fn pending_input(s: &mut Session) -> bool {
            s.cipher_at < s.cipher_len
                || s.tls
                    .as_mut()
                    .is_some_and(|t| t.reader().fill_buf().is_ok_and(|c| !c.is_empty()))
        }

        /// Encrypts the batch's frames once rustls has sent what it had, and sends records
        /// until the socket is full.
        pub(super) fn flush(s: &mut Session) -> Result<()> {
            let tls = s.tls.as_mut().expect("a TLS session");
            loop {
                if !s.wr {
                    return Ok(());
                }
                if tls.wants_write() {
                    match tls.write_tls(&mut Sock(s.fd)) {
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.wr = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e).context("send"),
                    }
                    continue;
                }
                if s.out_pos == s.out.len() {
                    break;
                }
                tls.writer().write_all(&s.out[s.out_pos..])?;
                s.out_pos = s.out.len();
            }
            s.out.clear();
            s.out_pos = 0;
            if s.out.capacity() > 4 * OUT_HIGH {
                s.out.shrink_to(SESSION_IN);
            }
            Ok(())
        }

        /// The session socket as rustls's writer: `sendmsg` of rustls's records, no SIGPIPE.
        struct Sock(RawFd);

        impl Write for Sock {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.write_vectored(&[io::IoSlice::new(buf)])
            }
            fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
                // SAFETY: msghdr is plain old data, all-zero is valid; the iovecs point at live
                // slices for the duration of the call (IoSlice is ABI-compatible with iovec).
                let r = unsafe {
                    let mut m: libc::msghdr = std::mem::zeroed();
                    m.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                    m.msg_iovlen = bufs.len() as _;
                    libc::sendmsg(self.0, &m, libc::MSG_NOSIGNAL)
                };
                cvt(r)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        /// Accepts exactly the server's certificate (and checks the handshake signature).
        #[derive(Debug)]
        struct Pinned {
            der: Vec<u8>,
            algorithms: WebPkiSupportedAlgorithms,
        }

        impl ServerCertVerifier for Pinned {
            fn verify_server_cert(
                &self,
                end_entity: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: UnixTime,
            ) -> Result<ServerCertVerified, rustls::Error> {
                if end_entity.as_ref() == self.der.as_slice() {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(
                        "not the server's certificate".into(),
                    ))
                }
            }
            fn verify_tls12_signature(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
            }
            fn verify_tls13_signature(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
            }
            fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
                self.algorithms.supported_schemes()
            }
        }

        pub(super) fn hex(b: &[u8]) -> String {
            b.iter().map(|x| format!("{x:02x}")).collect()
        }

        fn unhex(s: &str) -> Option<Vec<u8>> {
            if s.len() % 2 != 0 {
                return None;
            }
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
                .collect()
        }
    }
}
