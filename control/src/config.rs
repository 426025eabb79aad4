//! Typed TOML configuration for `warren server` and `warren client`.
//!
//! Parsing happens in two steps. `toml` first turns the text into a table, so syntax errors
//! carry a line and column. A hand-written reader then walks that table and builds typed values.
//! We do not derive `Deserialize` with `deny_unknown_fields`, because serde stops at the first
//! mistake. The reader keeps going, so one run reports every mistake in the file, each named by
//! its dotted TOML path (`server.services.ssh.bind_addr: ...`).
//!
//! Every value is checked here: addresses, names, number ranges, and rules that involve more
//! than one key (`idle_timeout_ms > keepalive_interval_ms`, TLS-only keys with
//! `transport = "tcp"`, duplicate listen addresses). The rest of the program never re-validates.
//! Numbers carry their unit in the key name (`_ms`, `_bytes`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha256};
use toml::{Table, Value};
pub use warren_dataplane::KeepAwake;

pub use crate::backend::Backend;

const KIB: u32 = 1024;
const MIB: u32 = 1024 * KIB;
const GIB: u32 = 1024 * MIB;

/// Accepted range for timeouts and intervals: 1 ms to one hour. Anything longer is almost
/// certainly a unit mistake (seconds typed as milliseconds the wrong way round).
const TIMEOUT_MS: RangeInclusive<u64> = 1..=3_600_000;
/// Same as [`TIMEOUT_MS`] but 0 is allowed: a drain timeout of 0 means "close at once".
const DRAIN_MS: RangeInclusive<u64> = 0..=3_600_000;
/// Upper bound on shard and session counts. This is a sanity limit, far above real core counts.
const MAX_SHARDS: u64 = 1024;
/// CPU ids must fit a glibc `cpu_set_t` (CPU_SETSIZE = 1024), which is what `sched_setaffinity` takes.
const MAX_CPU_ID: u64 = 1023;

/// Example values used in error messages, so each message shows the expected shape.
const EXAMPLE_BIND: &str = "0.0.0.0:7000";
const EXAMPLE_SERVICE_BIND: &str = "0.0.0.0:2222";

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// One parsed config file. It may hold a server section, a client section, or both (a single
/// file can describe both ends of a loopback test). At least one of them is present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// `[server]`: run as the public relay.
    pub server: Option<ServerConfig>,
    /// `[client]`: run as the agent behind NAT.
    pub client: Option<ClientConfig>,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted TOML path of the offending key, e.g. `server.services.ssh.bind_addr`. It is empty
    /// for problems with the whole file (I/O, syntax, no section at all).
    pub path: String,
    /// What is wrong and, where possible, what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config file, in the order found. The list is never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    /// One error per line, so an operator can fix them all in one edit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// How a session is carried between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// TLS 1.3/1.2 over TCP (rustls). This is the default: the tunnel crosses the internet.
    #[default]
    Tls,
    /// Plain TCP. You must opt in explicitly. Use it for loopback, trusted links and benchmarks
    /// against peers that do not encrypt.
    Tcp,
}

impl Transport {
    /// The spelling used in TOML (`"tls"` / `"tcp"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A shared secret (auth token). `Debug` and `Display` print `***`, so a config can be logged
/// or dumped with `{:?}` without leaking the secret.
///
/// `PartialEq` exists so that reload can diff two configs. It is not constant-time. The auth
/// handshake compares HMACs, never tokens, so this comparison never touches network input.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call this only where the value is needed (HMAC keys), never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// SHA-256 of a certificate in DER form. The client pins the server's leaf certificate with it.
///
/// It parses from `sha256:AB:CD:...`, `ab:cd:...` or `abcd...` (the prefix is optional, `:`
/// separators are optional, any case). It displays as `sha256:AB:CD:...`, which is also what
/// the server logs for its self-signed certificate, so users can copy and paste it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    /// A fingerprint is public, so `Debug` shows it in the same form as `Display`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a [`Fingerprint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{reason}; a SHA-256 fingerprint is 64 hex digits, optionally prefixed by \"sha256:\" and \
     separated by ':'"
)]
pub struct ParseFingerprintError {
    /// The specific defect, e.g. "found 62 hex digits".
    pub reason: String,
}

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| ParseFingerprintError { reason };
        let s = s.trim();
        // `get` rather than slicing: the input may contain multi-byte characters.
        let digits = match s.get(..7) {
            Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &s[7..],
            _ => s,
        };
        let hex: String = if digits.contains(':') {
            // With separators, accept only the canonical shape: 32 groups of 2 digits. Other
            // shapes usually mean a line was cut short while copying.
            let groups: Vec<&str> = digits.split(':').collect();
            if groups.len() != 32 || groups.iter().any(|g| g.len() != 2) {
                return Err(fail(format!(
                    "found {} ':'-separated groups, expected 32 groups of 2 hex digits",
                    groups.len()
                )));
            }
            groups.concat()
        } else {
            digits.to_owned()
        };
        if let Some(bad) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(fail(format!("{bad:?} is not a hex digit")));
        }
        if hex.len() != 64 {
            return Err(fail(format!("found {} hex digits", hex.len())));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            // Every character was checked to be an ASCII hex digit above, so this cannot fail.
            *byte =
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| fail(e.to_string()))?;
        }
        Ok(Fingerprint(bytes))
    }
}

/// `[server]`: the public relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `bind_addr`: where clients connect (the tunnel port).
    pub bind_addr: SocketAddr,
    /// `transport`: TLS (default) or plain TCP for sessions.
    pub transport: Transport,
    /// `tls_cert_file`: PEM certificate chain, leaf first. Always set together with
    /// `tls_key_file`. When both are absent and `transport = "tls"`, the server generates a
    /// self-signed certificate in `state_dir` and clients pin its fingerprint.
    pub tls_cert_file: Option<PathBuf>,
    /// `tls_key_file`: PEM private key matching `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// `state_dir`: where generated state (the self-signed certificate) lives. The default is
    /// `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`), else `./warren-state`.
    pub state_dir: PathBuf,
    /// `[server.clients.<name>]`: the identities allowed to connect. There is at least one.
    pub clients: BTreeMap<String, ServerClient>,
    /// `[server.services.<name>]`: public ports. Each is served by whichever client offers a
    /// service of the same name.
    pub services: BTreeMap<String, ServerService>,
    /// `handshake_timeout_ms`: how long a new connection has to finish TLS and auth.
    pub handshake_timeout_ms: u64,
    /// `keepalive_interval_ms`: a PING is sent after this much silence.
    pub keepalive_interval_ms: u64,
    /// `idle_timeout_ms`: a session with no traffic for this long is dead. Always greater than
    /// `keepalive_interval_ms`, so a live peer always has a chance to answer a PING first.
    pub idle_timeout_ms: u64,
    /// `drain_timeout_ms`: on shutdown or reload, how long open streams may finish.
    pub drain_timeout_ms: u64,
    /// `[server.tuning]`: data-plane limits and sizes.
    pub tuning: Tuning,
}

/// `[server.clients.<name>]`: one client identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerClient {
    /// `token`: shared secret. It is the HMAC key of the challenge-response and never travels
    /// on the wire. Never empty.
    pub token: Secret,
}

/// `[server.services.<name>]`: one public TCP port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerService {
    /// `bind_addr`: the public listen address. No other service (and not the tunnel port)
    /// uses it.
    pub bind_addr: SocketAddr,
    /// `clients`: which clients may serve this service. `None` means any client. Every name
    /// is listed in `[server.clients]`. The list is never empty.
    pub allowed_clients: Option<Vec<String>>,
}

/// `[client]`: the agent behind NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `server_addr`: `host:port` of the server. The syntax is checked here. The name is
    /// resolved at connect time, so DNS changes are picked up on reconnect.
    pub server_addr: String,
    /// `name`: this client's identity, as listed in the server's `[server.clients]`.
    /// 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
    pub name: String,
    /// `token`: shared secret, the same as the server's entry for `name`.
    pub token: Secret,
    /// `transport`: TLS (default) or plain TCP. It must match the server.
    pub transport: Transport,
    /// `server_fingerprint`: pin the server's leaf certificate. Names and expiry are not
    /// checked, which is what a self-signed server certificate needs. It cannot be combined
    /// with `ca_file`.
    pub server_fingerprint: Option<Fingerprint>,
    /// `ca_file`: PEM file of trust roots. Without it (and without a pin) the Mozilla roots
    /// from `webpki-roots` are used.
    pub ca_file: Option<PathBuf>,
    /// `server_name`: name to verify in the certificate and send as SNI. `None` means the
    /// host part of `server_addr` (see [`ClientConfig::tls_server_name`]).
    pub server_name: Option<String>,
    /// `sessions`: how many tunnel connections to open. `None` means as many as the server
    /// has shards (it says so at handshake).
    pub sessions: Option<u16>,
    /// `[client.services.<name>]`: local targets offered to the server. There is at least one.
    pub services: BTreeMap<String, ClientService>,
    /// `connect_timeout_ms`: TCP connect plus handshake budget when dialing the server.
    pub connect_timeout_ms: u64,
    /// `reconnect_min_ms`: first backoff delay after a failed or lost session.
    pub reconnect_min_ms: u64,
    /// `reconnect_max_ms`: the backoff doubles up to this cap. At least `reconnect_min_ms`.
    pub reconnect_max_ms: u64,
    /// `keepalive_interval_ms`: a PING is sent after this much silence.
    pub keepalive_interval_ms: u64,
    /// `idle_timeout_ms`: a session with no traffic for this long is dead. Always greater
    /// than `keepalive_interval_ms`.
    pub idle_timeout_ms: u64,
    /// `drain_timeout_ms`: on shutdown, how long open streams may finish.
    pub drain_timeout_ms: u64,
    /// `[client.tuning]`: data-plane limits and sizes.
    pub tuning: Tuning,
}

