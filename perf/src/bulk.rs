//! The bulk workload and its protocol, served by the `sink` backend.
//!
//! Protocol: the client opens a connection and sends a 9-byte request `[op u8][len u64 BE]`.
//!
//! - `op = 0`, download: the sink sends `len` pattern bytes, then closes its side. The client is
//!   the receiver: it counts and checks every byte and expects EOF exactly after `len`.
//! - `op = 1`, upload: the client sends `len` pattern bytes. The sink is the receiver: it checks
//!   them and replies with an 8-byte big-endian count of the bytes it received intact (`len` when
//!   all arrived; less when the stream ended early or a byte differed from the pattern).
//!
//! The sink acknowledges as soon as it has `len` bytes instead of waiting for the client to
//! half-close, so the workload does not depend on a tunnel forwarding half-close (that is tested
//! elsewhere, not measured here).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::clock::now;
use crate::error::{ConnError, RunError};
use crate::pattern;
use crate::report::{latency_histogram, record, Live, Report};
use crate::tcp::{connect, io_within, resolve};

/// Length of a bulk request on the wire.
pub const REQUEST_LEN: usize = 9;

/// Size of each read and the most each write hands the socket.
const CHUNK_BYTES: usize = 64 * 1024;

/// What a bulk client asks the sink for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkRequest {
    /// The sink sends `len_bytes` pattern bytes, then closes.
    Download { len_bytes: u64 },
    /// The client sends `len_bytes` pattern bytes; the sink acknowledges the count.
    Upload { len_bytes: u64 },
}

impl BulkRequest {
    pub fn encode(self) -> [u8; REQUEST_LEN] {
        let (op, len) = match self {
            BulkRequest::Download { len_bytes } => (0u8, len_bytes),
            BulkRequest::Upload { len_bytes } => (1u8, len_bytes),
        };
        let mut out = [0u8; REQUEST_LEN];
        out[0] = op;
        out[1..].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// Parses a request; `None` for an unknown op.
    pub fn decode(buf: [u8; REQUEST_LEN]) -> Option<Self> {
        let mut len = [0u8; 8];
        len.copy_from_slice(&buf[1..]);
        let len_bytes = u64::from_be_bytes(len);
        match buf[0] {
            0 => Some(BulkRequest::Download { len_bytes }),
            1 => Some(BulkRequest::Upload { len_bytes }),
            _ => None,
        }
    }
}

/// Which way the bytes of a bulk run flow, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to backend (through a tunnel: visitor to service).
    Up,
    /// Backend to client.
    Down,
}

/// Parameters of a bulk run.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct BulkParams {
    /// Address to connect to: a tunnel's public port, or the sink itself.
    #[arg(long)]
    pub target: String,
    /// Concurrent connections, each moving `--bytes`.
    #[arg(long, default_value_t = 1)]
    pub streams: u32,
    /// Bytes per stream; accepts KiB/MiB/GiB and KB/MB/GB suffixes.
    #[arg(long, default_value = "100MiB", value_parser = parse_bytes)]
    pub bytes: u64,
    /// `up` (client sends, sink acknowledges) or `down` (sink sends, client checks).
    #[arg(long, value_enum, default_value_t = Direction::Up)]
    pub direction: Direction,
    /// Give up on a connection that makes no progress for this long.
    #[arg(long, default_value_t = 30_000)]
    pub io_timeout_ms: u64,
}

/// Parses a byte count: a plain number, or one with a KiB/MiB/GiB (binary) or KB/MB/GB (decimal)
/// suffix.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 1048576, 64KiB, 1GiB, 100MB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} (use KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows 64 bits"))
}

/// Runs `streams` concurrent bulk transfers of `bytes` each; the report counts only bytes the
/// receiver confirmed intact.
pub async fn run_bulk(params: BulkParams, live: Arc<Live>) -> Result<Report, RunError> {
    if params.streams == 0 {
        return Err(RunError::Param("--streams must be at least 1".into()));
    }
    let addr = resolve(&params.target).await?;
    let timeout = Duration::from_millis(params.io_timeout_ms.max(1));
    let start = now();
    let mut set = JoinSet::new();
    for _ in 0..params.streams {
        let live = live.clone();
        let (len, direction) = (params.bytes, params.direction);
        set.spawn(async move {
            let t = now();
            let result = bulk_stream(addr, direction, len, timeout, &live).await;
            result.map(|()| t.elapsed())
        });
    }
    let mut hist = latency_histogram();
    let mut ok = 0u64;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(took)) => {
                ok += 1;
                live.add_op();
                record(&mut hist, took);
            }
            Ok(Err(e)) => live.fail(&e),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    let elapsed = start.elapsed();
    let bytes = ok * params.bytes;
    Ok(Report::new(
        "bulk", &params, &live, elapsed, bytes, ok, &hist,
    ))
}

