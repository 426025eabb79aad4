//! Loopback benchmark of warren's portable (compat) backend next to a direct connection, all in
//! one run: single-stream bulk both directions (plain TCP and TLS sessions), and the
//! head-of-line figure (nine bulk streams with and without a stalled tenth on one session).
//! Systems are interleaved over the rounds so drift on a shared machine hits all of them.
//!
//! `cargo run --release --example tunnel_bench -- [--rounds 3] [--mib 1024] [--hol-mib 100] [--out FILE]`
//!
//! Prints a Markdown report (stamped with commit, kernel, CPU and date) and writes it to
//! `--out` when given.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use warren::loopback::{Pair, PairSpec};

const MIB: u64 = 1024 * 1024;

/// What a visitor asks the bench service for: direction byte and length.
#[derive(Clone, Copy)]
enum Dir {
    /// Service -> visitor.
    Down,
    /// Visitor -> service.
    Up,
}

/// The service: `[dir u8][len u64 BE]`, then sends or swallows `len` bytes. For uploads it
/// answers with the 8-byte count once the visitor half-closed, so the visitor's clock stops
/// only when every byte arrived.
fn start_service() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut head = [0u8; 9];
                if s.read_exact(&mut head).is_err() {
                    return;
                }
                let len = u64::from_be_bytes(head[1..].try_into().unwrap_or([0; 8]));
                let mut buf = vec![0x5au8; 256 * 1024];
                if head[0] == 0 {
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = s.shutdown(Shutdown::Write);
                    // Wait for the visitor to close so teardown is not part of the next run.
                    let _ = s.read(&mut buf);
                } else {
                    let mut got = 0u64;
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n as u64,
                        }
                    }
                    let _ = s.write_all(&got.to_be_bytes());
                }
            });
        }
    });
    Ok(addr)
}

/// One visitor transfer; returns bytes moved.
fn transfer(addr: SocketAddr, dir: Dir, len: u64) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let mut head = [0u8; 9];
    head[0] = matches!(dir, Dir::Up) as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    s.write_all(&head)?;
    let mut buf = vec![0x33u8; 256 * 1024];
    match dir {
        Dir::Down => {
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            if got != len {
                bail!("download got {got} of {len} bytes");
            }
            Ok(got)
        }
        Dir::Up => {
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack)?;
            let got = u64::from_be_bytes(ack);
            if got != len {
                bail!("upload: service got {got} of {len} bytes");
            }
            Ok(got)
        }
    }
}

struct Tunnel {
    pair: Pair,
    public: SocketAddr,
}

async fn start_tunnel(service: SocketAddr, tls: bool) -> anyhow::Result<Tunnel> {
    let pair = Pair::start(PairSpec {
        services: &[("bench", service)],
        tls,
        ..PairSpec::default()
    })
    .await?;
    let public = pair.public("bench");
    Ok(Tunnel { pair, public })
}

#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
fn timed(f: impl FnOnce() -> anyhow::Result<u64>) -> anyhow::Result<(u64, Duration)> {
    let t0 = Instant::now();
    let n = f()?;
    Ok((n, t0.elapsed()))
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Nine downloads in parallel, optionally beside a tenth visitor that never reads.
fn hol_run(addr: SocketAddr, each: u64, stalled: bool) -> anyhow::Result<(u64, Duration)> {
    let stall = if stalled {
        let mut s = TcpStream::connect(addr)?;
        let mut head = [0u8; 9];
        head[1..].copy_from_slice(&(each * 4).to_be_bytes());
        s.write_all(&head)?;
        Some(s)
    } else {
        None
    };
    // Give the stalled stream time to fill its window before the clock starts. This is a
    // load-generator thread, not a shard.
    #[allow(clippy::disallowed_methods)]
    std::thread::sleep(Duration::from_millis(if stalled { 300 } else { 0 }));
    let r = timed(|| {
        let handles: Vec<_> = (0..9)
            .map(|_| std::thread::spawn(move || transfer(addr, Dir::Down, each)))
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
        }
        Ok(total)
    });
    drop(stall);
    r
}