impl ClientConfig {
    /// The host part of `server_addr`, without brackets for IPv6 literals.
    pub fn server_host(&self) -> &str {
        // `server_addr` was validated at parse time; the fallback only matters for hand-built
        // configs, where the whole string is the best guess.
        split_host_port(&self.server_addr)
            .map(|(host, _)| host)
            .unwrap_or(&self.server_addr)
    }

    /// The name TLS verifies and sends as SNI: `server_name`, or else the host part of
    /// `server_addr`.
    pub fn tls_server_name(&self) -> &str {
        self.server_name
            .as_deref()
            .unwrap_or_else(|| self.server_host())
    }
}

/// `[client.services.<name>]`: one local target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientService {
    /// `local_addr`: `host:port` of the local service. It is resolved when a visitor arrives.
    pub local_addr: String,
    /// `connect_timeout_ms`: budget for connecting to `local_addr`. When it runs out, the
    /// visitor's stream is reset with a "service unreachable" code.
    pub connect_timeout_ms: u64,
}

/// `[server.tuning]` / `[client.tuning]`: data-plane sizes and limits. Both roles use the same
/// keys, because both ends of a session run the same state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// `shards`: number of shard threads. `None` (key absent or `0`) means one per CPU in the
    /// process's affinity mask. When `cores` is set, this equals `cores.len()`.
    pub shards: Option<usize>,
    /// `cores`: CPU ids to pin shards to, one shard per entry. `None` (absent or `[]`) means
    /// the shards are pinned to the allowed CPUs in order.
    pub cores: Option<Vec<usize>>,
    /// `initial_stream_window_bytes`: receive credit granted to a new stream (1 KiB to 16 MiB).
    /// Default 1 MiB, the splice pipe's default capacity: a stream's sender is granted credit
    /// again after half a window, so the window sets how much moves per wake-up of each end.
    pub initial_stream_window_bytes: u32,
    /// `max_stream_window_bytes`: cap for the RTT-based window auto-tuning (at least the
    /// initial window, at most 256 MiB).
    pub max_stream_window_bytes: u32,
    /// `session_window_bytes`: total receive credit over all streams of one session, which
    /// bounds per-session memory (at least the initial stream window, at most 1 GiB).
    pub session_window_bytes: u32,
    /// `max_frame_payload_bytes`: largest DATA payload in one frame (1 KiB to 1 MiB).
    pub max_frame_payload_bytes: u32,
    /// `quantum_bytes`: bytes a stream may send per round-robin turn before the next stream
    /// gets to send (1 KiB to 16 MiB).
    pub quantum_bytes: u32,
    /// `read_buffer_bytes`: bytes read from a visitor or service socket per read, and half of
    /// what one stream may queue for sending (4 KiB to 4 MiB). With io_uring it is also the
    /// size of each provided receive buffer.
    pub read_buffer_bytes: u32,
    /// `max_streams_per_session`: concurrent streams per session. Extra OPENs are refused
    /// (1 to 1,000,000).
    pub max_streams_per_session: u32,
    /// `backend`: which data plane runs (`auto` probes io_uring and falls back to compat).
    pub backend: Backend,
    /// `buffer_count`: provided receive buffers per shard, io_uring only (64 to 32768; the data
    /// plane rounds it up to a power of two). Each is `read_buffer_bytes` long.
    pub buffer_count: u32,
    /// `pipe_size_bytes`: capacity asked of each splice pipe, io_uring only (4 KiB to 16 MiB;
    /// the kernel caps it at `fs.pipe-max-size`).
    pub pipe_size_bytes: u32,
    /// `pipe_pool_size`: pipes per shard for splicing plain-TCP payloads, io_uring only
    /// (0 turns splice off, at most 65536).
    pub pipe_pool_size: u32,
    /// `busy_poll_us`: how long a shard keeps polling its ring after the last completion
    /// before it sleeps, io_uring only (0 sleeps at once, at most 10,000). Saves a thread
    /// wake-up per hop on request/response traffic at the price of that much CPU after each
    /// burst; the poll yields the core to any other runnable thread.
    pub busy_poll_us: u32,
    /// `busy_poll_other_cores`: while one shard busy-polls for its own traffic, a `SCHED_IDLE`
    /// thread spins on each other shard's core, io_uring only. Keeps every core of the process
    /// awake between the hops of a request; it yields to any other thread. `true`, `false`,
    /// `"occupy"` (no busy polls; while a shard's traffic is light, nice-19 threads occupy the
    /// other shards' cores so that what a shard wakes runs on its core), or `"auto"` (default):
    /// a start-up probe picks `true` where a spinning core wakes faster than an idle one,
    /// `"occupy"` where a wake-up on one core costs at most half one across cores, else
    /// `false`.
    pub busy_poll_other_cores: KeepAwake,
    /// `busy_poll_sched_idle`: a shard busy-polls as `SCHED_IDLE`, io_uring only (default
    /// true). Its core then counts as idle, so the threads its sends wake (the visitor's
    /// program, the service) are placed on it instead of being woken on another core. It goes
    /// back to `SCHED_OTHER` before it sleeps, under load, and for a while after it finds the
    /// core taken by other work. Needs `CAP_SYS_NICE` or `RLIMIT_NICE` >= 20 (systemd
    /// `LimitNICE=+0`); without, polls stay `SCHED_OTHER` with one log line.
    pub busy_poll_sched_idle: bool,
    /// `tls_own_records`: once a TLS 1.3 session's handshake is over, warren seals and opens
    /// its records itself (`compat/src/records.rs`: the same wire format, fewer copies) instead
    /// of rustls (default true). Each end decides for itself; `false` keeps rustls for the
    /// whole session.
    pub tls_own_records: bool,
    /// `loopback_congestion_control`: TCP congestion control for the sockets warren owns whose
    /// peer is a loopback address (a service on this host, a session or visitor from it); every
    /// other socket keeps the system default (default `"cubic"`, which does not pace; `""`
    /// keeps the system default everywhere). See `warren_compat::congestion` for why.
    pub loopback_congestion_control: String,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            shards: None,
            cores: None,
            initial_stream_window_bytes: MIB,
            max_stream_window_bytes: 16 * MIB,
            session_window_bytes: 64 * MIB,
            max_frame_payload_bytes: MIB,
            quantum_bytes: 64 * KIB,
            read_buffer_bytes: 64 * KIB,
            max_streams_per_session: 16_384,
            backend: Backend::Auto,
            buffer_count: 512,
            pipe_size_bytes: MIB,
            pipe_pool_size: 256,
            busy_poll_us: 50,
            busy_poll_other_cores: KeepAwake::Auto,
            busy_poll_sched_idle: true,
            tls_own_records: true,
            loopback_congestion_control: "cubic".to_string(),
        }
    }
}

impl Tuning {
    /// Number of shards to run, given how many CPUs the process may use.
    pub fn shard_count(&self, allowed_cpus: usize) -> usize {
        match (&self.cores, self.shards) {
            (Some(cores), _) => cores.len(),
            (None, Some(shards)) => shards,
            (None, None) => allowed_cpus.max(1),
        }
    }
}

/// Every key the reader understands, as a dotted path with `*` for a map entry name
/// (`server.services.*.bind_addr`). Tables such as `server.tuning` are implied by their keys.
/// Tests use this list to check that the example files document every key.
pub fn known_keys() -> &'static [&'static str] {
    &[
        "server.bind_addr",
        "server.transport",
        "server.tls_cert_file",
        "server.tls_key_file",
        "server.state_dir",
        "server.handshake_timeout_ms",
        "server.keepalive_interval_ms",
        "server.idle_timeout_ms",
        "server.drain_timeout_ms",
        "server.clients.*.token",
        "server.services.*.bind_addr",
        "server.services.*.clients",
        "server.tuning.shards",
        "server.tuning.cores",
        "server.tuning.initial_stream_window_bytes",
        "server.tuning.max_stream_window_bytes",
        "server.tuning.session_window_bytes",
        "server.tuning.max_frame_payload_bytes",
        "server.tuning.quantum_bytes",
        "server.tuning.read_buffer_bytes",
        "server.tuning.max_streams_per_session",
        "server.tuning.backend",
        "server.tuning.buffer_count",
        "server.tuning.pipe_size_bytes",
        "server.tuning.pipe_pool_size",
        "server.tuning.busy_poll_us",
        "server.tuning.busy_poll_other_cores",
        "server.tuning.busy_poll_sched_idle",
        "server.tuning.tls_own_records",
        "server.tuning.loopback_congestion_control",
        "client.server_addr",
        "client.name",
        "client.token",
        "client.transport",
        "client.server_fingerprint",
        "client.ca_file",
        "client.server_name",
        "client.sessions",
        "client.connect_timeout_ms",
        "client.reconnect_min_ms",
        "client.reconnect_max_ms",
        "client.keepalive_interval_ms",
        "client.idle_timeout_ms",
        "client.drain_timeout_ms",
        "client.services.*.local_addr",
        "client.services.*.connect_timeout_ms",
        "client.tuning.shards",
        "client.tuning.cores",
        "client.tuning.initial_stream_window_bytes",
        "client.tuning.max_stream_window_bytes",
        "client.tuning.session_window_bytes",
        "client.tuning.max_frame_payload_bytes",
        "client.tuning.quantum_bytes",
        "client.tuning.read_buffer_bytes",
        "client.tuning.max_streams_per_session",
        "client.tuning.backend",
        "client.tuning.buffer_count",
        "client.tuning.pipe_size_bytes",
        "client.tuning.pipe_pool_size",
        "client.tuning.busy_poll_us",
        "client.tuning.busy_poll_other_cores",
        "client.tuning.busy_poll_sched_idle",
        "client.tuning.tls_own_records",
        "client.tuning.loopback_congestion_control",
    ]
}

