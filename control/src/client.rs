//! `warren client`: dials the server, authenticates, opens one session per server shard, and
//! serves the streams the server opens by dialling local services. Every session slot
//! reconnects forever with exponential backoff and jitter, and logs why.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};
use warren_compat::transport::SessionIo;
use warren_compat::{
    LocalService, RouteBoard, SessionHandoff, SessionRole, ShardCommand, ShardSetConfig,
};
use warren_proto::handshake::{Accepted, ClientHandshake, ClientHandshakeConfig, Token};
use warren_proto::session::Role;

use crate::backend::{BackendKind, DataPlane};
use crate::config::{ClientConfig, Transport};
use crate::setup::{allowed_cpus, exchange, local_params, random_u64, session_config};

/// A running client. Stop it with [`Client::shutdown`].
#[derive(Debug)]
pub struct Client {
    shards: Arc<DataPlane>,
    stop: watch::Sender<bool>,
    slots: tokio::task::JoinHandle<()>,
    /// Keeps host-name `local_addr`s resolved for the io_uring shards (see [`keep_resolved`]).
    resolvers: Vec<tokio::task::JoinHandle<()>>,
    drain_timeout: Duration,
    connected: watch::Receiver<usize>,
}

struct Ctx {
    cfg: ClientConfig,
    tls: Option<crate::tls::ClientTls>,
    shards: Arc<DataPlane>,
    services: Arc<HashMap<String, LocalService>>,
    instance_id: u64,
    /// Sessions currently up, for `wait_connected` and logs.
    connected: watch::Sender<usize>,
    /// Given to the session connections when the server is on this host.
    loopback_cc: warren_compat::congestion::LoopbackCc,
}

