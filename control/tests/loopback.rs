//! In-process loopback tests: the same server and client code the binary runs, started as a
//! library so the tests can read the shards' counters (how much a stalled stream buffers).
//! Every test runs twice, `..._compat` and `..._uring`: one conformance suite for both data
//! planes.

#[path = "common/uring.rs"]
#[macro_use]
mod uring;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren::backend::{Backend, BackendKind};
use warren::loopback::PairSpec;

use uring::require_uring;

const WINDOW: u32 = 256 * 1024;
const MAX_WINDOW: u32 = 4 * 1024 * 1024;

/// A service that reads an 8-byte big-endian length and answers with that many pattern bytes.
async fn source_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(len);
                let block = pattern_block();
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    if s.write_all(&block[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// 64 KiB of a pattern whose every byte depends on its offset modulo 251 (so shifted or
/// dropped bytes are caught).
fn pattern_block() -> Vec<u8> {
    // The block length is a multiple of 251 so consecutive blocks continue the pattern.
    (0..251 * 261).map(|i| (i % 251) as u8).collect()
}

struct Pair {
    inner: warren::loopback::Pair,
    public: SocketAddr,
}

async fn start_pair(backend: Backend, service: SocketAddr, sessions: usize) -> Pair {
    start_pair_with(backend, service, sessions, sessions).await
}

/// `shards` on each side; the client opens `sessions` sessions.
async fn start_pair_with(
    backend: Backend,
    service: SocketAddr,
    shards: usize,
    sessions: usize,
) -> Pair {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WARREN_LOG"))
        .with_test_writer()
        .try_init();
    let tuning =
        format!("initial_stream_window_bytes = {WINDOW}\nmax_stream_window_bytes = {MAX_WINDOW}");
    let inner = warren::loopback::Pair::start(PairSpec {
        services: &[("source", service)],
        shards,
        sessions: Some(sessions),
        tuning: &tuning,
        backend,
        ..PairSpec::default()
    })
    .await
    .unwrap();
    let want = match backend {
        Backend::Uring => Some(BackendKind::Uring),
        Backend::Compat => Some(BackendKind::Compat),
        Backend::Auto => None,
    };
    if let Some(want) = want {
        assert_eq!(inner.server.backend(), want, "server backend");
        assert_eq!(inner.client.backend(), want, "client backend");
    }
    let public = inner.public("source");
    Pair { inner, public }
}

/// Asks the source for `len` bytes and checks every byte.
async fn download(public: SocketAddr, len: u64) -> u64 {
    let mut s = TcpStream::connect(public).await.unwrap();
    s.write_all(&len.to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        check_pattern(&buf[..n], got);
        got += n as u64;
    }
    got
}

/// Checks that `bytes`, found at offset `from` of a download, continue the pattern.
fn check_pattern(bytes: &[u8], from: u64) {
    for (i, b) in bytes.iter().enumerate() {
        let off = from + i as u64;
        assert_eq!(*b, (off % 251) as u8, "byte {off} of the download is wrong");
    }
}

on_both_backends! {
    a_stalled_visitor_does_not_block_nine_others_and_buffers_at_most_its_window
        => a_stalled_visitor_does_not_block_nine_others_and_buffers_at_most_its_window_compat,
           a_stalled_visitor_does_not_block_nine_others_and_buffers_at_most_its_window_uring;
    visitors_spread_over_one_session_per_shard
        => visitors_spread_over_one_session_per_shard_compat,
           visitors_spread_over_one_session_per_shard_uring;
    a_visitor_on_a_shard_without_a_session_is_handed_to_one_that_has_it
        => a_visitor_on_a_shard_without_a_session_is_handed_to_one_that_has_it_compat,
           a_visitor_on_a_shard_without_a_session_is_handed_to_one_that_has_it_uring;
    a_service_that_never_answers_the_connect_is_given_up_after_its_connect_timeout
        => a_service_that_never_answers_the_connect_is_given_up_after_its_connect_timeout_compat,
           a_service_that_never_answers_the_connect_is_given_up_after_its_connect_timeout_uring;
    small_and_large_writes_behind_a_slow_visitor_arrive_byte_exact
        => small_and_large_writes_behind_a_slow_visitor_arrive_byte_exact_compat,
           small_and_large_writes_behind_a_slow_visitor_arrive_byte_exact_uring;
    loopback_connections_get_the_configured_congestion_control_and_others_keep_theirs
        => loopback_connections_get_the_configured_congestion_control_and_others_keep_theirs_compat,
           loopback_connections_get_the_configured_congestion_control_and_others_keep_theirs_uring;
}

/// A TCP socket: (local, peer, congestion control).
type Sock = (SocketAddr, Option<SocketAddr>, String);

/// Every TCP socket of this process. The server and the
/// client run in the test process, so this sees their sockets next to the test's own.
fn tcp_sockets_of_this_process() -> Vec<Sock> {
    warren_dataplane::diag::tcp_sockets_of_this_process()
        .into_iter()
        .map(|s| (s.local, s.peer, s.congestion))
        .collect()
}

async fn loopback_connections_get_the_configured_congestion_control_and_others_keep_theirs(
    backend: Backend,
) {
    let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap()
        .trim()
        .to_string();
    // reno is built into every kernel and always allowed; if it is the default, cubic.
    let algo = if default == "reno" { "cubic" } else { "reno" };
    let echo = echo_service().await;
    for configured in [algo, ""] {
        let inner = warren::loopback::Pair::start(PairSpec {
            services: &[("echo", echo)],
            shards: 2,
            sessions: Some(2),
            tuning: &format!("loopback_congestion_control = \"{configured}\""),
            backend,
            ..PairSpec::default()
        })
        .await
        .unwrap();
        let public = inner.public("echo");
        let session = inner.server.session_addr;
        // One visitor held open after a round trip, so its stream's sockets exist.
        let mut visitor = TcpStream::connect(public).await.unwrap();
        let mut trips = 0;
        round_trip_within_10s(&mut visitor, &mut trips).await;
        let want = if configured.is_empty() {
            default.as_str()
        } else {
            configured
        };
        let socks = tcp_sockets_of_this_process();
        let of = |what: &str, pick: &dyn Fn(&Sock) -> bool| {
            let found: Vec<&String> = socks.iter().filter(|s| pick(s)).map(|s| &s.2).collect();
            assert!(!found.is_empty(), "{what}: no socket found among {socks:?}");
            found
        };
        // warren's: the public listeners and the visitor they accepted, both ends of every
        // session, the socket dialled to the service.
        for cc in of("public port", &|s| s.0 == public) {
            assert_eq!(
                cc, want,
                "a socket on the public port {public} ({backend:?})"
            );
        }
        // (The session listener keeps the system default: the server sets the algorithm on
        // each accepted session whose peer is local.)
        let session_ends = of("session", &|s| {
            s.1.is_some() && (s.0 == session || s.1 == Some(session))
        });
        assert_eq!(
            session_ends.len(),
            2 * 2,
            "two sessions, two ends each: {session_ends:?}"
        );
        for cc in session_ends {
            assert_eq!(cc, want, "a session socket ({backend:?})");
        }
        for cc in of("service dial", &|s| s.1 == Some(echo)) {
            assert_eq!(cc, want, "the socket dialled to the service ({backend:?})");
        }
        // The test's own: the visitor's program and the service keep the system default.
        let mine = visitor.local_addr().unwrap();
        for cc in of("visitor program", &|s| s.0 == mine) {
            assert_eq!(cc, &default, "the visitor's own socket ({backend:?})");
        }
        for cc in of("service's accepted socket", &|s| {
            s.0 == echo && s.1.is_some()
        }) {
            assert_eq!(cc, &default, "the service's own socket ({backend:?})");
        }
        drop(visitor);
        inner.shutdown().await;
    }
}

/// A service that answers every connection with `MIXED_TOTAL` pattern bytes written as small
/// writes (1-200 bytes, each its own frame) between large ones (200-600 KiB), flushing each.
async fn mixed_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut off = 0u64;
                let mut i = 0u64;
                while off < MIXED_TOTAL {
                    let len = if i % 2 == 0 {
                        1 + (i * 37) % 200
                    } else {
                        200 * 1024 + (i * 7919) % (400 * 1024)
                    };
                    let len = len.min(MIXED_TOTAL - off);
                    let chunk: Vec<u8> = (off..off + len).map(|o| (o % 251) as u8).collect();
                    if s.write_all(&chunk).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                    off += len;
                    i += 1;
                    if i % 2 == 1 {
                        // Let the small write leave on its own.
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

const MIXED_TOTAL: u64 = 48 * 1024 * 1024;

/// Frames that are copied (small ones) and frames that are spliced (large ones, on io_uring)
/// alternate while the visitor reads slowly, so the receiver holds bytes in memory, in the
/// core and in its pipe at once: every byte must still arrive once and in order. (On io_uring
/// this is the path where a large frame is spliced behind bytes the core still holds.)
async fn small_and_large_writes_behind_a_slow_visitor_arrive_byte_exact(backend: Backend) {
    let service = mixed_service().await;
    let p = start_pair(backend, service, 1).await;
    let mut s = TcpStream::connect(p.public).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut reads = 0u64;
    let read_all = async {
        loop {
            let n = s.read(&mut buf).await.unwrap();
            reads += 1;
            if n == 0 {
                break;
            }
            check_pattern(&buf[..n], got);
            got += n as u64;
            // A slow visitor for the first half: the tunnel's buffers fill up behind it.
            if got < MIXED_TOTAL / 2 && reads % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("the download finishes within 60 s");
    assert_eq!(got, MIXED_TOTAL);
    drop(s);
    p.inner.shutdown().await;
}

async fn a_stalled_visitor_does_not_block_nine_others_and_buffers_at_most_its_window(
    backend: Backend,
) {
    let service = source_service().await;
    // One session (one shard each side): all ten streams share it.
    let p = start_pair(backend, service, 1).await;
    const EACH: u64 = 100 * 1024 * 1024;

    // The stalled visitor asks for plenty and never reads.
    let mut stalled = TcpStream::connect(p.public).await.unwrap();
    stalled.write_all(&(EACH).to_be_bytes()).await.unwrap();

    let mut tasks = Vec::new();
    for _ in 0..9 {
        let public = p.public;
        tasks.push(tokio::spawn(async move { download(public, EACH).await }));
    }
    let mut peak_buffered = 0u64;
    let done = async {
        let mut total = 0u64;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    };
    tokio::pin!(done);
    let total = loop {
        tokio::select! {
            t = &mut done => break t,
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                let b = p.inner.server.shards().total(|s| &s.recv_buffered);
                peak_buffered = peak_buffered.max(b);
            }
        }
    };
    assert_eq!(total, 9 * EACH, "all nine transfers complete, byte-exact");

    // With the nine done, what the server still buffers belongs to the stalled stream alone.
    // Their streams close once each visitor's FIN has crossed the session (on a loaded CI
    // machine running the other tests, that took more than 200 ms once): wait up to 5 s.
    settle(|| p.inner.server.shards().total(|s| &s.streams) == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalled_buffered = p.inner.server.shards().total(|s| &s.recv_buffered);
    let stalled_window = p.inner.server.shards().total(|s| &s.recv_windows);
    let streams = p.inner.server.shards().total(|s| &s.streams);
    assert_eq!(
        streams, 1,
        "only the stalled stream is still open on the server"
    );
    assert!(
        stalled_buffered > 0,
        "the stalled stream should hold some bytes (its visitor never read)"
    );
    // Its window may have grown while the visitor's kernel buffer still absorbed bytes; it
    // never exceeds the configured ceiling, and the buffer never exceeds the window.
    assert!(
        stalled_buffered <= stalled_window,
        "stalled stream buffers {stalled_buffered} bytes, more than its {stalled_window}-byte window"
    );
    assert!(stalled_window <= u64::from(MAX_WINDOW));
    let sessions = p.inner.server.shards().total(|s| &s.sessions);
    assert_eq!(sessions, 1, "everything ran on one session");
    eprintln!(
        "HOL: stalled stream buffered {stalled_buffered} B (its window {stalled_window} B); \
         peak server buffering during the run {peak_buffered} B"
    );

    // The stalled visitor can still drain its stream completely once it reads.
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stalled.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, EACH);
    p.inner.shutdown().await;
}

/// Waits (up to 5 s) until `ok` holds. Shards publish their counters on their own schedule, a
/// moment after the event (the route board, which start_pair waits for, learns of sessions
/// first); the assertion that follows reports the value if it never does.
async fn settle(ok: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !ok() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn visitors_spread_over_one_session_per_shard(backend: Backend) {
    let service = source_service().await;
    let p = start_pair(backend, service, 2).await;
    settle(|| p.inner.server.shards().total(|s| &s.sessions) == 2).await;
    assert_eq!(p.inner.server.shards().total(|s| &s.sessions), 2);
    // Each server shard has its own session: both shards have exactly one.
    for i in 0..2 {
        assert_eq!(
            p.inner
                .server
                .shards()
                .stats(i)
                .sessions
                .load(Ordering::Relaxed),
            1,
            "shard {i}"
        );
    }
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let public = p.public;
        tasks.push(tokio::spawn(async move { download(public, 1 << 20).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1 << 20);
    }
    p.inner.shutdown().await;
}

async fn a_visitor_on_a_shard_without_a_session_is_handed_to_one_that_has_it(backend: Backend) {
    let service = source_service().await;
    // Two server shards, one client session: every visitor the kernel gives to the other shard
    // must be handed over, not refused.
    let p = start_pair_with(backend, service, 2, 1).await;
    settle(|| p.inner.server.shards().total(|s| &s.sessions) == 1).await;
    assert_eq!(p.inner.server.shards().total(|s| &s.sessions), 1);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let public = p.public;
        tasks.push(tokio::spawn(
            async move { download(public, 64 * 1024).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 64 * 1024);
    }
    settle(|| {
        (0..2)
            .map(|i| {
                p.inner
                    .server
                    .shards()
                    .stats(i)
                    .visitors_accepted
                    .load(Ordering::Relaxed)
            })
            .sum::<u64>()
            == 32
    })
    .await;
    let accepted: Vec<u64> = (0..2)
        .map(|i| {
            p.inner
                .server
                .shards()
                .stats(i)
                .visitors_accepted
                .load(Ordering::Relaxed)
        })
        .collect();
    assert_eq!(accepted.iter().sum::<u64>(), 32);
    assert_eq!(p.inner.server.shards().total(|s| &s.visitors_unrouted), 0);
    p.inner.shutdown().await;
}

/// Listeners and sessions hold slots of the ring's registered-file table; a session that
/// ends must give its slot back (the table holds a reference to the socket: a slot kept
/// would keep the connection open in the kernel and, over reconnects, fill the table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_give_back_their_registered_file_slots_uring() {
    if !require_uring() {
        return;
    }
    let service = source_service().await;
    let p = start_pair(Backend::Uring, service, 2).await;
    let server = || p.inner.server.shards().total(|s| &s.registered_files);
    let client = || p.inner.client.shards().total(|s| &s.registered_files);
    settle(|| p.inner.server.shards().total(|s| &s.sessions) == 2).await;
    // Two shards a side: a listener and a session per server shard, a session per client one.
    settle(|| server() == 4 && client() == 2).await;
    assert_eq!(
        (server(), client()),
        (4, 2),
        "slots (server, client) with two sessions up"
    );
    assert_eq!(download(p.public, 4 << 20).await, 4 << 20);

    let warren::loopback::Pair {
        server: srv,
        client: cli,
    } = p.inner;
    cli.shutdown().await;
    settle(|| srv.shards().total(|s| &s.sessions) == 0).await;
    settle(|| srv.shards().total(|s| &s.registered_files) == 2).await;
    assert_eq!(
        srv.shards().total(|s| &s.registered_files),
        2,
        "after the sessions ended the server holds only its two listeners' slots"
    );
    srv.shutdown().await;
}

/// An echo service on an ephemeral loopback port.
async fn echo_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// One echo of `payload` through `public`; None when the tunnel refused or cut the visitor.
async fn echo_through(public: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(public).await.ok()?;
    s.write_all(payload).await.ok()?;
    s.shutdown().await.ok()?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.ok()?;
    Some(back)
}

/// A loopback address whose connects get no answer: a listener with a backlog of 0 that never
/// accepts, its accept queue filled by the test, so the kernel drops every further SYN. Returns
/// the listener and the connections that fill it (keep them alive).
async fn silent_service() -> (socket2::Socket, SocketAddr, Vec<TcpStream>) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fill.push(s),
            Ok(Err(e)) => panic!("filling the silent service's queue: {e}"),
            // This connect got no answer: the queue is full.
            Err(_) => return (l, addr, fill),
        }
    }
    panic!("16 connections to a listener with backlog 0 all completed");
}

/// A service whose connect never completes: the stream is reset once the service's
/// `connect_timeout_ms` has passed (not at once, not never), and the other service on the same
/// session keeps working.
async fn a_service_that_never_answers_the_connect_is_given_up_after_its_connect_timeout(
    backend: Backend,
) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WARREN_LOG"))
        .with_test_writer()
        .try_init();
    const TIMEOUT: Duration = Duration::from_millis(400);
    let (_listener, silent, _fill) = silent_service().await;
    let echo = echo_service().await;
    let lines = format!("connect_timeout_ms = {}", TIMEOUT.as_millis());
    let p = warren::loopback::Pair::start(PairSpec {
        services: &[("echo", echo), ("silent", silent)],
        shards: 1,
        backend,
        client_service_lines: &lines,
        ..PairSpec::default()
    })
    .await
    .unwrap();
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();

    // Two visitors of the silent service at once: each is given up on its own.
    let started = tokio::time::Instant::now();
    let visitors: Vec<_> = (0..2)
        .map(|_| {
            let public = p.public("silent");
            let payload = payload.clone();
            tokio::spawn(async move {
                let back = echo_through(public, &payload).await.unwrap_or_default();
                (back.len(), started.elapsed())
            })
        })
        .collect();
    // Meanwhile the echo service works.
    let back = echo_through(p.public("echo"), &payload).await;
    assert_eq!(
        back.as_deref(),
        Some(&payload[..]),
        "echo while a dial hangs"
    );
    for v in visitors {
        let (got, after) = tokio::time::timeout(Duration::from_secs(10), v)
            .await
            .expect("a visitor of a silent service was never given up")
            .unwrap();
        assert_eq!(
            got, 0,
            "{got} bytes came back from a service that never answered"
        );
        assert!(
            after >= TIMEOUT - Duration::from_millis(50),
            "the visitor was given up after {after:?}, before the {TIMEOUT:?} connect timeout"
        );
        eprintln!("visitor of the silent service ended after {after:?}");
    }
    let back = echo_through(p.public("echo"), &payload).await;
    assert_eq!(
        back.as_deref(),
        Some(&payload[..]),
        "echo after the timeouts"
    );
    p.shutdown().await;
}

/// A loopback port nothing listens on (connecting is refused).
fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A host name that resolves to several addresses is dialled in order: the first refuses
/// (as `localhost` -> `::1` does for a service listening on IPv4 only), the next answers. The
/// io_uring shards take the addresses from the control plane's lookup; here the test stands
/// in for the resolver by sending the shard the answer itself. When no address answers, the
/// visitor is refused and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_service_is_dialled_at_its_next_address_when_one_refuses_uring() {
    if !require_uring() {
        return;
    }
    const NAME: &str = "warren-test-multi.invalid:7";
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("WARREN_LOG"))
        .with_test_writer()
        .try_init();
    let echo = echo_service().await;
    let p = warren::loopback::Pair::start(PairSpec {
        services: &[("ip", echo)],
        host_services: &[("multi", NAME)],
        shards: 1,
        backend: Backend::Uring,
        ..PairSpec::default()
    })
    .await
    .unwrap();
    let publish = |addrs: Vec<SocketAddr>| {
        let cmd = warren_dataplane::ShardCommand::ServiceAddr {
            addr: NAME.into(),
            resolved: Ok(addrs.into()),
        };
        assert!(p.client.shards().send(0, cmd).is_ok(), "shard queue full");
    };
    // The client's own lookup of the made-up name failed (its next try is 5 s away).
    publish(vec![dead_port(), dead_port(), echo]);
    let public = p.public("multi");
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let mut first = None;
    for _ in 0..50 {
        // The shard takes the command on its next turn: until then the name is unresolved.
        first = echo_through(public, &payload)
            .await
            .filter(|b| !b.is_empty());
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        first.as_deref(),
        Some(&payload[..]),
        "no echo via the third address"
    );
    for _ in 0..5 {
        let back = echo_through(public, &payload).await;
        assert_eq!(
            back.as_deref(),
            Some(&payload[..]),
            "echo via the fallback address"
        );
    }

    // Every address refuses: the visitor gets no byte, and the other service still works.
    publish(vec![dead_port(), dead_port()]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let back = echo_through(public, &payload).await.unwrap_or_default();
    assert!(
        back.is_empty(),
        "{} bytes came back with no live address",
        back.len()
    );
    let back = echo_through(p.public("ip"), &payload).await;
    assert_eq!(
        back.as_deref(),
        Some(&payload[..]),
        "the other service stopped working"
    );
    p.shutdown().await;
}

/// Round trips of 64 bytes on one connection reach one server shard and one client shard; with
/// `busy_poll_other_cores = true` the keep-awake thread of the other shard's core in each
/// process spins while those poll, so that core stays awake for the load generator and the
/// service. Turned off, no keep-awake thread runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_cores_are_kept_awake_during_a_busy_poll_only_when_asked_uring() {
    if !require_uring() {
        return;
    }
    for mode in ["true", "\"occupy\"", "false"] {
        let along = mode != "false";
        let occupy = mode == "\"occupy\"";
        let tuning = format!("busy_poll_us = 200\nbusy_poll_other_cores = {mode}");
        let p = warren::loopback::Pair::start(PairSpec {
            services: &[("echo", echo_service().await)],
            shards: 2,
            sessions: Some(2),
            tuning: &tuning,
            backend: Backend::Uring,
            ..PairSpec::default()
        })
        .await
        .unwrap();
        settle(|| p.server.shards().total(|s| &s.sessions) == 2).await;
        let polls = |shards: &warren::backend::DataPlane| -> Vec<u64> {
            (0..2)
                .map(|i| shards.stats(i).awake_spells.load(Ordering::Relaxed))
                .collect()
        };
        // Bulk first, on a few connections so both server shards likely carry some: a shard
        // whose last turn before it went idle was a bulk turn must still count as light for
        // the keep-awake thread of its core (it once stayed "busy" for as long as it slept).
        for _ in 0..4 {
            let mut b = TcpStream::connect(p.public("echo")).await.unwrap();
            let block = vec![7u8; 4 << 20];
            let (mut r, mut w) = b.split();
            let (wrote, back) = tokio::join!(
                async {
                    w.write_all(&block).await.unwrap();
                    w.shutdown().await.unwrap();
                },
                async {
                    let mut back = Vec::with_capacity(block.len());
                    r.read_to_end(&mut back).await.unwrap();
                    back
                }
            );
            let () = wrote;
            assert!(back == block, "bulk echo came back different");
        }
        let accepted = |i: usize| {
            p.server
                .shards()
                .stats(i)
                .visitors_accepted
                .load(Ordering::Relaxed)
        };
        let accepted_before = [accepted(0), accepted(1)];
        let (srv0, cli0) = (polls(p.server.shards()), polls(p.client.shards()));
        let mut s = TcpStream::connect(p.public("echo")).await.unwrap();
        s.set_nodelay(true).unwrap();
        settle(|| accepted(0) + accepted(1) == accepted_before[0] + accepted_before[1] + 1).await;
        let busy = (0..2)
            .find(|i| accepted(*i) == accepted_before[*i] + 1)
            .expect("one server shard accepted the round-trip visitor");
        let mut buf = [0u8; 64];
        let mut trips = 0u32;
        // Spells of the idle server shard's keep-awake thread, and of any client one, since
        // the bulk phase.
        let spun = || {
            let (srv, cli) = (polls(p.server.shards()), polls(p.client.shards()));
            (
                srv[1 - busy] - srv0[1 - busy],
                cli.iter().sum::<u64>() - cli0.iter().sum::<u64>(),
            )
        };
        // With the option on, go until a keep-awake thread on each side has spun (one kicked
        // too late for a poll waits for the next one), at most 20 s.
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            s.write_all(&[trips as u8; 64]).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [trips as u8; 64], "round trip {trips}");
            trips += 1;
            let done = if along {
                let (srv, cli) = spun();
                srv > 0 && cli > 0
            } else {
                trips >= 2_000
            };
            if done || tokio::time::Instant::now() > end {
                break;
            }
        }
        let (srv, cli) = (polls(p.server.shards()), polls(p.client.shards()));
        if along {
            let (srv_spun, cli_spun) = spun();
            assert!(
                srv_spun > 0 && cli_spun > 0,
                "{mode}: after {trips} round trips no other core was kept awake: server {srv:?} \
                 (shard {busy} has the visitor), client {cli:?}, before them {srv0:?} / {cli0:?}"
            );
        }
        if occupy {
            // Occupying: the shards never busy-poll themselves, and the threads that occupy
            // the other cores run at nice 19.
            let own = p.server.shards().total(|s| &s.idle_class_polls)
                + p.client.shards().total(|s| &s.idle_class_polls);
            assert_eq!(own, 0, "occupy: {own} busy polls of the shards themselves");
            // Other tests of this binary may run pairs of their own meanwhile, so count: this
            // pair's four (two per side) must be among those at nice 19.
            let nices = awake_thread_nices();
            assert!(
                nices.iter().filter(|n| **n == 19).count() >= 4,
                "occupy: keep-awake nice values {nices:?}"
            );
        }
        if !along {
            assert_eq!(
                (srv, cli),
                (vec![0, 0], vec![0, 0]),
                "busy_poll_other_cores = false, {trips} round trips"
            );
        }
        drop(s);
        p.shutdown().await;
    }
}

