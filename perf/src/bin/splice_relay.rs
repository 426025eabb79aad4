//! `splice_relay`: loopback measurement of the ways warren's io_uring data plane can move a
//! plaintext payload from one TCP socket (A, the visitor) to another (B, the tunnel), compared on
//! CPU per GB as well as MB/s.
//!
//! A source thread writes `--gib` GiB into A (`write()` of 1 MiB pattern blocks, or `sendfile`
//! from a memfd with `--zc-source`); a relay thread that owns its own io_uring moves A -> B; a sink
//! thread reads B (`read()` into 1 MiB, or `recv(MSG_TRUNC)` with `--trunc-sink`) and counts.
//! Relay modes:
//! - `sync`: multishot `POLL_ADD(POLLIN)` on A through the ring; on readiness, synchronous
//!   non-blocking `splice(A -> pipe)` until EAGAIN or the pipe is full, then `splice(pipe -> B)`;
//!   a oneshot `POLL_ADD(POLLOUT)` on B when B would block (what warren does).
//! - `uring`: `IORING_OP_SPLICE` A -> pipe and pipe -> B, at most one op in flight per direction,
//!   short splices resubmitted (no links).
//! - `copy`: multishot recv into a provided-buffer ring (16 x 64 KiB), one `SEND` in flight.
//! - `seal`: `copy`, plus AES-128-GCM (ring, the AEAD of warren's TLS sessions) sealing each
//!   received buffer in place in 16 KiB records before it is sent: what one hop of a TLS tunnel
//!   must do at the least (no copy beyond the socket's, no framing). The 16-byte tag of each
//!   record is computed but not sent, so every mode moves the same bytes; opening a record costs
//!   what sealing it does (the same CTR keystream and GHASH), so the hop that decrypts is no
//!   cheaper.
//!
//! Relay CPU = the relay thread's `RUSAGE_THREAD` plus utime+stime of this process's `iou-wrk*`
//! threads (`/proc/self/task/*/stat`, clock ticks; their `schedstat` run time is reported beside
//! it as a cross-check), sampled before the ring is dropped. Process CPU = `RUSAGE_SELF` over the
//! round (source, sink, relay, io-wq workers, watcher). GB = 10^9 bytes. `--idle` instead arms
//! one op on each of `--idle-conns` idle connections per mode and reports the `iou-wrk` thread
//! count after 1 s. See perf/README.md.