impl Client {
    /// Starts the shards and the session slots; returns at once (connection is asynchronous).
    pub async fn start(cfg: ClientConfig) -> anyhow::Result<Client> {
        let tls = match cfg.transport {
            Transport::Tls => Some(crate::tls::client_tls(&cfg).context("setting up TLS")?),
            Transport::Tcp => {
                warn!("transport = \"tcp\": the session is NOT encrypted (explicit opt-in)");
                None
            }
        };
        let shard_count = cfg.tuning.shard_count(allowed_cpus());
        let loopback_cc = crate::backend::loopback_cc(&cfg.tuning, "client");
        let shards = Arc::new(DataPlane::start(
            &cfg.tuning,
            ShardSetConfig {
                count: shard_count,
                cores: cfg.tuning.cores.clone(),
                name: "client",
                read_buffer: cfg.tuning.read_buffer_bytes as usize,
                queue_capacity: 1024,
                loopback_cc: loopback_cc.clone(),
            },
            Arc::new(RouteBoard::new([], shard_count)),
        )?);
        info!(
            server = %cfg.server_addr,
            shards = shard_count,
            backend = %shards.kind(),
            "client started; connecting"
        );
        let services = Arc::new(
            cfg.services
                .iter()
                .map(|(name, s)| {
                    (
                        name.clone(),
                        LocalService {
                            addr: s.local_addr.clone(),
                            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
                        },
                    )
                })
                .collect(),
        );
        let resolvers = start_resolvers(&shards, &services).await;
        let (stop, stop_rx) = watch::channel(false);
        let (connected_tx, connected) = watch::channel(0usize);
        let drain_timeout = Duration::from_millis(cfg.drain_timeout_ms);
        let ctx = Arc::new(Ctx {
            cfg,
            tls,
            shards: shards.clone(),
            services,
            instance_id: random_u64(),
            connected: connected_tx,
            loopback_cc,
        });
        let slots = tokio::spawn(run_slots(ctx, stop_rx));
        Ok(Client {
            shards,
            stop,
            slots,
            resolvers,
            drain_timeout,
            connected,
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

    /// Waits until at least `n` sessions are up, or `limit` passes. Returns whether they are.
    pub async fn wait_connected(&self, n: usize, limit: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Graceful stop: GOAWAY on every session, wait for streams (up to `drain_timeout_ms`),
    /// then stop the shards.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.shards.drain("client shutting down");
        let left = crate::server::wait_drained(&self.shards, self.drain_timeout).await;
        if left > 0 {
            warn!(
                streams = left,
                "drain deadline reached; closing remaining streams"
            );
        }
        self.slots.abort();
        for r in &self.resolvers {
            r.abort();
        }
        self.shards.stop();
    }
}

/// How long a resolved host-name `local_addr` is used before it is looked up again, so a
/// service that moves to another address is followed.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// Next lookup after a failed one.
const RESOLVE_RETRY: Duration = Duration::from_secs(5);
/// A lookup without an answer after this long has failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The io_uring shards never call the system resolver (it blocks, and a slow DNS answer would
/// stall every stream on that core): for each service whose `local_addr` is a host name, a
/// task here resolves it and sends the answer to every shard ([`ShardCommand::ServiceAddr`]).
/// The first lookups finish (or time out) before this returns, so the first sessions can
/// dial at once. The compat backend resolves at each dial on its own runtime and needs none.
async fn start_resolvers(
    shards: &Arc<DataPlane>,
    services: &HashMap<String, LocalService>,
) -> Vec<tokio::task::JoinHandle<()>> {
    if shards.kind() != BackendKind::Uring {
        return Vec::new();
    }
    let mut names: Vec<Arc<str>> = services
        .values()
        .filter(|s| s.addr.parse::<std::net::SocketAddr>().is_err())
        .map(|s| Arc::from(s.addr.as_str()))
        .collect();
    names.sort();
    names.dedup();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel::<()>(names.len().max(1));
    let tasks: Vec<_> = names
        .into_iter()
        .map(|addr| tokio::spawn(keep_resolved(shards.clone(), addr, first_tx.clone())))
        .collect();
    drop(first_tx);
    // Every task reports once after its first lookup; a closed channel means all have.
    while first_rx.recv().await.is_some() {}
    tasks
}

/// Looks `addr` up now and then every [`RESOLVE_EVERY`] (after a failure, every
/// [`RESOLVE_RETRY`]) and publishes each answer to the shards. A failed re-lookup keeps the
/// last good address in use (and says so); only a host name that never resolved makes its
/// streams fail, each with the lookup's error.
async fn keep_resolved(
    shards: Arc<DataPlane>,
    addr: Arc<str>,
    first: tokio::sync::mpsc::Sender<()>,
) {
    let mut first = Some(first);
    let mut current: Option<Arc<[std::net::SocketAddr]>> = None;
    // The last failure said aloud: the same one again every RESOLVE_RETRY goes to debug.
    let mut said: Option<String> = None;
    loop {
        let answer =
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(&*addr)).await {
                Ok(Ok(found)) => {
                    let found: Arc<[std::net::SocketAddr]> = found.collect();
                    if found.is_empty() {
                        Err("the name has no addresses".to_string())
                    } else {
                        Ok(found)
                    }
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())),
            };
        let publish = match (&answer, &current) {
            (Ok(a), None) => {
                info!(local_addr = %addr, resolved = ?a, "service host name resolved");
                true
            }
            (Ok(a), Some(old)) if a != old => {
                info!(local_addr = %addr, resolved = ?a, previous = ?old, "service host name now resolves elsewhere");
                true
            }
            (Ok(_), Some(_)) => false,
            (Err(e), None) => {
                if said.as_deref() != Some(e) {
                    warn!(local_addr = %addr, "service host name does not resolve: {e}; its streams are refused; retrying every {} s", RESOLVE_RETRY.as_secs());
                } else {
                    debug!(local_addr = %addr, "service host name still does not resolve: {e}");
                }
                true
            }
            (Err(e), Some(old)) => {
                if said.as_deref() != Some(e) {
                    warn!(local_addr = %addr, using = ?old, "service host name lookup failed: {e}; keeping the last address; retrying every {} s", RESOLVE_RETRY.as_secs());
                }
                false
            }
        };
        match &answer {
            Ok(a) => {
                current = Some(a.clone());
                said = None;
            }
            Err(e) => said = Some(e.clone()),
        }
        let mut publish_failed = false;
        if publish {
            for shard in 0..shards.len() {
                let mut cmd = ShardCommand::ServiceAddr {
                    addr: addr.clone(),
                    resolved: answer.clone(),
                };
                // A full queue means a flooded shard; it drains within milliseconds.
                let mut sent = false;
                for _ in 0..1000 {
                    match shards.send(shard, cmd) {
                        Ok(()) => {
                            sent = true;
                            break;
                        }
                        Err(c) => {
                            cmd = c;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                if !sent {
                    // Forgetting `current` makes the next lookup publish again.
                    warn!(local_addr = %addr, shard, "shard command queue stayed full for 1 s; its service address update is late");
                    publish_failed = true;
                }
            }
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(()).await;
        }
        if publish_failed {
            current = None;
        }
        let next = if answer.is_ok() && !publish_failed {
            RESOLVE_EVERY
        } else {
            RESOLVE_RETRY
        };
        tokio::time::sleep(next).await;
    }
}

/// Slot 0 connects first and learns the server's shard count; then the other slots start.
async fn run_slots(ctx: Arc<Ctx>, stop: watch::Receiver<bool>) {
    let (count_tx, count_rx) = oneshot::channel();
    let first = tokio::spawn(run_slot(ctx.clone(), 0, Some(count_tx), stop.clone()));
    let Ok(server_shards) = count_rx.await else {
        let _ = first.await;
        return;
    };
    let sessions = ctx.cfg.sessions.map_or(server_shards.max(1), |s| s.max(1));
    info!(
        sessions,
        server_shards, "opening one session per server shard"
    );
    let mut tasks = vec![first];
    for i in 1..sessions {
        tasks.push(tokio::spawn(run_slot(ctx.clone(), i, None, stop.clone())));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Keeps session `index` up forever (until stop).
async fn run_slot(
    ctx: Arc<Ctx>,
    index: u16,
    mut shard_count: Option<oneshot::Sender<u16>>,
    mut stop: watch::Receiver<bool>,
) {
    let min = Duration::from_millis(ctx.cfg.reconnect_min_ms.max(1));
    let max = Duration::from_millis(ctx.cfg.reconnect_max_ms.max(ctx.cfg.reconnect_min_ms));
    let mut backoff = min;
    loop {
        if *stop.borrow() {
            return;
        }
        let attempt = tokio::select! {
            r = connect(&ctx, index) => r,
            _ = stop.changed() => return,
        };
        match attempt {
            Ok((done, accepted)) => {
                backoff = min;
                if let Some(tx) = shard_count.take() {
                    let _ = tx.send(accepted.shard_count);
                }
                ctx.connected.send_modify(|c| *c += 1);
                let end = tokio::select! {
                    r = done => r.ok(),
                    _ = stop.changed() => return,
                };
                ctx.connected.send_modify(|c| *c = c.saturating_sub(1));
                match end.and_then(|e| e.error) {
                    Some(e) => warn!(session = index, "session lost: {e}; reconnecting"),
                    None => info!(
                        session = index,
                        "session closed by the server; reconnecting"
                    ),
                }
            }
            Err(e) => {
                warn!(
                    session = index,
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot connect to {}: {e:#}",
                    ctx.cfg.server_addr
                );
            }
        }
        // Full jitter on the upper half keeps a fleet of clients from reconnecting in lockstep.
        let jitter = random_u64() % (backoff.as_millis() as u64 / 2 + 1);
        let wait = backoff / 2 + Duration::from_millis(jitter);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(max);
    }
}

type Connected = (oneshot::Receiver<warren_compat::SessionEnd>, Accepted);

/// Dial, TLS, handshake, hand the session to a shard.
async fn connect(ctx: &Ctx, index: u16) -> anyhow::Result<Connected> {
    let cfg = &ctx.cfg;
    let sock = tokio::time::timeout(
        Duration::from_millis(cfg.connect_timeout_ms),
        TcpStream::connect(&cfg.server_addr),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "no answer within {} ms (server side)",
            cfg.connect_timeout_ms
        )
    })?
    .context("TCP connect failed (server side)")?;
    let peer = sock.peer_addr()?;
    ctx.loopback_cc.apply(&sock, peer);
    let tls = match &ctx.tls {
        Some(t) => Some(rustls::Connection::from(
            rustls::ClientConnection::new(t.config.clone(), t.server_name.clone())
                .context("creating TLS state")?,
        )),
        None => None,
    };
    let mut io = SessionIo::new(sock, tls);
    if cfg.tuning.tls_own_records {
        // The config enables secret extraction (tls::client_tls).
        io.allow_record_takeover();
    }
    let mut input = BytesMut::new();
    let handshake = async {
        io.complete_tls_handshake(&mut input)
            .await
            .context("TLS handshake failed")?;
        let mut hs = ClientHandshake::new(ClientHandshakeConfig {
            name: cfg.name.clone(),
            token: Token::new(cfg.token.expose().as_bytes()),
            instance_id: ctx.instance_id,
            session_index: index,
            services: cfg.services.keys().cloned().collect(),
            params: local_params(&cfg.tuning),
        });
        let mut out = Vec::new();
        loop {
            match hs.handle_input(&mut input) {
                Ok(Some(accepted)) => break anyhow::Ok(accepted),
                Ok(None) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("handshake failed")),
            }
            out.clear();
            hs.poll_transmit(&mut out);
            exchange(&mut io, &out, &mut input, true).await?;
        }
    };
    let accepted = tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), handshake)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "handshake not finished within {} ms",
                cfg.connect_timeout_ms
            )
        })??;
    if index == 0 {
        for v in &accepted.services {
            match &v.refusal {
                None => info!(service = %v.name, "service accepted by the server"),
                Some(why) => warn!(service = %v.name, "service refused by the server: {why}"),
            }
        }
    }
    let config = session_config(
        Role::Client,
        &cfg.tuning,
        accepted.params,
        // Each side probes on its own schedule: the client's keys govern its PINGs and how
        // long it waits for a silent server; the server's values govern the server.
        cfg.keepalive_interval_ms,
        cfg.idle_timeout_ms,
    );
    let (done_tx, done_rx) = oneshot::channel();
    let handoff = SessionHandoff {
        parts: io.into_parts(input)?,
        config,
        session_id: accepted.session_id,
        peer_name: Arc::from(format!("server@{peer}")),
        role: SessionRole::Client {
            services: ctx.services.clone(),
        },
        done: Some(done_tx),
    };
    let shard = usize::from(index) % ctx.shards.len();
    if ctx
        .shards
        .send(shard, ShardCommand::Session(Box::new(handoff)))
        .is_err()
    {
        anyhow::bail!("shard {shard} command queue is full (internal)");
    }
    debug!(
        session = accepted.session_id,
        index, shard, "session handed to shard"
    );
    info!(session = accepted.session_id, index, server = %peer, "connected");
    Ok((done_rx, accepted))
}