/// Parses a config file's text. On failure, returns every problem found, not just the first.
pub fn parse_config(text: &str) -> Result<ConfigFile, ConfigErrors> {
    let mut errors = Errors::default();
    let parsed = parse_into(text, &mut errors);
    match parsed {
        Some(file) if errors.list.is_empty() => Ok(file),
        _ => Err(ConfigErrors(errors.list)),
    }
}

/// Reads and parses a config file. A read failure is reported like any other config error
/// (empty path, message naming the file), so callers handle a single error type.
pub fn load_config(path: &Path) -> Result<ConfigFile, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("reading {}: {e}", path.display()),
        }])
    })?;
    parse_config(&text)
}

// ---------------------------------------------------------------------------------------------
// The reader
// ---------------------------------------------------------------------------------------------

/// Marks a key that was present but invalid. Its error is already recorded. Checks that
/// involve several keys skip such keys, so one mistake yields one error.
#[derive(Debug, Clone, Copy)]
struct Invalid;

/// `Ok(None)`: key absent. `Ok(Some(v))`: valid. `Err(Invalid)`: present but wrong (reported).
type Field<T> = Result<Option<T>, Invalid>;

/// State shared by all readers while parsing one file.
#[derive(Debug, Default)]
struct Errors {
    list: Vec<ConfigError>,
    /// Schema paths (`server.services.*.bind_addr`) of every leaf key the reader looked up.
    /// A test checks that this equals [`known_keys`].
    leaves_read: BTreeSet<String>,
}

/// Reads one TOML table. Each lookup records the key as known, so [`TableReader::finish`] can
/// report everything else as unknown (the `deny_unknown_fields` rule, with a suggestion).
struct TableReader<'t, 'e> {
    /// Dotted path of this table for error messages (`server.services.ssh`).
    path: String,
    /// The same path with map entry names replaced by `*` (`server.services.*`).
    schema: String,
    table: &'t Table,
    known: Vec<&'static str>,
    errors: &'e mut Errors,
}

impl<'t, 'e> TableReader<'t, 'e> {
    fn new(path: String, schema: String, table: &'t Table, errors: &'e mut Errors) -> Self {
        TableReader {
            path,
            schema,
            table,
            known: Vec::new(),
            errors,
        }
    }

    /// A reader for the sub-table `key`.
    fn section<'c>(&'c mut self, key: &str, table: &'c Table) -> TableReader<'c, 'c> {
        TableReader::new(
            join_path(&self.path, key),
            join_schema(&self.schema, key),
            table,
            self.errors,
        )
    }

    /// A reader for the entry `name` of the map table `map_key`.
    fn entry<'c>(&'c mut self, map_key: &str, name: &str, table: &'c Table) -> TableReader<'c, 'c> {
        TableReader::new(
            join_path(&join_path(&self.path, map_key), name),
            join_schema(&join_schema(&self.schema, map_key), "*"),
            table,
            self.errors,
        )
    }

    fn key_path(&self, key: &str) -> String {
        join_path(&self.path, key)
    }

    fn error_at(&mut self, path: String, message: impl Into<String>) {
        self.errors.list.push(ConfigError {
            path,
            message: message.into(),
        });
    }

    fn error(&mut self, key: &str, message: impl Into<String>) {
        let path = self.key_path(key);
        self.error_at(path, message);
    }

    /// Looks up `key` and records it as known. `leaf` keys are also recorded for [`known_keys`].
    fn lookup(&mut self, key: &'static str, leaf: bool) -> Option<&'t Value> {
        self.known.push(key);
        if leaf {
            let schema = join_schema(&self.schema, key);
            self.errors.leaves_read.insert(schema);
        }
        self.table.get(key)
    }

    fn wrong_type(&mut self, path: String, expected: &str, found: &Value) -> Invalid {
        self.error_at(
            path,
            format!("expected {expected}, found {}", type_name(found)),
        );
        Invalid
    }

    fn missing(&mut self, key: &str) {
        self.error(key, "missing required key");
    }

    fn optional_bool(&mut self, key: &'static str) -> Field<bool> {
        match self.lookup(key, true) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(self.key_path(key), "a boolean", other)),
        }
    }

    /// `true`, `false`, `"auto"` or `"occupy"`.
    fn optional_keep_awake(&mut self, key: &'static str) -> Field<KeepAwake> {
        const CHOICES: &str = "true, false, \"auto\" or \"occupy\"";
        match self.lookup(key, true) {
            None => Ok(None),
            Some(Value::Boolean(true)) => Ok(Some(KeepAwake::On)),
            Some(Value::Boolean(false)) => Ok(Some(KeepAwake::Off)),
            Some(Value::String(s)) if s == "auto" => Ok(Some(KeepAwake::Auto)),
            Some(Value::String(s)) if s == "occupy" => Ok(Some(KeepAwake::Occupy)),
            Some(Value::String(s)) => {
                self.error(key, format!("{s:?} is not a choice (expected {CHOICES})"));
                Err(Invalid)
            }
            Some(other) => Err(self.wrong_type(self.key_path(key), CHOICES, other)),
        }
    }

    fn optional_str(&mut self, key: &'static str) -> Field<&'t str> {
        match self.lookup(key, true) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.wrong_type(self.key_path(key), "a string", other)),
        }
    }

    /// An optional string turned into `T` by `parse`. The parse error message is reported
    /// at the key's path.
    fn optional_parsed<T>(
        &mut self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Field<T> {
        match self.optional_str(key)? {
            None => Ok(None),
            Some(s) => match parse(s) {
                Ok(value) => Ok(Some(value)),
                Err(message) => {
                    self.error(key, message);
                    Err(Invalid)
                }
            },
        }
    }

    fn required_parsed<T>(
        &mut self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match self.optional_parsed(key, parse) {
            Ok(Some(value)) => Some(value),
            Ok(None) => {
                self.missing(key);
                None
            }
            Err(Invalid) => None,
        }
    }

    /// An optional non-negative integer within `range`.
    fn optional_u64_in(&mut self, key: &'static str, range: RangeInclusive<u64>) -> Field<u64> {
        match self.lookup(key, true) {
            None => Ok(None),
            Some(Value::Integer(i)) => {
                let path = self.key_path(key);
                self.integer_in(path, *i, &range).map(Some)
            }
            Some(other) => Err(self.wrong_type(self.key_path(key), "an integer", other)),
        }
    }

    fn integer_in(
        &mut self,
        path: String,
        i: i64,
        range: &RangeInclusive<u64>,
    ) -> Result<u64, Invalid> {
        match u64::try_from(i) {
            Ok(u) if range.contains(&u) => Ok(u),
            _ => {
                self.error_at(
                    path,
                    format!("{i} is out of range (expected {})", describe_range(range)),
                );
                Err(Invalid)
            }
        }
    }

    /// An integer key with a default. `None` means invalid (already reported).
    fn u64_or(
        &mut self,
        key: &'static str,
        default: u64,
        range: RangeInclusive<u64>,
    ) -> Option<u64> {
        debug_assert!(
            range.contains(&default),
            "default of {key} outside its range"
        );
        self.optional_u64_in(key, range)
            .ok()
            .map(|v| v.unwrap_or(default))
    }

    /// A byte size or count that fits `u32`, with a default.
    fn u32_or(
        &mut self,
        key: &'static str,
        default: u32,
        range: RangeInclusive<u32>,
    ) -> Option<u32> {
        let wide = u64::from(*range.start())..=u64::from(*range.end());
        self.u64_or(key, u64::from(default), wide)
            // The range is within u32, so the conversion cannot fail.
            .and_then(|v| u32::try_from(v).ok())
    }

    fn optional_array(&mut self, key: &'static str) -> Field<&'t [Value]> {
        match self.lookup(key, true) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items.as_slice())),
            Some(other) => Err(self.wrong_type(self.key_path(key), "an array", other)),
        }
    }

    /// An optional array of strings. Each bad element is reported at `key[i]`.
    fn optional_str_array(&mut self, key: &'static str) -> Field<Vec<&'t str>> {
        let Some(items) = self.optional_array(key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) => out.push(s.as_str()),
                other => {
                    let path = format!("{}[{i}]", self.key_path(key));
                    self.wrong_type(path, "a string", other);
                    ok = false;
                }
            }
        }
        if ok {
            Ok(Some(out))
        } else {
            Err(Invalid)
        }
    }

    /// An optional array of integers within `range`. Each bad element is reported at `key[i]`.
    fn optional_u64_array_in(
        &mut self,
        key: &'static str,
        range: RangeInclusive<u64>,
    ) -> Field<Vec<u64>> {
        let Some(items) = self.optional_array(key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("{}[{i}]", self.key_path(key));
            let value = match item {
                Value::Integer(n) => self.integer_in(path, *n, &range),
                other => Err(self.wrong_type(path, "an integer", other)),
            };
            match value {
                Ok(v) => out.push(v),
                Err(Invalid) => ok = false,
            }
        }
        if ok {
            Ok(Some(out))
        } else {
            Err(Invalid)
        }
    }

    /// An optional sub-table (`[server.tuning]`).
    fn optional_table(&mut self, key: &'static str) -> Field<&'t Table> {
        match self.lookup(key, false) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(t)),
            Some(other) => Err(self.wrong_type(self.key_path(key), "a table", other)),
        }
    }

    /// An optional map of named tables (`[server.services.<name>]`). It returns the entries
    /// whose name is valid and whose value is a table. Bad entries are reported and skipped.
    fn optional_map(&mut self, key: &'static str) -> Field<Vec<(&'t str, &'t Table)>> {
        let Some(map) = self.optional_table(key)? else {
            return Ok(None);
        };
        let map_path = self.key_path(key);
        let mut entries = Vec::with_capacity(map.len());
        for (name, value) in map {
            let path = join_path(&map_path, name);
            if let Err(message) = check_name(name) {
                self.error_at(path, message);
                continue;
            }
            match value {
                Value::Table(t) => entries.push((name.as_str(), t)),
                other => {
                    self.wrong_type(path, "a table", other);
                }
            }
        }
        Ok(Some(entries))
    }

    /// Reports every key of the table that no lookup asked for.
    fn finish(self) {
        for key in self.table.keys() {
            if self.known.contains(&key.as_str()) {
                continue;
            }
            let message = match suggest(key, &self.known) {
                Some(best) => format!("unknown key (did you mean {best:?}?)"),
                None => format!("unknown key (expected one of: {})", self.known.join(", ")),
            };
            let path = join_path(&self.path, key);
            self.errors.list.push(ConfigError { path, message });
        }
    }
}

