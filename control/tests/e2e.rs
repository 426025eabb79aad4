//! End-to-end tests of the real `warren` binary: a server and a client process on loopback,
//! with the local services and the visitors played by this test process.
//!
//! Every port is 0 in the configs; the real ones come from the processes' logs. The harness is
//! in `common/`. Every tunnel test runs twice, `..._compat` and `..._uring`, passing
//! `--backend` to both processes.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Barrier};
use tokio::time::{timeout, Instant};
use warren::backend::Backend;
use warren_proto::frame::{data_header, Frame, GoAwayCode, StreamId};
use warren_proto::handshake::{
    Accepted, ClientHandshake, ClientHandshakeConfig, HandshakeError, PeerParams, RejectCode, Token,
};

use common::{
    echo_service, endless_service, expect_refused, field, pattern_summary, raise_fd_limit,
    read_summary, read_summary_counting, require_uring, serve, sink_service, source_service,
    trickle_service, try_field, write_pattern, write_pattern_counting, EchoStats, Pattern, Server,
    ServerSpec, TestDir, Transport, Warren, CLIENT_NAME, SOON, TOKEN,
};

const MIB: u64 = 1024 * 1024;

/// Size of the byte-exact bulk transfers.
const BULK: u64 = 64 * MIB;

/// Budget for the bulk transfers; they take about a second on a quiet machine.
const BULK_LIMIT: Duration = Duration::from_secs(30);

on_both_backends! {
    tcp_transport_carries_64_mib_byte_exact_both_ways
        => tcp_transport_carries_64_mib_byte_exact_both_ways_compat,
           tcp_transport_carries_64_mib_byte_exact_both_ways_uring;
    tls_transport_with_pinned_self_signed_cert_carries_64_mib_byte_exact_both_ways
        => tls_transport_with_pinned_self_signed_cert_carries_64_mib_byte_exact_both_ways_compat,
           tls_transport_with_pinned_self_signed_cert_carries_64_mib_byte_exact_both_ways_uring;
    tls_records_sealed_by_rustls_at_one_end_and_by_warren_at_the_other_interoperate
        => tls_records_sealed_by_rustls_at_one_end_and_by_warren_at_the_other_interoperate_compat,
           tls_records_sealed_by_rustls_at_one_end_and_by_warren_at_the_other_interoperate_uring;
    visitor_half_close_reaches_the_service_and_its_answer_still_flows_back
        => visitor_half_close_reaches_the_service_and_its_answer_still_flows_back_compat,
           visitor_half_close_reaches_the_service_and_its_answer_still_flows_back_uring;
    service_half_close_reaches_the_visitor_while_the_visitor_keeps_sending
        => service_half_close_reaches_the_visitor_while_the_visitor_keeps_sending_compat,
           service_half_close_reaches_the_visitor_while_the_visitor_keeps_sending_uring;
    a_thousand_concurrent_visitors_each_get_their_own_echo
        => a_thousand_concurrent_visitors_each_get_their_own_echo_compat,
           a_thousand_concurrent_visitors_each_get_their_own_echo_uring;
    killed_client_resets_its_visitors_and_a_replacement_client_takes_over
        => killed_client_resets_its_visitors_and_a_replacement_client_takes_over_compat,
           killed_client_resets_its_visitors_and_a_replacement_client_takes_over_uring;
    bad_session_peers_are_refused_with_clear_errors_while_a_live_session_keeps_working
        => bad_session_peers_are_refused_with_clear_errors_while_a_live_session_keeps_working_compat,
           bad_session_peers_are_refused_with_clear_errors_while_a_live_session_keeps_working_uring;
    a_client_that_dies_inside_a_data_frame_resets_the_visitor_of_that_stream
        => a_client_that_dies_inside_a_data_frame_resets_the_visitor_of_that_stream_compat,
           a_client_that_dies_inside_a_data_frame_resets_the_visitor_of_that_stream_uring;
    sigterm_lets_the_open_stream_finish_refuses_new_visitors_and_exits_zero
        => sigterm_lets_the_open_stream_finish_refuses_new_visitors_and_exits_zero_compat,
           sigterm_lets_the_open_stream_finish_refuses_new_visitors_and_exits_zero_uring;
    services_named_by_host_name_are_dialled_and_one_that_does_not_resolve_refuses_only_its_streams
        => services_named_by_host_name_are_dialled_and_one_that_does_not_resolve_refuses_only_its_streams_compat,
           services_named_by_host_name_are_dialled_and_one_that_does_not_resolve_refuses_only_its_streams_uring;
}

// ---- 1. byte-exact bulk transfer -----------------------------------------------------------

