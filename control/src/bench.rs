//! `warren bench`: the user-facing self-test. It starts a tunnel server and client in this
//! process on loopback (port 0), with the tuning sections of the user's config file (or the
//! defaults), puts the `warren-perf` sink and echo backends behind the client as its local
//! services, and drives traffic through the server's public ports: a bulk download, a bulk
//! upload, then request-response round trips. It reports throughput, latency percentiles, the
//! process's CPU time per GB and the effective tuning, so a user sees what a change to
//! `[server.tuning]` / `[client.tuning]` does on their machine.
//!
//! What it does not do: compare against other tunnels or a direct connection (`perf/compare`
//! does), or separate the tunnel's CPU from the load generator's (everything is one process).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use warren_perf::bulk::{run_bulk, BulkParams, Direction};
use warren_perf::clock::now;
use warren_perf::rr::{run_rr, RrParams};
use warren_perf::{Backend, BackendKind, Live, Report};

use crate::client::Client;
use crate::config::{parse_config, ClientConfig, ServerConfig, Transport, Tuning};
use crate::server::Server;
use crate::setup::{allowed_cpus, random_bytes};

/// Version of the JSON shape; bumped when a field changes meaning or disappears.
pub const SCHEMA: u32 = 1;

/// A connection that makes no progress for this long fails the run instead of hanging it.
const IO_TIMEOUT_MS: u64 = 30_000;

/// How long the client may take to bring its sessions up.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Width of the progress bar in characters.
const BAR_WIDTH: usize = 30;

/// The embedded server half; `{...}` fields are filled in at start. Service `bulk` leads to the
/// sink backend, service `rr` to the echo backend.
const SERVER_TOML: &str = r#"
[server]
bind_addr = "127.0.0.1:0"
transport = "{transport}"
state_dir = "{state_dir}"
[server.clients.bench]
token = "{token}"
[server.services.bulk]
bind_addr = "127.0.0.1:0"
[server.services.rr]
bind_addr = "127.0.0.1:0"
"#;

/// The embedded client half.
const CLIENT_TOML: &str = r#"
[client]
server_addr = "{server_addr}"
name = "bench"
token = "{token}"
transport = "{transport}"
{pin}
[client.services.bulk]
local_addr = "{sink_addr}"
[client.services.rr]
local_addr = "{echo_addr}"
"#;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Config file whose `[server.tuning]` / `[client.tuning]` are used; `None`: defaults.
    pub config: Option<PathBuf>,
    /// Bytes per bulk stream, each direction.
    pub bytes: u64,
    /// Concurrent bulk streams, each direction.
    pub streams: u32,
    /// Length of the measured rr phase.
    pub rr_duration: Duration,
    /// Payload bytes per round trip, each way.
    pub rr_size: usize,
    /// rr connections, each with one round trip outstanding.
    pub rr_connections: u32,
    /// Session transport between the in-process client and server.
    pub transport: Transport,
    /// Data plane of both roles, overriding `tuning.backend` of the file; `None`: the file's
    /// (or `auto`).
    pub backend: Option<crate::backend::Backend>,
    /// Draw a progress bar on stderr (only done when stderr is a terminal).
    pub progress: bool,
}

/// Where one role's tuning came from, and what it is.
#[derive(Debug, Clone)]
pub struct RoleTuning {
    /// `defaults`, or the file and table it was read from.
    pub source: String,
    pub tuning: Tuning,
    /// Shard threads this role actually runs (`tuning.shards`, `cores`, or one per CPU).
    pub shards: usize,
}

/// Process CPU time spent in one phase, and what it moved.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// User + system time of the whole process (all threads) during the phase; `None` where
    /// the platform does not expose it.
    pub seconds: Option<f64>,
    /// Payload bytes moved in the phase (both directions summed for rr).
    pub bytes: u64,
    /// Operations in the phase: streams (bulk), round trips including the warm-up (rr).
    pub ops: u64,
}

