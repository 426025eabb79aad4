//! Shard threads, their command queues, and what the control plane hands them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};
use warren_proto::session::{SessionConfig, SessionStats};

use crate::driver;
use crate::transport::SessionParts;

/// Commands a shard accepts. Control-plane traffic only; bytes never travel this way.
#[derive(Debug)]
pub enum ShardCommand {
    /// Run an authenticated session on this shard.
    Session(Box<SessionHandoff>),
    /// Accept visitors for `service` on this (per-shard) listener.
    Listener {
        /// Service the port belongs to.
        service: Arc<str>,
        /// A bound, listening, non-blocking socket.
        listener: std::net::TcpListener,
    },
    /// A visitor accepted by a shard with no session for its service; served here instead.
    Visitor {
        /// Service the visitor came for.
        service: Arc<str>,
        /// The visitor's connection.
        sock: std::net::TcpStream,
        /// The visitor's address.
        peer: SocketAddr,
    },
    /// The latest answer for a service's host-name `local_addr` (the control plane resolves
    /// them off the shards, at start and then periodically). The io_uring shards dial from it
    /// and never call the blocking system resolver; compat shards resolve at each dial on their
    /// runtime and ignore it.
    ServiceAddr {
        /// The `local_addr` text exactly as configured (`host:port`).
        addr: Arc<str>,
        /// The addresses it resolved to, in the resolver's order of preference (dials try
        /// them in turn), or why it did not resolve.
        resolved: Result<Arc<[SocketAddr]>, String>,
    },
    /// Graceful shutdown: stop accepting visitors, send GOAWAY on every session, let streams
    /// finish; sessions close once drained.
    Drain {
        /// Sent in the GOAWAY.
        reason: String,
    },
    /// Stop the shard now: every session and stream is dropped.
    Stop,
}

/// An authenticated session, moved from the control plane to a shard.
#[derive(Debug)]
pub struct SessionHandoff {
    /// The connection and any bytes read past the handshake.
    pub parts: SessionParts,
    /// Flow-control and timing parameters agreed in the handshake.
    pub config: SessionConfig,
    /// Server-assigned id, for logs.
    pub session_id: u64,
    /// The client's name (server side) or the server's address (client side), for logs.
    pub peer_name: Arc<str>,
    /// What this end does with streams.
    pub role: SessionRole,
    /// Told when the session ends.
    pub done: Option<oneshot::Sender<SessionEnd>>,
}

/// What a session serves.
#[derive(Debug, Clone)]
pub enum SessionRole {
    /// Server side: the services this session's client was accepted for.
    Server {
        /// Accepted service names.
        services: Vec<Arc<str>>,
    },
    /// Client side: where each service's streams are dialled.
    Client {
        /// By service name.
        services: Arc<HashMap<String, LocalService>>,
    },
}

/// A local target the client forwards a service to.
#[derive(Debug, Clone)]
pub struct LocalService {
    /// `host:port`. An IP address is used as it is. A host name: the compat backend resolves it
    /// at each dial (asynchronously); the io_uring backend dials the latest
    /// [`ShardCommand::ServiceAddr`] the control plane sent for it.
    pub addr: String,
    /// How long a dial may take before the stream is reset.
    pub connect_timeout: Duration,
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    /// None for a clean close (drained after GOAWAY).
    pub error: Option<String>,
}

/// Counters a shard publishes; the control plane reads them without locks.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Sessions running on the shard.
    pub sessions: AtomicU64,
    /// Streams open across those sessions.
    pub streams: AtomicU64,
    /// Payload bytes sent into sessions.
    pub bytes_sent: AtomicU64,
    /// Payload bytes received from sessions.
    pub bytes_received: AtomicU64,
    /// Payload bytes buffered for slow local consumers right now.
    pub recv_buffered: AtomicU64,
    /// Sum of the receive windows of open streams (bounds what they may make us buffer).
    pub recv_windows: AtomicU64,
    /// The most any single stream has had buffered.
    pub max_stream_recv_buffered: AtomicU64,
    /// Visitors accepted on this shard's listeners.
    pub visitors_accepted: AtomicU64,
    /// Visitors closed because no session offered their service.
    pub visitors_unrouted: AtomicU64,
    /// Slots of the io_uring registered-file table in use (listeners and sessions; always 0
    /// on compat). A socket that closes without giving its slot back shows here, and its
    /// connection stays open in the kernel.
    pub registered_files: AtomicU64,
    /// Spells in which this shard's keep-awake thread spun because another shard of the
    /// process busy-polled (io_uring, `busy_poll_other_cores`; always 0 on compat).
    pub awake_spells: AtomicU64,
    /// Times this shard switched to `SCHED_IDLE` for a busy poll (at a poll's start, and again
    /// after each look at its core every 2 ms), so the threads its traffic woke were placed on
    /// its core (io_uring, `busy_poll_sched_idle`; always 0 on compat).
    pub idle_class_polls: AtomicU64,
    /// Times this shard saw its core taken by other work during such a poll and went back to
    /// polling as `SCHED_OTHER` for a while (io_uring; always 0 on compat).
    pub idle_class_backoffs: AtomicU64,
}

