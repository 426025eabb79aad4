//! Harness for the end-to-end tests: runs the real `warren` binary as child processes, reads
//! their logs, and provides the local services and visitors the tunnel connects.
//!
//! Everything binds port 0; real ports are read from the logs. Every child process is owned by
//! a [`Warren`] guard that kills it on drop and, when the test is failing, prints its log.
//! The children log at `info`; set `E2E_WARREN_LOG` (e.g. `debug`) to change that.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use warren::backend::Backend;

#[macro_use]
pub mod uring;
pub use uring::require_uring;

/// Default budget for anything the tunnel should do "at once" (start, connect, refuse).
pub const SOON: Duration = Duration::from_secs(15);

/// The token every test client uses (tests that need a wrong one make it up).
pub const TOKEN: &str = "e2e-secret-token";

/// Client name used by every test.
pub const CLIENT_NAME: &str = "laptop";

// ---- temporary directories -----------------------------------------------------------------

/// A directory under the system temp dir, unique per test, removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(test: &str) -> TestDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "warren-e2e-{}-{test}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `name` inside the directory and returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---- child processes -------------------------------------------------------------------------

/// Lines a child wrote to stderr, shared with the thread that reads them.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// One running `warren` process. Killed (SIGKILL) on drop if still running; its log is printed
/// to the test's stderr when the test is failing.
pub struct Warren {
    label: String,
    child: Child,
    log: Arc<Log>,
    exited: Option<ExitStatus>,
}

impl Warren {
    /// Runs `warren <args..>` with stderr captured line by line.
    pub fn spawn(label: &str, args: &[&str]) -> Warren {
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(args)
            .env(
                "WARREN_LOG",
                std::env::var("E2E_WARREN_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning warren {args:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Log::default());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        Warren {
            label: label.to_string(),
            child,
            log,
            exited: None,
        }
    }

    /// `warren server -c <config> --backend <backend>`.
    pub fn server(config: &Path, backend: Backend) -> Warren {
        Warren::spawn(
            "server",
            &[
                "server",
                "-c",
                config.to_str().unwrap(),
                "--backend",
                backend.as_str(),
            ],
        )
    }

    /// `warren client -c <config> --backend <backend>`.
    pub fn client(label: &str, config: &Path, backend: Backend) -> Warren {
        Warren::spawn(
            label,
            &[
                "client",
                "-c",
                config.to_str().unwrap(),
                "--backend",
                backend.as_str(),
            ],
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of log lines so far: pass it to the `wait_*` calls to look only at later lines.
    pub fn mark(&self) -> usize {
        self.log.lines.lock().unwrap().len()
    }

    /// A copy of every log line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Whether some line contains every one of `parts`.
    pub fn has_line(&self, parts: &[&str]) -> bool {
        self.lines().iter().any(|l| matches_all(l, parts))
    }

    /// Waits for `n` lines at or after `from` that each contain every one of `parts`.
    pub fn wait_lines(
        &self,
        from: usize,
        parts: &[&str],
        n: usize,
        limit: Duration,
    ) -> Vec<String> {
        self.wait_matching(from, n, limit, &format!("{parts:?}"), |l| {
            matches_all(l, parts)
        })
    }

    /// Waits for one line at or after `from` containing every one of `parts`; returns it.
    pub fn wait_line(&self, from: usize, parts: &[&str], limit: Duration) -> String {
        self.wait_lines(from, parts, 1, limit).swap_remove(0)
    }

    /// Waits for `n` lines at or after `from` for which `pred` holds; `what` describes them.
    // The lint guards the product's clock discipline; this is a test thread waiting on a child.
    #[allow(clippy::disallowed_methods)]
    pub fn wait_matching(
        &self,
        from: usize,
        n: usize,
        limit: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            let found: Vec<String> = lines
                .iter()
                .skip(from)
                .filter(|l| pred(l))
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "{}: waited {limit:?} for {n} log line(s) matching {what}, found {}",
                self.label,
                found.len()
            );
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// SIGKILL (what `Child::kill` sends on unix), then reap.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Sends SIGTERM: the graceful stop systemd uses.
    pub fn terminate(&self) {
        signal(self.pid(), "TERM");
    }

    /// Waits for the process to exit on its own; `None` if it is still running after `limit`.
    // The lint guards shard threads and the product's clock; this is a test thread polling a child.
    #[allow(clippy::disallowed_methods)]
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited {
                return Some(status);
            }
            if let Some(status) = self.child.try_wait().expect("waiting for warren") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Warren {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- log of warren {} (pid {}) -----",
                self.label,
                self.child.id()
            );
            for line in self.lines() {
                eprintln!("[{}] {line}", self.label);
            }
        }
    }
}

fn matches_all(line: &str, parts: &[&str]) -> bool {
    parts.iter().all(|p| line.contains(p))
}

/// The value of `key=value` in a tracing log line (fields follow the message).
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    try_field(line, key).unwrap_or_else(|| panic!("no field {key:?} in log line {line:?}"))
}

