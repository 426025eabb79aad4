//! `mux_relay` end to end (Linux only): the binary in front of in-process backends, the load
//! tool's workloads through it (every byte checked by the receiver), and its reports. Tiny sizes;
//! they assert correctness, never speed.
#![cfg(target_os = "linux")]

use std::net::SocketAddr;
use std::sync::Arc;

use warren_perf::connrate::{run_connrate, ConnrateParams};
use warren_perf::{BackendKind, Live};

mod common;
use common::{start, workloads, RelayProcess, ECHO_CONNECTIONS, SINK_CONNECTIONS, TIMEOUT_MS};

/// A mux_relay (server and the client process it starts) in front of `to`. Its `stop` report
/// covers both processes.
fn mux(to: SocketAddr, sessions: usize, tls: bool) -> RelayProcess {
    let (to, sessions) = (to.to_string(), sessions.to_string());
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--to",
        &to,
        "--sessions",
        &sessions,
    ];
    if tls {
        args.push("--tls");
    }
    RelayProcess::start(env!("CARGO_BIN_EXE_mux_relay"), &args)
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
    let (echo_mux, sink_mux) = (mux(echo, 2, tls), mux(sink, 1, tls));
    assert_eq!(echo_mux.ready["processes"], 2);
    assert_eq!(echo_mux.ready["sessions"], 2);
    assert_eq!(echo_mux.ready["tls"], tls);
    assert_eq!(sink_mux.ready["tls"], tls);
    let client_pid = echo_mux.ready["client_pid"].as_u64().unwrap();
    let banner = format!("over 2 session(s) to client process {client_pid} ");
    assert!(echo_mux.banner.contains(&banner), "{}", echo_mux.banner);
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
    let mux = mux(to, 1, false);
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