/// Appends `key` to a dotted path. It quotes the key the way TOML would when it is not a
/// bare key (entry names may contain '.').
fn join_path(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

fn join_schema(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn describe_range(range: &RangeInclusive<u64>) -> String {
    let (lo, hi) = (*range.start(), *range.end());
    if hi == u64::MAX {
        format!("at least {lo}")
    } else {
        format!("{lo} to {hi}")
    }
}

/// The known key closest to `key` by edit distance, if close enough to be a likely typo.
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let threshold = (key.chars().count() / 3).max(2);
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= threshold)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, counted in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Value parsers: each returns the complete error message (without the path)
// ---------------------------------------------------------------------------------------------

/// Client, service and client-identity names end up in logs, metrics labels and the
/// handshake, so they use a conservative alphabet and a fixed length limit.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1 to 64 characters of A-Z a-z 0-9 _ . -)"
        ))
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    check_name(s).map(|()| s.to_owned())
}

fn parse_socket_addr(s: &str, example: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not a socket address (expected host:port, e.g. {example})"))
}

/// Splits `host:port` (or `[v6]:port`) without resolving anything.
fn split_host_port(s: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("missing ']' after the IPv6 address")?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| "the part in brackets is not an IPv6 address")?;
        let port = after.strip_prefix(':').ok_or("missing :port")?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("missing :port")?;
        if host.contains(':') {
            return Err("an IPv6 address needs brackets, e.g. [::1]:7000");
        }
        if host.is_empty() {
            return Err("missing host");
        }
        let host_ok = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !host_ok {
            return Err("the host may only contain letters, digits, '-', '.' and '_'");
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host, p)),
        _ => Err("the port must be a number from 1 to 65535"),
    }
}

fn parse_host_port(s: &str, example: &str) -> Result<String, String> {
    split_host_port(s)
        .map(|_| s.to_owned())
        .map_err(|why| format!("{s:?} is not host:port ({why}; e.g. {example})"))
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    match s {
        "tls" => Ok(Transport::Tls),
        "tcp" => Ok(Transport::Tcp),
        _ => Err(format!(
            "{s:?} is not a transport (expected \"tls\" or \"tcp\")"
        )),
    }
}

fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        Err("must not be empty (omit the key instead)".to_owned())
    } else {
        Ok(PathBuf::from(s))
    }
}

fn parse_token(s: &str) -> Result<Secret, String> {
    if s.is_empty() {
        Err("must not be empty".to_owned())
    } else {
        Ok(Secret::new(s))
    }
}

fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    s.parse::<Fingerprint>()
        .map_err(|e| format!("{s:?} is not a fingerprint: {e}"))
}

fn parse_server_name(s: &str) -> Result<String, String> {
    rustls::pki_types::ServerName::try_from(s)
        .map(|_| s.to_owned())
        .map_err(|_| format!("{s:?} is not a valid TLS server name (a DNS name or an IP address)"))
}

/// The default state directory: systemd's `$STATE_DIRECTORY` (the first entry, since the
/// variable is ':'-separated when a unit lists several), else `./warren-state`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            let first = v
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .unwrap_or_else(|| PathBuf::from("./warren-state"))
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

fn parse_into(text: &str, errors: &mut Errors) -> Option<ConfigFile> {
    let table = match toml::from_str::<Table>(text) {
        Ok(table) => table,
        Err(e) => {
            errors.list.push(syntax_error(text, &e));
            return None;
        }
    };
    let mut root = TableReader::new(String::new(), String::new(), &table, errors);
    let server_table = root.optional_table("server");
    let client_table = root.optional_table("client");
    if let (Ok(None), Ok(None)) = (server_table, client_table) {
        root.error_at(
            String::new(),
            "expected a [server] or [client] table (or both)",
        );
    }
    let server = match server_table {
        Ok(Some(t)) => read_server(root.section("server", t)).map(Some),
        Ok(None) => Some(None),
        Err(Invalid) => None,
    };
    let client = match client_table {
        Ok(Some(t)) => read_client(root.section("client", t)).map(Some),
        Ok(None) => Some(None),
        Err(Invalid) => None,
    };
    root.finish();
    Some(ConfigFile {
        server: server?,
        client: client?,
    })
}

/// A one-line syntax error with line and column (toml's own Display spans several lines).
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', "; ");
    let message = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    };
    ConfigError {
        path: String::new(),
        message,
    }
}

/// Reads the keys shared by both roles' timing rules and checks idle > keepalive.
fn read_keepalive(r: &mut TableReader<'_, '_>) -> (Option<u64>, Option<u64>, Option<u64>) {
    let keepalive = r.u64_or("keepalive_interval_ms", 10_000, TIMEOUT_MS);
    let idle = r.u64_or("idle_timeout_ms", 30_000, TIMEOUT_MS);
    let drain = r.u64_or("drain_timeout_ms", 30_000, DRAIN_MS);
    if let (Some(k), Some(i)) = (keepalive, idle) {
        if i <= k {
            r.error(
                "idle_timeout_ms",
                format!(
                    "{i} must be greater than keepalive_interval_ms ({k}), or a healthy but \
                     quiet session is declared dead before its PING is answered"
                ),
            );
        }
    }
    (keepalive, idle, drain)
}