/// Like [`field`], `None` when the line has no such field.
pub fn try_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = line.rfind(&pat)? + pat.len();
    line[start..].split_whitespace().next()
}

fn addr_field(line: &str, key: &str) -> SocketAddr {
    let v = field(line, key);
    v.parse()
        .unwrap_or_else(|e| panic!("field {key}={v:?} in {line:?} is not an address: {e}"))
}

/// Sends `sig` (a name such as `TERM`) to `pid` with kill(1): no `unsafe` outside the data
/// plane, not even in tests. `pid` is a child this test spawned and has not reaped, so the id
/// cannot have been reused by another process.
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("running kill -{sig} {pid}: {e}"));
    assert!(status.success(), "kill -{sig} {pid}: {status}");
}

/// Raises this process's soft open-file limit to at least `want` (up to the hard limit), so
/// thousands of test sockets fit. Child processes inherit it. Returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get().expect("getrlimit(RLIMIT_NOFILE)");
    let target = want.min(hard);
    if soft < target {
        Resource::NOFILE
            .set(target, hard)
            .unwrap_or_else(|e| panic!("setrlimit(RLIMIT_NOFILE, {target}, {hard}): {e}"));
    }
    soft.max(target)
}

// ---- server and client --------------------------------------------------------------------

/// Session transport of a test tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    /// Self-signed certificate generated by the server, fingerprint pinned by the client.
    Tls,
}

/// What the test server looks like.
pub struct ServerSpec<'a> {
    pub transport: Transport,
    /// Data plane, passed as `--backend` to the server and its clients (it overrides the file).
    pub backend: Backend,
    pub shards: usize,
    /// Public services, each on its own port.
    pub services: &'a [&'a str],
    /// Extra lines for the `[server]` table (e.g. `drain_timeout_ms = 5000`).
    pub extra: &'a str,
    /// Extra lines for the `[server.tuning]` table.
    pub tuning: &'a str,
}

impl Default for ServerSpec<'_> {
    fn default() -> Self {
        ServerSpec {
            transport: Transport::Tcp,
            backend: Backend::Auto,
            shards: 2,
            services: &[],
            extra: "",
            tuning: "",
        }
    }
}

/// A running server and what its log told us.
pub struct Server {
    pub proc: Warren,
    pub transport: Transport,
    pub backend: Backend,
    pub shards: usize,
    /// Where clients connect.
    pub session_addr: SocketAddr,
    /// Public port of each service.
    pub services: BTreeMap<String, SocketAddr>,
    /// `sha256:..` of the self-signed certificate (TLS only).
    pub fingerprint: Option<String>,
}

impl Server {
    /// Writes `server.toml` in `dir`, starts the server and waits until it accepts sessions.
    pub fn start(dir: &TestDir, spec: ServerSpec<'_>) -> Server {
        let mut toml = String::from("[server]\nbind_addr = \"127.0.0.1:0\"\n");
        toml += match spec.transport {
            Transport::Tcp => "transport = \"tcp\"\n",
            Transport::Tls => "transport = \"tls\"\n",
        };
        toml += &format!("state_dir = \"{}\"\n", dir.path().join("state").display());
        toml += spec.extra;
        toml += &format!("\n[server.clients.{CLIENT_NAME}]\ntoken = \"{TOKEN}\"\n");
        for s in spec.services {
            toml += &format!("[server.services.{s}]\nbind_addr = \"127.0.0.1:0\"\n");
        }
        toml += &format!(
            "[server.tuning]\nshards = {}\n{}\n",
            spec.shards, spec.tuning
        );
        let config = dir.write("server.toml", &toml);
        let proc = Warren::server(&config, spec.backend);
        let ready = proc.wait_line(0, &["accepting client sessions"], SOON);
        let session_addr = addr_field(&ready, "addr");
        assert_eq!(field(&ready, "shards"), spec.shards.to_string(), "{ready}");
        if spec.backend != Backend::Auto {
            assert_eq!(field(&ready, "backend"), spec.backend.as_str(), "{ready}");
        }
        let services = proc
            .wait_lines(0, &["public port ready"], spec.services.len(), SOON)
            .iter()
            .map(|l| (field(l, "service").to_string(), addr_field(l, "addr")))
            .collect::<BTreeMap<_, _>>();
        assert_eq!(services.len(), spec.services.len(), "{services:?}");
        let fingerprint = (spec.transport == Transport::Tls).then(|| {
            let line = proc.wait_line(0, &["server_fingerprint = \"sha256:"], SOON);
            let start = line.find("\"sha256:").expect("fingerprint quote") + 1;
            let len = line[start..].find('"').expect("closing quote");
            line[start..start + len].to_string()
        });
        Server {
            proc,
            transport: spec.transport,
            backend: spec.backend,
            shards: spec.shards,
            session_addr,
            services,
            fingerprint,
        }
    }