/// The nice values of this process's keep-awake threads (named `<role>-awake-<i>`).
fn awake_thread_nices() -> Vec<i64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if !comm.contains("-awake-") {
                return None;
            }
            // Field 19 of stat is the nice value; the command name before it may hold spaces,
            // so count from the closing parenthesis.
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            rest.split(' ').nth(16)?.parse().ok()
        })
        .collect()
}

/// With `busy_poll_sched_idle` (the default) the shards busy-poll as `SCHED_IDLE`, so the
/// threads their sends wake are placed on their core; a CPU hog on that core makes them back
/// off to `SCHED_OTHER` polls, and round trips keep flowing meanwhile. Turned off, no poll runs
/// as `SCHED_IDLE`. Everything runs on one core (one shard per side, pinned to the first
/// allowed CPU) so the hog shares the shards' core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polls_run_as_sched_idle_and_back_off_from_a_busy_core_uring() {
    if !require_uring() {
        return;
    }
    if let Err(why) = warren_dataplane::sched_idle_probe() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "SCHED_IDLE busy polls are unavailable and CI=true, so this fails instead of skipping: {why}"
        );
        eprintln!("skipped: SCHED_IDLE busy polls are unavailable here ({why})");
        return;
    }
    let core = core_affinity::get_core_ids()
        .and_then(|c| c.first().copied())
        .expect("an allowed CPU");
    for on in [true, false] {
        let tuning = format!(
            "busy_poll_us = 200\nbusy_poll_sched_idle = {on}\ncores = [{}]",
            core.id
        );
        let p = warren::loopback::Pair::start(PairSpec {
            services: &[("echo", echo_service().await)],
            shards: 1,
            tuning: &tuning,
            backend: Backend::Uring,
            ..PairSpec::default()
        })
        .await
        .unwrap();
        let count = |d: &warren::backend::DataPlane, backoffs: bool| {
            let s = d.stats(0);
            if backoffs {
                s.idle_class_backoffs.load(Ordering::Relaxed)
            } else {
                s.idle_class_polls.load(Ordering::Relaxed)
            }
        };
        let mut s = TcpStream::connect(p.public("echo")).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut trips = 0u32;
        // Phase 1: light traffic alone; both shards poll as SCHED_IDLE (if asked), at most 20 s.
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            round_trip_within_10s(&mut s, &mut trips).await;
            let both = count(p.server.shards(), false) > 0 && count(p.client.shards(), false) > 0;
            if (on && both) || (!on && trips >= 2_000) || tokio::time::Instant::now() > end {
                break;
            }
        }
        let polls = (
            count(p.server.shards(), false),
            count(p.client.shards(), false),
        );
        if !on {
            assert_eq!(
                polls,
                (0, 0),
                "busy_poll_sched_idle = false, {trips} round trips"
            );
            drop(s);
            p.shutdown().await;
            continue;
        }
        assert!(
            polls.0 > 0 && polls.1 > 0,
            "after {trips} round trips a shard never polled as SCHED_IDLE: {polls:?}"
        );
        // Phase 2: a SCHED_OTHER hog on the shards' core. Both shards must notice it and back
        // off, and every round trip still completes (each within 10 s).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                core_affinity::set_for_current(core);
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        let before = trips;
        loop {
            round_trip_within_10s(&mut s, &mut trips).await;
            let both = count(p.server.shards(), true) > 0 && count(p.client.shards(), true) > 0;
            if both || tokio::time::Instant::now() > end {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
        let backoffs = (
            count(p.server.shards(), true),
            count(p.client.shards(), true),
        );
        assert!(
            backoffs.0 > 0 && backoffs.1 > 0,
            "{} round trips with a hog on core {}: back-offs {backoffs:?}",
            trips - before,
            core.id
        );
        // And the tunnel still works once the hog is gone.
        round_trip_within_10s(&mut s, &mut trips).await;
        drop(s);
        p.shutdown().await;
    }
}

/// One 64-byte echo round trip, numbered `trips` (incremented); panics past 10 s.
async fn round_trip_within_10s(s: &mut TcpStream, trips: &mut u32) {
    let msg = [*trips as u8; 64];
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(10), async {
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
    })
    .await
    .unwrap_or_else(|_| panic!("round trip {trips} took more than 10 s"));
    assert_eq!(buf, msg, "round trip {trips}");
    *trips += 1;
}