/// Uploads 64 MiB (visitor -> service) and downloads 64 MiB (service -> visitor) at the same
/// time through one tunnel; both must arrive byte-exact, and each direction must end with EOF.
/// `records`: who must seal the session's records at the server and at the client, as the
/// "session running" lines name it ("none" for plain TCP); `server_tuning` goes into the
/// server's `[server.tuning]`.
async fn bulk_transfer_is_byte_exact_both_ways(
    transport: Transport,
    backend: Backend,
    server_tuning: &str,
    records: [&str; 2],
) {
    let dir = TestDir::new("bulk");
    let server = Server::start(
        &dir,
        ServerSpec {
            transport,
            backend,
            services: &["upload", "download"],
            tuning: server_tuning,
            ..ServerSpec::default()
        },
    );
    let (sink, mut received) = sink_service().await;
    let source = source_service(2, BULK).await;
    let config = server.client_config(&dir, &[("upload", sink), ("download", source)]);
    let client = server.connect_client("client", &config, 0);
    for (end, proc, want) in [
        ("server", &server.proc, records[0]),
        ("client", &client, records[1]),
    ] {
        for line in proc.wait_lines(0, &["session running"], server.shards, SOON) {
            assert_eq!(field(&line, "tls").trim_matches('"'), want, "{end}: {line}");
        }
    }

    let uploaded = Arc::new(AtomicU64::new(0));
    let downloaded = Arc::new(AtomicU64::new(0));
    let upload = {
        let addr = server.public("upload");
        let uploaded = uploaded.clone();
        tokio::spawn(async move {
            let mut sock = TcpStream::connect(addr).await?;
            let sent = write_pattern_counting(&mut sock, 1, BULK, &uploaded).await?;
            sock.shutdown().await?;
            // The sink closes after our EOF; nothing comes back before that.
            let mut back = Vec::new();
            sock.read_to_end(&mut back).await?;
            assert!(back.is_empty(), "the sink sent {} bytes", back.len());
            std::io::Result::Ok(sent)
        })
    };
    let download = {
        let addr = server.public("download");
        let downloaded = downloaded.clone();
        tokio::spawn(async move {
            let mut sock = TcpStream::connect(addr).await?;
            read_summary_counting(&mut sock, &downloaded).await
        })
    };
    let (sent, got) = timeout(BULK_LIMIT, async { (upload.await, download.await) })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "bulk transfers did not finish within {BULK_LIMIT:?}: uploaded {} and downloaded \
                 {} of {BULK} bytes each",
                uploaded.load(Ordering::Relaxed),
                downloaded.load(Ordering::Relaxed)
            )
        });
    let sent = sent.unwrap().expect("upload failed");
    let got = got.unwrap().expect("download failed");

    let at_service = timeout(SOON, received.recv())
        .await
        .expect("the sink never reported")
        .expect("sink channel open")
        .expect("the sink's connection failed");
    assert_eq!(at_service, sent, "visitor -> service bytes differ");
    assert_eq!(sent.len, BULK);
    assert_eq!(
        got,
        pattern_summary(2, BULK),
        "service -> visitor bytes differ"
    );
}

// Known product bug (see the e2e report): a shard's session task can spin forever on its own
// `Notify` while the session socket is full (compat/src/driver.rs, run_session + dispatch), so a
// bulk transfer sometimes stalls for good; this test then fails on BULK_LIMIT.
async fn tcp_transport_carries_64_mib_byte_exact_both_ways(backend: Backend) {
    bulk_transfer_is_byte_exact_both_ways(Transport::Tcp, backend, "", ["none"; 2]).await;
}

/// Both ends take the records over from rustls after the handshake (the default).
async fn tls_transport_with_pinned_self_signed_cert_carries_64_mib_byte_exact_both_ways(
    backend: Backend,
) {
    bulk_transfer_is_byte_exact_both_ways(Transport::Tls, backend, "", ["own-records"; 2]).await;
}

/// A server that keeps rustls for its records (`tls_own_records = false`) and a client that
/// seals its own speak the same TLS.
async fn tls_records_sealed_by_rustls_at_one_end_and_by_warren_at_the_other_interoperate(
    backend: Backend,
) {
    bulk_transfer_is_byte_exact_both_ways(
        Transport::Tls,
        backend,
        "tls_own_records = false",
        ["rustls", "own-records"],
    )
    .await;
}

// ---- 1b. host-name services -------------------------------------------------------------