/// What one session last published into its shard's [`ShardStats`]: the driver hands it each
/// new `Session::stats()` and the atomics move by the difference. Both data planes use it.
#[derive(Debug, Default)]
pub struct Published(SessionStats);

impl Published {
    /// Moves the shard's counters by what changed since the last call.
    pub fn update(&mut self, stats: &ShardStats, now: SessionStats) {
        let d = |a: u64, b: u64| a.wrapping_sub(b);
        let p = &self.0;
        stats
            .bytes_sent
            .fetch_add(d(now.data_bytes_sent, p.data_bytes_sent), Ordering::Relaxed);
        stats.bytes_received.fetch_add(
            d(now.data_bytes_received, p.data_bytes_received),
            Ordering::Relaxed,
        );
        stats
            .recv_buffered
            .fetch_add(d(now.recv_buffered, p.recv_buffered), Ordering::Relaxed);
        stats
            .recv_windows
            .fetch_add(d(now.recv_windows, p.recv_windows), Ordering::Relaxed);
        stats
            .streams
            .fetch_add(d(now.streams as u64, p.streams as u64), Ordering::Relaxed);
        stats
            .max_stream_recv_buffered
            .fetch_max(u64::from(now.max_stream_recv_buffered), Ordering::Relaxed);
        self.0 = now;
    }

    /// The session is gone: publishes its last byte counts and takes its share out of the
    /// level counters (streams, buffered bytes, windows).
    pub fn retire(mut self, stats: &ShardStats, now: SessionStats) {
        self.update(stats, now);
        let p = &self.0;
        stats.streams.fetch_sub(p.streams as u64, Ordering::Relaxed);
        stats
            .recv_buffered
            .fetch_sub(p.recv_buffered, Ordering::Relaxed);
        stats
            .recv_windows
            .fetch_sub(p.recv_windows, Ordering::Relaxed);
    }
}

/// Which shards have a session offering each service. Written by shards when sessions come and
/// go, read only when a shard accepts a visitor it cannot serve itself. Atomics, no locks.
#[derive(Debug)]
pub struct RouteBoard {
    index: HashMap<Arc<str>, usize>,
    shards: usize,
    counts: Vec<AtomicU32>,
}