fn cmd(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn stamp() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "- commit: {}{}\n- kernel: {}\n- CPU: {cpu} ({cores} cores available)\n- date: {}\n- load average at the end (1/5/15 min): {}\n",
        cmd("git", &["rev-parse", "--short", "HEAD"]),
        if cmd("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            ""
        } else {
            " (with uncommitted changes)"
        },
        cmd("uname", &["-sr"]),
        cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into()),
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let rounds: usize = flag("--rounds").map_or(Ok(3), |v| v.parse())?;
    let mib: u64 = flag("--mib").map_or(Ok(1024), |v| v.parse())?;
    let hol_mib: u64 = flag("--hol-mib").map_or(Ok(100), |v| v.parse())?;
    let out = flag("--out");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let service = start_service()?;
    let plain = rt.block_on(start_tunnel(service, false))?;
    let tls = rt.block_on(start_tunnel(service, true))?;
    let len = mib * MIB;

    let systems: [(&str, SocketAddr); 3] = [
        ("direct", service),
        ("warren compat, tcp session", plain.public),
        ("warren compat, tls session", tls.public),
    ];
    let mut down: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut up: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    let mut hol: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, (name, addr)) in systems.iter().enumerate() {
            let (n, d) = timed(|| transfer(*addr, Dir::Down, len))?;
            down[i].push(mb_per_s(n, d));
            let (n, d) = timed(|| transfer(*addr, Dir::Up, len))?;
            up[i].push(mb_per_s(n, d));
            eprintln!(
                "round {round} {name}: down {:.0} MB/s, up {:.0} MB/s",
                down[i].last().unwrap_or(&0.0),
                up[i].last().unwrap_or(&0.0)
            );
        }
        for (k, stalled) in [false, true].into_iter().enumerate() {
            let (n, d) = hol_run(plain.public, hol_mib * MIB, stalled)?;
            hol[k].push(mb_per_s(n, d));
            eprintln!(
                "round {round} HOL stalled={stalled}: {:.0} MB/s aggregate",
                hol[k].last().unwrap_or(&0.0)
            );
        }
    }

    let mut report = format!(
        "# warren compat backend on loopback: single-stream bulk and head-of-line\n\n{}\
         - command: `cargo run --release --example tunnel_bench -- --rounds {rounds} --mib {mib} --hol-mib {hol_mib}`\n\
         - method: one process; blocking std::net visitor and service threads; tunnel server and client \
         in-process with 1 shard each (one session); systems interleaved in each of {rounds} rounds; \
         medians with min-max.\n\n",
        stamp()
    );
    report.push_str(&format!(
        "## Single stream, {mib} MiB\n\n| system | down MB/s (service->visitor) | up MB/s (visitor->service) | down vs direct | up vs direct |\n|---|---|---|---|---|\n"
    ));
    let mut d0 = down[0].clone();
    let mut u0 = up[0].clone();
    let (dm0, um0) = (median(&mut d0), median(&mut u0));
    for (i, (name, _)) in systems.iter().enumerate() {
        let (mut d, mut u) = (down[i].clone(), up[i].clone());
        let (dm, um) = (median(&mut d), median(&mut u));
        report.push_str(&format!(
            "| {name} | {dm:.0} ({:.0}-{:.0}) | {um:.0} ({:.0}-{:.0}) | {:.2}x | {:.2}x |\n",
            d[0],
            d[d.len() - 1],
            u[0],
            u[u.len() - 1],
            dm / dm0,
            um / um0
        ));
    }
    let (mut a, mut b) = (hol[0].clone(), hol[1].clone());
    let (am, bm) = (median(&mut a), median(&mut b));
    report.push_str(&format!(
        "\n## Head-of-line: 9 x {hol_mib} MiB down on one tcp session\n\n| run | aggregate MB/s |\n|---|---|\n\
         | 9 streams alone | {am:.0} ({:.0}-{:.0}) |\n| 9 streams + 1 stalled visitor | {bm:.0} ({:.0}-{:.0}) |\n\n\
         Slowdown with the stalled visitor: {:.1}% (target <= 10%).\n",
        a[0],
        a[a.len() - 1],
        b[0],
        b[b.len() - 1],
        (1.0 - bm / am) * 100.0
    ));
    eprintln!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, &report).with_context(|| format!("writing {path}"))?;
    }
    rt.block_on(async {
        plain.pair.shutdown().await;
        tls.pair.shutdown().await;
    });
    Ok(())
}