/// Reports keys that only make sense with TLS when the transport is plain TCP.
fn reject_tls_keys_with_tcp(r: &mut TableReader<'_, '_>, keys: &[(&'static str, bool)]) {
    for (key, present) in keys {
        if *present {
            r.error(
                key,
                "only used when transport = \"tls\" (transport is \"tcp\")",
            );
        }
    }
}

fn read_server(mut r: TableReader<'_, '_>) -> Option<ServerConfig> {
    let bind_addr = r.required_parsed("bind_addr", |s| parse_socket_addr(s, EXAMPLE_BIND));
    let transport = r.optional_parsed("transport", parse_transport);
    let cert = r.optional_parsed("tls_cert_file", parse_path);
    let key = r.optional_parsed("tls_key_file", parse_path);
    let state_dir = r.optional_parsed("state_dir", parse_path);
    let handshake = r.u64_or("handshake_timeout_ms", 10_000, TIMEOUT_MS);
    let (keepalive, idle, drain) = read_keepalive(&mut r);

    match transport {
        Ok(Some(Transport::Tcp)) => {
            let keys = [
                ("tls_cert_file", !matches!(cert, Ok(None))),
                ("tls_key_file", !matches!(key, Ok(None))),
            ];
            reject_tls_keys_with_tcp(&mut r, &keys);
        }
        Ok(_) => match (&cert, &key) {
            (Ok(Some(_)), Ok(None)) => r.error(
                "tls_key_file",
                "missing; tls_cert_file and tls_key_file must be set together",
            ),
            (Ok(None), Ok(Some(_))) => r.error(
                "tls_cert_file",
                "missing; tls_cert_file and tls_key_file must be set together",
            ),
            _ => {}
        },
        Err(Invalid) => {}
    }

    // Client names are looked up in the raw table, so a service that names a client whose
    // own entry is broken does not get a second, misleading error.
    let raw_client_names: BTreeSet<&str> = match r.table.get("clients") {
        Some(Value::Table(t)) => t.keys().map(String::as_str).collect(),
        _ => BTreeSet::new(),
    };
    let clients_entries = r.optional_map("clients");
    let mut clients = BTreeMap::new();
    match &clients_entries {
        Ok(None) => r.error(
            "clients",
            "at least one client is required, e.g. [server.clients.laptop] with token = \"...\"",
        ),
        Ok(Some(entries)) if entries.is_empty() && raw_client_names.is_empty() => r.error(
            "clients",
            "at least one client is required, e.g. [server.clients.laptop] with token = \"...\"",
        ),
        _ => {}
    }
    for (name, table) in clients_entries.clone().ok().flatten().unwrap_or_default() {
        let mut c = r.entry("clients", name, table);
        let token = c.required_parsed("token", parse_token);
        c.finish();
        if let Some(token) = token {
            clients.insert(name.to_owned(), ServerClient { token });
        }
    }
    let clients_usable = clients_entries.is_ok();

    let mut services = BTreeMap::new();
    // Every valid listen address, including those of services with other mistakes, so a
    // clash is reported in the same run.
    let mut binds: Vec<(&str, SocketAddr)> = Vec::new();
    for (name, table) in r
        .optional_map("services")
        .ok()
        .flatten()
        .unwrap_or_default()
    {
        let mut s = r.entry("services", name, table);
        let bind = s.required_parsed("bind_addr", |v| parse_socket_addr(v, EXAMPLE_SERVICE_BIND));
        let allowed = s.optional_str_array("clients");
        let mut allowed_ok = allowed.is_ok();
        if let Ok(Some(names)) = &allowed {
            if names.is_empty() {
                s.error(
                    "clients",
                    "must name at least one client (omit the key to allow every client)",
                );
                allowed_ok = false;
            }
            for (i, client) in names.iter().enumerate() {
                if clients_usable && !raw_client_names.contains(client) {
                    let known: Vec<&str> = raw_client_names.iter().copied().collect();
                    let path = format!("{}[{i}]", s.key_path("clients"));
                    s.error_at(
                        path,
                        format!(
                            "{client:?} is not listed in [server.clients] (known: {})",
                            known.join(", ")
                        ),
                    );
                    allowed_ok = false;
                }
            }
        }
        s.finish();
        if let Some(addr) = bind {
            binds.push((name, addr));
        }
        if let (Some(bind_addr), true) = (bind, allowed_ok) {
            let allowed_clients = allowed
                .ok()
                .flatten()
                .map(|names| names.iter().map(|n| (*n).to_owned()).collect());
            services.insert(
                name.to_owned(),
                ServerService {
                    bind_addr,
                    allowed_clients,
                },
            );
        }
    }
    check_bind_conflicts(&mut r, bind_addr, &binds);

    let tuning = read_tuning(&mut r);
    r.finish();

    Some(ServerConfig {
        bind_addr: bind_addr?,
        transport: transport.ok()?.unwrap_or_default(),
        tls_cert_file: cert.ok()?,
        tls_key_file: key.ok()?,
        state_dir: state_dir.ok()?.unwrap_or_else(default_state_dir),
        clients,
        services,
        handshake_timeout_ms: handshake?,
        keepalive_interval_ms: keepalive?,
        idle_timeout_ms: idle?,
        drain_timeout_ms: drain?,
        tuning: tuning?,
    })
}

/// Two listeners cannot share an address. A wildcard address (`0.0.0.0`, `[::]`) collides
/// with every address on the same port, because it listens on all of them.
fn check_bind_conflicts(
    r: &mut TableReader<'_, '_>,
    tunnel: Option<SocketAddr>,
    services: &[(&str, SocketAddr)],
) {
    let overlaps = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port()
            && a.port() != 0 // port 0 picks a fresh port per listener
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    for (i, (name, addr)) in services.iter().enumerate() {
        let path = join_path(
            &join_path(&join_path(&r.path, "services"), name),
            "bind_addr",
        );
        if let Some(t) = tunnel.filter(|t| overlaps(*t, *addr)) {
            r.error_at(
                path.clone(),
                format!("{addr} overlaps the tunnel port server.bind_addr ({t})"),
            );
        }
        if let Some((other, other_addr)) = services[..i].iter().find(|(_, a)| overlaps(*a, *addr)) {
            r.error_at(
                path,
                format!("{addr} overlaps {other_addr}, the bind_addr of service {other:?}"),
            );
        }
    }
}

fn read_client(mut r: TableReader<'_, '_>) -> Option<ClientConfig> {
    let server_addr = r.required_parsed("server_addr", |s| {
        parse_host_port(s, "tunnel.example.com:7000")
    });
    let name = r.required_parsed("name", parse_name);
    let token = r.required_parsed("token", parse_token);
    let transport = r.optional_parsed("transport", parse_transport);
    let fingerprint = r.optional_parsed("server_fingerprint", parse_fingerprint);
    let ca_file = r.optional_parsed("ca_file", parse_path);
    let server_name = r.optional_parsed("server_name", parse_server_name);
    let sessions = r.optional_u64_in("sessions", 1..=MAX_SHARDS);
    let connect = r.u64_or("connect_timeout_ms", 10_000, TIMEOUT_MS);
    let reconnect_min = r.u64_or("reconnect_min_ms", 500, TIMEOUT_MS);
    let reconnect_max = r.u64_or("reconnect_max_ms", 30_000, TIMEOUT_MS);
    if let (Some(lo), Some(hi)) = (reconnect_min, reconnect_max) {
        if hi < lo {
            r.error(
                "reconnect_max_ms",
                format!("{hi} is smaller than reconnect_min_ms ({lo})"),
            );
        }
    }
    let (keepalive, idle, drain) = read_keepalive(&mut r);

    match transport {
        Ok(Some(Transport::Tcp)) => {
            let keys = [
                ("server_fingerprint", !matches!(fingerprint, Ok(None))),
                ("ca_file", !matches!(ca_file, Ok(None))),
                ("server_name", !matches!(server_name, Ok(None))),
            ];
            reject_tls_keys_with_tcp(&mut r, &keys);
        }
        Ok(_) => {
            if let (Ok(Some(_)), Ok(Some(_))) = (&fingerprint, &ca_file) {
                r.error(
                    "ca_file",
                    "cannot be combined with server_fingerprint (a pinned fingerprint replaces \
                     CA verification; keep one of them)",
                );
            }
        }
        Err(Invalid) => {}
    }

    let entries = r.optional_map("services");
    let mut services = BTreeMap::new();
    if let Ok(None) = entries {
        r.error(
            "services",
            "at least one service is required, e.g. [client.services.ssh] with local_addr = \"127.0.0.1:22\"",
        );
    }
    if let Ok(Some(list)) = &entries {
        let any_raw = matches!(r.table.get("services"), Some(Value::Table(t)) if !t.is_empty());
        if list.is_empty() && !any_raw {
            r.error(
                "services",
                "at least one service is required, e.g. [client.services.ssh] with local_addr = \"127.0.0.1:22\"",
            );
        }
    }
    for (service, table) in entries.ok().flatten().unwrap_or_default() {
        let mut s = r.entry("services", service, table);
        let local_addr = s.required_parsed("local_addr", |v| parse_host_port(v, "127.0.0.1:22"));
        let connect_timeout_ms = s.u64_or("connect_timeout_ms", 5_000, TIMEOUT_MS);
        s.finish();
        if let (Some(local_addr), Some(connect_timeout_ms)) = (local_addr, connect_timeout_ms) {
            services.insert(
                service.to_owned(),
                ClientService {
                    local_addr,
                    connect_timeout_ms,
                },
            );
        }
    }

    let tuning = read_tuning(&mut r);
    r.finish();

    Some(ClientConfig {
        server_addr: server_addr?,
        name: name?,
        token: token?,
        transport: transport.ok()?.unwrap_or_default(),
        server_fingerprint: fingerprint.ok()?,
        ca_file: ca_file.ok()?,
        server_name: server_name.ok()?,
        // The range is 1..=MAX_SHARDS, which fits u16.
        sessions: sessions.ok()?.and_then(|n| u16::try_from(n).ok()),
        services,
        connect_timeout_ms: connect?,
        reconnect_min_ms: reconnect_min?,
        reconnect_max_ms: reconnect_max?,
        keepalive_interval_ms: keepalive?,
        idle_timeout_ms: idle?,
        drain_timeout_ms: drain?,
        tuning: tuning?,
    })
}

/// `[<role>.tuning]`. An absent table yields the defaults. It is still walked, so every key
/// is recorded as known.
fn read_tuning(r: &mut TableReader<'_, '_>) -> Option<Tuning> {
    let empty = Table::new();
    let table = match r.optional_table("tuning") {
        Ok(t) => t.unwrap_or(&empty),
        Err(Invalid) => return None,
    };
    let mut t = r.section("tuning", table);
    let d = Tuning::default();
    let shards = t.optional_u64_in("shards", 0..=MAX_SHARDS);
    let cores = t.optional_u64_array_in("cores", 0..=MAX_CPU_ID);
    let initial = t.u32_or(
        "initial_stream_window_bytes",
        d.initial_stream_window_bytes,
        KIB..=16 * MIB,
    );
    let max_stream = t.u32_or(
        "max_stream_window_bytes",
        d.max_stream_window_bytes,
        KIB..=256 * MIB,
    );
    let session = t.u32_or("session_window_bytes", d.session_window_bytes, KIB..=GIB);
    let frame = t.u32_or(
        "max_frame_payload_bytes",
        d.max_frame_payload_bytes,
        KIB..=MIB,
    );
    let quantum = t.u32_or("quantum_bytes", d.quantum_bytes, KIB..=16 * MIB);
    let read_buffer = t.u32_or("read_buffer_bytes", d.read_buffer_bytes, 4 * KIB..=4 * MIB);
    let max_streams = t.u32_or(
        "max_streams_per_session",
        d.max_streams_per_session,
        1..=1_000_000,
    );
    let backend = t.optional_parsed("backend", str::parse::<Backend>);
    let buffer_count = t.u32_or("buffer_count", d.buffer_count, 64..=32_768);
    let pipe_size = t.u32_or("pipe_size_bytes", d.pipe_size_bytes, 4 * KIB..=16 * MIB);
    let pipe_pool = t.u32_or("pipe_pool_size", d.pipe_pool_size, 0..=65_536);
    let busy_poll = t.u32_or("busy_poll_us", d.busy_poll_us, 0..=10_000);
    let busy_poll_other_cores = t.optional_keep_awake("busy_poll_other_cores");
    let busy_poll_sched_idle = t.optional_bool("busy_poll_sched_idle");
    let tls_own_records = t.optional_bool("tls_own_records");
    let loopback_cc = t.optional_parsed("loopback_congestion_control", |s| {
        match warren_compat::congestion::invalid_name(s) {
            Some(why) => Err(why),
            None => Ok(s.to_string()),
        }
    });

    if let Some(initial) = initial {
        for (key, value) in [
            ("max_stream_window_bytes", max_stream),
            ("session_window_bytes", session),
        ] {
            if let Some(value) = value.filter(|v| *v < initial) {
                t.error(
                    key,
                    format!("{value} is smaller than initial_stream_window_bytes ({initial})"),
                );
            }
        }
    }

    // `[]` means "not set", like `shards = 0`, so the example files can show the default.
    let cores: Field<Vec<usize>> = match cores {
        Ok(Some(list)) if list.is_empty() => Ok(None),
        Ok(Some(list)) => {
            let mut ok = true;
            for (i, cpu) in list.iter().enumerate() {
                if list[..i].contains(cpu) {
                    let path = format!("{}[{i}]", t.key_path("cores"));
                    t.error_at(path, format!("CPU {cpu} is listed twice"));
                    ok = false;
                }
            }
            // Values are at most MAX_CPU_ID, so they fit usize.
            let list: Vec<usize> = list
                .iter()
                .filter_map(|c| usize::try_from(*c).ok())
                .collect();
            if ok {
                Ok(Some(list))
            } else {
                Err(Invalid)
            }
        }
        Ok(None) => Ok(None),
        Err(Invalid) => Err(Invalid),
    };
    let shards: Field<usize> =
        shards.map(|s| s.filter(|n| *n != 0).and_then(|n| usize::try_from(n).ok()));
    if let (Ok(Some(n)), Ok(Some(list))) = (&shards, &cores) {
        if *n != list.len() {
            t.error(
                "shards",
                format!(
                    "{n} does not match the {} CPUs listed in cores (set one of them, or make them agree)",
                    list.len()
                ),
            );
        }
    }
    t.finish();

    let cores = cores.ok()?;
    let shards = match &cores {
        Some(list) => Some(list.len()),
        None => shards.ok()?,
    };
    Some(Tuning {
        shards,
        cores,
        initial_stream_window_bytes: initial?,
        max_stream_window_bytes: max_stream?,
        session_window_bytes: session?,
        max_frame_payload_bytes: frame?,
        quantum_bytes: quantum?,
        read_buffer_bytes: read_buffer?,
        max_streams_per_session: max_streams?,
        backend: backend.ok()?.unwrap_or_default(),
        buffer_count: buffer_count?,
        pipe_size_bytes: pipe_size?,
        pipe_pool_size: pipe_pool?,
        busy_poll_us: busy_poll?,
        busy_poll_other_cores: busy_poll_other_cores
            .ok()?
            .unwrap_or(d.busy_poll_other_cores),
        busy_poll_sched_idle: busy_poll_sched_idle.ok()?.unwrap_or(d.busy_poll_sched_idle),
        tls_own_records: tls_own_records.ok()?.unwrap_or(d.tls_own_records),
        loopback_congestion_control: loopback_cc.ok()?.unwrap_or(d.loopback_congestion_control),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = r#"
[server]
bind_addr = "0.0.0.0:7000"     # where clients connect
transport = "tcp"              # "tls" is the default; "tcp" is the explicit plaintext opt-in
[server.clients.laptop]        # one entry per client identity
token = "change-me"
[server.services.ssh]          # a public TCP port, served by whichever client offers "ssh"
bind_addr = "0.0.0.0:2222"
"#;

    const CLIENT: &str = r#"
[client]
server_addr = "tunnel.example.com:7000"
name = "laptop"
token = "change-me"
transport = "tcp"
[client.services.ssh]
local_addr = "127.0.0.1:22"
"#;

    fn errors_of(text: &str) -> Vec<ConfigError> {
        match parse_config(text) {
            Ok(file) => panic!("expected errors, parsed {file:?}"),
            Err(ConfigErrors(list)) => list,
        }
    }

    fn paths_of(text: &str) -> Vec<String> {
        errors_of(text).into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn server_contract_example_parses_to_expected_values() {
        let file = parse_config(SERVER).unwrap();
        assert!(file.client.is_none());
        let server = file.server.unwrap();
        assert_eq!(
            server.bind_addr,
            "0.0.0.0:7000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(server.transport, Transport::Tcp);
        assert_eq!(server.tls_cert_file, None);
        assert_eq!(server.tls_key_file, None);
        assert_eq!(server.state_dir, default_state_dir());
        assert_eq!(server.clients.len(), 1);
        assert_eq!(server.clients["laptop"].token.expose(), "change-me");
        assert_eq!(
            server.services["ssh"],
            ServerService {
                bind_addr: "0.0.0.0:2222".parse().unwrap(),
                allowed_clients: None
            }
        );
        assert_eq!(server.handshake_timeout_ms, 10_000);
        assert_eq!(server.keepalive_interval_ms, 10_000);
        assert_eq!(server.idle_timeout_ms, 30_000);
        assert_eq!(server.drain_timeout_ms, 30_000);
        assert_eq!(server.tuning, Tuning::default());
    }

    #[test]
    fn client_contract_example_parses_to_expected_values() {
        let file = parse_config(CLIENT).unwrap();
        assert!(file.server.is_none());
        let client = file.client.unwrap();
        assert_eq!(client.server_addr, "tunnel.example.com:7000");
        assert_eq!(client.server_host(), "tunnel.example.com");
        assert_eq!(client.tls_server_name(), "tunnel.example.com");
        assert_eq!(client.name, "laptop");
        assert_eq!(client.token.expose(), "change-me");
        assert_eq!(client.transport, Transport::Tcp);
        assert_eq!(client.server_fingerprint, None);
        assert_eq!(client.ca_file, None);
        assert_eq!(client.server_name, None);
        assert_eq!(client.sessions, None);
        assert_eq!(
            client.services["ssh"],
            ClientService {
                local_addr: "127.0.0.1:22".into(),
                connect_timeout_ms: 5_000
            }
        );
        assert_eq!(client.connect_timeout_ms, 10_000);
        assert_eq!(client.reconnect_min_ms, 500);
        assert_eq!(client.reconnect_max_ms, 30_000);
        assert_eq!(client.keepalive_interval_ms, 10_000);
        assert_eq!(client.idle_timeout_ms, 30_000);
        assert_eq!(client.drain_timeout_ms, 30_000);
        assert_eq!(client.tuning, Tuning::default());
    }

    #[test]
    fn one_file_may_hold_both_roles_and_transport_defaults_to_tls() {
        let text = format!(
            "{}{}",
            SERVER.replace("transport = \"tcp\"", ""),
            CLIENT.replace("transport = \"tcp\"", "")
        );
        let file = parse_config(&text).unwrap();
        assert_eq!(file.server.unwrap().transport, Transport::Tls);
        assert_eq!(file.client.unwrap().transport, Transport::Tls);
    }

    #[test]
    fn five_mistakes_yield_five_errors_with_their_paths() {
        // One of each kind: bad value, wrong type, out of range, missing key, unknown key.
        let text = r#"
[server]
bind_addr = "0.0.0.0:99999"
idle_timeout_ms = "30s"
[server.clients.laptop]
token = "x"
[server.services.ssh]
bind_addr = "0.0.0.0:2222"
[server.tuning]
read_buffer_bytes = 10
[client]
server_addr = "tunnel.example.com:7000"
token = "x"
tokn = "y"
[client.services.ssh]
local_addr = "127.0.0.1:22"
"#;
        let rendered: Vec<String> = errors_of(text).iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "server.bind_addr: \"0.0.0.0:99999\" is not a socket address (expected host:port, e.g. 0.0.0.0:7000)",
                "server.idle_timeout_ms: expected an integer, found a string",
                "server.tuning.read_buffer_bytes: 10 is out of range (expected 4096 to 4194304)",
                "client.name: missing required key",
                "client.tokn: unknown key (did you mean \"token\"?)",
            ]
        );
        let all = parse_config(text).unwrap_err().to_string();
        assert_eq!(all.lines().count(), 5, "{all}");
    }

    #[test]
    fn unknown_keys_are_errors_at_every_level_with_suggestions() {
        let text = format!(
            "[sever]\nx = 1\n{}",
            CLIENT
                .replace("token =", "tokn =")
                .replace("local_addr", "local_adr")
        );
        let rendered: Vec<String> = errors_of(&text).iter().map(ToString::to_string).collect();
        for expected in [
            "client.tokn: unknown key (did you mean \"token\"?)",
            "client.token: missing required key",
            "client.services.ssh.local_addr: missing required key",
            "client.services.ssh.local_adr: unknown key (did you mean \"local_addr\"?)",
            "sever: unknown key (did you mean \"server\"?)",
        ] {
            assert!(
                rendered.iter().any(|r| r == expected),
                "{expected} not in {rendered:#?}"
            );
        }
        assert_eq!(rendered.len(), 5, "{rendered:#?}");
        // Far from every known key: list the choices instead of guessing.
        let errors = errors_of(&SERVER.replace(
            "[server.clients.laptop]",
            "colour = 1\n[server.clients.laptop]",
        ));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "server.colour");
        assert!(
            errors[0]
                .message
                .contains("expected one of: bind_addr, transport"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn debug_output_never_contains_tokens() {
        let text = format!("{SERVER}{CLIENT}")
            .replace(
                "token = \"change-me\"\n[server",
                "token = \"s3cr3t-server\"\n[server",
            )
            .replace(
                "token = \"change-me\"\ntransport",
                "token = \"s3cr3t-client\"\ntransport",
            );
        let file = parse_config(&text).unwrap();
        assert_eq!(
            file.server.as_ref().unwrap().clients["laptop"]
                .token
                .expose(),
            "s3cr3t-server"
        );
        assert_eq!(
            file.client.as_ref().unwrap().token.expose(),
            "s3cr3t-client"
        );
        let debug = format!("{file:?} {file:#?}");
        assert!(!debug.contains("s3cr3t"), "{debug}");
        assert!(debug.contains("***"));
        assert_eq!(Secret::new("hunter2").to_string(), "***");
    }

    #[test]
    fn fingerprint_round_trips_through_display_and_accepts_common_spellings() {
        let fp = Fingerprint::of_der(b"not really a certificate");
        let shown = fp.to_string();
        assert!(shown.starts_with("sha256:"));
        assert_eq!(shown.len(), 7 + 32 * 3 - 1);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), fp);
        let bare_hex: String = fp.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(bare_hex.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            format!("SHA256:{bare_hex}").parse::<Fingerprint>().unwrap(),
            fp
        );
        assert_eq!(
            shown.to_lowercase()["sha256:".len()..]
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert_eq!(format!("  {shown}\n").parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("{fp:?}"), shown);

        for bad in [
            "",
            "sha256:",
            &bare_hex[2..],
            &format!("{bare_hex}00"),
            &shown[..shown.len() - 3],
            &bare_hex.replace('a', "g"),
            "sha256:ÅÅ",
            "ab:cd",
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn reader_looks_up_exactly_the_known_keys() {
        let text = format!(
            "{}{}",
            SERVER.replace(
                "bind_addr = \"0.0.0.0:2222\"",
                "bind_addr = \"0.0.0.0:2222\"\nclients = [\"laptop\"]"
            ),
            CLIENT
        );
        let mut errors = Errors::default();
        assert!(parse_into(&text, &mut errors).is_some());
        assert!(errors.list.is_empty(), "{:?}", errors.list);
        let known: BTreeSet<String> = known_keys().iter().map(|k| (*k).to_owned()).collect();
        assert_eq!(errors.leaves_read, known);
    }

    #[test]
    fn syntax_errors_report_line_and_column() {
        let errors = errors_of("[server]\nbind_addr = \"0.0.0.0:7000\nx = 1\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "");
        assert!(
            errors[0]
                .message
                .starts_with("TOML syntax error at line 2, column"),
            "{}",
            errors[0]
        );
        assert!(!errors[0].to_string().contains('\n'));
    }

    #[test]
    fn empty_file_and_wrong_section_types_are_reported() {
        assert_eq!(
            errors_of("")[0].to_string(),
            "expected a [server] or [client] table (or both)"
        );
        assert_eq!(
            errors_of("server = 1")[0].to_string(),
            "server: expected a table, found an integer"
        );
    }

    #[test]
    fn tls_only_keys_with_tcp_transport_are_rejected() {
        let server = SERVER.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"",
        );
        let errors = errors_of(&server);
        assert_eq!(errors.len(), 2);
        assert_eq!(
            errors[0].to_string(),
            "server.tls_cert_file: only used when transport = \"tls\" (transport is \"tcp\")"
        );
        assert_eq!(errors[1].path, "server.tls_key_file");

        let client = CLIENT.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\nca_file = \"ca.pem\"\nserver_name = \"x.example\"",
        );
        assert_eq!(paths_of(&client), ["client.ca_file", "client.server_name"]);
    }

    #[test]
    fn tls_cert_and_key_go_together() {
        let server = SERVER.replace("transport = \"tcp\"", "tls_cert_file = \"c.pem\"");
        assert_eq!(
            errors_of(&server)[0].to_string(),
            "server.tls_key_file: missing; tls_cert_file and tls_key_file must be set together"
        );
        let server = SERVER.replace(
            "transport = \"tcp\"",
            "tls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"",
        );
        let server = parse_config(&server).unwrap().server.unwrap();
        assert_eq!(server.tls_cert_file, Some(PathBuf::from("c.pem")));
        assert_eq!(server.tls_key_file, Some(PathBuf::from("k.pem")));
    }

    #[test]
    fn pin_and_ca_file_are_exclusive() {
        let fp = Fingerprint([7; 32]);
        let client = CLIENT.replace(
            "transport = \"tcp\"",
            &format!("server_fingerprint = \"{fp}\"\nca_file = \"ca.pem\""),
        );
        let errors = errors_of(&client);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "client.ca_file");
        let client = CLIENT.replace(
            "transport = \"tcp\"",
            &format!("server_fingerprint = \"{fp}\""),
        );
        let client = parse_config(&client).unwrap().client.unwrap();
        assert_eq!(client.server_fingerprint, Some(fp));
    }

    #[test]
    fn overlapping_service_addresses_name_both_services() {
        let text = format!(
            "{SERVER}[server.services.web]\nbind_addr = \"127.0.0.1:2222\"\n[server.services.api]\nbind_addr = \"0.0.0.0:7000\"\n"
        );
        let rendered: Vec<String> = errors_of(&text).iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "server.services.api.bind_addr: 0.0.0.0:7000 overlaps the tunnel port server.bind_addr (0.0.0.0:7000)",
                "server.services.web.bind_addr: 127.0.0.1:2222 overlaps 0.0.0.0:2222, the bind_addr of service \"ssh\"",
            ]
        );
    }

    #[test]
    fn timing_rules_are_checked() {
        let server = SERVER.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\nkeepalive_interval_ms = 5000\nidle_timeout_ms = 5000\nhandshake_timeout_ms = 0",
        );
        assert_eq!(
            paths_of(&server),
            ["server.handshake_timeout_ms", "server.idle_timeout_ms"]
        );
        let client = CLIENT.replace(
            "transport = \"tcp\"",
            "transport = \"tcp\"\nreconnect_min_ms = 1000\nreconnect_max_ms = 999\ndrain_timeout_ms = 0",
        );
        assert_eq!(paths_of(&client), ["client.reconnect_max_ms"]);
        let client = CLIENT.replace("transport = \"tcp\"", "transport = \"tcp\"\nsessions = -1");
        assert_eq!(
            errors_of(&client)[0].to_string(),
            "client.sessions: -1 is out of range (expected 1 to 1024)"
        );
    }

    #[test]
    fn names_and_addresses_are_validated() {
        let client = CLIENT
            .replace("\"laptop\"", "\"my laptop\"")
            .replace("tunnel.example.com:7000", "tunnel.example.com")
            .replace("127.0.0.1:22", "127.0.0.1:0")
            .replace(
                "[client.services.ssh]",
                "[client.services.\"s/sh\"]\nlocal_addr = \"x:1\"\n[client.services.ssh]",
            );
        let rendered: Vec<String> = errors_of(&client).iter().map(ToString::to_string).collect();
        assert_eq!(
            rendered,
            [
                "client.server_addr: \"tunnel.example.com\" is not host:port (missing :port; e.g. tunnel.example.com:7000)",
                "client.name: \"my laptop\" is not a valid name (1 to 64 characters of A-Z a-z 0-9 _ . -)",
                "client.services.\"s/sh\": \"s/sh\" is not a valid name (1 to 64 characters of A-Z a-z 0-9 _ . -)",
                "client.services.ssh.local_addr: \"127.0.0.1:0\" is not host:port (the port must be a number from 1 to 65535; e.g. 127.0.0.1:22)",
            ]
        );
        for good in ["[::1]:7000", "10.0.0.1:1", "a-b.example:65535"] {
            let c = CLIENT.replace("tunnel.example.com:7000", good);
            assert!(parse_config(&c).is_ok(), "{good}");
        }
        let c = CLIENT.replace("tunnel.example.com:7000", "[::1]:7000");
        assert_eq!(
            parse_config(&c).unwrap().client.unwrap().tls_server_name(),
            "::1"
        );
        for bad in [
            "::1:7000",
            "[::1]",
            "host:",
            ":7000",
            "host:port",
            "ho st:1",
        ] {
            let c = CLIENT.replace("tunnel.example.com:7000", bad);
            assert_eq!(paths_of(&c), ["client.server_addr"], "{bad}");
        }
    }

    #[test]
    fn clients_and_services_are_required() {
        let server = "[server]\nbind_addr = \"0.0.0.0:7000\"\n";
        assert_eq!(paths_of(server), ["server.clients"]);
        let client =
            "[client]\nserver_addr = \"h:1\"\nname = \"n\"\ntoken = \"t\"\n[client.services]\n";
        assert_eq!(paths_of(client), ["client.services"]);
        let server = SERVER.replace("token = \"change-me\"", "token = \"\"");
        assert_eq!(
            errors_of(&server)[0].to_string(),
            "server.clients.laptop.token: must not be empty"
        );
        let server = SERVER.replace(
            "bind_addr = \"0.0.0.0:2222\"",
            "bind_addr = \"0.0.0.0:2222\"\nclients = []",
        );
        assert_eq!(paths_of(&server), ["server.services.ssh.clients"]);
    }

    #[test]
    fn tuning_is_read_and_cross_checked() {
        let text = SERVER.replace(
            "[server.clients.laptop]",
            "[server.tuning]\ncores = [2, 3]\ninitial_stream_window_bytes = 1024\nmax_stream_window_bytes = 2048\n\
             session_window_bytes = 1048576\nmax_frame_payload_bytes = 16384\nquantum_bytes = 8192\n\
             read_buffer_bytes = 4096\nmax_streams_per_session = 8\nbackend = \"compat\"\nbuffer_count = 128\n\
             pipe_size_bytes = 65536\npipe_pool_size = 0\nbusy_poll_us = 0\nbusy_poll_other_cores = false\nbusy_poll_sched_idle = false\ntls_own_records = false\nloopback_congestion_control = \"\"\n[server.clients.laptop]",
        );
        let tuning = parse_config(&text).unwrap().server.unwrap().tuning;
        assert_eq!(
            tuning,
            Tuning {
                shards: Some(2),
                cores: Some(vec![2, 3]),
                initial_stream_window_bytes: 1024,
                max_stream_window_bytes: 2048,
                session_window_bytes: 1 << 20,
                max_frame_payload_bytes: 16 * 1024,
                quantum_bytes: 8192,
                read_buffer_bytes: 4096,
                max_streams_per_session: 8,
                backend: Backend::Compat,
                buffer_count: 128,
                pipe_size_bytes: 64 * 1024,
                pipe_pool_size: 0,
                busy_poll_us: 0,
                busy_poll_other_cores: KeepAwake::Off,
                busy_poll_sched_idle: false,
                tls_own_records: false,
                loopback_congestion_control: String::new(),
            }
        );
        assert_eq!(tuning.shard_count(64), 2);
        assert_eq!(Tuning::default().shard_count(6), 6);

        let text = SERVER.replace(
            "[server.clients.laptop]",
            "[server.tuning]\nshards = 3\ncores = [1, 1]\nmax_stream_window_bytes = 1024\n[server.clients.laptop]",
        );
        assert_eq!(
            paths_of(&text),
            [
                "server.tuning.max_stream_window_bytes",
                "server.tuning.cores[1]"
            ]
        );
        let text = SERVER.replace(
            "[server.clients.laptop]",
            "[server.tuning]\nshards = 3\ncores = [1, 2]\n[server.clients.laptop]",
        );
        assert_eq!(paths_of(&text), ["server.tuning.shards"]);
        let text = SERVER.replace(
            "[server.clients.laptop]",
            "[server.tuning]\nshards = 0\ncores = []\n[server.clients.laptop]",
        );
        let tuning = parse_config(&text).unwrap().server.unwrap().tuning;
        assert_eq!(tuning, Tuning::default());
    }

    #[test]
    fn backend_and_io_uring_sizes_are_checked_with_their_paths() {
        let tuned = |role: &str, lines: &str| {
            let base = if role == "server" { SERVER } else { CLIENT };
            format!("{base}[{role}.tuning]\n{lines}\n")
        };
        let errors = errors_of(&tuned(
            "client",
            "backend = \"io_uring\"\nbuffer_count = 32\npipe_size_bytes = 33554432\npipe_pool_size = 65537\nbusy_poll_us = 10001\nbusy_poll_other_cores = 1\nbusy_poll_sched_idle = \"yes\"\nloopback_congestion_control = \"BBR 2\"",
        ));
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "client.tuning.backend: \"io_uring\" is not a backend (expected \"auto\", \"uring\" or \"compat\")",
                "client.tuning.buffer_count: 32 is out of range (expected 64 to 32768)",
                "client.tuning.pipe_size_bytes: 33554432 is out of range (expected 4096 to 16777216)",
                "client.tuning.pipe_pool_size: 65537 is out of range (expected 0 to 65536)",
                "client.tuning.busy_poll_us: 10001 is out of range (expected 0 to 10000)",
                "client.tuning.busy_poll_other_cores: expected true, false, \"auto\" or \"occupy\", found an integer",
                "client.tuning.busy_poll_sched_idle: expected a boolean, found a string",
                "client.tuning.loopback_congestion_control: \"BBR 2\" is not an algorithm name (lowercase letters, digits, '_' and '-')",
            ]
        );
        assert_eq!(
            paths_of(&tuned("server", "backend = 1")),
            ["server.tuning.backend"]
        );
        let tuning = parse_config(&tuned("server", "backend = \"uring\""))
            .unwrap()
            .server
            .unwrap()
            .tuning;
        assert_eq!(tuning.backend, Backend::Uring);
        let d = Tuning::default();
        assert_eq!(
            (
                d.backend,
                d.buffer_count,
                d.pipe_size_bytes,
                d.pipe_pool_size,
                d.busy_poll_us
            ),
            (Backend::Auto, 512, 1 << 20, 256, 50)
        );
    }

    #[test]
    fn busy_poll_other_cores_takes_true_false_auto_or_occupy() {
        let tuned = |line: &str| format!("{CLIENT}[client.tuning]\n{line}\n");
        let keep = |line: &str| {
            parse_config(&tuned(line))
                .unwrap()
                .client
                .unwrap()
                .tuning
                .busy_poll_other_cores
        };
        assert_eq!(Tuning::default().busy_poll_other_cores, KeepAwake::Auto);
        assert_eq!(keep("busy_poll_other_cores = true"), KeepAwake::On);
        assert_eq!(keep("busy_poll_other_cores = false"), KeepAwake::Off);
        assert_eq!(keep("busy_poll_other_cores = \"auto\""), KeepAwake::Auto);
        assert_eq!(
            keep("busy_poll_other_cores = \"occupy\""),
            KeepAwake::Occupy
        );
        assert_eq!(keep("busy_poll_us = 20"), KeepAwake::Auto);
        let lines: Vec<String> = errors_of(&tuned("busy_poll_other_cores = \"yes\""))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            ["client.tuning.busy_poll_other_cores: \"yes\" is not a choice (expected true, false, \"auto\" or \"occupy\")"]
        );
        for k in [
            KeepAwake::Auto,
            KeepAwake::On,
            KeepAwake::Occupy,
            KeepAwake::Off,
        ] {
            let line = match k {
                KeepAwake::Auto | KeepAwake::Occupy => format!("busy_poll_other_cores = \"{k}\""),
                _ => format!("busy_poll_other_cores = {k}"),
            };
            assert_eq!(keep(&line), k, "{line} reads back as itself");
        }
    }

    #[test]
    fn load_config_reports_unreadable_files() {
        let path = std::env::temp_dir().join(format!("warren-missing-{}.toml", std::process::id()));
        let errors = load_config(&path).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].path, "");
        assert!(errors.0[0]
            .message
            .starts_with(&format!("reading {}", path.display())));
    }
}