    /// Public address of `service`.
    pub fn public(&self, service: &str) -> SocketAddr {
        self.services[service]
    }

    /// Writes `client.toml` for this server, offering `services` (name, local address).
    pub fn client_config(&self, dir: &TestDir, services: &[(&str, SocketAddr)]) -> PathBuf {
        let mut toml = format!(
            "[client]\nserver_addr = \"{}\"\nname = \"{CLIENT_NAME}\"\ntoken = \"{TOKEN}\"\n\
             reconnect_min_ms = 100\nreconnect_max_ms = 1000\n",
            self.session_addr
        );
        match self.transport {
            Transport::Tcp => toml += "transport = \"tcp\"\n",
            Transport::Tls => {
                toml += "transport = \"tls\"\nserver_name = \"localhost\"\n";
                toml += &format!(
                    "server_fingerprint = \"{}\"\n",
                    self.fingerprint
                        .as_deref()
                        .expect("TLS server has a fingerprint")
                );
            }
        }
        for (name, addr) in services {
            toml += &format!("[client.services.{name}]\nlocal_addr = \"{addr}\"\n");
        }
        toml += "[client.tuning]\nshards = 2\n";
        dir.write("client.toml", &toml)
    }

    /// Starts a client with `config` (on the server's backend) and waits until the server runs
    /// one session per shard for it (counting only server log lines from `server_mark` on).
    pub fn connect_client(&self, label: &str, config: &Path, server_mark: usize) -> Warren {
        let client = Warren::client(label, config, self.backend);
        if self.backend != Backend::Auto {
            let started = client.wait_line(0, &["client started"], SOON);
            assert_eq!(
                field(&started, "backend"),
                self.backend.as_str(),
                "{started}"
            );
        }
        client.wait_lines(0, &["connected session="], self.shards, SOON);
        // The shard registers the session (and its services) before it logs this line, so a
        // visitor arriving after it is routed.
        self.proc.wait_lines(
            server_mark,
            &["session running", &format!("peer={CLIENT_NAME}@")],
            self.shards,
            SOON,
        );
        client
    }
}

// ---- deterministic data ---------------------------------------------------------------------

/// Deterministic pseudo-random bytes (splitmix64), produced 8 bytes at a time.
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern { state: seed }
    }

    /// Fills `buf` with the next bytes. `buf.len()` must be a multiple of 8 so that chunked
    /// generation yields the same stream whatever the chunk sizes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        assert_eq!(buf.len() % 8, 0, "pattern chunks are multiples of 8 bytes");
        for word in buf.chunks_exact_mut(8) {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
    }

    /// `len` bytes of the stream for `seed`, in one buffer.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// Byte count and SHA-256 of a byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Count and digest of the first `len` bytes of the pattern for `seed`.
pub fn pattern_summary(seed: u64, len: u64) -> Summary {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Summary {
        len,
        sha256: h.finalize().into(),
    }
}

/// Writes `len` pattern bytes for `seed`; returns their summary.
pub async fn write_pattern(sock: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<Summary> {
    write_pattern_counting(sock, seed, len, &AtomicU64::new(0)).await
}

/// Like [`write_pattern`], also publishing the running byte count in `progress`.
pub async fn write_pattern_counting(
    sock: &mut TcpStream,
    seed: u64,
    len: u64,
    progress: &AtomicU64,
) -> std::io::Result<Summary> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        sock.write_all(&buf[..n]).await?;
        h.update(&buf[..n]);
        left -= n as u64;
        progress.store(len - left, Ordering::Relaxed);
    }
    Ok(Summary {
        len,
        sha256: h.finalize().into(),
    })
}

/// Reads until EOF; returns count and digest of everything read.
pub async fn read_summary(sock: &mut TcpStream) -> std::io::Result<Summary> {
    read_summary_counting(sock, &AtomicU64::new(0)).await
}

