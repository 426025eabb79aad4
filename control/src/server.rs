//! `warren server`: accepts client sessions, authenticates them, places each on a shard, and
//! binds the public service ports (one `SO_REUSEPORT` listener per shard).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use warren_compat::transport::SessionIo;
use warren_compat::{RouteBoard, SessionHandoff, SessionRole, ShardCommand, ShardSetConfig};
use warren_proto::handshake::{Accept, ServerHandshake, ServiceVerdict, Token};
use warren_proto::session::Role;

use crate::backend::{BackendKind, DataPlane};
use crate::config::{Fingerprint, ServerConfig, Transport};
use crate::setup::{allowed_cpus, exchange, local_params, random_bytes, session_config};

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    /// Where clients connect (resolved, so port 0 in the config shows the real port).
    pub session_addr: SocketAddr,
    /// Public address of each service.
    pub service_addrs: BTreeMap<String, SocketAddr>,
    /// SHA-256 of the TLS certificate clients should pin (TLS only).
    pub fingerprint: Option<Fingerprint>,
    shards: Arc<DataPlane>,
    accept_task: JoinHandle<()>,
    drain_timeout: Duration,
}

/// Everything the session acceptor needs, shared by its handshake tasks.
struct Acceptor {
    cfg: ServerConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    tokens: HashMap<String, Token>,
    shards: Arc<DataPlane>,
    next_session_id: AtomicU64,
    /// Given to session connections from this host (`tuning.loopback_congestion_control`).
    loopback_cc: warren_compat::congestion::LoopbackCc,
}

impl Server {
    /// Binds every port, starts the shards, and starts accepting sessions.
    pub async fn start(cfg: ServerConfig) -> anyhow::Result<Server> {
        let shard_count = cfg.tuning.shard_count(allowed_cpus());
        let loopback_cc = crate::backend::loopback_cc(&cfg.tuning, "server");
        let tls = match cfg.transport {
            Transport::Tls => {
                let t = crate::tls::server_tls(&cfg).context("setting up TLS")?;
                if t.self_signed {
                    info!(
                        "self-signed certificate in {}; clients pin it with: server_fingerprint = \"{}\"",
                        cfg.state_dir.display(),
                        t.fingerprint
                    );
                } else {
                    info!(fingerprint = %t.fingerprint, "TLS certificate loaded");
                }
                Some(t)
            }
            Transport::Tcp => {
                warn!("transport = \"tcp\": sessions are NOT encrypted (explicit opt-in)");
                None
            }
        };
        let listener = TcpListener::bind(cfg.bind_addr)
            .await
            .with_context(|| format!("server.bind_addr: cannot listen on {}", cfg.bind_addr))?;
        let session_addr = listener.local_addr()?;

        let board = Arc::new(RouteBoard::new(
            cfg.services.keys().map(String::as_str),
            shard_count,
        ));
        let shards = Arc::new(DataPlane::start(
            &cfg.tuning,
            ShardSetConfig {
                count: shard_count,
                cores: cfg.tuning.cores.clone(),
                name: "server",
                read_buffer: cfg.tuning.read_buffer_bytes as usize,
                queue_capacity: 4096,
                loopback_cc: loopback_cc.clone(),
            },
            board,
        )?);
        let backend = shards.kind();

        let mut service_addrs = BTreeMap::new();
        for (name, svc) in &cfg.services {
            let listeners =
                warren_compat::listener::reuseport_listeners(svc.bind_addr, shard_count)
                    .with_context(|| {
                        format!(
                            "server.services.{name}.bind_addr: cannot listen on {}",
                            svc.bind_addr
                        )
                    })?;
            let addr = listeners[0].local_addr()?;
            for (i, l) in listeners.into_iter().enumerate() {
                // A listener on a loopback address only ever accepts connections from this
                // host; what it accepts inherits the algorithm (no syscall per visitor).
                loopback_cc.apply(&l, addr);
                let cmd = ShardCommand::Listener {
                    service: Arc::from(name.as_str()),
                    listener: l,
                };
                if shards.send(i, cmd).is_err() {
                    anyhow::bail!("shard {i} did not take the listener for service {name}");
                }
            }
            info!(service = %name, addr = %addr, "public port ready");
            service_addrs.insert(name.clone(), addr);
        }

        let tokens = cfg
            .clients
            .iter()
            .map(|(name, c)| (name.clone(), Token::new(c.token.expose().as_bytes())))
            .collect();
        let drain_timeout = Duration::from_millis(cfg.drain_timeout_ms);
        let fingerprint = tls.as_ref().map(|t| t.fingerprint);
        let acceptor = Arc::new(Acceptor {
            tls: tls.map(|t| t.config),
            tokens,
            shards: shards.clone(),
            next_session_id: AtomicU64::new(1),
            loopback_cc,
            cfg,
        });
        info!(addr = %session_addr, shards = shard_count, %backend, "accepting client sessions");
        let accept_task = tokio::spawn(accept_sessions(listener, acceptor));
        Ok(Server {
            session_addr,
            service_addrs,
            fingerprint,
            shards,
            accept_task,
            drain_timeout,
        })
    }