/// `local_addr = "localhost:PORT"` works like the IP address (the io_uring shards dial the
/// control plane's lookup, never the blocking resolver), and a service whose host name does
/// not resolve refuses its own visitors while the other services keep working.
async fn services_named_by_host_name_are_dialled_and_one_that_does_not_resolve_refuses_only_its_streams(
    backend: Backend,
) {
    let stats = Arc::new(EchoStats::default());
    let echo = echo_service(stats.clone()).await;
    let dir = TestDir::new("host-names");
    let server = Server::start(
        &dir,
        ServerSpec {
            backend,
            services: &["ip", "named", "nowhere"],
            ..ServerSpec::default()
        },
    );
    let config = server.client_config(&dir, &[("ip", echo), ("named", echo), ("nowhere", echo)]);
    let text = std::fs::read_to_string(&config).unwrap();
    let ip_line = format!("local_addr = \"{echo}\"");
    let text = text
        .replacen(
            &format!("[client.services.named]\n{ip_line}"),
            &format!(
                "[client.services.named]\nlocal_addr = \"localhost:{}\"",
                echo.port()
            ),
            1,
        )
        .replacen(
            &format!("[client.services.nowhere]\n{ip_line}"),
            "[client.services.nowhere]\nlocal_addr = \"warren-test-no-such-host.invalid:9\"",
            1,
        );
    assert!(
        text.contains("localhost:") && text.contains(".invalid:9"),
        "{text}"
    );
    let config = dir.write("client.toml", &text);
    let client = server.connect_client("client", &config, 0);
    if backend != Backend::Compat {
        // The io_uring client resolved both names before its sessions started.
        let ok = client.wait_line(0, &["service host name resolved", "localhost:"], SOON);
        let bad = client.wait_line(0, &["does not resolve", ".invalid:9"], SOON);
        eprintln!("{ok}\n{bad}");
    }

    async fn echo_once(addr: SocketAddr, seed: u64) {
        let payload = Pattern::bytes(seed, 4096);
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.write_all(&payload).await.unwrap();
        sock.shutdown().await.unwrap();
        let mut back = Vec::new();
        sock.read_to_end(&mut back).await.unwrap();
        assert!(
            back == payload,
            "{} of 4096 bytes came back from {addr}",
            back.len()
        );
    }
    timeout(Duration::from_secs(20), async {
        for i in 0..8 {
            echo_once(server.public("named"), i).await;
            echo_once(server.public("ip"), 100 + i).await;
        }
    })
    .await
    .expect("echo through the host-name service did not complete");

    // The unresolvable one: each visitor is accepted and then closed, never served...
    for _ in 0..3 {
        let how = expect_refused(server.public("nowhere"), Duration::from_secs(20)).await;
        eprintln!("visitor of the unresolvable service: {how}");
    }
    // ...and the others still work.
    timeout(Duration::from_secs(20), async {
        echo_once(server.public("named"), 50).await;
        echo_once(server.public("ip"), 51).await;
    })
    .await
    .expect("the other services stopped working");
    assert_eq!(
        stats.total.load(Ordering::SeqCst),
        18,
        "every echo reached the service once"
    );
}

// ---- 2. half-close -------------------------------------------------------------------------

/// One tunnel with a single service `svc` served by `addr`.
fn tunnel_for(dir: &TestDir, addr: SocketAddr, backend: Backend) -> (Server, Warren) {
    let server = Server::start(
        dir,
        ServerSpec {
            backend,
            services: &["svc"],
            ..ServerSpec::default()
        },
    );
    let config = server.client_config(dir, &[("svc", addr)]);
    let client = server.connect_client("client", &config, 0);
    (server, client)
}

async fn visitor_half_close_reaches_the_service_and_its_answer_still_flows_back(backend: Backend) {
    const REQUEST: usize = 600 * 1024; // more than one initial stream window
    const ANSWER: usize = 1024 * 1024;
    // The service answers only once it has read the whole request up to EOF: without the
    // visitor's FIN crossing the tunnel it would wait forever.
    let service = serve(|mut sock| async move {
        let mut request = Vec::new();
        if sock.read_to_end(&mut request).await.is_err() {
            return;
        }
        let mut answer = Sha256::digest(&request).to_vec();
        answer.extend_from_slice(&(request.len() as u64).to_be_bytes());
        answer.extend_from_slice(&Pattern::bytes(7, ANSWER));
        if sock.write_all(&answer).await.is_ok() {
            let _ = sock.shutdown().await;
        }
    })
    .await;
    let dir = TestDir::new("half-close-visitor");
    let (server, _client) = tunnel_for(&dir, service, backend);

    let request = Pattern::bytes(5, REQUEST);
    let mut expected = Sha256::digest(&request).to_vec();
    expected.extend_from_slice(&(REQUEST as u64).to_be_bytes());
    expected.extend_from_slice(&Pattern::bytes(7, ANSWER));

    let answer = timeout(Duration::from_secs(20), async {
        let mut sock = TcpStream::connect(server.public("svc")).await.unwrap();
        sock.write_all(&request).await.unwrap();
        sock.shutdown().await.unwrap();
        let mut answer = Vec::new();
        sock.read_to_end(&mut answer).await.unwrap();
        answer
    })
    .await
    .expect("no complete answer after the visitor's half-close");
    assert_eq!(answer.len(), expected.len());
    assert!(
        answer == expected,
        "the answer differs from what the service sent"
    );
}