impl CpuUse {
    /// Below this much CPU time a figure is mostly tick rounding.
    const PRECISE_SECONDS: f64 = 0.2;

    /// CPU seconds per 10^9 payload bytes.
    pub fn seconds_per_gb(&self) -> Option<f64> {
        let s = self.seconds?;
        (self.bytes > 0).then(|| s / (self.bytes as f64 / 1e9))
    }

    /// CPU microseconds per operation.
    pub fn us_per_op(&self) -> Option<f64> {
        let s = self.seconds?;
        (self.ops > 0).then(|| s * 1e6 / self.ops as f64)
    }

    /// A note for figures too small to trust.
    fn caveat(&self) -> &'static str {
        match self.seconds {
            Some(s) if s < Self::PRECISE_SECONDS => {
                " (short run: the CPU clock ticks every 10 ms; use more --bytes)"
            }
            _ => "",
        }
    }
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub options: BenchOptions,
    pub server: RoleTuning,
    pub client: RoleTuning,
    /// The data plane each role ran on (what `tuning.backend` resolved to).
    pub server_backend: crate::backend::BackendKind,
    pub client_backend: crate::backend::BackendKind,
    /// Sessions the client opened (one per server shard).
    pub sessions: u32,
    /// Service to visitor.
    pub download: Report,
    /// Visitor to service.
    pub upload: Report,
    pub rr: Report,
    pub cpu_download: CpuUse,
    pub cpu_upload: CpuUse,
    pub cpu_rr: CpuUse,
}

impl BenchResult {
    /// Failed operations over all workloads.
    pub fn errors(&self) -> u64 {
        self.download.errors + self.upload.errors + self.rr.errors
    }

    /// One JSON object with every figure.
    pub fn to_json(&self) -> serde_json::Value {
        let o = &self.options;
        let cpu = |c: &CpuUse| {
            json!({
                "seconds": c.seconds,
                "bytes": c.bytes,
                "seconds_per_gb": c.seconds_per_gb(),
                // false when under 0.2 s of CPU: 10 ms ticks dominate the figure.
                "precise": c.caveat().is_empty(),
            })
        };
        let r = &self.cpu_rr;
        let cpu_rr = json!({
            "seconds": r.seconds,
            "round_trips": r.ops,
            "us_per_round_trip": r.us_per_op(),
            "precise": r.caveat().is_empty(),
        });
        let report = |r: &Report| serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
        json!({
            "schema": SCHEMA,
            "transport": o.transport.as_str(),
            "backend": self.backend(),
            "backends": {
                "server": self.server_backend.as_str(),
                "client": self.client_backend.as_str(),
            },
            "params": {
                "config": o.config.as_ref().map(|p| p.display().to_string()),
                "bytes": o.bytes,
                "streams": o.streams,
                "rr_seconds": o.rr_duration.as_secs_f64(),
                "rr_size": o.rr_size,
                "rr_connections": o.rr_connections,
            },
            "tuning": {
                "server": tuning_json(&self.server),
                "client": tuning_json(&self.client),
                "sessions": self.sessions,
            },
            "download": report(&self.download),
            "upload": report(&self.upload),
            "rr": report(&self.rr),
            "cpu": {
                "source": "process user+system time from /proc/self/stat (10 ms ticks); includes the load generator and backends, which run in the same process; rr includes its warm-up",
                "download": cpu(&self.cpu_download),
                "upload": cpu(&self.cpu_upload),
                "rr": cpu_rr,
            },
            "errors": self.errors(),
        })
    }

