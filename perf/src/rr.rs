//! The request-response workload: fixed-size echo round trips, one outstanding per connection,
//! against the `echo` backend. Warm-up round trips are excluded from the histogram and the rate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::clock::now;
use crate::error::{ConnError, RunError};
use crate::pattern;
use crate::report::{latency_histogram, record, Live, Report};
use crate::tcp::{connect, io_within, resolve};

/// Largest round-trip payload accepted.
pub const SIZE_MAX: usize = 16 << 20;

/// Parameters of an rr run.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct RrParams {
    /// Address to connect to: a tunnel's public port, or the echo backend itself.
    #[arg(long)]
    pub target: String,
    /// Payload bytes per round trip (each way).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Connections, each with one round trip outstanding.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    /// Length of the measured phase.
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// Round trips before the measured phase starts; excluded from every number.
    #[arg(long, default_value_t = 1_000)]
    pub warmup_ms: u64,
    /// Stop after this many measured round trips in all (whichever comes first with the
    /// duration).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Give up on a connection that makes no progress for this long.
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
}

/// Runs echo round trips on `connections` connections for `warmup_ms + duration_ms`.
pub async fn run_rr(params: RrParams, live: Arc<Live>) -> Result<Report, RunError> {
    if params.connections == 0 {
        return Err(RunError::Param("--connections must be at least 1".into()));
    }
    if params.size == 0 || params.size > SIZE_MAX {
        return Err(RunError::Param(format!(
            "--size must be 1..={SIZE_MAX} bytes"
        )));
    }
    let addr = resolve(&params.target).await?;
    let timeout = Duration::from_millis(params.io_timeout_ms.max(1));
    let t0 = now();
    let measure_start = t0 + Duration::from_millis(params.warmup_ms);
    let end = measure_start + Duration::from_millis(params.duration_ms);
    // Measured round trips still allowed; `u64::MAX` when only the duration limits the run.
    let budget = Arc::new(AtomicU64::new(params.requests.unwrap_or(u64::MAX)));
    let mut set = JoinSet::new();
    for conn in 0..params.connections {
        let live = live.clone();
        let budget = budget.clone();
        let size = params.size;
        set.spawn(async move {
            let mut run = ConnRun {
                hist: latency_histogram(),
                measured: 0,
            };
            let phases = Phases { measure_start, end };
            let result =
                rr_connection(addr, conn, size, timeout, phases, &budget, &live, &mut run).await;
            (run, result)
        });
    }
    let mut hist = latency_histogram();
    let mut measured = 0u64;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((run, result)) => {
                // Round trips that completed before a connection failed still count.
                hist.add(&run.hist).ok();
                measured += run.measured;
                if let Err(e) = result {
                    live.fail(&e);
                }
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let elapsed = now().saturating_duration_since(measure_start);
    let bytes = measured * 2 * params.size as u64;
    Ok(Report::new(
        "rr", &params, &live, elapsed, bytes, measured, &hist,
    ))
}

/// What one connection measured.
struct ConnRun {
    hist: Histogram<u64>,
    measured: u64,
}

#[derive(Clone, Copy)]
struct Phases {
    /// Round trips starting before this are warm-up.
    measure_start: Instant,
    /// No round trip starts after this.
    end: Instant,
}

#[allow(clippy::too_many_arguments)]
async fn rr_connection(
    addr: SocketAddr,
    conn: u32,
    size: usize,
    timeout: Duration,
    phases: Phases,
    budget: &AtomicU64,
    live: &Live,
    run: &mut ConnRun,
) -> Result<(), ConnError> {
    let mut stream = connect(addr, timeout).await?;
    let mut send = vec![0u8; size];
    let mut recv = vec![0u8; size];
    // Each connection walks its own stretch of the pattern, so echoes cannot be mixed up.
    let mut offset = u64::from(conn) << 40;
    loop {
        let start = now();
        if start >= phases.end {
            return Ok(());
        }
        let measured = start >= phases.measure_start;
        if measured
            && budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
        {
            return Ok(());
        }
        pattern::fill(offset, &mut send);
        io_within(timeout, "send request", stream.write_all(&send)).await?;
        io_within(timeout, "read echo", stream.read_exact(&mut recv)).await?;
        let took = start.elapsed();
        if let Some(bad) = pattern::first_mismatch(offset, &recv) {
            return Err(ConnError::Corrupt {
                phase: "read echo",
                offset: offset + bad as u64,
            });
        }
        offset += size as u64;
        live.add_op();
        live.add_bytes(2 * size as u64);
        if measured {
            record(&mut run.hist, took);
            run.measured += 1;
        }
    }
}