impl RouteBoard {
    /// A board for a fixed set of services over `shards` shards.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a str>, shards: usize) -> RouteBoard {
        let index: HashMap<Arc<str>, usize> = services
            .into_iter()
            .enumerate()
            .map(|(i, s)| (Arc::from(s), i))
            .collect();
        let counts = (0..index.len() * shards)
            .map(|_| AtomicU32::new(0))
            .collect();
        RouteBoard {
            index,
            shards,
            counts,
        }
    }

    fn slot(&self, service: &str, shard: usize) -> Option<&AtomicU32> {
        let i = *self.index.get(service)?;
        self.counts.get(i * self.shards + shard)
    }

    /// A session offering `service` started on `shard`.
    pub fn add(&self, service: &str, shard: usize) {
        if let Some(c) = self.slot(service, shard) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A session offering `service` on `shard` ended.
    pub fn remove(&self, service: &str, shard: usize) {
        if let Some(c) = self.slot(service, shard) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Another shard with a session for `service`, scanning from `from + 1`.
    pub fn find_other(&self, service: &str, from: usize) -> Option<usize> {
        (1..self.shards)
            .map(|k| (from + k) % self.shards)
            .find(|s| {
                self.slot(service, *s)
                    .is_some_and(|c| c.load(Ordering::Relaxed) > 0)
            })
    }

    /// Sessions offering `service` across all shards.
    pub fn sessions_for(&self, service: &str) -> u32 {
        (0..self.shards)
            .filter_map(|s| self.slot(service, s))
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// How to start the shard set.
#[derive(Debug, Clone)]
pub struct ShardSetConfig {
    /// Number of shards (threads).
    pub count: usize,
    /// CPUs to pin shard i to (`cores[i % len]`); None pins to the allowed CPUs in order.
    pub cores: Option<Vec<usize>>,
    /// Thread name prefix ("server" or "client").
    pub name: &'static str,
    /// Bytes read from a local socket per read.
    pub read_buffer: usize,
    /// Commands a shard's queue holds before senders are refused.
    pub queue_capacity: usize,
    /// Congestion control for service sockets dialled to a loopback address
    /// ([`crate::congestion`]).
    pub loopback_cc: crate::congestion::LoopbackCc,
}

#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: ArrayQueue<ShardCommand>,
    wake: Notify,
}

impl Mailbox {
    pub(crate) fn push(&self, cmd: ShardCommand) -> Result<(), ShardCommand> {
        self.queue.push(cmd)?;
        self.wake.notify_one();
        Ok(())
    }
}

/// The running shards. Dropping it without [`Shards::stop`] leaves the threads running.
#[derive(Debug)]
pub struct Shards {
    mailboxes: Arc<Vec<Mailbox>>,
    stats: Vec<Arc<ShardStats>>,
    /// Joined by [`Shards::stop`]; a Mutex only because stop takes `&self` (control path).
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    board: Arc<RouteBoard>,
}

impl Shards {
    /// Starts `cfg.count` shard threads, pinned where possible.
    pub fn start(cfg: ShardSetConfig, board: Arc<RouteBoard>) -> io::Result<Shards> {
        let count = cfg.count.max(1);
        let mailboxes: Arc<Vec<Mailbox>> = Arc::new(
            (0..count)
                .map(|_| Mailbox {
                    queue: ArrayQueue::new(cfg.queue_capacity.max(16)),
                    wake: Notify::new(),
                })
                .collect(),
        );
        let allowed = core_affinity::get_core_ids().unwrap_or_default();
        let stats: Vec<Arc<ShardStats>> = (0..count).map(|_| Arc::default()).collect();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let core = match &cfg.cores {
                Some(c) if !c.is_empty() => Some(core_affinity::CoreId { id: c[i % c.len()] }),
                _ if !allowed.is_empty() => Some(allowed[i % allowed.len()]),
                _ => None,
            };
            let ctx = ShardContext {
                index: i,
                mailboxes: mailboxes.clone(),
                stats: stats[i].clone(),
                board: board.clone(),
                read_buffer: cfg.read_buffer.max(4096),
                loopback_cc: cfg.loopback_cc.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("{}-shard-{i}", cfg.name))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            debug!(shard = i, core = core.id, "could not pin shard thread");
                        }
                    }
                    if let Err(e) = shard_main(ctx) {
                        warn!(shard = i, "shard stopped: {e}");
                    }
                })?;
            threads.push(t);
        }
        Ok(Shards {
            mailboxes,
            stats,
            threads: std::sync::Mutex::new(threads),
            board,
        })
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.mailboxes.len()
    }

    /// Never true: there is always at least one shard.
    pub fn is_empty(&self) -> bool {
        self.mailboxes.is_empty()
    }

    /// Queues a command for shard `shard`; returns it when the queue is full.
    pub fn send(&self, shard: usize, cmd: ShardCommand) -> Result<(), ShardCommand> {
        self.mailboxes[shard % self.mailboxes.len()].push(cmd)
    }

    /// Counters of one shard.
    pub fn stats(&self, shard: usize) -> &ShardStats {
        &self.stats[shard]
    }

    /// Sum of one counter over all shards.
    pub fn total(&self, f: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
        self.stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }

    /// The service board shared by the shards.
    pub fn board(&self) -> &RouteBoard {
        &self.board
    }

    /// Sends [`ShardCommand::Drain`] to every shard.
    pub fn drain(&self, reason: &str) {
        for m in self.mailboxes.iter() {
            let mut cmd = ShardCommand::Drain {
                reason: reason.to_string(),
            };
            // A full queue only delays the drain; retry briefly.
            for _ in 0..1000 {
                match m.push(cmd) {
                    Ok(()) => break,
                    Err(c) => {
                        cmd = c;
                        std::thread::yield_now();
                    }
                }
            }
        }
    }

    /// Stops every shard and joins the threads. Idempotent.
    pub fn stop(&self) {
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        if threads.is_empty() {
            return;
        }
        for m in self.mailboxes.iter() {
            while m.push(ShardCommand::Stop).is_err() {
                std::thread::yield_now();
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

struct ShardContext {
    index: usize,
    mailboxes: Arc<Vec<Mailbox>>,
    stats: Arc<ShardStats>,
    board: Arc<RouteBoard>,
    read_buffer: usize,
    loopback_cc: crate::congestion::LoopbackCc,
}

/// One shard's state, owned by its thread. `Rc`/`RefCell`, never shared.
pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) board: Arc<RouteBoard>,
    pub(crate) read_buffer: usize,
    pub(crate) loopback_cc: crate::congestion::LoopbackCc,
    mailboxes: Arc<Vec<Mailbox>>,
    pub(crate) sessions: RefCell<Vec<Rc<driver::SessionHandle>>>,
    rr: Cell<usize>,
    listeners: RefCell<Vec<AbortHandle>>,
    pub(crate) draining: Cell<bool>,
}

fn shard_main(ctx: ShardContext) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let shard = Rc::new(Shard {
        index: ctx.index,
        stats: ctx.stats,
        board: ctx.board,
        read_buffer: ctx.read_buffer,
        loopback_cc: ctx.loopback_cc,
        mailboxes: ctx.mailboxes,
        sessions: RefCell::new(Vec::new()),
        rr: Cell::new(0),
        listeners: RefCell::new(Vec::new()),
        draining: Cell::new(false),
    });
    local.block_on(&rt, async move {
        loop {
            let mailbox = &shard.mailboxes[shard.index];
            mailbox.wake.notified().await;
            while let Some(cmd) = mailbox.queue.pop() {
                if !handle_command(&shard, cmd) {
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Returns false on [`ShardCommand::Stop`].
fn handle_command(shard: &Rc<Shard>, cmd: ShardCommand) -> bool {
    match cmd {
        ShardCommand::Session(h) => driver::spawn_session(shard.clone(), *h),
        ShardCommand::Listener { service, listener } => {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    let task = tokio::task::spawn_local(accept_loop(shard.clone(), service, l));
                    shard.listeners.borrow_mut().push(task.abort_handle());
                }
                Err(e) => warn!(shard = shard.index, %service, "cannot register listener: {e}"),
            }
        }
        ShardCommand::Visitor {
            service,
            sock,
            peer,
        } => match tokio::net::TcpStream::from_std(sock) {
            Ok(s) => route_visitor(shard, service, s, peer, false),
            Err(e) => warn!(
                shard = shard.index,
                "cannot register handed-off visitor: {e}"
            ),
        },
        // Compat dials resolve the host name asynchronously on this runtime.
        ShardCommand::ServiceAddr { .. } => {}
        ShardCommand::Drain { reason } => {
            shard.draining.set(true);
            for l in shard.listeners.borrow_mut().drain(..) {
                l.abort();
            }
            for s in shard.sessions.borrow().iter() {
                s.go_away(&reason);
            }
        }
        ShardCommand::Stop => return false,
    }
    true
}

async fn accept_loop(shard: Rc<Shard>, service: Arc<str>, listener: tokio::net::TcpListener) {
    let addr = listener.local_addr().ok();
    debug!(shard = shard.index, %service, ?addr, "accepting visitors");
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                shard
                    .stats
                    .visitors_accepted
                    .fetch_add(1, Ordering::Relaxed);
                route_visitor(&shard, service.clone(), sock, peer, true);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener stays.
                warn!(shard = shard.index, %service, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves a visitor through a session on this shard, or hands it to a shard that has one.
fn route_visitor(
    shard: &Rc<Shard>,
    service: Arc<str>,
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
    may_hand_off: bool,
) {
    let candidates: Vec<Rc<driver::SessionHandle>> = shard
        .sessions
        .borrow()
        .iter()
        .filter(|s| s.serves(&service))
        .cloned()
        .collect();
    let start = shard.rr.get();
    shard.rr.set(start.wrapping_add(1));
    for k in 0..candidates.len() {
        let s = &candidates[(start + k) % candidates.len()];
        if let Some(id) = s.open_for_visitor(&service, peer) {
            driver::spawn_stream(
                shard.clone(),
                s.clone(),
                id,
                sock,
                driver::LocalEnd::Visitor,
            );
            return;
        }
    }
    if may_hand_off {
        if let Some(other) = shard.board.find_other(&service, shard.index) {
            match sock.into_std() {
                Ok(std_sock) => {
                    let cmd = ShardCommand::Visitor {
                        service: service.clone(),
                        sock: std_sock,
                        peer,
                    };
                    match shard.mailboxes[other].push(cmd) {
                        Ok(()) => return,
                        Err(_) => {
                            warn!(shard = shard.index, %service, "shard {other} queue full; visitor {peer} dropped")
                        }
                    }
                }
                Err(e) => warn!("visitor {peer}: {e}"),
            }
            shard
                .stats
                .visitors_unrouted
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    shard
        .stats
        .visitors_unrouted
        .fetch_add(1, Ordering::Relaxed);
    info!(%service, %peer, "visitor refused: no client is connected for this service");
}