    /// The data plane the run used: `uring` or `compat`, or `mixed` when the two roles ran on
    /// different ones (see `backends`).
    pub fn backend(&self) -> &'static str {
        if self.server_backend == self.client_backend {
            self.server_backend.as_str()
        } else {
            "mixed"
        }
    }

    /// The human-readable summary.
    pub fn render(&self) -> String {
        let o = &self.options;
        let (s, c) = (&self.server, &self.client);
        let backend = if self.server_backend == self.client_backend {
            format!("backend {}", self.server_backend)
        } else {
            format!(
                "backend {} (server), {} (client)",
                self.server_backend, self.client_backend
            )
        };
        let mut out = format!(
            "warren bench: tunnel server and client in this process on loopback, {} session(s), transport {}, {backend}\n\n",
            self.sessions,
            o.transport.as_str()
        );
        out.push_str(&format!(
            "effective tuning\n  server: {}\n  client: {}\n",
            s.source, c.source
        ));
        out.push_str(&format!("  {:<30} {:>14} {:>14}\n", "", "server", "client"));
        let cores = |t: &Tuning| {
            t.cores.as_ref().map_or("auto".to_string(), |c| {
                c.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
            })
        };
        let rows: [(&str, String, String); 18] = [
            (
                "backend",
                s.tuning.backend.to_string(),
                c.tuning.backend.to_string(),
            ),
            ("shards", s.shards.to_string(), c.shards.to_string()),
            ("cores", cores(&s.tuning), cores(&c.tuning)),
            (
                "initial_stream_window_bytes",
                size(s.tuning.initial_stream_window_bytes),
                size(c.tuning.initial_stream_window_bytes),
            ),
            (
                "max_stream_window_bytes",
                size(s.tuning.max_stream_window_bytes),
                size(c.tuning.max_stream_window_bytes),
            ),
            (
                "session_window_bytes",
                size(s.tuning.session_window_bytes),
                size(c.tuning.session_window_bytes),
            ),
            (
                "max_frame_payload_bytes",
                size(s.tuning.max_frame_payload_bytes),
                size(c.tuning.max_frame_payload_bytes),
            ),
            (
                "quantum_bytes",
                size(s.tuning.quantum_bytes),
                size(c.tuning.quantum_bytes),
            ),
            (
                "read_buffer_bytes",
                size(s.tuning.read_buffer_bytes),
                size(c.tuning.read_buffer_bytes),
            ),
            (
                "max_streams_per_session",
                s.tuning.max_streams_per_session.to_string(),
                c.tuning.max_streams_per_session.to_string(),
            ),
            (
                "buffer_count",
                s.tuning.buffer_count.to_string(),
                c.tuning.buffer_count.to_string(),
            ),
            (
                "pipe_size_bytes",
                size(s.tuning.pipe_size_bytes),
                size(c.tuning.pipe_size_bytes),
            ),
            (
                "pipe_pool_size",
                s.tuning.pipe_pool_size.to_string(),
                c.tuning.pipe_pool_size.to_string(),
            ),
            (
                "busy_poll_us",
                s.tuning.busy_poll_us.to_string(),
                c.tuning.busy_poll_us.to_string(),
            ),
            (
                "busy_poll_other_cores",
                s.tuning.busy_poll_other_cores.to_string(),
                c.tuning.busy_poll_other_cores.to_string(),
            ),
            (
                "busy_poll_sched_idle",
                s.tuning.busy_poll_sched_idle.to_string(),
                c.tuning.busy_poll_sched_idle.to_string(),
            ),
            (
                "tls_own_records",
                s.tuning.tls_own_records.to_string(),
                c.tuning.tls_own_records.to_string(),
            ),
            (
                "loopback_congestion_control",
                format!("{:?}", s.tuning.loopback_congestion_control),
                format!("{:?}", c.tuning.loopback_congestion_control),
            ),
        ];
        for (name, a, b) in rows {
            out.push_str(&format!("  {name:<30} {a:>14} {b:>14}\n"));
        }

        out.push_str(&format!(
            "\nbulk, {} stream(s) x {} each way\n",
            o.streams,
            size_u64(o.bytes)
        ));
        for (label, r) in [
            ("download (service -> visitor)", &self.download),
            ("upload   (visitor -> service)", &self.upload),
        ] {
            out.push_str(&format!(
                "  {label}  {:>9.1} MB/s  ({:.1} MB in {:.2} s)\n",
                r.mb_per_s,
                r.bytes as f64 / 1e6,
                r.seconds
            ));
        }

        out.push_str(&format!(
            "\nrr, {} B each way, {} connection(s), {:.1} s measured\n",
            o.rr_size, o.rr_connections, self.rr.seconds
        ));
        out.push_str(&format!(
            "  round trips   {} ({:.0}/s)\n",
            self.rr.requests, self.rr.rps
        ));
        match &self.rr.latency_us {
            Some(l) => out.push_str(&format!(
                "  latency (us)  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  (max {:.1})\n",
                l.p50, l.p90, l.p99, l.p999, l.max
            )),
            None => out.push_str("  latency       n/a (no round trip completed)\n"),
        }

        out.push_str(
            "\nCPU, whole process (user + system; includes the load generator and the backends, \
             which run in this process too)\n",
        );
        let per_gb = |c: &CpuUse| match (c.seconds, c.seconds_per_gb()) {
            (Some(s), Some(g)) => format!("{g:.2} s per GB  ({s:.2} s){}", c.caveat()),
            (Some(s), None) => format!("n/a  ({s:.2} s, nothing moved)"),
            _ => "n/a (needs /proc/self/stat)".to_string(),
        };
        out.push_str(&format!("  download  {}\n", per_gb(&self.cpu_download)));
        out.push_str(&format!("  upload    {}\n", per_gb(&self.cpu_upload)));
        let c = &self.cpu_rr;
        let rr_cpu = match (c.seconds, c.us_per_op()) {
            (Some(s), Some(us)) => format!(
                "{us:.1} us per round trip  ({s:.2} s, {} round trips with the warm-up){}",
                c.ops,
                c.caveat()
            ),
            (Some(s), None) => format!("n/a  ({s:.2} s, no round trip completed)"),
            _ => "n/a (needs /proc/self/stat)".to_string(),
        };
        out.push_str(&format!("  rr        {rr_cpu}\n"));

        let errors = self.errors();
        if errors > 0 {
            out.push_str(&format!("\n{errors} operation(s) FAILED:\n"));
            for r in [&self.download, &self.upload, &self.rr] {
                for e in &r.error_samples {
                    out.push_str(&format!("  {}: {e}\n", r.workload));
                }
            }
        }
        out
    }
}