async fn bulk_stream(
    addr: SocketAddr,
    direction: Direction,
    len: u64,
    timeout: Duration,
    live: &Live,
) -> Result<(), ConnError> {
    let mut stream = connect(addr, timeout).await?;
    match direction {
        Direction::Up => {
            let req = BulkRequest::Upload { len_bytes: len };
            io_within(timeout, "send request", stream.write_all(&req.encode())).await?;
            send_pattern(&mut stream, len, timeout, live).await?;
            let mut ack = [0u8; 8];
            io_within(timeout, "read acknowledgement", stream.read_exact(&mut ack)).await?;
            let got = u64::from_be_bytes(ack);
            if got != len {
                return Err(ConnError::Count {
                    who: "sink",
                    expected: len,
                    got,
                });
            }
        }
        Direction::Down => {
            let req = BulkRequest::Download { len_bytes: len };
            io_within(timeout, "send request", stream.write_all(&req.encode())).await?;
            let got = receive_pattern(&mut stream, len, timeout, Some(live)).await?;
            if got != len {
                return Err(ConnError::Count {
                    who: "client",
                    expected: len,
                    got,
                });
            }
        }
    }
    Ok(())
}

/// Writes `len` pattern bytes.
async fn send_pattern(
    stream: &mut TcpStream,
    len: u64,
    timeout: Duration,
    live: &Live,
) -> Result<(), ConnError> {
    let mut sent = 0u64;
    while sent < len {
        let max = usize::try_from(len - sent)
            .unwrap_or(usize::MAX)
            .min(CHUNK_BYTES);
        let chunk = pattern::slice_at(sent, max);
        let n = io_within(timeout, "send data", stream.write(chunk)).await?;
        if n == 0 {
            return Err(ConnError::Eof { phase: "send data" });
        }
        sent += n as u64;
        live.add_bytes(n as u64);
    }
    Ok(())
}

/// Reads and checks pattern bytes until EOF, or until `len` intact bytes have arrived. Returns the
/// count of intact bytes; a byte that differs from the pattern is an error when `live` is given
/// (the client), and ends the count when it is not (the sink, which reports the short count).
async fn receive_pattern(
    stream: &mut TcpStream,
    len: u64,
    timeout: Duration,
    live: Option<&Live>,
) -> Result<u64, ConnError> {
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut got = 0u64;
    loop {
        // The sender sends exactly `len`: the sink acknowledges once it has them (the uploading
        // client is waiting for that), while a downloading client reads on to see EOF or excess.
        if got >= len && live.is_none() {
            return Ok(got);
        }
        let n = io_within(timeout, "receive data", stream.read(&mut buf)).await?;
        if n == 0 {
            return Ok(got);
        }
        if let Some(bad) = pattern::first_mismatch(got, &buf[..n]) {
            let offset = got + bad as u64;
            return match live {
                Some(_) => Err(ConnError::Corrupt {
                    phase: "receive data",
                    offset,
                }),
                None => Ok(offset),
            };
        }
        got += n as u64;
        if let Some(live) = live {
            live.add_bytes(n as u64);
        }
    }
}

/// Serves one connection of the `sink` backend.
pub(crate) async fn serve_sink(mut stream: TcpStream) -> std::io::Result<()> {
    // Backend side: no deadline but the client's; a stuck client holds one task, nothing else.
    let timeout = Duration::from_secs(24 * 3600);
    let mut req = [0u8; REQUEST_LEN];
    stream.read_exact(&mut req).await?;
    match BulkRequest::decode(req) {
        Some(BulkRequest::Download { len_bytes }) => {
            let mut sent = 0u64;
            while sent < len_bytes {
                let max = usize::try_from(len_bytes - sent)
                    .unwrap_or(usize::MAX)
                    .min(CHUNK_BYTES);
                let n = stream.write(pattern::slice_at(sent, max)).await?;
                if n == 0 {
                    return Ok(());
                }
                sent += n as u64;
            }
            stream.shutdown().await
        }
        Some(BulkRequest::Upload { len_bytes }) => {
            let got = receive_pattern(&mut stream, len_bytes, timeout, None)
                .await
                .map_err(std::io::Error::other)?;
            stream.write_all(&got.to_be_bytes()).await?;
            stream.shutdown().await
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ops_are_rejected() {
        for req in [
            BulkRequest::Download { len_bytes: 0 },
            BulkRequest::Upload {
                len_bytes: u64::MAX,
            },
            BulkRequest::Download { len_bytes: 1 << 30 },
        ] {
            assert_eq!(BulkRequest::decode(req.encode()), Some(req));
        }
        assert_eq!(
            BulkRequest::Upload { len_bytes: 258 }.encode(),
            [1, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        assert_eq!(BulkRequest::decode([2, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn byte_counts_parse_with_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("100MB"), Ok(100_000_000));
        assert!(parse_bytes("1.5GiB").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }
}
