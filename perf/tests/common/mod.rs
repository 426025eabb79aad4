//! What the relay tests share: in-process backends, and one pass of the load tool's workloads
//! through a relay (every byte checked by the receiver).

use std::net::SocketAddr;
use std::sync::Arc;

use warren_perf::bulk::{run_bulk, BulkParams, Direction};
use warren_perf::connrate::{run_connrate, ConnrateParams};
use warren_perf::rr::{run_rr, RrParams};
use warren_perf::{Backend, BackendKind, Live};

pub const TIMEOUT_MS: u64 = 20_000;

/// Connections one [`workloads`] pass opens to the echo target, and to the sink target.
pub const ECHO_CONNECTIONS: u64 = 204;
pub const SINK_CONNECTIONS: u64 = 6;

/// A backend of `kind` on an ephemeral loopback port, served by this runtime.
pub async fn start(kind: BackendKind) -> SocketAddr {
    let backend = Backend::bind(kind, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = backend.local_addr();
    tokio::spawn(backend.run());
    addr
}

/// Through `echo` (a relay in front of an echo backend): 200 connect + echo + close, then 400
/// round trips of 1000 bytes on 4 connections. Through `sink`: 3 x 8 MiB up, then down (larger
/// than a 64 KiB splice pipe, so pipes fill and drain many times; down makes the backend's side
/// the source). Panics naming the workload on any error or short transfer.
pub async fn workloads(echo: &str, sink: &str) {
    let params = ConnrateParams {
        target: echo.to_owned(),
        total: 200,
        concurrency: 8,
        size: 32,
        io_timeout_ms: TIMEOUT_MS,
    };
    let r = run_connrate(params, Arc::new(Live::default()))
        .await
        .unwrap();
    assert_eq!((r.errors, r.requests), (0, 200), "{}", r.to_json());
    let params = RrParams {
        target: echo.to_owned(),
        size: 1000,
        connections: 4,
        duration_ms: 10_000,
        warmup_ms: 0,
        requests: Some(400),
        io_timeout_ms: TIMEOUT_MS,
    };
    let r = run_rr(params, Arc::new(Live::default())).await.unwrap();
    assert_eq!(r.errors, 0, "{}", r.to_json());
    for direction in [Direction::Up, Direction::Down] {
        let params = BulkParams {
            target: sink.to_owned(),
            streams: 3,
            bytes: 8 << 20,
            direction,
            io_timeout_ms: TIMEOUT_MS,
        };
        let r = run_bulk(params, Arc::new(Live::default())).await.unwrap();
        assert_eq!((r.errors, r.bytes), (0, 3 * (8 << 20)), "{}", r.to_json());
    }
}