async fn service_half_close_reaches_the_visitor_while_the_visitor_keeps_sending(backend: Backend) {
    const GREETING: usize = 512 * 1024;
    const UPLOAD: u64 = 2 * MIB;
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    // The service says everything it has to say, closes its sending side, and only then reads.
    let service = serve(move |mut sock| {
        let tx = tx.clone();
        async move {
            if sock.write_all(&Pattern::bytes(8, GREETING)).await.is_err() {
                return;
            }
            if sock.shutdown().await.is_err() {
                return;
            }
            let _ = tx.send(read_summary(&mut sock).await);
        }
    })
    .await;
    let dir = TestDir::new("half-close-service");
    let (server, _client) = tunnel_for(&dir, service, backend);

    timeout(Duration::from_secs(20), async {
        let mut sock = TcpStream::connect(server.public("svc")).await.unwrap();
        // EOF from the service arrives while our own sending side is still open.
        let mut greeting = Vec::new();
        sock.read_to_end(&mut greeting).await.unwrap();
        assert!(greeting == Pattern::bytes(8, GREETING), "greeting differs");
        // The other direction keeps working after that EOF.
        let sent = write_pattern(&mut sock, 9, UPLOAD).await.unwrap();
        sock.shutdown().await.unwrap();
        let mut rest = [0u8; 16];
        assert_eq!(sock.read(&mut rest).await.unwrap(), 0, "data after EOF");
        let at_service = received.recv().await.unwrap().unwrap();
        assert_eq!(
            at_service, sent,
            "visitor -> service bytes differ after the service's FIN"
        );
    })
    .await
    .expect("half-closed stream did not finish");
}

// ---- 3. many concurrent streams ------------------------------------------------------------

async fn a_thousand_concurrent_visitors_each_get_their_own_echo(backend: Backend) {
    const VISITORS: usize = 1000;
    // 1000 visitors + 1000 service connections live in this process (alongside other tests).
    let limit = raise_fd_limit(16_384);
    assert!(
        limit >= 4 * VISITORS as u64,
        "open-file limit {limit} is too low for this test"
    );
    let stats = Arc::new(EchoStats::default());
    let echo = echo_service(stats.clone()).await;
    let dir = TestDir::new("thousand");
    // One shard on each side, so all 1000 streams share a single session.
    let server = Server::start(
        &dir,
        ServerSpec {
            backend,
            services: &["svc"],
            shards: 1,
            ..ServerSpec::default()
        },
    );
    let config = server.client_config(&dir, &[("svc", echo)]);
    let _client = server.connect_client("client", &config, 0);
    let public = server.public("svc");

    // Nobody closes before every visitor has its echo back: all 1000 are open at once.
    let all_echoed = Arc::new(Barrier::new(VISITORS));
    let tasks: Vec<_> = (0..VISITORS)
        .map(|i| {
            let all_echoed = all_echoed.clone();
            tokio::spawn(async move {
                let mut message = format!("visitor {i:04} of {VISITORS}: ").into_bytes();
                message.extend_from_slice(&Pattern::bytes(i as u64, 8 * (1 + i % 64)));
                let echoed = async {
                    let mut sock = TcpStream::connect(public).await?;
                    sock.write_all(&message).await?;
                    let mut back = vec![0u8; message.len()];
                    sock.read_exact(&mut back).await?;
                    std::io::Result::Ok((sock, back))
                }
                .await;
                // Wait for the others even after a failure, so a failure is reported, not hung.
                all_echoed.wait().await;
                let (mut sock, back) = echoed.map_err(|e| format!("visitor {i}: {e}"))?;
                if back != message {
                    return Err(format!("visitor {i}: echo differs from the message"));
                }
                sock.shutdown()
                    .await
                    .map_err(|e| format!("visitor {i}: {e}"))?;
                let mut rest = Vec::new();
                sock.read_to_end(&mut rest)
                    .await
                    .map_err(|e| format!("visitor {i}: {e}"))?;
                if !rest.is_empty() {
                    return Err(format!("visitor {i}: {} extra bytes", rest.len()));
                }
                Ok(())
            })
        })
        .collect();
    let results = timeout(Duration::from_secs(45), async {
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("visitor task panicked"));
        }
        results
    })
    .await
    .expect("1000 visitors did not finish in time");
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} visitors failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(stats.total.load(Ordering::SeqCst), VISITORS);
    assert_eq!(
        stats.max_active.load(Ordering::SeqCst),
        VISITORS,
        "the service never saw all streams open at the same time"
    );
}

// ---- 4. client killed ----------------------------------------------------------------------