fn tuning_json(r: &RoleTuning) -> serde_json::Value {
    let t = &r.tuning;
    json!({
        "source": r.source,
        "shards": r.shards,
        "cores": t.cores,
        "initial_stream_window_bytes": t.initial_stream_window_bytes,
        "max_stream_window_bytes": t.max_stream_window_bytes,
        "session_window_bytes": t.session_window_bytes,
        "max_frame_payload_bytes": t.max_frame_payload_bytes,
        "quantum_bytes": t.quantum_bytes,
        "read_buffer_bytes": t.read_buffer_bytes,
        "max_streams_per_session": t.max_streams_per_session,
        "backend": t.backend.as_str(),
        "buffer_count": t.buffer_count,
        "pipe_size_bytes": t.pipe_size_bytes,
        "pipe_pool_size": t.pipe_pool_size,
        "busy_poll_us": t.busy_poll_us,
        "busy_poll_other_cores": t.busy_poll_other_cores.as_str(),
        "busy_poll_sched_idle": t.busy_poll_sched_idle,
        "tls_own_records": t.tls_own_records,
        "loopback_congestion_control": t.loopback_congestion_control,
    })
}

/// `262144 (256 KiB)`.
fn size(n: u32) -> String {
    size_u64(u64::from(n))
}

fn size_u64(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit && n % unit == 0 {
            return format!("{} {name}", n / unit);
        }
    }
    format!("{n} B")
}