    /// The shards, for counters.
    pub fn shards(&self) -> &DataPlane {
        &self.shards
    }

    /// The data plane running (what `tuning.backend` resolved to).
    pub fn backend(&self) -> BackendKind {
        self.shards.kind()
    }

    /// Waits until at least `n` sessions offering `service` are registered on the shards (a
    /// client counts a session once it hands it to its own shard; the server's shard registers
    /// it a moment later). False if `limit` passes first.
    pub async fn wait_service_sessions(&self, service: &str, n: usize, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if self.shards.board().sessions_for(service) as usize >= n {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Graceful stop: no new sessions or visitors, GOAWAY on every session, wait for streams
    /// to finish (up to `drain_timeout_ms`), then stop the shards.
    pub async fn shutdown(self) {
        self.accept_task.abort();
        self.shards.drain("server shutting down");
        let streams = wait_drained(&self.shards, self.drain_timeout).await;
        if streams > 0 {
            warn!(streams, "drain deadline reached; closing remaining streams");
        } else {
            info!("drained");
        }
        self.shards.stop();
    }
}

/// Waits until no session is left or the deadline passes; returns the streams still open.
pub(crate) async fn wait_drained(shards: &DataPlane, deadline: Duration) -> u64 {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let sessions = shards.total(|s| &s.sessions);
        let streams = shards.total(|s| &s.streams);
        if sessions == 0 || tokio::time::Instant::now() >= until {
            return streams;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Handshakes in progress at once. Unauthenticated peers cost a task and a small buffer each
/// for up to `handshake_timeout_ms`; beyond this many, new connections are closed at once so
/// a connection flood cannot exhaust memory.
const MAX_PENDING_HANDSHAKES: usize = 1024;

async fn accept_sessions(listener: TcpListener, acceptor: Arc<Acceptor>) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                acceptor.loopback_cc.apply(&sock, peer);
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    warn!(%peer, "session refused: {MAX_PENDING_HANDSHAKES} handshakes already in progress");
                    drop(sock);
                    continue;
                };
                let a = acceptor.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let limit = Duration::from_millis(a.cfg.handshake_timeout_ms);
                    match tokio::time::timeout(limit, setup_session(&a, sock, peer)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(%peer, "session refused: {e:#}"),
                        Err(_) => warn!(
                            %peer,
                            "session refused (client side): handshake not finished within {} ms",
                            limit.as_millis()
                        ),
                    }
                });
            }
            Err(e) => {
                warn!("accepting a session connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// TLS, then the warren handshake, then placement on a shard.
async fn setup_session(a: &Acceptor, sock: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let tls = match &a.tls {
        Some(cfg) => Some(rustls::Connection::from(
            rustls::ServerConnection::new(cfg.clone()).context("creating TLS state")?,
        )),
        None => None,
    };
    let mut io = SessionIo::new(sock, tls);
    if a.cfg.tuning.tls_own_records {
        // The config enables secret extraction (tls::server_tls).
        io.allow_record_takeover();
    }
    let mut input = BytesMut::new();
    io.complete_tls_handshake(&mut input)
        .await
        .context("TLS handshake failed (client side)")?;

    let mut hs = ServerHandshake::new(random_bytes::<32>());
    let mut out = Vec::new();
    let claim = loop {
        match hs.handle_input(&mut input) {
            Ok(Some(claim)) => break claim,
            Ok(None) => {
                out.clear();
                hs.poll_transmit(&mut out);
                exchange(&mut io, &out, &mut input, true).await?;
            }
            Err(e) => {
                flush_reject(&mut io, &mut hs).await;
                return Err(anyhow::Error::new(e).context("handshake failed (client side)"));
            }
        }
    };
    let name = claim.name.clone();
    if let Err(e) = hs.verify(&claim, a.tokens.get(&name)) {
        flush_reject(&mut io, &mut hs).await;
        return Err(anyhow::Error::new(e).context(format!(
            "client {name:?} failed authentication (client side)"
        )));
    }

    let services: Vec<ServiceVerdict> = claim
        .services
        .iter()
        .map(|s| ServiceVerdict {
            name: s.clone(),
            refusal: service_refusal(&a.cfg, &name, s),
        })
        .collect();
    for v in services.iter().filter(|v| v.refusal.is_some()) {
        warn!(client = %name, service = %v.name, "service refused: {}", v.refusal.as_deref().unwrap_or(""));
    }
    let accepted: Vec<Arc<str>> = services
        .iter()
        .filter(|v| v.refusal.is_none())
        .map(|v| Arc::from(v.name.as_str()))
        .collect();
    let session_id = a.next_session_id.fetch_add(1, Ordering::Relaxed);
    let shard_count = a.shards.len();
    hs.accept(Accept {
        session_id,
        shard_count: shard_count.min(u16::MAX as usize) as u16,
        params: local_params(&a.cfg.tuning),
        keepalive_interval_ms: a.cfg.keepalive_interval_ms.min(u64::from(u32::MAX)) as u32,
        idle_timeout_ms: a.cfg.idle_timeout_ms.min(u64::from(u32::MAX)) as u32,
        services,
    })
    .context("building the handshake accept")?;
    out.clear();
    hs.poll_transmit(&mut out);
    exchange(&mut io, &out, &mut input, false).await?;

    // One session per shard: the client numbers its sessions, we place index i on shard i.
    let shard = usize::from(claim.session_index) % shard_count;
    let config = session_config(
        Role::Server,
        &a.cfg.tuning,
        claim.params,
        a.cfg.keepalive_interval_ms,
        a.cfg.idle_timeout_ms,
    );
    info!(client = %name, %peer, session = session_id, shard, index = claim.session_index, "client authenticated");
    let parts = io.into_parts(input)?;
    let handoff = SessionHandoff {
        parts,
        config,
        session_id,
        peer_name: Arc::from(format!("{name}@{peer}")),
        role: SessionRole::Server { services: accepted },
        done: None,
    };
    if a.shards
        .send(shard, ShardCommand::Session(Box::new(handoff)))
        .is_err()
    {
        anyhow::bail!("shard {shard} command queue is full (internal)");
    }
    debug!(session = session_id, "handed to shard {shard}");
    Ok(())
}

fn service_refusal(cfg: &ServerConfig, client: &str, service: &str) -> Option<String> {
    match cfg.services.get(service) {
        None => Some(format!("the server has no service named {service:?}")),
        Some(s) => match &s.allowed_clients {
            Some(allowed) if !allowed.iter().any(|c| c == client) => Some(format!(
                "client {client:?} is not in server.services.{service}.clients"
            )),
            _ => None,
        },
    }
}

async fn flush_reject(io: &mut SessionIo, hs: &mut ServerHandshake) {
    let mut out = Vec::new();
    hs.poll_transmit(&mut out);
    if !out.is_empty() && io.queue(&out).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), io.flush_all()).await;
    }
    io.close().await;
}