async fn killed_client_resets_its_visitors_and_a_replacement_client_takes_over(backend: Backend) {
    const DATA: u64 = 16 * MIB;
    let endless = endless_service(3).await;
    let data = source_service(4, DATA).await;
    let dir = TestDir::new("kill-client");
    let server = Server::start(
        &dir,
        ServerSpec {
            backend,
            services: &["endless", "data"],
            ..ServerSpec::default()
        },
    );
    let config = server.client_config(&dir, &[("endless", endless), ("data", data)]);
    let mut client = server.connect_client("client", &config, 0);

    // A visitor in the middle of a download that never ends by itself.
    let progress = Arc::new(AtomicU64::new(0));
    let endless_addr = server.public("endless");
    let reading = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut sock = TcpStream::connect(endless_addr).await.unwrap();
            let end = read_summary_counting(&mut sock, &progress).await;
            (Instant::now(), end.map(|s| s.len))
        })
    };
    let start = Instant::now();
    while progress.load(Ordering::Relaxed) < 4 * MIB {
        assert!(start.elapsed() < SOON, "the download never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let killed_at = Instant::now();
    client.kill();
    let (ended_at, end) = timeout(Duration::from_secs(10), reading)
        .await
        .expect("the visitor's connection stayed open after the client was killed")
        .unwrap();
    assert!(
        ended_at - killed_at < Duration::from_secs(5),
        "the visitor's connection ended {:?} after the kill",
        ended_at - killed_at
    );
    eprintln!(
        "visitor's download ended {:?} after SIGKILL: {end:?}",
        ended_at - killed_at
    );

    // With no client, a new visitor is turned away at once.
    let how = expect_refused(server.public("data"), Duration::from_secs(3)).await;
    eprintln!("visitor with no client connected: {how}");

    // A replacement client with the same config takes over.
    let mark = server.proc.mark();
    let _replacement = server.connect_client("client-2", &config, mark);
    let got = timeout(Duration::from_secs(20), async {
        let mut sock = TcpStream::connect(server.public("data")).await.unwrap();
        read_summary(&mut sock).await.unwrap()
    })
    .await
    .expect("download through the replacement client did not finish (see the stall bug noted at tcp_transport_carries_64_mib_byte_exact_both_ways)");
    assert_eq!(
        got,
        pattern_summary(4, DATA),
        "bytes through the replacement client differ"
    );
}

// ---- 5. bad peers on the session port ------------------------------------------------------

/// What a raw client advertises: the defaults of `[client.tuning]`.
fn raw_params() -> PeerParams {
    PeerParams {
        max_frame_payload: 65536,
        initial_stream_window: 262_144,
        session_window: 64 * 1024 * 1024,
        max_streams: 16_384,
    }
}

/// Runs the client handshake by hand over a fresh connection to the session port. Returns the
/// socket and any bytes read past the handshake, or the handshake error.
async fn raw_handshake(
    addr: SocketAddr,
    token: &str,
) -> (TcpStream, Result<(Accepted, BytesMut), HandshakeError>) {
    raw_handshake_offering(addr, token, &[]).await
}

/// [`raw_handshake`] for a client that offers `services`.
async fn raw_handshake_offering(
    addr: SocketAddr,
    token: &str,
    services: &[&str],
) -> (TcpStream, Result<(Accepted, BytesMut), HandshakeError>) {
    let mut sock = TcpStream::connect(addr)
        .await
        .expect("connecting to the session port");
    let mut hs = ClientHandshake::new(ClientHandshakeConfig {
        name: CLIENT_NAME.to_string(),
        token: Token::new(token.as_bytes()),
        instance_id: 0x0e2e_0e2e,
        session_index: 0,
        services: services.iter().map(|s| s.to_string()).collect(),
        params: raw_params(),
    });
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    loop {
        match hs.handle_input(&mut input) {
            Ok(Some(accepted)) => return (sock, Ok((accepted, input))),
            Ok(None) => {}
            Err(e) => return (sock, Err(e)),
        }
        out.clear();
        hs.poll_transmit(&mut out);
        sock.write_all(&out)
            .await
            .expect("sending a handshake message");
        let n = sock
            .read_buf(&mut input)
            .await
            .expect("reading the handshake");
        assert!(n > 0, "the server closed the connection without a verdict");
    }
}

/// Reads into `into` until the server closes the connection; says how it closed (EOF or the
/// error), for assertion messages.
async fn read_until_closed(sock: &mut TcpStream, into: &mut BytesMut) -> String {
    timeout(Duration::from_secs(5), async {
        loop {
            match sock.read_buf(into).await {
                Ok(0) => return "EOF".to_string(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
        }
    })
    .await
    .expect("the server did not close the connection")
}

/// Waits for the server's `session refused` line about the connection from `local`.
fn refusal_line(server: &Server, from: usize, local: SocketAddr) -> String {
    let local = local.to_string();
    server
        .proc
        .wait_matching(
            from,
            1,
            SOON,
            &format!("session refused for {local}"),
            |l| l.contains("session refused") && try_field(l, "peer") == Some(local.as_str()),
        )
        .swap_remove(0)
}

async fn bad_session_peers_are_refused_with_clear_errors_while_a_live_session_keeps_working(
    backend: Backend,
) {
    let (stop, stop_rx) = watch::channel(false);
    let (trickle, mut trickled) =
        trickle_service(6, 16 * 1024, Duration::from_millis(10), u64::MAX, stop_rx).await;
    let echo = echo_service(Arc::new(EchoStats::default())).await;
    let dir = TestDir::new("bad-peers");
    let server = Server::start(
        &dir,
        ServerSpec {
            backend,
            services: &["trickle", "echo"],
            ..ServerSpec::default()
        },
    );
    let config = server.client_config(&dir, &[("trickle", trickle), ("echo", echo)]);
    let client = server.connect_client("client", &config, 0);

    // A transfer that runs for the whole test.
    let progress = Arc::new(AtomicU64::new(0));
    let trickle_addr = server.public("trickle");
    let transfer = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut sock = TcpStream::connect(trickle_addr).await?;
            read_summary_counting(&mut sock, &progress).await
        })
    };
    let start = Instant::now();
    while progress.load(Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < SOON, "the long transfer never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let session = server.session_addr;

    // (a) The right name with a wrong token.
    let mark = server.proc.mark();
    let (sock, result) = raw_handshake(session, "not-the-token").await;
    match result {
        Err(HandshakeError::Rejected {
            code: RejectCode::AuthFailed,
            reason,
        }) => {
            assert!(reason.contains("authentication"), "reason: {reason}");
        }
        other => panic!("wrong token: expected an AuthFailed reject, got {other:?}"),
    }
    let line = refusal_line(&server, mark, sock.local_addr().unwrap());
    assert!(line.contains("failed authentication"), "{line}");
    assert!(
        line.contains(CLIENT_NAME),
        "the log should name the client: {line}"
    );
    drop(sock);

    // (b) A ClientHello for protocol version 99.
    let mark = server.proc.mark();
    let mut sock = TcpStream::connect(session).await.unwrap();
    let mut hello = vec![1u8];
    hello.extend_from_slice(&10u16.to_be_bytes());
    hello.extend_from_slice(b"WRRN");
    hello.extend_from_slice(&99u16.to_be_bytes());
    hello.extend_from_slice(&0u32.to_be_bytes());
    sock.write_all(&hello).await.unwrap();
    let mut reply = BytesMut::new();
    read_until_closed(&mut sock, &mut reply).await;
    assert!(reply.len() >= 6, "expected a Reject, got {reply:?}");
    assert_eq!(reply[0], 5, "expected a Reject (kind 5), got {reply:?}");
    let len = usize::from(u16::from_be_bytes([reply[1], reply[2]]));
    assert_eq!(
        reply.len(),
        3 + len,
        "exactly one Reject, then close: {reply:?}"
    );
    let code = u16::from_be_bytes([reply[3], reply[4]]);
    assert_eq!(RejectCode::from(code), RejectCode::UnsupportedVersion);
    let reason_len = usize::from(reply[5]);
    let reason = String::from_utf8_lossy(&reply[6..6 + reason_len]).into_owned();
    assert!(
        reason.contains('1') && reason.contains("99") && reason.contains("version"),
        "reason: {reason}"
    );
    let line = refusal_line(&server, mark, sock.local_addr().unwrap());
    assert!(line.contains("version") && line.contains("99"), "{line}");
    drop(sock);

    // (c) Not a warren peer at all.
    let mark = server.proc.mark();
    let mut sock = TcpStream::connect(session).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: tunnel\r\n\r\n")
        .await
        .unwrap();
    let mut reply = BytesMut::new();
    read_until_closed(&mut sock, &mut reply).await;
    assert!(
        reply.is_empty(),
        "a stranger should get nothing back, got {reply:?}"
    );
    let line = refusal_line(&server, mark, sock.local_addr().unwrap());
    assert!(line.contains("not a warren peer"), "{line}");
    drop(sock);

    // (d) Authenticated, then a DATA frame far beyond the advertised maximum.
    // Known product bug (see the e2e report): when the session fails while earlier output (the
    // session's opening PING) is still waiting for the socket, the GOAWAY stays in the core and
    // the server closes without it (compat/src/driver.rs, the `closed` branch of run_session).
    let mark = server.proc.mark();
    let (mut sock, result) = raw_handshake(session, TOKEN).await;
    let (accepted, mut input) = result.expect("the right token is accepted");
    let max_payload = accepted.params.max_frame_payload;
    sock.write_all(&data_header(StreamId(2), 100 << 20))
        .await
        .unwrap();
    let how = read_until_closed(&mut sock, &mut input).await;
    let received = format!("{} bytes then {how}: {:?}", input.len(), &input[..]);
    let mut goaway = None;
    while let Some(frame) = Frame::decode(&mut input, raw_params().max_frame_payload)
        .unwrap_or_else(|e| panic!("the server sent an undecodable frame: {e}"))
    {
        if let Frame::GoAway { code, reason, .. } = frame {
            goaway = Some((code, reason));
        }
    }
    let (code, reason) =
        goaway.unwrap_or_else(|| panic!("the server closed without a GOAWAY; got {received}"));
    assert_eq!(code, GoAwayCode::ProtocolError, "GOAWAY reason: {reason}");
    assert!(
        reason.contains("exceeds the advertised maximum"),
        "GOAWAY reason: {reason}"
    );
    let local = sock.local_addr().unwrap().to_string();
    let line = server.proc.wait_line(
        mark,
        &[
            "exceeds the advertised maximum",
            &format!("{max_payload}"),
            &local,
        ],
        SOON,
    );
    assert!(line.contains("104857600"), "{line}");
    drop(sock);

    // The session that was there all along never noticed.
    assert!(progress.load(Ordering::Relaxed) > 0);
    stop.send(true).unwrap();
    let got = timeout(Duration::from_secs(20), transfer)
        .await
        .expect("the long transfer did not finish")
        .unwrap()
        .expect("the long transfer failed");
    let sent = timeout(SOON, trickled.recv()).await.unwrap().unwrap();
    assert!(sent.len > 0);
    assert_eq!(got, sent, "the long transfer's bytes differ");
    assert!(
        !client.has_line(&["session lost"]),
        "the real client lost a session during the test"
    );

    // And new visitors are still served.
    let message = Pattern::bytes(10, MIB as usize);
    let back = timeout(Duration::from_secs(20), async {
        let mut sock = TcpStream::connect(server.public("echo")).await.unwrap();
        sock.write_all(&message).await.unwrap();
        sock.shutdown().await.unwrap();
        let mut back = Vec::new();
        sock.read_to_end(&mut back).await.unwrap();
        back
    })
    .await
    .expect("a new visitor was not served");
    assert!(back == message, "echo after the bad peers differs");
}

/// A client (played by hand) that dies after a DATA frame's header and the first kilobyte of its
/// payload. The server reads such a payload straight into the stream's pipe on the io_uring
/// backend; the stream that waited for that pipe must still close, so its visitor learns the
/// stream is gone instead of hanging.
async fn a_client_that_dies_inside_a_data_frame_resets_the_visitor_of_that_stream(
    backend: Backend,
) {
    let dir = TestDir::new("dies-mid-frame");
    let server = Server::start(
        &dir,
        ServerSpec {
            backend,
            services: &["web"],
            ..ServerSpec::default()
        },
    );
    let mark = server.proc.mark();
    let (mut session, result) = raw_handshake_offering(server.session_addr, TOKEN, &["web"]).await;
    let (accepted, mut input) = result.expect("the right token is accepted");
    // The service is on the route board once the shard runs the session.
    server.proc.wait_line(mark, &["session running"], SOON);
    assert!(
        accepted.params.max_frame_payload >= 65536,
        "the server's maximum payload is {}",
        accepted.params.max_frame_payload
    );

    let mut visitor = TcpStream::connect(server.public("web")).await.unwrap();
    let stream = timeout(SOON, async {
        loop {
            while let Some(frame) = Frame::decode(&mut input, raw_params().max_frame_payload)
                .unwrap_or_else(|e| panic!("the server sent an undecodable frame: {e}"))
            {
                if let Frame::Open {
                    stream, service, ..
                } = frame
                {
                    assert_eq!(service, "web");
                    return stream;
                }
            }
            let n = session.read_buf(&mut input).await.unwrap();
            assert!(
                n > 0,
                "the server closed the session before opening the stream"
            );
        }
    })
    .await
    .expect("the server never opened a stream for the visitor");

    // 64 KiB announced, 1 KiB sent; then the client is gone.
    let mut partial = data_header(stream, 65536).to_vec();
    partial.extend_from_slice(&Pattern::bytes(7, 1024));
    session.write_all(&partial).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(session);

    let mut got = Vec::new();
    let end = timeout(Duration::from_secs(5), visitor.read_to_end(&mut got))
        .await
        .expect("the visitor's connection stayed open after its client died inside a frame");
    eprintln!(
        "visitor got {} bytes, then {:?}",
        got.len(),
        end.map(|_| "EOF")
    );
    assert!(
        got.len() <= 1024 && got[..] == Pattern::bytes(7, 1024)[..got.len()],
        "the visitor got {} bytes that are not the start of the payload",
        got.len()
    );
    // The session's end names the half-received frame ("inside a frame (N bytes pending)", or
    // on a session that splices payloads, "inside a DATA frame (N bytes missing)").
    server.proc.wait_line(
        mark,
        &["session ended", "the peer closed the connection inside a"],
        SOON,
    );
}

// ---- 6. config check -------------------------------------------------------------------------

#[test]
fn check_reports_every_config_mistake_with_its_toml_path() {
    let dir = TestDir::new("check");
    let bad = dir.write(
        "bad.toml",
        r#"
[server]
bind_addr = "127.0.0.1:7000"
transport = "tcp"
colour = "blue"
idle_timeout_ms = "thirty seconds"

[server.clients.laptop]

[server.services.ssh]
bind_addr = "0.0.0.0:99999"
"#,
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["check", "-c", bad.to_str().unwrap()])
        .output()
        .expect("running warren check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check accepted a bad file:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    for path in [
        "server.colour",                 // unknown key
        "server.services.ssh.bind_addr", // bad address
        "server.clients.laptop.token",   // missing token
        "server.idle_timeout_ms",        // wrong type
    ] {
        let hits: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains(&format!("{path}: ")))
            .collect();
        assert_eq!(hits.len(), 1, "expected one line for {path}:\n{stderr}");
    }
    let errors = lines.iter().filter(|l| l.contains(": server.")).count();
    assert_eq!(errors, 4, "one line per mistake:\n{stderr}");
    assert!(stderr.contains("4 error(s)"), "{stderr}");

    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/server.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["check", "-c", example.to_str().unwrap()])
        .output()
        .expect("running warren check");
    assert!(
        out.status.success(),
        "examples/server.toml fails the check:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

// ---- 7. graceful drain on SIGTERM --------------------------------------------------------------

async fn sigterm_lets_the_open_stream_finish_refuses_new_visitors_and_exits_zero(backend: Backend) {
    const CHUNK: usize = 32 * 1024;
    const CHUNKS: u64 = 20; // one every 50 ms: about a second in all
    const DRAIN: Duration = Duration::from_secs(10);
    let (_stop, stop_rx) = watch::channel(false);
    let (trickle, mut trickled) =
        trickle_service(11, CHUNK, Duration::from_millis(50), CHUNKS, stop_rx).await;
    let dir = TestDir::new("drain");
    let extra = format!("drain_timeout_ms = {}\n", DRAIN.as_millis());
    let mut server = Server::start(
        &dir,
        ServerSpec {
            backend,
            services: &["svc"],
            extra: &extra,
            ..ServerSpec::default()
        },
    );
    let config = server.client_config(&dir, &[("svc", trickle)]);
    let client = server.connect_client("client", &config, 0);
    let public = server.public("svc");

    let progress = Arc::new(AtomicU64::new(0));
    let transfer = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut sock = TcpStream::connect(public).await?;
            read_summary_counting(&mut sock, &progress).await
        })
    };
    let start = Instant::now();
    while progress.load(Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < SOON, "the stream never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mark = server.proc.mark();
    let client_mark = client.mark();
    let terminated_at = Instant::now();
    server.proc.terminate();
    server.proc.wait_line(mark, &["draining"], SOON);
    // Each shard stops accepting visitors and sends GOAWAY in one step, so once the client has
    // the GOAWAY of every session, no shard takes new visitors.
    client.wait_lines(
        client_mark,
        &["peer sent GOAWAY", "server shutting down"],
        server.shards,
        SOON,
    );
    assert!(
        !transfer.is_finished(),
        "the stream finished before the drain began; make it longer"
    );

    // New visitors are turned away while the old stream is still running.
    let how = expect_refused(public, Duration::from_secs(3)).await;
    eprintln!("visitor during the drain: {how}");

    let got = timeout(DRAIN, transfer)
        .await
        .expect("the in-flight stream did not finish during the drain")
        .unwrap()
        .expect("the in-flight stream failed");
    let sent = timeout(SOON, trickled.recv()).await.unwrap().unwrap();
    assert_eq!(sent.len, CHUNK as u64 * CHUNKS, "the service was cut short");
    assert_eq!(got, sent, "the in-flight stream's bytes differ");

    let status = server
        .proc
        .wait_exit(DRAIN.saturating_sub(terminated_at.elapsed()) + Duration::from_secs(2))
        .expect("the server did not exit within the drain time");
    assert!(status.success(), "the server exited with {status}");
    assert!(
        terminated_at.elapsed() < DRAIN,
        "the server waited for the drain deadline instead of the stream"
    );
    server.proc.wait_line(mark, &["drained"], SOON);
    assert!(!server.proc.has_line(&["drain deadline reached"]));
}

