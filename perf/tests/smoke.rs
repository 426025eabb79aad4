//! CI smoke tests of the load tool: every backend on port 0 in-process, every client against it
//! with tiny sizes. They assert that the tool ran and that the bytes arrived intact, never speed.

use std::sync::Arc;

use warren_perf::bulk::{run_bulk, BulkParams, Direction};
use warren_perf::connrate::{run_connrate, ConnrateParams};
use warren_perf::hold::{run_hold, HoldParams};
use warren_perf::rr::{run_rr, RrParams};
use warren_perf::{Backend, BackendKind, Live, Report};

mod common;
use common::{start, TIMEOUT_MS};

fn assert_clean(report: &Report) {
    assert_eq!(report.errors, 0, "{}", report.to_json());
    assert!(report.error_samples.is_empty(), "{}", report.to_json());
    // The JSON is one object that parses back.
    let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(v["workload"], report.workload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_up_and_down_every_byte_acknowledged() {
    let sink = start(BackendKind::Sink).await;
    for direction in [Direction::Up, Direction::Down] {
        let live = Arc::new(Live::default());
        let params = BulkParams {
            target: sink.to_string(),
            streams: 2,
            bytes: 1 << 20,
            direction,
            io_timeout_ms: TIMEOUT_MS,
        };
        let report = run_bulk(params, live).await.unwrap();
        assert_clean(&report);
        assert_eq!(report.requests, 2, "{direction:?}");
        assert_eq!(report.bytes, 2 << 20, "{direction:?}");
        assert_eq!(report.latency_us.unwrap().count, 2);
        assert_eq!(
            report.params["direction"],
            format!("{direction:?}").to_lowercase()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_of_zero_bytes_completes_both_ways() {
    let sink = start(BackendKind::Sink).await;
    for direction in [Direction::Up, Direction::Down] {
        let params = BulkParams {
            target: sink.to_string(),
            streams: 1,
            bytes: 0,
            direction,
            io_timeout_ms: TIMEOUT_MS,
        };
        let report = run_bulk(params, Arc::new(Live::default())).await.unwrap();
        assert_clean(&report);
        assert_eq!(report.requests, 1, "{direction:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_fails_when_the_target_returns_other_bytes() {
    // An echo backend does not speak the bulk protocol: it sends back the request, not the data.
    let echo = start(BackendKind::Echo).await;
    let params = BulkParams {
        target: echo.to_string(),
        streams: 1,
        bytes: 100_000,
        direction: Direction::Down,
        io_timeout_ms: TIMEOUT_MS,
    };
    let report = run_bulk(params, Arc::new(Live::default())).await.unwrap();
    assert_eq!(report.errors, 1, "{}", report.to_json());
    assert_eq!(report.bytes, 0);
    assert_eq!(report.requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_acknowledges_only_the_intact_prefix_of_an_upload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warren_perf::bulk::BulkRequest;

    let sink = start(BackendKind::Sink).await;
    let mut stream = tokio::net::TcpStream::connect(sink).await.unwrap();
    let req = BulkRequest::Upload { len_bytes: 1000 };
    stream.write_all(&req.encode()).await.unwrap();
    let mut data = vec![0u8; 1000];
    warren_perf::pattern::fill(0, &mut data);
    data[700] ^= 0xff;
    stream.write_all(&data).await.unwrap();
    let mut ack = [0u8; 8];
    stream.read_exact(&mut ack).await.unwrap();
    assert_eq!(u64::from_be_bytes(ack), 700);
}

/// The binary end to end: a sink started as a process on port 0, a bulk run against it, one JSON
/// object on stdout.
#[test]
fn cli_prints_one_json_report_on_stdout() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let bin = env!("CARGO_BIN_EXE_warren-load");
    let mut sink = Command::new(bin)
        .args(["sink", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(sink.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    let out = Command::new(bin)
        .args(["--quiet", "--threads", "2", "bulk", "--target", &addr])
        .args(["--streams", "2", "--bytes", "1MiB", "--direction", "down"])
        .output()
        .unwrap();
    sink.kill().ok();
    sink.wait().ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["workload"], "bulk");
    assert_eq!(v["bytes"], 2 << 20);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["params"]["target"], addr.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rr_echoes_every_round_trip_intact() {
    let echo = start(BackendKind::Echo).await;
    let params = RrParams {
        target: echo.to_string(),
        size: 64,
        connections: 2,
        duration_ms: 60_000,
        warmup_ms: 0,
        requests: Some(200),
        io_timeout_ms: TIMEOUT_MS,
    };
    let report = run_rr(params, Arc::new(Live::default())).await.unwrap();
    assert_clean(&report);
    assert_eq!(report.requests, 200);
    assert_eq!(report.bytes, 200 * 2 * 64);
    let lat = report.latency_us.unwrap();
    assert_eq!(lat.count, 200);
    assert!(lat.p50 <= lat.p90 && lat.p90 <= lat.p99 && lat.p99 <= lat.p999);
    assert!(report.rps > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rr_warmup_is_excluded_from_the_numbers() {
    let echo = start(BackendKind::Echo).await;
    let live = Arc::new(Live::default());
    let params = RrParams {
        target: echo.to_string(),
        size: 16,
        connections: 1,
        duration_ms: 100,
        warmup_ms: 100,
        requests: None,
        io_timeout_ms: TIMEOUT_MS,
    };
    let report = run_rr(params, live.clone()).await.unwrap();
    assert_clean(&report);
    let all_ops = live.ops.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        report.requests > 0 && report.requests < all_ops,
        "{all_ops} {}",
        report.to_json()
    );
    assert!(report.seconds < 1.0, "{}", report.to_json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connrate_completes_every_connection() {
    let echo = start(BackendKind::Echo).await;
    let params = ConnrateParams {
        target: echo.to_string(),
        total: 50,
        concurrency: 4,
        size: 32,
        io_timeout_ms: TIMEOUT_MS,
    };
    let report = run_connrate(params, Arc::new(Live::default()))
        .await
        .unwrap();
    assert_clean(&report);
    assert_eq!(report.requests, 50);
    assert_eq!(report.bytes, 50 * 2 * 32);
    assert_eq!(report.latency_us.unwrap().count, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_every_connection_alive() {
    let echo = Backend::bind(BackendKind::Echo, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = echo.local_addr();
    let stats = echo.stats();
    tokio::spawn(echo.run());
    let params = HoldParams {
        target: addr.to_string(),
        connections: 20,
        hold_ms: 50,
        connect_concurrency: 8,
        io_timeout_ms: TIMEOUT_MS,
    };
    let report = run_hold(params, Arc::new(Live::default())).await.unwrap();
    assert_clean(&report);
    assert_eq!(report.requests, 20);
    assert_eq!(report.extra["opened"], 20);
    assert_eq!(report.extra["alive_at_end"], 20);
    assert_eq!(
        stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_counts_connections_that_cannot_open() {
    // Bind then drop a listener: nothing listens on that port now.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let params = HoldParams {
        target: closed.to_string(),
        connections: 3,
        hold_ms: 0,
        connect_concurrency: 3,
        io_timeout_ms: TIMEOUT_MS,
    };
    let report = run_hold(params, Arc::new(Live::default())).await.unwrap();
    assert_eq!(report.errors, 3);
    assert_eq!(report.requests, 0);
    assert!(report.latency_us.is_none());
    assert!(
        report.error_samples[0].contains("connect"),
        "{:?}",
        report.error_samples
    );
}

/// Sends raw HTTP/1.1 requests on one keep-alive connection and reads the responses by
/// Content-Length, as `oha` and `wrk` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_serves_keep_alive_routes_with_content_length() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let http = start(BackendKind::Http).await;
    let stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let mut stream = BufReader::new(stream);
    for (path, status, body_len) in [
        ("/small", 200, 2usize),
        ("/large", 200, 256 * 1024),
        ("/health", 200, 2),
        ("/nope", 404, 9),
        ("/small?x=1", 200, 2),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {line}"
        );
        let mut content_length = None;
        loop {
            line.clear();
            stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = Some(v.trim().parse::<usize>().unwrap());
            }
        }
        assert_eq!(content_length, Some(body_len), "{path}");
        let mut body = vec![0u8; body_len];
        stream.read_exact(&mut body).await.unwrap();
        if path == "/health" {
            assert_eq!(body, b"ok");
        }
    }
    // Connection: close is honoured.
    stream
        .get_mut()
        .write_all(b"GET /small HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.ends_with(b"\r\n\r\nhi"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
}
