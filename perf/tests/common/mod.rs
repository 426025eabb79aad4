//! What the perf tests share: in-process backends, a relay process with its reports, and one
//! pass of the load tool's workloads through a relay (every byte checked by the receiver).

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Lines};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::Arc;

use serde_json::Value;

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

/// A relay binary (`conn_relay`, `mux_relay`) started with `args`, once it has printed its
/// "relaying ADDR -> ..." line on stderr and its `ready` report on stdout.
pub struct RelayProcess {
    child: Child,
    /// The address it listens on, from the banner.
    pub addr: String,
    /// The banner line.
    pub banner: String,
    /// The `ready` report.
    pub ready: Value,
    reports: Lines<BufReader<ChildStdout>>,
    /// Kept open: a closed stderr would make the relay's messages fail.
    _stderr: BufReader<ChildStderr>,
}

impl RelayProcess {
    pub fn start(bin: &str, args: &[&str]) -> RelayProcess {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut banner = String::new();
        stderr.read_line(&mut banner).unwrap();
        // "<name>: relaying 127.0.0.1:P -> ..."
        let addr = banner.split_whitespace().nth(2).unwrap().to_owned();
        let mut reports = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready: Value = serde_json::from_str(&reports.next().unwrap().unwrap()).unwrap();
        assert_eq!(ready["event"], "ready", "{ready}");
        RelayProcess {
            child,
            addr,
            banner,
            ready,
            reports,
            _stderr: stderr,
        }
    }

    /// SIGTERM: the last report, and exit status 0.
    pub fn stop(mut self) -> Value {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let last: Value = serde_json::from_str(&self.reports.next().unwrap().unwrap()).unwrap();
        assert!(self.child.wait().unwrap().success());
        last
    }
}
