//! The hold workload: open N connections to the `echo` backend, check each with a 1-byte echo,
//! hold them all open, check each again, close. Reports how many survived; the tunnel's memory
//! per connection is measured from outside while they are held.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::clock::now;
use crate::error::{ConnError, RunError};
use crate::report::{latency_histogram, record, Live, Report};
use crate::tcp::{connect, io_within, resolve};

/// Parameters of a hold run.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct HoldParams {
    /// Address to connect to: a tunnel's public port, or the echo backend itself.
    #[arg(long)]
    pub target: String,
    /// Connections to open and hold (mind `ulimit -n`: each needs a descriptor here and, through
    /// a tunnel, a few more there).
    #[arg(long, default_value_t = 1_000)]
    pub connections: u32,
    /// How long to hold them once all are open.
    #[arg(long, default_value_t = 10_000)]
    pub hold_ms: u64,
    /// Connections being opened at once (keeps the target's accept backlog from overflowing).
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: u32,
    /// Give up on a connection that makes no progress for this long.
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
}

/// Opens, holds and re-checks `connections` connections.
pub async fn run_hold(params: HoldParams, live: Arc<Live>) -> Result<Report, RunError> {
    if params.connect_concurrency == 0 {
        return Err(RunError::Param(
            "--connect-concurrency must be at least 1".into(),
        ));
    }
    let addr = resolve(&params.target).await?;
    let timeout = Duration::from_millis(params.io_timeout_ms.max(1));
    let start = now();

    // Open every connection and check it.
    let permits = Arc::new(Semaphore::new(params.connect_concurrency as usize));
    let mut set = JoinSet::new();
    for _ in 0..params.connections {
        let permits = permits.clone();
        set.spawn(async move {
            // The semaphore is never closed, so acquiring cannot fail.
            let _permit = permits.acquire_owned().await;
            let t = now();
            open_and_check(addr, timeout)
                .await
                .map(|s| (s, t.elapsed()))
        });
    }
    let mut hist = latency_histogram();
    let mut held = Vec::with_capacity(params.connections as usize);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok((stream, took))) => {
                record(&mut hist, took);
                live.add_op();
                live.add_bytes(2);
                held.push(stream);
            }
            Ok(Err(e)) => live.fail(&e),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let open_seconds = start.elapsed().as_secs_f64();
    let opened = held.len() as u64;

    tokio::time::sleep(Duration::from_millis(params.hold_ms)).await;

    // Check every held connection again, all at once: they are already established.
    let mut set = JoinSet::new();
    for stream in held {
        set.spawn(check_alive(stream, timeout));
    }
    let mut alive = 0u64;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {
                alive += 1;
                live.add_bytes(2);
            }
            Ok(Err(e)) => live.fail(&e),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let elapsed = start.elapsed();
    let mut report = Report::new(
        "hold",
        &params,
        &live,
        elapsed,
        (opened + alive) * 2,
        alive,
        &hist,
    );
    report.extra.insert("opened".into(), opened.into());
    report.extra.insert("alive_at_end".into(), alive.into());
    report
        .extra
        .insert("open_seconds".into(), open_seconds.into());
    Ok(report)
}

async fn open_and_check(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnError> {
    let mut stream = connect(addr, timeout).await?;
    echo_byte(&mut stream, b'h', "first echo", timeout).await?;
    Ok(stream)
}

async fn check_alive(mut stream: TcpStream, timeout: Duration) -> Result<(), ConnError> {
    echo_byte(&mut stream, b'z', "echo after hold", timeout).await?;
    io_within(timeout, "close", stream.shutdown()).await
}

async fn echo_byte(
    stream: &mut TcpStream,
    byte: u8,
    phase: &'static str,
    timeout: Duration,
) -> Result<(), ConnError> {
    io_within(timeout, phase, stream.write_all(&[byte])).await?;
    let mut got = [0u8; 1];
    io_within(timeout, phase, stream.read_exact(&mut got)).await?;
    if got[0] != byte {
        return Err(ConnError::Corrupt { phase, offset: 0 });
    }
    Ok(())
}