// ---- 8. --backend overrides the file ---------------------------------------------------------

/// Both files say `backend = "uring"`; `--backend compat` on each command line wins, and the
/// tunnel works. (Runs on any host: the override never needs io_uring.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_flag_overrides_the_backend_of_the_config_file() {
    let echo = echo_service(Arc::new(EchoStats::default())).await;
    let dir = TestDir::new("backend-flag");
    let server = Server::start(
        &dir,
        ServerSpec {
            backend: Backend::Compat,
            services: &["echo"],
            tuning: "backend = \"uring\"",
            ..ServerSpec::default()
        },
    );
    assert!(server
        .proc
        .has_line(&["--backend compat overrides server.tuning.backend"]));
    let config = server.client_config(&dir, &[("echo", echo)]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    assert!(text.trim_end().ends_with("shards = 2"), "{text}");
    text += "backend = \"uring\"\n";
    std::fs::write(&config, &text).unwrap();
    // connect_client checks that the client reports backend=compat.
    let client = server.connect_client("client", &config, 0);
    assert!(client.has_line(&["--backend compat overrides client.tuning.backend"]));

    let message = Pattern::bytes(12, 64 * 1024);
    let back = timeout(SOON, async {
        let mut sock = TcpStream::connect(server.public("echo")).await.unwrap();
        sock.write_all(&message).await.unwrap();
        sock.shutdown().await.unwrap();
        let mut back = Vec::new();
        sock.read_to_end(&mut back).await.unwrap();
        back
    })
    .await
    .expect("the echo through the overridden tunnel did not finish");
    assert!(back == message, "echo differs");
}