/// Like [`read_summary`], also publishing the running byte count in `progress`.
pub async fn read_summary_counting(
    sock: &mut TcpStream,
    progress: &AtomicU64,
) -> std::io::Result<Summary> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
        progress.store(len, Ordering::Relaxed);
    }
    Ok(Summary {
        len,
        sha256: h.finalize().into(),
    })
}

// ---- local services (the client's side) ---------------------------------------------------------

/// Binds 127.0.0.1:0 and runs `handler` for every connection; returns the address.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // A deep accept queue: the 1000-visitor test dials the service 1000 times at once, and with
    // tokio's default backlog (1024) plus SYN cookies the kernel reset some of those dials
    // (TcpExtListenOverflows), which the tunnel then rightly reported as service resets.
    let socket = tokio::net::TcpSocket::new_v4().expect("creating a local service socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("binding a local service");
    let listener = socket.listen(4096).expect("listening on a local service");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    tokio::spawn(handler(sock));
                }
                Err(e) => {
                    eprintln!("local service {addr}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    addr
}

/// Connection counters of the echo service.
#[derive(Default)]
pub struct EchoStats {
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    pub total: AtomicUsize,
}

/// Echoes every byte back; after the visitor's EOF, half-closes too.
pub async fn echo_service(stats: Arc<EchoStats>) -> SocketAddr {
    serve(move |mut sock| {
        let stats = stats.clone();
        async move {
            let now = stats.active.fetch_add(1, Ordering::SeqCst) + 1;
            stats.max_active.fetch_max(now, Ordering::SeqCst);
            stats.total.fetch_add(1, Ordering::SeqCst);
            let (mut r, mut w) = sock.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
            stats.active.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await
}

/// Reads each connection to EOF and reports what it got; then closes.
pub async fn sink_service() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<std::io::Result<Summary>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve(move |mut sock| {
        let tx = tx.clone();
        async move {
            let got = read_summary(&mut sock).await;
            let _ = tx.send(got);
        }
    })
    .await;
    (addr, rx)
}

/// Sends `len` pattern bytes for `seed` to each connection, then closes.
pub async fn source_service(seed: u64, len: u64) -> SocketAddr {
    serve(move |mut sock| async move {
        if write_pattern(&mut sock, seed, len).await.is_ok() {
            let _ = sock.shutdown().await;
        }
    })
    .await
}

/// Sends pattern bytes to each connection until writing fails.
pub async fn endless_service(seed: u64) -> SocketAddr {
    serve(move |mut sock| async move {
        let mut p = Pattern::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            p.fill(&mut buf);
            if sock.write_all(&buf).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// A slow source: `chunk` pattern bytes every `every`, until `stop` turns true (checked before
/// each chunk) or `max_chunks` are sent; then closes and reports the bytes it sent.
pub async fn trickle_service(
    seed: u64,
    chunk: usize,
    every: Duration,
    max_chunks: u64,
    stop: watch::Receiver<bool>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Summary>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve(move |mut sock| {
        let tx = tx.clone();
        let stop = stop.clone();
        async move {
            let mut p = Pattern::new(seed);
            let mut h = Sha256::new();
            let mut buf = vec![0u8; chunk];
            let mut len = 0u64;
            for _ in 0..max_chunks {
                if *stop.borrow() {
                    break;
                }
                p.fill(&mut buf);
                if sock.write_all(&buf).await.is_err() {
                    return;
                }
                h.update(&buf);
                len += buf.len() as u64;
                tokio::time::sleep(every).await;
            }
            let _ = sock.shutdown().await;
            let _ = tx.send(Summary {
                len,
                sha256: h.finalize().into(),
            });
        }
    })
    .await;
    (addr, rx)
}

/// Connects as a visitor that expects to be turned away within `limit`: either the connect
/// fails (nobody listens), or the connection closes (EOF or reset) without delivering a byte.
/// Panics otherwise. Returns how it was turned away, for the test's output.
pub async fn expect_refused(addr: SocketAddr, limit: Duration) -> String {
    let attempt = async {
        let mut sock = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => return format!("connect failed: {e}"),
        };
        // Say something, as a real visitor would; the tunnel must not carry it anywhere.
        let _ = sock.write_all(b"hello?").await;
        let mut buf = [0u8; 4096];
        match sock.read(&mut buf).await {
            Ok(0) => "accepted, then closed".to_string(),
            Err(e) => format!("accepted, then {e}"),
            Ok(n) => panic!("visitor to {addr} should be refused but received {n} bytes"),
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| {
            panic!("visitor to {addr} was neither refused nor closed within {limit:?}")
        })
}