// This tool measures raw syscalls (splice, sendfile, getrusage, fcntl, mmap) and io_uring
// submissions; all of them are FFI calls that need `unsafe`, which the workspace denies by default.
#![allow(unsafe_code)]

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("splice_relay: Linux only (io_uring and splice)");
    std::process::ExitCode::from(2)
}

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    linux::main()
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::VecDeque;
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    use std::io::{self, Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering::*};
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    use anyhow::{anyhow, bail, ensure, Context, Result};
    use clap::{Parser, ValueEnum};
    use io_uring::{cqueue, opcode, squeue::Entry, types::BufRingEntry, types::Fd, IoUring};
    use serde::Serialize;
    use serde_json::json;
    use warren_perf::clock::now;

    const GB: f64 = 1e9;
    const BLOCK: usize = 1 << 20;
    const MEMFD_LEN: usize = 16 << 20;
    const COPY_BUFS: u16 = 16;
    const BGID: u16 = 7;
    const UD_POLL_IN: u64 = 1;
    const UD_POLL_OUT: u64 = 2;
    const UD_IN: u64 = 3;
    const UD_OUT: u64 = 4;
    const MOVE_NB: u32 = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;

    /// Loopback relay benchmark: IORING_OP_SPLICE vs readiness + splice(2) vs io_uring copy.
    #[derive(Debug, Parser)]
    #[command(about)]
    struct Cli {
        /// GiB sent per round.
        #[arg(long, default_value_t = 2.0)]
        gib: f64,
        /// Rounds; each round runs every mode once, in order (modes interleave).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "sync,uring,copy"
        )]
        modes: Vec<Mode>,
        /// Pipe capacity asked with F_SETPIPE_SZ (bounded by fs.pipe-max-size).
        #[arg(long, default_value_t = 1 << 20)]
        pipe_size: usize,
        /// Source sends with sendfile() from a 16 MiB memfd instead of write().
        #[arg(long)]
        zc_source: bool,
        /// Sink discards with recv(MSG_TRUNC) instead of read().
        #[arg(long)]
        trunc_sink: bool,
        /// Run the idle test (one pending op per idle connection) instead of the rounds.
        #[arg(long)]
        idle: bool,
        #[arg(long, default_value_t = 64)]
        idle_conns: usize,
        /// One JSON object on stdout instead of the Markdown table.
        #[arg(long)]
        json: bool,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Sync,
        Uring,
        Copy,
        Seal,
    }

    impl std::fmt::Display for Mode {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&format!("{self:?}").to_lowercase())
        }
    }

    #[derive(Debug, Serialize)]
    struct Round {
        mode: Mode,
        bytes: u64,
        secs: f64,
        mb_per_s: f64,
        relay_cpu_s_per_gb: f64,
        relay_thread_cpu_s: f64,
        iou_wrk_cpu_s: f64,
        iou_wrk_cpu_s_schedstat: f64,
        process_cpu_s_per_gb: f64,
        peak_iou_wrk: usize,
        ring_flags: &'static str,
    }

    pub fn main() -> ExitCode {
        match run(&Cli::parse()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("splice_relay: FAILED: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    fn run(cli: &Cli) -> Result<()> {
        ensure!(!cli.modes.is_empty(), "--modes is empty");
        if cli.idle {
            let mut out = Vec::new();
            for &mode in &cli.modes {
                let (before, after, cpu) = idle(mode, cli.idle_conns)?;
                eprintln!(
                    "idle {mode}: {} conns, iou-wrk threads before {before}, after 1 s {after}, \
                     process CPU in that 1 s {cpu:.3} s",
                    cli.idle_conns
                );
                out.push(
                    json!({"mode": mode, "conns": cli.idle_conns, "iou_wrk_before": before,
                    "iou_wrk_after_1s": after, "process_cpu_s": cpu}),
                );
            }
            if cli.json {
                emit(&json!({ "idle": out }).to_string());
            }
            return Ok(());
        }
        ensure!(
            cli.gib > 0.0 && cli.rounds > 0,
            "--gib, --rounds must be > 0"
        );
        let total = (cli.gib * (1u64 << 30) as f64) as u64;
        let mut rounds = Vec::new();
        for r in 1..=cli.rounds {
            for &mode in &cli.modes {
                let x = run_round(cli, mode, total)
                    .with_context(|| format!("round {r}, mode {mode}"))?;
                eprintln!("round {r}/{}: {}", cli.rounds, serde_json::to_string(&x)?);
                rounds.push(x);
            }
        }
        let mut table = String::from(
            "| mode | MB/s median (min-max) | relay CPU s/GB incl. iou-wrk | of which iou-wrk \
             | process CPU s/GB | peak iou-wrk threads |\n|---|---|---|---|---|---|\n",
        );
        let mut summary = Vec::new();
        for &mode in &cli.modes {
            let rs: Vec<&Round> = rounds.iter().filter(|x| x.mode == mode).collect();
            let stat = |f: &dyn Fn(&Round) -> f64| spread(rs.iter().map(|x| f(x)).collect());
            let mbps = stat(&|x| x.mb_per_s);
            let relay = stat(&|x| x.relay_cpu_s_per_gb);
            let wrk = stat(&|x| x.iou_wrk_cpu_s * GB / x.bytes as f64);
            let proc = stat(&|x| x.process_cpu_s_per_gb);
            let peak = rs.iter().map(|x| x.peak_iou_wrk).max().unwrap_or(0);
            let d3 = |t: (f64, f64, f64)| format!("{:.3} ({:.3}-{:.3})", t.0, t.1, t.2);
            let (m, r, w, p) = (mbps, d3(relay), wrk.0, d3(proc));
            let m = format!("{:.0} ({:.0}-{:.0})", m.0, m.1, m.2);
            table += &format!("| {mode} | {m} | {r} | {w:.3} | {p} | {peak} |\n");
            summary.push(
                json!({"mode": mode, "mb_per_s": mbps, "relay_cpu_s_per_gb": relay,
                "iou_wrk_cpu_s_per_gb": wrk, "process_cpu_s_per_gb": proc, "peak_iou_wrk": peak}),
            );
        }
        if cli.json {
            let config = json!({"gib": cli.gib, "rounds": cli.rounds, "pipe_size": cli.pipe_size,
                "zc_source": cli.zc_source, "trunc_sink": cli.trunc_sink});
            emit(&json!({"config": config, "rounds": rounds, "summary": summary}).to_string());
        } else {
            emit(table.trim_end());
        }
        Ok(())
    }

    /// Stdout carries only the result (table or JSON); progress goes to stderr.
    #[allow(clippy::print_stdout)]
    fn emit(s: &str) {
        println!("{s}");
    }

    /// The benchmark's own threads (watcher, idle test) wait; none of them is a shard thread.
    #[allow(clippy::disallowed_methods)]
    fn sleep(d: Duration) {
        thread::sleep(d);
    }

    /// (median, min, max).
    fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let med = (v[(n - 1) / 2] + v[n / 2]) / 2.0;
        (med, v[0], v[n - 1])
    }

    fn join<T>(h: JoinHandle<Result<T>>, what: &str) -> Result<T> {
        let r = h.join().map_err(|_| anyhow!("{what} thread panicked"))?;
        r.context(what.to_string())
    }

    fn run_round(cli: &Cli, mode: Mode, total: u64) -> Result<Round> {
        let l_relay = TcpListener::bind("127.0.0.1:0")?;
        let l_sink = TcpListener::bind("127.0.0.1:0")?;
        let (relay_addr, sink_addr) = (l_relay.local_addr()?, l_sink.local_addr()?);
        let (zc, trunc, pipe_size) = (cli.zc_source, cli.trunc_sink, cli.pipe_size);
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let cpu0 = rusage_secs(libc::RUSAGE_SELF);
        let (stop2, peak2) = (stop.clone(), peak.clone());
        let watcher = thread::spawn(move || {
            while !stop2.load(Relaxed) {
                peak2.fetch_max(wrk_threads().len(), Relaxed);
                sleep(Duration::from_millis(10));
            }
        });
        let spawn = |name: &str| thread::Builder::new().name(name.to_string());
        let sink = spawn("sink").spawn(move || sink(l_sink, trunc))?;
        let relay = spawn("relay").spawn(move || relay(l_relay, sink_addr, mode, pipe_size))?;
        let source = spawn("source").spawn(move || source(relay_addr, total, zc))?;
        // Join all three before looking at any result: the relay's error explains the others'.
        let (source, sink, relay) = (
            join(source, "source"),
            join(sink, "sink"),
            join(relay, "relay"),
        );
        stop.store(true, Relaxed);
        watcher
            .join()
            .map_err(|_| anyhow!("watcher thread panicked"))?;
        let process_s = rusage_secs(libc::RUSAGE_SELF) - cpu0;
        let (relay, t0, (sunk, t_end)) = (relay?, source?, sink?);
        ensure!(
            sunk == total,
            "BYTE COUNT MISMATCH: sink got {sunk}, source sent {total}"
        );
        ensure!(
            relay.moved == total,
            "relay moved {} of {total}",
            relay.moved
        );
        let (secs, gb) = ((t_end - t0).as_secs_f64(), total as f64 / GB);
        Ok(Round {
            mode,
            bytes: total,
            secs,
            mb_per_s: total as f64 / secs / 1e6,
            relay_cpu_s_per_gb: (relay.thread_s + relay.wrk.0) / gb,
            relay_thread_cpu_s: relay.thread_s,
            iou_wrk_cpu_s: relay.wrk.0,
            iou_wrk_cpu_s_schedstat: relay.wrk.1,
            process_cpu_s_per_gb: process_s / gb,
            peak_iou_wrk: peak.load(Relaxed),
            ring_flags: relay.flags,
        })
    }

    /// Writes `total` bytes into the relay; returns the instant just before the first byte.
    fn source(addr: SocketAddr, total: u64, zc: bool) -> Result<Instant> {
        let mut s = TcpStream::connect(addr)?;
        let mut left = total;
        let mut buf = vec![0u8; if zc { MEMFD_LEN } else { BLOCK }];
        warren_perf::pattern::fill(0, &mut buf);
        let t0;
        if zc {
            // SAFETY: the name is a NUL-terminated C string; flags are valid.
            let fd = unsafe { libc::memfd_create(c"splice_relay".as_ptr(), libc::MFD_CLOEXEC) };
            cvt(fd as isize).context("memfd_create")?;
            // SAFETY: memfd_create returned a new fd that nothing else owns.
            let mut memfd = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            memfd.write_all(&buf)?;
            let (mut off, sfd, mfd) = (0 as libc::off_t, s.as_raw_fd(), memfd.as_raw_fd());
            t0 = now();
            while left > 0 {
                off %= MEMFD_LEN as libc::off_t;
                let want = left.min((MEMFD_LEN - off as usize) as u64) as usize;
                // SAFETY: both fds are open for the call; `off` is a valid, exclusive off_t.
                let n = cvt(unsafe { libc::sendfile(sfd, mfd, &mut off, want) })?;
                ensure!(n > 0, "sendfile returned 0");
                left -= n as u64;
            }
        } else {
            t0 = now();
            while left > 0 {
                let n = left.min(BLOCK as u64) as usize;
                s.write_all(&buf[..n]).context("write")?;
                left -= n as u64;
            }
        }
        s.shutdown(Shutdown::Write)?;
        Ok(t0)
    }

    /// Counts bytes until EOF; returns the count and the instant of EOF.
    fn sink(l: TcpListener, trunc: bool) -> Result<(u64, Instant)> {
        let (mut s, _) = l.accept()?;
        let (mut buf, mut n, fd) = (vec![0u8; BLOCK], 0u64, s.as_raw_fd());
        loop {
            let r = if trunc {
                let (p, len) = (buf.as_mut_ptr().cast(), buf.len());
                // SAFETY: buf is valid for len bytes; with MSG_TRUNC TCP discards the data.
                cvt(unsafe { libc::recv(fd, p, len, libc::MSG_TRUNC) })
            } else {
                s.read(&mut buf)
            };
            match r {
                Ok(0) => return Ok((n, now())),
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return Err(e).context("sink read"),
            }
        }
    }

    #[derive(Debug)]
    struct RelayOut {
        moved: u64,
        thread_s: f64,
        /// iou-wrk CPU from /proc/.../stat utime+stime, and from schedstat (ns) as a cross-check.
        wrk: (f64, f64),
        flags: &'static str,
    }

    fn relay(l: TcpListener, sink: SocketAddr, mode: Mode, pipe_size: usize) -> Result<RelayOut> {
        let (a, _) = l.accept()?;
        let b = TcpStream::connect(sink)?;
        // Everything an SQE points at is created before the ring, so it is dropped after it.
        let pipe = Pipe::new(Some(pipe_size))?;
        let mut pool = BufPool::new(COPY_BUFS, 64 << 10)?;
        let (mut ring, flags) = make_ring(256)?;
        let wrk0 = wrk_threads();
        let cpu0 = rusage_secs(libc::RUSAGE_THREAD);
        let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
        let moved = match mode {
            Mode::Sync => relay_sync(&mut ring, fa, fb, &pipe)?,
            Mode::Uring => relay_uring(&mut ring, fa, fb, &pipe)?,
            Mode::Copy => relay_copy(&mut ring, fa, fb, &mut pool, None)?,
            Mode::Seal => relay_copy(&mut ring, fa, fb, &mut pool, Some(Sealer::new()?))?,
        };
        b.shutdown(Shutdown::Write)?; // The sink's EOF (end of wall time) comes before sampling.
        let thread_s = rusage_secs(libc::RUSAGE_THREAD) - cpu0;
        let mut wrk = (0.0, 0.0);
        for (tid, stat, sched) in wrk_threads() {
            let base = wrk0
                .iter()
                .find(|w| w.0 == tid)
                .map_or((0.0, 0.0), |w| (w.1, w.2));
            (wrk.0, wrk.1) = (wrk.0 + stat - base.0, wrk.1 + sched - base.1);
        }
        drop(ring);
        Ok(RelayOut {
            moved,
            thread_s,
            wrk,
            flags,
        })
    }

    fn relay_sync(ring: &mut IoUring, a: RawFd, b: RawFd, pipe: &Pipe) -> Result<u64> {
        set_nonblocking(a)?;
        set_nonblocking(b)?;
        let (pr, pw, cap) = (pipe.r.as_raw_fd(), pipe.w.as_raw_fd(), pipe.cap);
        let poll_in = opcode::PollAdd::new(Fd(a), libc::POLLIN as u32)
            .multi(true)
            .build();
        let poll_in = poll_in.user_data(UD_POLL_IN);
        let poll_out = opcode::PollAdd::new(Fd(b), libc::POLLOUT as u32).build();
        let poll_out = poll_out.user_data(UD_POLL_OUT);
        let (mut in_armed, mut out_armed, mut eof) = (false, false, false);
        let (mut in_pipe, mut moved) = (0usize, 0u64);
        let mut cqes = Vec::new();
        loop {
            // In until EAGAIN (socket empty or pipe out of slots) or pipe full, then out until the
            // pipe is empty or B would block; repeat while anything moved, because a multishot
            // poll reports new arrivals, not bytes already waiting in A.
            loop {
                let mut progress = false;
                while !eof && in_pipe < cap {
                    match splice_nb(a, pw, cap - in_pipe) {
                        Ok(0) => eof = true,
                        Ok(n) => (in_pipe, progress) = (in_pipe + n, true),
                        Err(e) if e.kind() == WouldBlock => break,
                        Err(e) if e.kind() == Interrupted => {}
                        Err(e) => return Err(e).context("splice A -> pipe"),
                    }
                }
                while !out_armed && in_pipe > 0 {
                    match splice_nb(pr, b, in_pipe) {
                        Ok(0) => bail!("splice pipe -> B returned 0 with {in_pipe} bytes queued"),
                        Ok(n) => (in_pipe, moved, progress) = (in_pipe - n, moved + n as u64, true),
                        Err(e) if e.kind() == WouldBlock => {
                            // SAFETY: the poll references only socket B, which outlives the ring.
                            unsafe { push(ring, &poll_out) }?;
                            out_armed = true;
                        }
                        Err(e) if e.kind() == Interrupted => {}
                        Err(e) => return Err(e).context("splice pipe -> B"),
                    }
                }
                if !progress || out_armed {
                    break;
                }
            }
            if eof && in_pipe == 0 {
                return Ok(moved);
            }
            if !eof && !in_armed {
                // SAFETY: the poll references only socket A, which outlives the ring.
                unsafe { push(ring, &poll_in) }?;
                in_armed = true;
            }
            wait(ring, &mut cqes)?;
            for &(ud, res, flags) in &cqes {
                check(res, "poll")?;
                match ud {
                    UD_POLL_IN => in_armed = in_armed && cqueue::more(flags),
                    UD_POLL_OUT => out_armed = false,
                    _ => bail!("unexpected user_data {ud}"),
                }
            }
        }
    }

    fn relay_uring(ring: &mut IoUring, a: RawFd, b: RawFd, pipe: &Pipe) -> Result<u64> {
        let (pr, pw, cap) = (pipe.r.as_raw_fd(), pipe.w.as_raw_fd(), pipe.cap);
        let (mut in_flight, mut out_flight, mut eof) = (false, false, false);
        let (mut in_pipe, mut moved) = (0usize, 0u64);
        let mut cqes = Vec::new();
        loop {
            if !eof && !in_flight && in_pipe < cap {
                // SAFETY: socket A and the pipe outlive the ring.
                unsafe { push(ring, &splice_sqe(a, pw, cap - in_pipe, UD_IN)) }?;
                in_flight = true;
            }
            if !out_flight && in_pipe > 0 {
                // SAFETY: the pipe and socket B outlive the ring.
                unsafe { push(ring, &splice_sqe(pr, b, in_pipe, UD_OUT)) }?;
                out_flight = true;
            }
            if eof && !in_flight && !out_flight && in_pipe == 0 {
                return Ok(moved);
            }
            wait(ring, &mut cqes)?;
            for &(ud, res, _) in &cqes {
                let n = check(res, "IORING_OP_SPLICE")?;
                match ud {
                    UD_IN if n == 0 => (in_flight, eof) = (false, true),
                    UD_IN => (in_flight, in_pipe) = (false, in_pipe + n),
                    UD_OUT if n > 0 => {
                        (out_flight, in_pipe, moved) = (false, in_pipe - n, moved + n as u64)
                    }
                    _ => bail!("unexpected completion {ud}: {n}"),
                }
            }
        }
    }

    /// AES-128-GCM over TLS-sized records, as a TLS 1.3 record layer seals them (a per-record
    /// nonce from a sequence number, the 5-byte header as associated data).
    struct Sealer {
        key: ring::aead::LessSafeKey,
        seq: u64,
    }

    impl Sealer {
        const RECORD: usize = 16 * 1024;

        fn new() -> Result<Sealer> {
            let key = ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &[0x5a; 16])
                .map_err(|_| anyhow!("AES-128-GCM key"))?;
            Ok(Sealer {
                key: ring::aead::LessSafeKey::new(key),
                seq: 0,
            })
        }

        /// Seals `buf` in place, record by record; returns the tags' first bytes so the work
        /// cannot be optimised away.
        fn seal(&mut self, buf: &mut [u8]) -> Result<u8> {
            let mut acc = 0u8;
            for rec in buf.chunks_mut(Self::RECORD) {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&self.seq.to_be_bytes());
                self.seq += 1;
                let len = (rec.len() + 17) as u16;
                let aad = [23, 3, 3, (len >> 8) as u8, len as u8];
                let tag = self
                    .key
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(aad),
                        rec,
                    )
                    .map_err(|_| anyhow!("seal"))?;
                acc ^= tag.as_ref()[0];
            }
            Ok(acc)
        }
    }

    fn relay_copy(
        ring: &mut IoUring,
        a: RawFd,
        b: RawFd,
        pool: &mut BufPool,
        mut sealer: Option<Sealer>,
    ) -> Result<u64> {
        let mut tags = 0u8;
        pool.register(ring)?;
        let recv = opcode::RecvMulti::new(Fd(a), BGID).build().user_data(UD_IN);
        let (mut armed, mut eof, mut held, mut moved) = (false, false, 0usize, 0u64);
        let mut filled: VecDeque<(u16, usize, usize)> = VecDeque::new();
        let mut sending: Option<(u16, usize, usize)> = None;
        let mut cqes = Vec::new();
        loop {
            if let (None, Some((bid, off, len))) = (sending, filled.front().copied()) {
                filled.pop_front();
                let send = opcode::Send::new(Fd(b), pool.ptr(bid, off), (len - off) as u32);
                // SAFETY: the buffer stays out of the kernel's ring until this send completes;
                // the pool and socket B outlive the ring.
                unsafe { push(ring, &send.build().user_data(UD_OUT)) }?;
                sending = Some((bid, off, len));
            }
            if !armed && !eof && held < COPY_BUFS as usize {
                // SAFETY: socket A and the registered pool outlive the ring.
                unsafe { push(ring, &recv) }?;
                armed = true;
            }
            if eof && !armed && sending.is_none() && filled.is_empty() {
                std::hint::black_box(tags);
                return Ok(moved);
            }
            wait(ring, &mut cqes)?;
            for &(ud, res, flags) in &cqes {
                if ud == UD_IN {
                    armed = armed && cqueue::more(flags);
                    if res == -libc::ENOBUFS {
                        continue; // Re-armed once a send returns a buffer.
                    }
                    let n = check(res, "recv")?;
                    if n == 0 {
                        (eof, armed) = (true, false);
                        continue;
                    }
                    let bid = cqueue::buffer_select(flags).context("recv CQE without bid")?;
                    if let Some(s) = sealer.as_mut() {
                        // SAFETY: the kernel filled `n` bytes of buffer `bid` and gave it to us;
                        // it is not in the ring or in a send until it is queued below.
                        let buf = unsafe {
                            std::slice::from_raw_parts_mut(pool.ptr(bid, 0).cast_mut(), n)
                        };
                        tags ^= s.seal(buf)?;
                    }
                    held += 1;
                    filled.push_back((bid, 0, n));
                } else {
                    let (bid, off, len) = sending.take().context("unexpected completion")?;
                    let n = check(res, "send")?;
                    ensure!(n > 0, "send returned 0");
                    moved += n as u64;
                    if off + n < len {
                        filled.push_front((bid, off + n, len));
                    } else {
                        pool.give(bid);
                        held -= 1;
                    }
                }
            }
        }
    }

    /// Opens `conns` idle loopback connections, arms one op on each (sync: multishot POLL_ADD,
    /// uring: IORING_OP_SPLICE into a pipe, copy: multishot recv), waits 1 s and returns the
    /// `iou-wrk` thread count before and after, and the process CPU seconds in that second.
    fn idle(mode: Mode, conns: usize) -> Result<(usize, usize, f64)> {
        let h = thread::spawn(move || -> Result<(usize, usize, f64)> {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            let (mut clients, mut servers, mut pipes) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..conns {
                clients.push(TcpStream::connect(addr)?);
                servers.push(l.accept()?.0);
                pipes.push(Pipe::new(None)?);
            }
            let mut pool = BufPool::new(COPY_BUFS, 4096)?;
            let (mut ring, _) = make_ring((2 * conns).max(8) as u32)?;
            pool.register(&ring)?;
            let before = wrk_threads().len();
            for (i, (s, p)) in servers.iter().zip(&pipes).enumerate() {
                let fd = s.as_raw_fd();
                let e = match mode {
                    Mode::Sync => opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
                        .multi(true)
                        .build(),
                    Mode::Uring => splice_sqe(fd, p.w.as_raw_fd(), 1 << 16, 0),
                    Mode::Copy | Mode::Seal => opcode::RecvMulti::new(Fd(fd), BGID).build(),
                };
                // SAFETY: sockets, pipes and pool were created before the ring and outlive it.
                unsafe { push(&mut ring, &e.user_data(i as u64)) }?;
            }
            ring.submit()?;
            let cpu0 = rusage_secs(libc::RUSAGE_SELF);
            sleep(Duration::from_secs(1));
            let after = wrk_threads().len();
            let cpu = rusage_secs(libc::RUSAGE_SELF) - cpu0;
            drop(clients); // EOF on every server socket completes the pending ops.
            sleep(Duration::from_millis(100));
            drop(ring);
            Ok((before, after, cpu))
        });
        join(h, "idle")
    }

    /// `IORING_OP_SPLICE` of up to `len` bytes (SPLICE_F_MOVE only: the op runs in io-wq).
    fn splice_sqe(from: RawFd, to: RawFd, len: usize, ud: u64) -> Entry {
        let op = opcode::Splice::new(Fd(from), -1, Fd(to), -1, len as u32);
        op.flags(libc::SPLICE_F_MOVE).build().user_data(ud)
    }

    /// Pipe pair (blocking; `sync` passes SPLICE_F_NONBLOCK) with its actual capacity in bytes.
    #[derive(Debug)]
    struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
        cap: usize,
    }

    impl Pipe {
        fn new(size: Option<usize>) -> Result<Pipe> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: fds is a valid out-parameter for two c_ints.
            cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as isize)?;
            // SAFETY: pipe2 succeeded, so both fds are open and owned by nothing else.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            let (cmd, arg) = match size {
                Some(s) => (libc::F_SETPIPE_SZ, s as libc::c_int),
                None => (libc::F_GETPIPE_SZ, 0),
            };
            // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ on an open pipe fd with an int argument.
            let cap = cvt(unsafe { libc::fcntl(w.as_raw_fd(), cmd, arg) } as isize)
                .with_context(|| format!("F_SETPIPE_SZ {size:?} (see fs.pipe-max-size)"))?;
            Ok(Pipe { r, w, cap })
        }
    }

    /// Provided-buffer ring (group BGID): `n` buffers of `len` bytes, entries in an mmap'd page.
    #[derive(Debug)]
    struct BufPool {
        entries: *mut BufRingEntry,
        base: *mut u8,
        _mem: Vec<u8>,
        n: u16,
        len: usize,
        tail: u16,
    }

    impl BufPool {
        fn new(n: u16, len: usize) -> Result<BufPool> {
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            let flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
            // SAFETY: anonymous private mapping of one page, no fd, kernel-chosen address.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, rw, flags, -1, 0) };
            ensure!(
                p != libc::MAP_FAILED,
                "mmap: {}",
                io::Error::last_os_error()
            );
            ensure!(n as usize * size_of::<BufRingEntry>() <= 4096 && n.is_power_of_two());
            let mut mem = vec![0u8; n as usize * len];
            let (entries, base) = (p.cast(), mem.as_mut_ptr());
            let tail = 0;
            Ok(BufPool {
                entries,
                base,
                _mem: mem,
                n,
                len,
                tail,
            })
        }

        /// Registers the ring with the kernel and hands it every buffer.
        fn register(&mut self, ring: &IoUring) -> Result<()> {
            let sub = ring.submitter();
            // SAFETY: the mapping holds `n` entries and lives until Drop, which runs after the
            // ring is dropped (a pool is always created before its ring).
            unsafe { sub.register_buf_ring_with_flags(self.entries as u64, self.n, BGID, 0) }
                .context("register_buf_ring")?;
            for bid in 0..self.n {
                self.give(bid);
            }
            Ok(())
        }

        fn ptr(&self, bid: u16, off: usize) -> *const u8 {
            self.base.wrapping_add(bid as usize * self.len + off)
        }

        /// Returns buffer `bid` to the kernel.
        fn give(&mut self, bid: u16) {
            let slot = (self.tail & (self.n - 1)) as usize;
            // SAFETY: slot < n entries of the mapping; the kernel only reads entries before the
            // published tail, and this one is at the tail, so we are its only user.
            let e = unsafe { &mut *self.entries.add(slot) };
            e.set_addr(self.ptr(bid, 0) as u64);
            e.set_len(self.len as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            // SAFETY: `tail` points at the aligned u16 tail field of entry 0 in the live mapping;
            // the kernel reads it concurrently, so it is published atomically with release.
            let tail = unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.entries).cast_mut()) };
            tail.store(self.tail, Release);
        }
    }

    impl Drop for BufPool {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the page mapped in new(); the ring that used it is gone.
            unsafe { libc::munmap(self.entries.cast(), 4096) };
        }
    }

    fn make_ring(entries: u32) -> Result<(IoUring, &'static str)> {
        let mut b = IoUring::builder();
        b.setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag();
        match b.build(entries) {
            Ok(r) => Ok((r, "SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG")),
            Err(e) => {
                eprintln!("splice_relay: SINGLE_ISSUER|DEFER_TASKRUN ring: {e}; using no flags");
                Ok((IoUring::new(entries).context("io_uring_setup")?, "none"))
            }
        }
    }

    /// Queues an SQE, submitting first if the queue is full.
    ///
    /// # Safety
    /// Every fd and buffer the entry refers to must stay valid until its completion.
    unsafe fn push(ring: &mut IoUring, e: &Entry) -> Result<()> {
        // SAFETY: forwarded from the caller.
        if unsafe { ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
        // SAFETY: forwarded from the caller.
        unsafe { ring.submission().push(e) }.map_err(|_| anyhow!("submission queue full"))
    }

    /// Submits and waits for at least one completion; fills `out` with (user_data, res, flags).
    fn wait(ring: &mut IoUring, out: &mut Vec<(u64, i32, u32)>) -> Result<()> {
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return Err(e).context("io_uring_enter"),
            }
        }
        out.clear();
        out.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        Ok(())
    }

    /// A CQE result as a byte count, or the errno it carries.
    fn check(res: i32, what: &str) -> Result<usize> {
        let e = io::Error::from_raw_os_error(res.saturating_neg());
        usize::try_from(res).map_err(|_| anyhow!("{what}: {e}"))
    }

    fn splice_nb(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        let null = std::ptr::null_mut();
        // SAFETY: both fds are open for the call; null offsets mean "use the file position".
        cvt(unsafe { libc::splice(from, null, to, null, len, MOVE_NB) })
    }

    fn set_nonblocking(fd: RawFd) -> Result<()> {
        // SAFETY: F_GETFL on an open fd.
        let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) } as isize)? as libc::c_int;
        // SAFETY: F_SETFL on an open fd with an int argument.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } as isize)?;
        Ok(())
    }

    fn cvt(r: isize) -> io::Result<usize> {
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    fn rusage_secs(who: libc::c_int) -> f64 {
        // SAFETY: rusage is plain old data, all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: ru is a valid out-parameter.
        unsafe { libc::getrusage(who, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    }

    fn clk_tck() -> f64 {
        // SAFETY: sysconf has no memory-safety preconditions.
        (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
    }

    /// (tid, utime+stime s, schedstat run time s) of every thread of this process named
    /// `iou-wrk*`.
    fn wrk_threads() -> Vec<(u32, f64, f64)> {
        let tck = clk_tck();
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            // A thread may exit between read_dir and read: skip it.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            if !stat[open + 1..close].starts_with("iou-wrk") {
                continue;
            }
            // Fields after the comm start at field 3 (state); utime is field 14, stime 15.
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            let tid = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            let sched = std::fs::read_to_string(entry.path().join("schedstat")).unwrap_or_default();
            let ns: f64 = sched
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            out.push((tid, (num(11) + num(12)) as f64 / tck, ns / 1e9));
        }
        out
    }
}