/// Reads the tuning sections of `path`. A file with only one of them uses it for both roles;
/// a file with neither gets the defaults. Each section is validated by the real config reader
/// in its own role, so an error names its TOML path.
pub fn load_tuning(path: Option<&Path>) -> anyhow::Result<(RoleTuning, RoleTuning)> {
    let Some(path) = path else {
        return Ok((
            role(Tuning::default(), "defaults"),
            role(Tuning::default(), "defaults"),
        ));
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let section = |role: &str| {
        doc.get(role)
            .and_then(toml::Value::as_table)
            .and_then(|t| t.get("tuning"))
            .cloned()
    };
    let file = path.display();
    let server = section("server")
        .map(|t| validate_tuning("server", t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{file}:\n{e}"))?;
    let client = section("client")
        .map(|t| validate_tuning("client", t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{file}:\n{e}"))?;
    Ok(match (server, client) {
        (Some(s), Some(c)) => (
            role(s, &format!("{file} [server.tuning]")),
            role(c, &format!("{file} [client.tuning]")),
        ),
        (Some(s), None) => (
            role(s.clone(), &format!("{file} [server.tuning]")),
            role(
                s,
                &format!("{file} [server.tuning] (the file has no [client.tuning])"),
            ),
        ),
        (None, Some(c)) => (
            role(
                c.clone(),
                &format!("{file} [client.tuning] (the file has no [server.tuning])"),
            ),
            role(c, &format!("{file} [client.tuning]")),
        ),
        (None, None) => {
            let why = format!("defaults ({file} has no [server.tuning] or [client.tuning])");
            (role(Tuning::default(), &why), role(Tuning::default(), &why))
        }
    })
}

fn role(tuning: Tuning, source: &str) -> RoleTuning {
    RoleTuning {
        source: source.to_string(),
        shards: tuning.shard_count(allowed_cpus()),
        tuning,
    }
}

/// Runs `[<role>.tuning]` through the config reader inside an otherwise valid embedded config.
fn validate_tuning(role: &str, tuning: toml::Value) -> anyhow::Result<Tuning> {
    let base = match role {
        "server" => fill(SERVER_TOML, "tcp", "/nonexistent", "x", None, None, None),
        _ => fill(
            CLIENT_TOML,
            "tcp",
            "/nonexistent",
            "x",
            Some("127.0.0.1:1"),
            None,
            None,
        ),
    };
    let mut doc: toml::Table = base.parse().context("embedded bench config")?;
    if let Some(section) = doc.get_mut(role).and_then(toml::Value::as_table_mut) {
        section.insert("tuning".into(), tuning);
    }
    let cfg = parse_config(&doc.to_string()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tuning = match role {
        "server" => cfg.server.map(|s| s.tuning),
        _ => cfg.client.map(|c| c.tuning),
    };
    tuning.context("embedded bench config lost its role section")
}

/// Fills the `{...}` fields of an embedded config. Fields a template lacks are ignored.
fn fill(
    template: &str,
    transport: &str,
    state_dir: &str,
    token: &str,
    server_addr: Option<&str>,
    pin: Option<&str>,
    backends: Option<(SocketAddr, SocketAddr)>,
) -> String {
    let (sink, echo) = backends.map_or(("127.0.0.1:1".into(), "127.0.0.1:1".into()), |(s, e)| {
        (s.to_string(), e.to_string())
    });
    template
        .replace("{transport}", transport)
        .replace("{state_dir}", &state_dir.replace('\\', "/"))
        .replace("{token}", token)
        .replace("{server_addr}", server_addr.unwrap_or("127.0.0.1:1"))
        .replace("{pin}", pin.unwrap_or(""))
        .replace("{sink_addr}", &sink)
        .replace("{echo_addr}", &echo)
}

/// Runs the whole bench on its own runtime.
pub fn run(options: &BenchOptions) -> anyhow::Result<BenchResult> {
    if options.streams == 0 {
        bail!("--streams must be at least 1");
    }
    if options.bytes == 0 {
        bail!("--bytes must be at least 1");
    }
    if options.rr_connections == 0 {
        bail!("--rr-connections must be at least 1");
    }
    if options.rr_duration.is_zero() {
        bail!("--rr-seconds must be above 0");
    }
    let (mut server_tuning, mut client_tuning) = load_tuning(options.config.as_deref())?;
    if let Some(b) = options.backend {
        server_tuning.tuning.backend = b;
        client_tuning.tuning.backend = b;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warren-bench")
        .build()
        .context("starting the bench runtime")?;
    rt.block_on(run_async(options, server_tuning, client_tuning))
}

async fn run_async(
    options: &BenchOptions,
    server_tuning: RoleTuning,
    client_tuning: RoleTuning,
) -> anyhow::Result<BenchResult> {
    let sink = Backend::bind(BackendKind::Sink, "127.0.0.1:0".parse()?).await?;
    let echo = Backend::bind(BackendKind::Echo, "127.0.0.1:0".parse()?).await?;
    let backends = (sink.local_addr(), echo.local_addr());
    let sink_task = tokio::spawn(sink.run());
    let echo_task = tokio::spawn(echo.run());

    let state_dir = std::env::temp_dir().join(format!("warren-bench-{}", std::process::id()));
    let tunnel = start_tunnel(
        options,
        &server_tuning,
        &client_tuning,
        &state_dir,
        backends,
    )
    .await;
    let result = match tunnel {
        Ok((server, client, sessions)) => {
            let backends = (server.backend(), client.backend());
            let measured = measure(options, &server).await;
            client.shutdown().await;
            server.shutdown().await;
            measured.map(|(download, upload, rr, cpu)| BenchResult {
                options: options.clone(),
                server: server_tuning,
                client: client_tuning,
                server_backend: backends.0,
                client_backend: backends.1,
                sessions,
                download,
                upload,
                rr,
                cpu_download: cpu[0],
                cpu_upload: cpu[1],
                cpu_rr: cpu[2],
            })
        }
        Err(e) => Err(e),
    };
    sink_task.abort();
    echo_task.abort();
    if options.transport == Transport::Tls {
        // Only the self-signed certificate lives there; a leftover is harmless.
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    result
}

/// Starts the server, then the client with the server's address (and certificate pin), and
/// waits for every session to be up on both ends.
async fn start_tunnel(
    options: &BenchOptions,
    server_tuning: &RoleTuning,
    client_tuning: &RoleTuning,
    state_dir: &Path,
    backends: (SocketAddr, SocketAddr),
) -> anyhow::Result<(Server, Client, u32)> {
    let token: String = random_bytes::<16>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let transport = options.transport.as_str();
    let state = state_dir.display().to_string();
    let server_toml = fill(SERVER_TOML, transport, &state, &token, None, None, None);
    let mut server_cfg: ServerConfig = parse_config(&server_toml)
        .map_err(|e| anyhow::anyhow!("embedded server config: {e}"))?
        .server
        .context("embedded server config has no [server]")?;
    server_cfg.tuning = server_tuning.tuning.clone();
    let server = Server::start(server_cfg)
        .await
        .context("starting the bench server")?;

    let pin = server
        .fingerprint
        .map(|f| format!("server_fingerprint = \"{f}\"\nserver_name = \"localhost\""));
    let session_addr = server.session_addr.to_string();
    let client_toml = fill(
        CLIENT_TOML,
        transport,
        &state,
        &token,
        Some(&session_addr),
        pin.as_deref(),
        Some(backends),
    );
    let mut client_cfg: ClientConfig = parse_config(&client_toml)
        .map_err(|e| anyhow::anyhow!("embedded client config: {e}"))?
        .client
        .context("embedded client config has no [client]")?;
    client_cfg.tuning = client_tuning.tuning.clone();
    let client = match Client::start(client_cfg).await {
        Ok(c) => c,
        Err(e) => {
            server.shutdown().await;
            return Err(e.context("starting the bench client"));
        }
    };

    // One session per server shard; the server registers each on its shard just after the
    // client counts it up.
    let sessions = server_tuning.shards.max(1);
    let up = client.wait_connected(sessions, CONNECT_LIMIT).await && {
        let deadline = now() + CONNECT_LIMIT;
        loop {
            let board = server.shards().board();
            let ready = ["bulk", "rr"]
                .iter()
                .all(|s| board.sessions_for(s) as usize >= sessions);
            if ready || now() >= deadline {
                break ready;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if !up {
        client.shutdown().await;
        server.shutdown().await;
        bail!(
            "the bench client did not bring up {sessions} session(s) within {} s",
            CONNECT_LIMIT.as_secs()
        );
    }
    Ok((server, client, u32::try_from(sessions).unwrap_or(u32::MAX)))
}

type Measured = (Report, Report, Report, [CpuUse; 3]);

async fn measure(options: &BenchOptions, server: &Server) -> anyhow::Result<Measured> {
    let bulk_addr = server.service_addrs["bulk"];
    let rr_addr = server.service_addrs["rr"];
    let total = options.bytes.saturating_mul(u64::from(options.streams));
    let bar = options.progress && std::io::stderr().is_terminal();

    let mut cpu = [CpuUse {
        seconds: None,
        bytes: 0,
        ops: 0,
    }; 3];
    let mut reports = Vec::new();
    for (i, (label, direction)) in [("download", Direction::Down), ("upload", Direction::Up)]
        .into_iter()
        .enumerate()
    {
        let params = BulkParams {
            target: bulk_addr.to_string(),
            streams: options.streams,
            bytes: options.bytes,
            direction,
            io_timeout_ms: IO_TIMEOUT_MS,
        };
        let live = Arc::new(Live::default());
        let progress = bar.then(|| spawn_progress(label, live.clone(), Goal::Bytes(total)));
        let cpu0 = process_cpu();
        let report = run_bulk(params, live.clone()).await;
        let cpu1 = process_cpu();
        finish_progress(progress).await;
        let report = report.with_context(|| format!("bulk {label}"))?;
        cpu[i] = CpuUse {
            seconds: cpu_delta(cpu0, cpu1),
            bytes: report.bytes,
            ops: live.ops.load(Ordering::Relaxed),
        };
        reports.push(report);
    }

    let duration_ms = u64::try_from(options.rr_duration.as_millis()).unwrap_or(u64::MAX);
    // A fifth of the measured time, within 100 ms to 1 s: enough to open the connections and
    // let the windows settle, short enough for a quick run.
    let warmup_ms = (duration_ms / 5).clamp(100, 1_000);
    let params = RrParams {
        target: rr_addr.to_string(),
        size: options.rr_size,
        connections: options.rr_connections,
        duration_ms,
        warmup_ms,
        requests: None,
        io_timeout_ms: IO_TIMEOUT_MS,
    };
    let live = Arc::new(Live::default());
    let progress = bar.then(|| {
        spawn_progress(
            "rr",
            live.clone(),
            Goal::Time(Duration::from_millis(warmup_ms + duration_ms)),
        )
    });
    let cpu0 = process_cpu();
    let rr = run_rr(params, live.clone()).await;
    let cpu1 = process_cpu();
    finish_progress(progress).await;
    let rr = rr.context("rr")?;
    // The CPU time covers the warm-up too, so it is divided by every round trip, warm-up
    // included (the report's own counts exclude it).
    let ops = live.ops.load(Ordering::Relaxed);
    cpu[2] = CpuUse {
        seconds: cpu_delta(cpu0, cpu1),
        bytes: ops.saturating_mul(2 * options.rr_size as u64),
        ops,
    };
    let upload = reports.pop().context("upload report")?;
    let download = reports.pop().context("download report")?;
    Ok((download, upload, rr, cpu))
}

/// What a progress bar counts towards.
#[derive(Debug, Clone, Copy)]
enum Goal {
    Bytes(u64),
    Time(Duration),
}

/// Redraws one line on stderr from the workload's [`Live`] counters until aborted.
fn spawn_progress(label: &'static str, live: Arc<Live>, goal: Goal) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = now();
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tick.tick().await;
            let elapsed = start.elapsed().as_secs_f64().max(1e-9);
            let bytes = live.bytes.load(Ordering::Relaxed);
            let ops = live.ops.load(Ordering::Relaxed);
            let (fraction, detail) = match goal {
                Goal::Bytes(total) => (
                    bytes as f64 / total.max(1) as f64,
                    format!(
                        "{:.0}/{:.0} MB  {:.0} MB/s",
                        bytes as f64 / 1e6,
                        total as f64 / 1e6,
                        bytes as f64 / 1e6 / elapsed
                    ),
                ),
                Goal::Time(total) => (
                    elapsed / total.as_secs_f64(),
                    format!("{ops} round trips  {:.0}/s", ops as f64 / elapsed),
                ),
            };
            let fraction = fraction.clamp(0.0, 1.0);
            let filled = (fraction * BAR_WIDTH as f64).round() as usize;
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K{label:<9}[{}{}] {:>3.0}%  {detail}",
                "#".repeat(filled),
                "-".repeat(BAR_WIDTH - filled),
                fraction * 100.0
            );
            let _ = err.flush();
        }
    })
}

/// Stops the bar and clears its line.
async fn finish_progress(progress: Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = progress {
        task.abort();
        let _ = task.await;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

/// User + system CPU time of this process, all threads, from `/proc/self/stat`. `None` where
/// that file does not exist (not Linux). Resolution is one clock tick (10 ms).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat_cpu(&stat)
}

/// `utime` and `stime` are fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks. The ticks
/// are `USER_HZ`, which is 100 on every mainstream Linux architecture; reading the exact value
/// needs `sysconf`, an unsafe call this crate does not make.
fn parse_stat_cpu(stat: &str) -> Option<Duration> {
    const TICKS_PER_SECOND: u64 = 100;
    // Field 2, the command name, is in parentheses and may contain spaces or ')'; the fields
    // after the last ')' start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    Some(Duration::from_millis(
        ticks.checked_mul(1_000 / TICKS_PER_SECOND)?,
    ))
}

fn cpu_delta(before: Option<Duration>, after: Option<Duration>) -> Option<f64> {
    Some(after?.saturating_sub(before?).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_reads_utime_and_stime_after_the_command_name() {
        let stat = "4242 (warren (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(parse_stat_cpu(stat), Some(Duration::from_secs(3)));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn a_file_with_one_tuning_section_uses_it_for_both_roles() {
        let dir = std::env::temp_dir().join(format!("warren-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tuning.toml");
        std::fs::write(
            &path,
            "[client.tuning]\nshards = 3\nread_buffer_bytes = 131072\n",
        )
        .unwrap();
        let (s, c) = load_tuning(Some(&path)).unwrap();
        assert_eq!(s.tuning, c.tuning);
        assert_eq!((s.shards, c.tuning.read_buffer_bytes), (3, 131_072));
        assert!(s.source.contains("no [server.tuning]"), "{}", s.source);

        std::fs::write(&path, "[server.tuning]\nread_buffer_bytes = 10\n").unwrap();
        let err = format!("{:#}", load_tuning(Some(&path)).unwrap_err());
        assert!(err.contains("server.tuning.read_buffer_bytes"), "{err}");

        std::fs::write(&path, "[server]\nbind_addr = \"0.0.0.0:7000\"\n").unwrap();
        let (s, c) = load_tuning(Some(&path)).unwrap();
        assert_eq!(
            (s.tuning.clone(), c.tuning.clone()),
            (Tuning::default(), Tuning::default())
        );
        assert!(s.source.starts_with("defaults"), "{}", s.source);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_print_in_the_largest_exact_binary_unit() {
        assert_eq!(size(256 * 1024), "256 KiB");
        assert_eq!(size_u64(1 << 30), "1 GiB");
        assert_eq!(size(1000), "1000 B");
    }
}
