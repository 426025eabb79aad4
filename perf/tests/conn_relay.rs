//! `conn_relay` end to end (Linux only): two relays in a chain (as perf/compare's `splice-floor`
//! with `--splice`, and without it) in front of in-process backends, the load tool's workloads
//! through them (every byte checked by the receiver, both directions of bulk), and the relays'
//! final reports. Tiny sizes; they assert correctness, never speed.
#![cfg(target_os = "linux")]

use std::net::SocketAddr;
use std::process::Command;

use warren_perf::BackendKind;

mod common;
use common::{start, workloads, RelayProcess, ECHO_CONNECTIONS, SINK_CONNECTIONS};

/// One conn_relay process in front of `to` (2 event loops).
fn relay(to: &str, extra: &[&str]) -> RelayProcess {
    let mut args = vec!["--listen", "127.0.0.1:0", "--to", to, "--threads", "2"];
    args.extend_from_slice(extra);
    RelayProcess::start(env!("CARGO_BIN_EXE_conn_relay"), &args)
}

/// Relay A (the public side) -> relay B -> `to`, both with `extra` arguments.
fn chain(to: SocketAddr, extra: &[&str]) -> (RelayProcess, RelayProcess) {
    let b = relay(&to.to_string(), extra);
    let a = relay(&b.addr, extra);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spliced_chain_passes_every_workload_intact() {
    workloads_pass_through(
        &["--splice", "--pipe-bytes", "65536"],
        "splice through 65536-byte pipes",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copying_chain_passes_every_workload_intact() {
    workloads_pass_through(&[], "recv/send").await;
}

async fn workloads_pass_through(extra: &[&str], mode: &str) {
    let (echo, sink) = (
        start(BackendKind::Echo).await,
        start(BackendKind::Sink).await,
    );
    let (echo_a, echo_b) = chain(echo, extra);
    let (sink_a, sink_b) = chain(sink, extra);
    assert!(echo_a.banner.contains(mode), "{}", echo_a.banner);
    assert_eq!(echo_a.ready["threads"], 2, "{}", echo_a.ready);

    workloads(&echo_a.addr, &sink_a.addr).await;

    for (relay, n) in [
        (echo_a, ECHO_CONNECTIONS),
        (echo_b, ECHO_CONNECTIONS),
        (sink_a, SINK_CONNECTIONS),
        (sink_b, SINK_CONNECTIONS),
    ] {
        let last = relay.stop();
        assert_eq!(last["event"], "exit", "{last}");
        assert_eq!(
            (
                &last["accepted"],
                &last["completed"],
                &last["failed"],
                &last["open"]
            ),
            (&n.into(), &n.into(), &0.into(), &0.into()),
            "{last}"
        );
    }
}

#[test]
fn pipe_bytes_out_of_range_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_conn_relay"))
        .args(["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9"])
        .args(["--splice", "--pipe-bytes", "100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--pipe-bytes"), "{err}");
}
