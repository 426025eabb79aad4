//! `mux_relay` end to end (Linux only): the binary in front of in-process backends, the load
//! tool's workloads through it (every byte checked by the receiver), and its reports. Tiny sizes;
//! they assert correctness, never speed.
#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Lines};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::Arc;

use serde_json::Value;
use warren_perf::connrate::{run_connrate, ConnrateParams};
use warren_perf::{BackendKind, Live};

mod common;
use common::{start, workloads, ECHO_CONNECTIONS, SINK_CONNECTIONS, TIMEOUT_MS};

/// A mux_relay (server and the client process it starts) in front of `to`.
struct Mux {
    child: Child,
    addr: String,
    reports: Lines<BufReader<ChildStdout>>,
    ready: Value,
    /// Kept open: a closed stderr would make the relay's messages fail.
    _stderr: BufReader<ChildStderr>,
}

impl Mux {
    fn start(to: SocketAddr, sessions: usize, tls: bool) -> Mux {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mux_relay"))
            .args(["--listen", "127.0.0.1:0", "--to", &to.to_string()])
            .args(["--sessions", &sessions.to_string()])
            .args(tls.then_some("--tls"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut reports = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready: Value = serde_json::from_str(&reports.next().unwrap().unwrap()).unwrap();
        assert_eq!(ready["event"], "ready", "{ready}");
        // "mux_relay: relaying 127.0.0.1:P -> ..."
        let mut line = String::new();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        stderr.read_line(&mut line).unwrap();
        let addr = line.split_whitespace().nth(2).unwrap().to_owned();
        Mux {
            child,
            addr,
            reports,
            ready,
            _stderr: stderr,
        }
    }

    /// SIGTERM: the last report (both processes), and exit status 0.
    fn stop(mut self) -> Value {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_pass_through_intact_and_reports_count_both_processes() {
    workloads_pass_through(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_pass_through_intact_over_tls_sessions() {
    workloads_pass_through(true).await;
}

async fn workloads_pass_through(tls: bool) {
    let (echo, sink) = (
        start(BackendKind::Echo).await,
        start(BackendKind::Sink).await,
    );
    let (echo_mux, sink_mux) = (Mux::start(echo, 2, tls), Mux::start(sink, 1, tls));
    assert_eq!(echo_mux.ready["processes"], 2);
    assert_eq!(echo_mux.ready["sessions"], 2);
    assert_eq!(echo_mux.ready["tls"], tls);
    assert_eq!(sink_mux.ready["tls"], tls);
    let client_pid = echo_mux.ready["client_pid"].as_u64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{client_pid}")).exists());

    workloads(&echo_mux.addr, &sink_mux.addr).await;

    let last = echo_mux.stop();
    assert_eq!(last["event"], "exit", "{last}");
    assert_eq!(last["accepted"], ECHO_CONNECTIONS, "{last}");
    assert_eq!(last["completed"], ECHO_CONNECTIONS, "{last}");
    assert_eq!(last["failed"], 0, "{last}");
    assert_eq!(last["open"], 0, "{last}");
    assert_eq!(last["client"]["completed"], ECHO_CONNECTIONS, "{last}");
    // Two sessions, streams in turn.
    assert_eq!(
        last["per_session"][0]["accepted"],
        ECHO_CONNECTIONS / 2,
        "{last}"
    );
    let f = |k: &str| last[k].as_f64().unwrap();
    assert!(f("client_cpu_s") > 0.0 && f("server_cpu_s") > 0.0, "{last}");
    assert!(
        (f("cpu_s") - f("server_cpu_s") - f("client_cpu_s")).abs() < 1e-9,
        "{last}"
    );
    // The client process went with the server.
    assert!(!std::path::Path::new(&format!("/proc/{client_pid}")).exists());
    let last = sink_mux.stop();
    assert_eq!(
        (&last["completed"], &last["failed"]),
        (&SINK_CONNECTIONS.into(), &0.into()),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_backend_resets_the_visitor() {
    // A port nothing listens on: bound, then closed.
    let to = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mux = Mux::start(to, 1, false);
    let params = ConnrateParams {
        target: mux.addr.clone(),
        total: 10,
        concurrency: 2,
        size: 32,
        io_timeout_ms: TIMEOUT_MS,
    };
    let r = run_connrate(params, Arc::new(Live::default()))
        .await
        .unwrap();
    assert_eq!((r.errors, r.requests), (10, 0), "{}", r.to_json());
    let last = mux.stop();
    assert_eq!(
        (&last["failed"], &last["completed"]),
        (&10.into(), &0.into()),
        "{last}"
    );
    assert_eq!(last["client"]["failed"], 10, "{last}");
}
