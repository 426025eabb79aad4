//! The connection-rate workload: connect, one small echo, orderly close, at a fixed concurrency,
//! against the `echo` backend. Latency covers the whole life of a connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::clock::now;
use crate::error::{ConnError, RunError};
use crate::pattern;
use crate::report::{latency_histogram, record, Live, Report};
use crate::tcp::{connect, io_within, resolve};

/// Largest echo payload accepted.
pub const SIZE_MAX: usize = 1 << 20;

/// Parameters of a connrate run.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct ConnrateParams {
    /// Address to connect to: a tunnel's public port, or the echo backend itself.
    #[arg(long)]
    pub target: String,
    /// Connections to make in all.
    #[arg(long, default_value_t = 2_000)]
    pub total: u64,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u32,
    /// Echo payload bytes per connection.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Give up on a connection that makes no progress for this long.
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
}

/// Makes `total` connections, `concurrency` at a time; each echoes `size` bytes and closes.
pub async fn run_connrate(params: ConnrateParams, live: Arc<Live>) -> Result<Report, RunError> {
    if params.concurrency == 0 {
        return Err(RunError::Param("--concurrency must be at least 1".into()));
    }
    if params.size == 0 || params.size > SIZE_MAX {
        return Err(RunError::Param(format!(
            "--size must be 1..={SIZE_MAX} bytes"
        )));
    }
    let addr = resolve(&params.target).await?;
    let timeout = Duration::from_millis(params.io_timeout_ms.max(1));
    let next = Arc::new(AtomicU64::new(0));
    let start = now();
    let mut set = JoinSet::new();
    for _ in 0..params.concurrency {
        let (live, next) = (live.clone(), next.clone());
        let (total, size) = (params.total, params.size);
        set.spawn(async move {
            let mut hist = latency_histogram();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return hist;
                }
                let t = now();
                match one_connection(addr, i, size, timeout).await {
                    Ok(()) => {
                        record(&mut hist, t.elapsed());
                        live.add_op();
                        live.add_bytes(2 * size as u64);
                    }
                    Err(e) => live.fail(&e),
                }
            }
        });
    }
    let mut hist = latency_histogram();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(h) => {
                hist.add(&h).ok();
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let elapsed = start.elapsed();
    let ok = hist.len();
    let bytes = ok * 2 * params.size as u64;
    Ok(Report::new(
        "connrate", &params, &live, elapsed, bytes, ok, &hist,
    ))
}

async fn one_connection(
    addr: SocketAddr,
    i: u64,
    size: usize,
    timeout: Duration,
) -> Result<(), ConnError> {
    let mut stream = connect(addr, timeout).await?;
    let offset = i * size as u64;
    let mut buf = vec![0u8; size];
    pattern::fill(offset, &mut buf);
    io_within(timeout, "send request", stream.write_all(&buf)).await?;
    io_within(timeout, "read echo", stream.read_exact(&mut buf)).await?;
    if let Some(bad) = pattern::first_mismatch(offset, &buf) {
        return Err(ConnError::Corrupt {
            phase: "read echo",
            offset: bad as u64,
        });
    }
    // Orderly close: our FIN, then the echo backend's FIN once it has seen ours.
    io_within(timeout, "close", stream.shutdown()).await?;
    let mut rest = [0u8; 1];
    match io_within(timeout, "close", stream.read(&mut rest)).await? {
        0 => Ok(()),
        _ => Err(ConnError::Corrupt {
            phase: "close",
            offset: size as u64,
        }),
    }
}
