//! One shard: a pinned thread, one ring, and the completion loop that drives its listeners,
//! sessions and streams.
//!
//! The loop is `submit_and_wait → for each completion: translate → serve what changed`. Every
//! operation carries its kind, slot and slot generation in `user_data`; a completion for a slot
//! that has been reused is dropped. A slot (listener, session, stream) owns its socket, and every
//! buffer an in-flight operation points into, until the last completion for it arrives: closing
//! cancels the operations and frees the slot only when its in-flight count reaches zero.
//!
//! Protocol decisions are `warren_proto::session::Session`'s: this file only moves bytes in and
//! out of it and reports what the sockets did.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{SockAddr, SockRef};
use tracing::{debug, info, warn};
use warren_compat::congestion::LoopbackCc;
use warren_compat::records::Tls13Records;
use warren_compat::{
    LocalEnd, LocalService, Published, RouteBoard, SessionEnd, SessionHandoff, SessionRole,
    ShardCommand, ShardStats,
};
use warren_proto::frame::{GoAwayCode, ResetCode, StreamId};
use warren_proto::session::{Event, Readable, Role, Session, SessionConfig};

use super::awake_probe;
use super::bufring::BufRing;
use super::bulk::BulkMeter;
use super::clock;
use super::short_io;
use super::sys::{self, Pipe};
use crate::probe::SetupFlags;
use crate::{KeepAwake, UringConfig};

/// Submission queue entries per ring (completions: four times as many).
const RING_ENTRIES: u32 = 4096;
/// Bytes of frames produced per session send.
const TRANSMIT_CHUNK: usize = 256 * 1024;
/// Largest chunk taken from the core per send to a local socket.
const WRITE_CHUNK: usize = 256 * 1024;
/// How long a closing session may take to flush its last frames (GOAWAY, close_notify).
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// Received DATA payloads at least this large (beyond what one small read brought in) are
/// spliced from a plain-TCP session socket into the stream's pipe instead of copied.
const RX_SPLICE_MIN: usize = 16 * 1024;
/// Bytes asked of the session socket per read in splice-receive mode: enough for many control
/// frames and small payloads, small enough that a large payload is mostly spliced.
const RX_READ: usize = 16 * 1024;
/// Splice-receive turns in a row without a large payload before a session goes back to
/// multishot recv.
const RX_QUIET_SWITCH: u32 = 32;
/// A spliced stream in its small-message phase reads up to this many bytes into memory per
/// readiness: one `recv` instead of splice in, header send, splice out and a final EAGAIN.
const SMALL_READ: usize = 16 * 1024;
/// Most a new visitor's first read takes (see `first_read`); on the shard's stack.
const FIRST_READ: usize = 16 * 1024;
/// Bytes a session reads or splices per turn before letting the rest of the shard run.
const RX_BUDGET: usize = 4 * 1024 * 1024;
/// How often `WARREN_DUMP_SHARDS` logs every slot's state.
const DUMP_EVERY: Duration = Duration::from_secs(2);
/// Rounds of "serve what changed" per loop turn before waiting on the ring again.
const SERVE_ROUNDS: usize = 8;
/// `io_uring_enter(2)` flag: wait for / reap completions (uapi value, stable ABI).
const IORING_ENTER_GETEVENTS: u32 = 1;
/// A turn with more completions than this means load: the shard sleeps instead of polling.
const BUSY_POLL_MAX_BATCH: usize = 4;
/// With more streams than this the shard is busy enough that work arrives without a poll, and
/// a poll would take the core from the threads that produce it (measured: rr-64 and
/// connect+echo+close lost 6-30% to the poll): the shard sleeps.
const BUSY_POLL_MAX_STREAMS: usize = 4;
/// A stream opened within this long means connection churn: the shard sleeps instead of
/// polling. Each new connection brings its own completions (accept or connect, first reads,
/// closes) soon enough, and a poll between them only took the core from the load generator
/// and the service: with this rule connect+echo+close made 4.5% more connections per second
/// at 4-9% less tunnel CPU per connection on the AMD host
/// (perf/results/2026-12-07-churn-poll/). A few long-lived streams (the case the poll is
/// for) open nothing and keep polling.
const CHURN_QUIET: Duration = Duration::from_millis(1);
/// Slots of the ring's registered-file table: long-lived sockets (listeners, sessions) only.
const FIXED_FILES: u32 = 1024;
/// A look of a busy poll that comes this long after the one before means another thread held
/// the shard's core (a `sched_yield` handed it a whole time slice): no `SCHED_IDLE` poll for a
/// while (`busy_poll_sched_idle`), since as `SCHED_IDLE` the shard would wait behind that work.
const CORE_TAKEN: Duration = Duration::from_millis(1);
/// A `SCHED_IDLE` poll goes back to `SCHED_OTHER` this often for one look at the core (a
/// `sched_yield`, timed against `CORE_TAKEN`) before it goes on.
const IDLE_PROBE_EVERY: Duration = Duration::from_millis(2);
/// First back-off after the core was found taken; doubled while it keeps being found taken, up
/// to `IDLE_BACKOFF_MAX`, and reset after a `IDLE_BACKOFF_MAX` without.
const IDLE_BACKOFF_MIN: Duration = Duration::from_secs(1);
const IDLE_BACKOFF_MAX: Duration = Duration::from_secs(64);

/// Whether traffic is light enough for a busy poll: no bulk lately, a small last batch, few
/// streams, and no stream opened within `CHURN_QUIET` (`since_open`).
fn light_traffic(
    bulk_quiet: bool,
    last_batch: usize,
    streams: usize,
    since_open: Duration,
) -> bool {
    bulk_quiet
        && last_batch <= BUSY_POLL_MAX_BATCH
        && streams <= BUSY_POLL_MAX_STREAMS
        && since_open >= CHURN_QUIET
}

/// Builds an SQE against a registered file when the socket has a slot in the ring's file
/// table, else against its fd: `target!(slot, fd, |t| opcode::Send::new(t, ..).build())`.
macro_rules! target {
    ($fixed:expr, $fd:expr, |$t:ident| $body:expr) => {
        match $fixed {
            Some(i) => {
                let $t = types::Fixed(i);
                $body
            }
            None => {
                let $t = types::Fd($fd);
                $body
            }
        }
    };
}

// ----- user_data ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Mailbox = 1,
    Accept,
    SessionRecv,
    SessionSend,
    SessionPollOut,
    StreamRecv,
    StreamSend,
    StreamPollIn,
    Connect,
    ConnectTimeout,
    Cancel,
    SessionPollIn,
    StreamPollOut,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Mailbox,
            2 => Op::Accept,
            3 => Op::SessionRecv,
            4 => Op::SessionSend,
            5 => Op::SessionPollOut,
            6 => Op::StreamRecv,
            7 => Op::StreamSend,
            8 => Op::StreamPollIn,
            9 => Op::Connect,
            10 => Op::ConnectTimeout,
            11 => Op::Cancel,
            12 => Op::SessionPollIn,
            13 => Op::StreamPollOut,
            _ => return None,
        })
    }
}

/// A slot reference: index plus the generation it had when the operation was submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    index: u32,
    gen: u32,
}

fn user_data(op: Op, key: Key) -> u64 {
    ((op as u64) << 56) | ((u64::from(key.index) & 0xff_ffff) << 32) | u64::from(key.gen)
}

fn decode(ud: u64) -> Option<(Op, Key)> {
    let op = Op::from_u8((ud >> 56) as u8)?;
    Some((
        op,
        Key {
            index: ((ud >> 32) & 0xff_ffff) as u32,
            gen: ud as u32,
        },
    ))
}

// ----- slab --------------------------------------------------------------------------------

#[derive(Debug)]
struct Slab<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
}

impl<T> Slab<T> {
    /// Occupied entries.
    fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    fn new() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, v: T) -> Key {
        if let Some(i) = self.free.pop() {
            let e = &mut self.entries[i as usize];
            e.0 = e.0.wrapping_add(1);
            e.1 = Some(v);
            Key { index: i, gen: e.0 }
        } else {
            let i = self.entries.len() as u32;
            assert!(i < 0xff_ffff, "slab full");
            self.entries.push((0, Some(v)));
            Key { index: i, gen: 0 }
        }
    }

    fn get(&mut self, k: Key) -> Option<&mut T> {
        match self.entries.get_mut(k.index as usize) {
            Some((g, Some(v))) if *g == k.gen => Some(v),
            _ => None,
        }
    }

    fn remove(&mut self, k: Key) -> Option<T> {
        match self.entries.get_mut(k.index as usize) {
            Some((g, v @ Some(_))) if *g == k.gen => {
                self.free.push(k.index);
                v.take()
            }
            _ => None,
        }
    }

    /// Occupied entries with their keys, without collecting them (the loop's per-turn scans).
    fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.entries
            .iter_mut()
            .enumerate()
            .filter_map(|(i, (g, v))| {
                v.as_mut().map(|v| {
                    (
                        Key {
                            index: i as u32,
                            gen: *g,
                        },
                        v,
                    )
                })
            })
    }

    fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_some())
            .map(|(i, (g, _))| Key {
                index: i as u32,
                gen: *g,
            })
            .collect()
    }
}

// ----- the shard set (control-plane side) --------------------------------------------------

/// A shard's command queue and its wake.
#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: ArrayQueue<ShardCommand>,
    wake: OwnedFd,
    /// Set by the first sender after the shard last looked; only that sender writes the
    /// eventfd, so a burst of commands costs one wake.
    woken: AtomicBool,
    /// Until when this shard busy-polls for its own traffic (`PollClock` nanoseconds; 0 when
    /// it never has). Read by the keep-awake threads of the other shards
    /// (`busy_poll_other_cores`). On its own cache line: it is written at most every quarter
    /// of `busy_poll_us`.
    poll_until: PaddedU64,
    /// Whether this shard serves few streams (at most `BUSY_POLL_MAX_STREAMS`). Its keep-awake
    /// thread spins only while it does: a core whose shard has many streams is busy anyway, and
    /// a spinner there only adds context switches and draws woken threads to the core. Only the
    /// stream count, not the other busy-poll rules (a bulk turn, a big batch): those describe
    /// the last turn and would go stale while the shard sleeps, which is exactly when its core
    /// needs the spinner.
    light: AtomicBool,
    /// Blocking eventfd the keep-awake thread of this shard's core sleeps on.
    awake: OwnedFd,
    /// Set by the first shard that kicks the keep-awake thread since it last woke, so a
    /// spell costs one eventfd write per core.
    awake_kicked: AtomicBool,
    /// Tells the keep-awake thread to end (`ShardSet::stop`).
    awake_stop: AtomicBool,
}

/// An `AtomicU64` alone on its cache line (128 bytes: adjacent-line prefetch on x86).
#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedU64(AtomicU64);

/// The time base shared by the shards of one process for `Mailbox::poll_until`.
#[derive(Debug, Clone, Copy)]
struct PollClock(Instant);

impl PollClock {
    fn ns(self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.0).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Mailbox {
    fn push(&self, cmd: ShardCommand) -> Result<(), ShardCommand> {
        self.queue.push(cmd)?;
        if !self.woken.swap(true, Ordering::SeqCst) {
            sys::eventfd_wake(self.wake.as_raw_fd());
        }
        Ok(())
    }
}

/// The shard threads and their mailboxes.
#[derive(Debug)]
pub(crate) struct ShardSet {
    mailboxes: Arc<Vec<Mailbox>>,
    /// Joined by `stop`; a Mutex only because stop takes `&self` (control path, never per byte).
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The keep-awake threads (`busy_poll_other_cores`), one per shard; joined by `stop`.
    awake: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl ShardSet {
    pub(crate) fn start(
        cfg: UringConfig,
        board: Arc<RouteBoard>,
    ) -> io::Result<(ShardSet, Vec<Arc<ShardStats>>)> {
        let probe = crate::probe().map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
        let count = cfg.shards.count.max(1);
        let mut mailboxes = Vec::with_capacity(count);
        for _ in 0..count {
            mailboxes.push(Mailbox {
                queue: ArrayQueue::new(cfg.shards.queue_capacity.max(16)),
                wake: sys::eventfd()?,
                woken: AtomicBool::new(false),
                poll_until: PaddedU64::default(),
                light: AtomicBool::new(true),
                awake: sys::eventfd_blocking()?,
                awake_kicked: AtomicBool::new(false),
                awake_stop: AtomicBool::new(false),
            });
        }
        let mailboxes = Arc::new(mailboxes);
        let poll_clock = PollClock(clock::now());
        let stats: Vec<Arc<ShardStats>> = (0..count).map(|_| Arc::default()).collect();
        let allowed = core_affinity::get_core_ids().unwrap_or_default();
        let mut threads = Vec::with_capacity(count);
        let mut awake = Vec::new();
        let cores: Vec<Option<core_affinity::CoreId>> = (0..count)
            .map(|i| match &cfg.shards.cores {
                Some(c) if !c.is_empty() => Some(core_affinity::CoreId { id: c[i % c.len()] }),
                _ if !allowed.is_empty() => Some(allowed[i % allowed.len()]),
                _ => None,
            })
            .collect();
        let core_of = |i: usize| cores[i % cores.len()];
        let awake_mode = if count > 1 && !cfg.busy_poll.is_zero() {
            match cfg.busy_poll_other_cores {
                KeepAwake::On => AwakeMode::Spin,
                KeepAwake::Occupy => AwakeMode::Occupy,
                KeepAwake::Off => AwakeMode::Off,
                KeepAwake::Auto => auto_keep_awake(cfg.shards.name, core_of(0), core_of(1)),
            }
        } else {
            AwakeMode::Off
        };
        // Occupying spinners must be able to lower their priority, or they would compete with
        // real work; the shards do not poll in that mode, so without them fall back to polls.
        let awake_mode = match awake_mode {
            AwakeMode::Occupy => match sys::nice_allowed() {
                Ok(()) => AwakeMode::Occupy,
                Err(why) => {
                    warn!(
                        role = %cfg.shards.name,
                        "not occupying the other cores (a thread may not lower its priority: {why}); shards busy-poll instead"
                    );
                    AwakeMode::Off
                }
            },
            mode => mode,
        };
        let mut cfg = cfg;
        if cfg.busy_poll_sched_idle && !cfg.busy_poll.is_zero() {
            if let Err(why) = sys::idle_class_reversible() {
                info!(
                    role = %cfg.shards.name,
                    "busy polls run as SCHED_OTHER (busy_poll_sched_idle needs the way back): {why}"
                );
                cfg.busy_poll_sched_idle = false;
            }
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        for i in 0..count {
            let core = core_of(i);
            if awake_mode != AwakeMode::Off {
                let (mailboxes, stats) = (mailboxes.clone(), stats[i].clone());
                let t = std::thread::Builder::new()
                    .name(format!("{}-awake-{i}", cfg.shards.name))
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        if let Some(core) = core {
                            core_affinity::set_for_current(core);
                        }
                        keep_core_awake(i, awake_mode, &mailboxes, poll_clock, &stats);
                    })?;
                awake.push(t);
            }
            let ctx = Context {
                index: i,
                mailboxes: mailboxes.clone(),
                poll_clock,
                stats: stats[i].clone(),
                board: board.clone(),
                cfg: cfg.clone(),
                awake: awake_mode,
                flags: probe.setup,
            };
            let ready = ready_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("{}-uring-{i}", cfg.shards.name))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            debug!(shard = i, core = core.id, "could not pin shard thread");
                        }
                    }
                    match Shard::new(ctx) {
                        Ok(mut shard) => {
                            let _ = ready.send(Ok(()));
                            if let Err(e) = shard.run() {
                                warn!(shard = i, "shard stopped: {e}");
                            }
                            shard.shutdown();
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })?;
            threads.push(t);
        }
        drop(ready_tx);
        let set = ShardSet {
            mailboxes,
            threads: std::sync::Mutex::new(threads),
            awake: std::sync::Mutex::new(awake),
        };
        for _ in 0..count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    set.stop();
                    return Err(e);
                }
                Err(_) => {
                    set.stop();
                    return Err(io::Error::other("a shard thread died during start-up"));
                }
            }
        }
        Ok((set, stats))
    }

    pub(crate) fn send(&self, shard: usize, cmd: ShardCommand) -> Result<(), ShardCommand> {
        self.mailboxes[shard % self.mailboxes.len()].push(cmd)
    }

    pub(crate) fn stop(&self) {
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for (i, t) in threads.into_iter().enumerate() {
            if !t.is_finished() {
                while self.mailboxes[i].push(ShardCommand::Stop).is_err() {
                    std::thread::yield_now();
                }
            }
            let _ = t.join();
        }
        let awake = match self.awake.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for (i, t) in awake.into_iter().enumerate() {
            self.mailboxes[i].awake_stop.store(true, Ordering::SeqCst);
            sys::eventfd_wake(self.mailboxes[i].awake.as_raw_fd());
            let _ = t.join();
        }
    }
}

/// `busy_poll_other_cores = "auto"`: runs the start-up probe between the first two shards'
/// cores and logs what it found. Off when they share a core, when there is no core to pin to,
/// or when the probe fails (its error is logged).
fn auto_keep_awake(
    role: &str,
    a: Option<core_affinity::CoreId>,
    b: Option<core_affinity::CoreId>,
) -> AwakeMode {
    keep_awake_by_probe(role, a, b, awake_probe::measure)
}

/// `auto_keep_awake` with the probe passed in (tests give it fixed answers).
fn keep_awake_by_probe(
    role: &str,
    a: Option<core_affinity::CoreId>,
    b: Option<core_affinity::CoreId>,
    measure: impl FnOnce(usize, usize) -> Result<awake_probe::AwakeProbe, String>,
) -> AwakeMode {
    let (Some(a), Some(b)) = (a, b) else {
        info!(
            role,
            "no keep-awake threads (busy_poll_other_cores = auto): shards are not pinned"
        );
        return AwakeMode::Off;
    };
    if a.id == b.id {
        info!(
            role,
            "no keep-awake threads (busy_poll_other_cores = auto): the shards share CPU {}", a.id
        );
        return AwakeMode::Off;
    }
    match measure(a.id, b.id) {
        Ok(p) => {
            let mode = if p.helps() {
                AwakeMode::Spin
            } else if p.local_pays() {
                AwakeMode::Occupy
            } else {
                AwakeMode::Off
            };
            info!(
                role,
                idle_us = p.idle.as_secs_f64() * 1e6,
                spinning_us = p.spinning.as_secs_f64() * 1e6,
                local_us = p.local.as_secs_f64() * 1e6,
                "keep-awake threads {} (busy_poll_other_cores = auto): a wake-up round trip from CPU {} to CPU {} took {:.1} µs with CPU {} idle and {:.1} µs with a SCHED_IDLE spinner on it, {:.1} µs on CPU {} alone",
                mode.describe(),
                a.id,
                b.id,
                p.idle.as_secs_f64() * 1e6,
                b.id,
                p.spinning.as_secs_f64() * 1e6,
                p.local.as_secs_f64() * 1e6,
                a.id,
            );
            mode
        }
        Err(e) => {
            info!(
                role,
                "no keep-awake threads (busy_poll_other_cores = auto): the probe failed: {e}"
            );
            AwakeMode::Off
        }
    }
}

/// What the keep-awake threads do, resolved from `busy_poll_other_cores` at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AwakeMode {
    /// None run.
    Off,
    /// While a shard busy-polls for light traffic, they spin as `SCHED_IDLE` on the other
    /// shards' cores, so those do not halt and count as idle when a woken thread is placed.
    Spin,
    /// Shards do not busy-poll; while one serves light traffic (and for `OCCUPY_WINDOW` after
    /// its last completion) they spin at nice 19 on the other shards' cores. A core running a
    /// normal-class thread is not idle to the scheduler, so a thread woken by a shard's send
    /// (a synchronous socket wake-up) stays on that shard's core, where the hand-off costs a
    /// context switch instead of a cross-core wake-up; and nice 19 gives the core to any real
    /// work there (weight 15 against 1,024, and a `sched_yield` every turn).
    Occupy,
}

impl AwakeMode {
    fn describe(self) -> &'static str {
        match self {
            AwakeMode::Off => "off",
            AwakeMode::Spin => "on (SCHED_IDLE spinners)",
            AwakeMode::Occupy => "on (occupying the other cores at nice 19)",
        }
    }
}

/// How long after a light shard's last completion the other cores stay occupied
/// (`AwakeMode::Occupy`). Longer than a request/response round trip through a tunnel on one
/// host (~70-90 µs) with room for a client's think time.
const OCCUPY_WINDOW: Duration = Duration::from_millis(1);

/// The keep-awake thread of shard `index`'s core (`busy_poll_other_cores`). With
/// `AwakeMode::Spin` it runs as `SCHED_IDLE`, so it gets the core only when nothing else wants
/// it, and the scheduler counts the core as idle when it places a woken thread; with
/// `AwakeMode::Occupy` it runs at nice 19, so the core does not count as idle (see
/// `AwakeMode`). It sleeps on its eventfd; kicked by another shard that starts a busy poll (or,
/// occupying, a light-traffic window), it spins (`sched_yield`) until no other shard's window
/// lies ahead.
/// So while one shard polls for a light stream, the other cores of the process do not halt: the
/// threads that stream wakes (the load generator, the backend, the other end of a loopback
/// session) are woken on a core that is running, not on a halted vCPU (~30 µs on the VM the
/// results were measured on). A shard's own busy poll outranks it on its core.
fn keep_core_awake(
    index: usize,
    mode: AwakeMode,
    mailboxes: &[Mailbox],
    clock: PollClock,
    stats: &ShardStats,
) {
    let lowered = if mode == AwakeMode::Occupy {
        sys::set_thread_nice(19).map_err(|e| format!("nice 19: {e}"))
    } else {
        sys::set_idle_class(true).map_err(|e| format!("SCHED_IDLE: {e}"))
    };
    if let Err(e) = lowered {
        // Without its low priority the spin would compete with real work: do not run.
        warn!(
            shard = index,
            "keep-awake thread not started ({e}): other cores may halt during light traffic"
        );
        return;
    }
    let me = &mailboxes[index];
    let others_poll_until = || {
        mailboxes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, mb)| mb.poll_until.0.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    };
    loop {
        if let Err(e) = sys::eventfd_read_blocking(me.awake.as_raw_fd()) {
            warn!(shard = index, "keep-awake thread stopped: {e}");
            return;
        }
        me.awake_kicked.store(false, Ordering::SeqCst);
        if me.awake_stop.load(Ordering::SeqCst) {
            return;
        }
        let mut counted = false;
        while me.light.load(Ordering::Relaxed) && clock.ns(clock::now()) < others_poll_until() {
            if !counted {
                stats.awake_spells.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            std::thread::yield_now();
        }
    }
}

struct Context {
    index: usize,
    mailboxes: Arc<Vec<Mailbox>>,
    poll_clock: PollClock,
    stats: Arc<ShardStats>,
    board: Arc<RouteBoard>,
    cfg: UringConfig,
    /// What the keep-awake threads do (`busy_poll_other_cores`, resolved at start).
    awake: AwakeMode,
    flags: SetupFlags,
}

// ----- slots -------------------------------------------------------------------------------

#[derive(Debug)]
struct Listener {
    sock: std::net::TcpListener,
    /// Slot in the ring's registered-file table, if it got one.
    fixed: Option<u32>,
    service: Arc<str>,
    armed: bool,
    closing: bool,
}

/// A payload being spliced from a stream's pipe into the session socket, after its header.
#[derive(Debug)]
struct SpliceOut {
    stream: Key,
    /// Position in the session's `out` after which the payload goes (the header's end).
    after: usize,
    /// Payload bytes still to splice.
    left: usize,
}

struct SessionSlot {
    sock: TcpStream,
    /// Slot in the ring's registered-file table, if it got one. Ring ops on the session
    /// socket use it; the synchronous reads, sends and splices use the fd.
    fixed: Option<u32>,
    tls: Option<Box<rustls::Connection>>,
    /// The TLS records once warren seals and opens them itself (then `tls` is None).
    records: Option<Box<Tls13Records>>,
    core: Session,
    id: u64,
    peer_name: Arc<str>,
    role: SessionRole,
    done: Option<tokio::sync::oneshot::Sender<SessionEnd>>,
    /// Plaintext received and not yet decoded (a partial frame at most, between turns).
    input: BytesMut,
    /// Encoded bytes for the socket; `out[out_sent..]` is not yet written.
    out: Vec<u8>,
    out_sent: usize,
    /// Frames produced by the core before TLS encryption (TLS sessions only).
    plain: Vec<u8>,
    /// The close_notify record is in `out` (own records only).
    close_sealed: bool,
    splice: Option<SpliceOut>,
    /// Spliced streams whose pipes hold bytes, in turn order.
    splice_ready: VecDeque<Key>,
    streams: HashMap<StreamId, Key>,
    recv_armed: bool,
    send_inflight: bool,
    poll_inflight: bool,
    inflight: u32,
    /// Set once the session is over: why (None = clean) and until when it may flush.
    ending: Option<(Option<String>, Instant)>,
    /// Nothing more may be written (the socket failed).
    write_failed: bool,
    published: Published,
    /// Whether the socket can carry spliced payloads (plain TCP).
    can_splice: bool,
    /// Receive by readiness + reads + splice instead of multishot recv. Plain-TCP sessions
    /// switch to it when a large DATA payload arrives and back after `RX_QUIET_SWITCH` reads
    /// without one; small frames are cheaper through multishot recv (no syscall per read).
    rx_splice_mode: bool,
    /// The last DATA frame was spliced: read the next header alone (12 bytes), so a large
    /// payload goes straight from the socket into the pipe instead of its first 16 KiB being
    /// copied into `input` and written into the pipe. Cleared by the first frame that is not
    /// a large DATA frame (small frames are read 16 KiB at a time again).
    rx_expect_large: bool,
    /// Leaving multishot recv for splice mode: the cancel is on its way; the switch happens at
    /// the recv's last completion, so no byte is read by both.
    rx_switching: bool,
    /// Splice-mode reads in a row that found the socket drained without splicing anything.
    rx_quiet: u32,
    /// The receive-side operation armed while `recv_armed` (what a cancel must target).
    rx_op: Op,
    /// The socket may have bytes (a readiness completion arrived and we have not seen EAGAIN).
    rx_ready: bool,
    /// The readiness poll reported the peer's FIN or a hang-up: short reads no longer prove
    /// the socket drained; read until EOF.
    rx_hup: bool,
    /// A received payload being spliced from the socket into a stream's pipe.
    rx_splice: Option<RxSplice>,
}

impl SessionSlot {
    /// Appends what the core has to send to `out`: frames as they are (plain TCP) or as TLS
    /// records, with close_notify after the last frame of a clean end.
    fn produce(&mut self) {
        if self.tls.is_none() && self.records.is_none() {
            self.core.poll_transmit(&mut self.out, TRANSMIT_CHUNK);
            return;
        }
        // TLS: frames into `plain`, then into records in `out`.
        self.plain.clear();
        self.core.poll_transmit(&mut self.plain, TRANSMIT_CHUNK);
        let clean_end = self.ending.as_ref().is_some_and(|e| e.0.is_none());
        let close = clean_end && !self.core.has_transmit();
        let sealed = if let Some(records) = self.records.as_mut() {
            // Sealed straight into `out` (one copy, in cache).
            records.seal(&self.plain, &mut self.out).and_then(|()| {
                if close && !self.close_sealed {
                    self.close_sealed = true;
                    records.seal_close_notify(&mut self.out)?;
                }
                Ok(())
            })
        } else if let Some(tls) = self.tls.as_mut() {
            let r = if self.plain.is_empty() {
                Ok(())
            } else {
                tls.writer()
                    .write_all(&self.plain)
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))
            };
            if close {
                tls.send_close_notify();
            }
            while tls.wants_write() {
                if tls.write_tls(&mut self.out).is_err() {
                    break;
                }
            }
            r
        } else {
            Ok(())
        };
        if let Err(e) = sealed {
            self.core.handle_connection_lost(&e.to_string());
        }
        if self.plain.capacity() > 4 * TRANSMIT_CHUNK {
            self.plain = Vec::new();
        }
    }
}

/// A DATA payload on its way from the session socket into a stream's receive pipe.
#[derive(Debug)]
struct RxSplice {
    stream: Key,
    /// Payload bytes still in the socket.
    left: usize,
    /// The pipe filled up by slots before the payload was in: the rest is read into memory.
    copying: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Connecting,
    Open,
}

struct StreamSlot {
    sock: TcpStream,
    session: Key,
    id: StreamId,
    end: LocalEnd,
    state: StreamState,
    /// Address and timeout an in-flight connect points at.
    connect_addr: Option<Box<SockAddr>>,
    connect_timeout: Option<Box<types::Timespec>>,
    /// Service addresses not tried yet (a host name that resolved to several), next last,
    /// and the connect timeout of each try.
    dial_rest: Vec<SocketAddr>,
    dial_timeout: Duration,
    /// The last connect failed and `dial_rest` has another address: dial it once the failed
    /// connect and its timeout have both completed.
    redial: bool,
    service: Arc<str>,
    recv_armed: bool,
    /// The multishot receive ran out of buffers; re-arm when some come back.
    starved: bool,
    send_inflight: bool,
    poll_armed: bool,
    inflight: u32,
    /// Bytes being written to the local socket (the send in flight points into it).
    sending: Option<Bytes>,
    /// Bytes read from the local socket beyond the credit the core accepted (copied out of
    /// the buffer ring so a stalled stream never pins ring buffers).
    held: VecDeque<Bytes>,
    held_bytes: usize,
    /// Some of `held` still points into the buffer ring.
    held_on_ring: bool,
    /// A cancel for the multishot receive is on its way.
    recv_cancelling: bool,
    /// The local peer closed its sending side.
    read_eof: bool,
    /// We told the core (FIN queued).
    fin_queued: bool,
    /// The core's FIN reached us and the local socket's write side is shut.
    write_done: bool,
    /// Splice mode: a pipe from the shard's pool and the bytes it holds.
    pipe: Option<Pipe>,
    pipe_bytes: usize,
    splice_mode: bool,
    /// The stream may splice (plain-TCP session, pipes configured). It starts copying through
    /// multishot recv and switches to splice mode when a receive fills a whole buffer.
    splice_ok: bool,
    /// Switching to splice mode: the multishot recv is being cancelled; the switch happens at
    /// its last completion, so no byte is read by both.
    to_splice: bool,
    /// Splice mode, small-message phase: each readiness first reads up to `SMALL_READ` bytes
    /// into memory; only a read that fills them switches the stream to splicing (bulk phase),
    /// and a splice into an empty pipe that moves less than `SMALL_READ` switches it back.
    small_reads: bool,
    /// Splice mode: the local socket may have bytes (set by each readiness completion, cleared
    /// when a read finds it drained), so a stream served for the other direction does not pay
    /// for an EAGAIN read.
    readable: bool,
    /// The readiness poll reported the peer's FIN (POLLRDHUP) or a hang-up: a short read no
    /// longer proves the socket drained (the FIN may wait behind the data), so reads go on
    /// until they return 0 or fail.
    hup_seen: bool,
    in_splice_ready: bool,
    /// Set when the stream is being torn down: reset (abortive close) or clean.
    closing: Option<bool>,
    /// Receive side of splice: payload bytes spliced from the session, waiting for the local
    /// socket, then bytes that had to be read into memory (pipe full), in that order.
    rx_pipe: Option<Pipe>,
    rx_pipe_bytes: usize,
    rx_overflow: VecDeque<Bytes>,
    /// `sending` holds externally accounted bytes (from `rx_overflow`).
    sending_external: bool,
    /// Waiting for the local socket to take more (splice returned EAGAIN).
    pollout_armed: bool,
}

impl StreamSlot {
    /// Received payload bytes of this stream that have arrived and wait here for the local
    /// socket: the pipe's contents, memory overflow and an unfinished external send. The core
    /// uses it to tell a slow local consumer from a window that is too small.
    fn rx_backlog(&self) -> u32 {
        let overflow: usize = self.rx_overflow.iter().map(Bytes::len).sum();
        let sending = if self.sending_external {
            self.sending.as_ref().map_or(0, Bytes::len)
        } else {
            0
        };
        u32::try_from(self.rx_pipe_bytes + overflow + sending).unwrap_or(u32::MAX)
    }
}

// ----- the shard ---------------------------------------------------------------------------

struct Shard {
    index: usize,
    ring: IoUring,
    bufs: BufRing,
    stats: Arc<ShardStats>,
    board: Arc<RouteBoard>,
    mailboxes: Arc<Vec<Mailbox>>,
    cfg: UringConfig,
    mailbox_buf: Box<u64>,
    mailbox_armed: bool,
    listeners: Slab<Listener>,
    sessions: Slab<SessionSlot>,
    streams: Slab<StreamSlot>,
    pipes: Vec<Pipe>,
    /// What the kernel granted the shard's first pipe (made at start): `pipe_size` capped by
    /// `fs.pipe-max-size` or per-user pipe limits. Sessions' window tuning uses it.
    pipe_capacity: usize,
    pipes_out: usize,
    rr: usize,
    /// Host-name `local_addr`s as the control plane last resolved them
    /// ([`ShardCommand::ServiceAddr`]); a dial never calls the blocking resolver.
    service_addrs: HashMap<Arc<str>, Result<Arc<[SocketAddr]>, String>>,
    /// `route_visitor`'s candidate sessions, kept so routing a visitor allocates nothing.
    route_scratch: Vec<Key>,
    draining: bool,
    stopping: bool,
    dirty_sessions: Vec<Key>,
    dirty_streams: Vec<Key>,
    /// Streams and sessions whose multishot receive ended with ENOBUFS, re-armed when buffers
    /// come back. Two lists: keys of different slabs can be equal.
    starved: Vec<Key>,
    starved_sessions: Vec<Key>,
    listeners_need_arm: Vec<Key>,
    /// Diagnostics: when the last state dump was logged (`WARREN_DUMP_SHARDS` set), else None.
    last_dump: Option<Instant>,
    /// How long the loop keeps polling the ring after the last completion before it sleeps
    /// (`busy_poll_us`); zero sleeps at once.
    busy_poll: Duration,
    /// When the last completion other than a mailbox wake arrived (drives `busy_poll`).
    last_io: Instant,
    /// Publish this shard's busy polls and kick the other cores' keep-awake threads: the
    /// shard set runs them (`Context::awake`, never with one shard).
    publish_polls: bool,
    /// `AwakeMode::Occupy`: no busy poll of its own; light traffic keeps the other cores
    /// occupied instead.
    occupy: bool,
    /// Time base of `Mailbox::poll_until`.
    poll_clock: PollClock,
    /// Free slots of the registered-file table (empty when the kernel refused the table).
    fixed_free: Vec<u32>,
    /// Payload bytes per ms: no busy poll during bulk traffic (see `bulk`).
    bulk: BulkMeter,
    /// Completions the last non-empty turn handled (no busy poll under load).
    last_batch: usize,
    /// When the last stream was opened (no busy poll under connection churn).
    last_open: Instant,
    /// Busy polls run as `SCHED_IDLE` (`busy_poll_sched_idle`, and the switch back works).
    sched_idle: bool,
    /// This thread is `SCHED_IDLE` now (only from a busy poll until it sleeps or gets load).
    in_idle_class: bool,
    /// No `SCHED_IDLE` poll before this: the core was found taken by other work.
    idle_blocked_until: Instant,
    /// The back-off that set `idle_blocked_until`.
    idle_backoff: Duration,
    /// When a `SCHED_IDLE` poll next goes back to `SCHED_OTHER` for one look at the core.
    idle_probe_due: Instant,
}

impl Shard {
    fn new(ctx: Context) -> io::Result<Shard> {
        let ring = super::build_ring(ctx.flags, RING_ENTRIES)?;
        // One pipe made at start tells what capacity the kernel grants; it waits in the pool.
        let pipes: Vec<Pipe> = if ctx.cfg.pipe_pool > 0 {
            Pipe::new(ctx.cfg.pipe_size).into_iter().collect()
        } else {
            Vec::new()
        };
        let pipe_capacity = pipes.first().map_or(ctx.cfg.pipe_size, |p| p.capacity);
        if pipe_capacity < ctx.cfg.pipe_size && ctx.index == 0 {
            let max = sys::pipe_max_size().map_or("unknown".into(), |m| m.to_string());
            warn!(
                "pipe_size_bytes = {} was refused: splice pipes hold {pipe_capacity} bytes \
                 (fs.pipe-max-size is {max}; raise it with sysctl, or run with \
                 CAP_SYS_RESOURCE)",
                ctx.cfg.pipe_size
            );
        }
        let busy_poll = ctx.cfg.busy_poll;
        let publish_polls = ctx.awake != AwakeMode::Off;
        let occupy = ctx.awake == AwakeMode::Occupy;
        let sched_idle = ctx.cfg.busy_poll_sched_idle && !busy_poll.is_zero();
        // A sparse registered-file table for the long-lived sockets. Without it (old kernel,
        // RLIMIT_NOFILE below the table size) every op uses plain fds.
        let fixed_free = match ring.submitter().register_files_sparse(FIXED_FILES) {
            Ok(()) => (0..FIXED_FILES).rev().collect(),
            Err(e) => {
                debug!(
                    shard = ctx.index,
                    "no registered-file table ({e}): ops use plain fds"
                );
                Vec::new()
            }
        };
        let count = ctx.cfg.buffer_count.clamp(16, 32768).next_power_of_two() as u16;
        let bufs = BufRing::new(
            &ring.submitter(),
            0,
            count,
            ctx.cfg.shards.read_buffer.max(4096),
        )?;
        Ok(Shard {
            index: ctx.index,
            ring,
            bufs,
            stats: ctx.stats,
            board: ctx.board,
            mailboxes: ctx.mailboxes,
            cfg: ctx.cfg,
            mailbox_buf: Box::new(0),
            mailbox_armed: false,
            listeners: Slab::new(),
            sessions: Slab::new(),
            streams: Slab::new(),
            pipes,
            pipe_capacity,
            pipes_out: 0,
            rr: 0,
            service_addrs: HashMap::new(),
            route_scratch: Vec::new(),
            draining: false,
            stopping: false,
            dirty_sessions: Vec::new(),
            dirty_streams: Vec::new(),
            starved: Vec::new(),
            starved_sessions: Vec::new(),
            listeners_need_arm: Vec::new(),
            last_dump: std::env::var_os("WARREN_DUMP_SHARDS").map(|_| clock::now()),
            busy_poll,
            last_io: clock::now(),
            publish_polls,
            occupy,
            poll_clock: ctx.poll_clock,
            fixed_free,
            bulk: BulkMeter::new(clock::now()),
            last_batch: 0,
            // No stream yet: as if the last one opened a churn window ago.
            last_open: {
                let now = clock::now();
                now.checked_sub(CHURN_QUIET).unwrap_or(now)
            },
            sched_idle,
            in_idle_class: false,
            idle_blocked_until: clock::now(),
            idle_backoff: Duration::ZERO,
            idle_probe_due: clock::now(),
        })
    }

    /// Pushes one submission, flushing the queue to the kernel when it is full.
    fn push(&mut self, e: &squeue::Entry) {
        loop {
            // SAFETY: every entry built in this file points only at memory owned by a slot (or
            // the shard) that stays alive, at a fixed address, until the entry's completion
            // arrives; see the module docs and the `inflight` counters.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                if err.raw_os_error() != Some(libc::EBUSY) {
                    warn!(shard = self.index, "io_uring submit failed: {err}");
                }
            }
        }
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_mailbox();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            self.drain_mailbox();
            if self.stopping {
                return Ok(());
            }
            self.serve();
            let now = clock::now();
            let deadline = self.next_deadline();
            let mut has_ready = !self.ring.completion().is_empty();
            self.bulk.note(now, sys::take_moved());
            // Poll only while traffic is light: no bulk in the last bulk::QUIET, few completions
            // in the last turn, no stream opened in the last CHURN_QUIET, few streams. Under
            // load a sleeping shard wakes to a batch of completions and coalesces their frames
            // into fewer session sends; polling would take them one by one.
            let light = light_traffic(
                self.bulk.is_quiet(now),
                self.last_batch,
                self.streams.len(),
                now.saturating_duration_since(self.last_open),
            );
            let few_streams = self.streams.len() <= BUSY_POLL_MAX_STREAMS;
            let mb = &self.mailboxes[self.index];
            // Only this thread stores it, so the load is what it last stored.
            if self.publish_polls && mb.light.load(Ordering::Relaxed) != few_streams {
                mb.light.store(few_streams, Ordering::Relaxed);
            }
            if self.occupy {
                // No poll of its own: the other cores stay occupied while this shard's traffic
                // is light, so what its sends wake runs on this core.
                let until = self.last_io + OCCUPY_WINDOW;
                if !has_ready && light && now < until {
                    self.publish_poll(now, until);
                }
            } else if !has_ready && light && !self.busy_poll.is_zero() {
                let until = self.last_io + self.busy_poll;
                if self.publish_polls && now < until {
                    self.publish_poll(now, until);
                }
                let until = deadline.map_or(until, |d| d.min(until));
                if now < until {
                    self.idle_class_enter();
                    has_ready = self.busy_wait(until);
                }
            }
            // Never sleep, nor carry load, as SCHED_IDLE: a wake-up would then not preempt
            // other work on the core, and load would wait behind it.
            if self.in_idle_class && (!has_ready || !light) {
                self.idle_class_leave();
            }
            let res = if has_ready {
                self.ring.submit()
            } else if let Some(d) = deadline {
                let wait = d.saturating_duration_since(now);
                let ts = types::Timespec::from(wait.max(Duration::from_micros(1)));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            } else {
                self.ring.submit_and_wait(1)
            };
            match res {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if !cqes.is_empty() {
                self.last_batch = cqes.len();
                // A mailbox wake alone (a command from the control plane or another shard) is
                // not traffic, so it does not start a busy poll.
                if cqes
                    .iter()
                    .any(|c| !matches!(decode(c.0), Some((Op::Mailbox, _))))
                {
                    self.last_io = clock::now();
                }
            }
            for &(ud, res, flags) in &cqes {
                self.complete(ud, res, flags);
            }
            self.fire_timers();
        }
    }

    /// Puts `fd` into a free slot of the registered-file table; None when the table is full
    /// or absent (the caller then uses the fd).
    fn fixed_register(&mut self, fd: i32) -> Option<u32> {
        let slot = self.fixed_free.pop()?;
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => {
                self.stats.registered_files.fetch_add(1, Ordering::Relaxed);
                Some(slot)
            }
            Err(e) => {
                debug!(
                    shard = self.index,
                    "registering a file failed ({e}): using its fd"
                );
                self.fixed_free.push(slot);
                None
            }
        }
    }

    /// Empties a slot of the registered-file table. Call it before the socket closes: the
    /// table holds a reference, so the connection would otherwise stay open.
    fn fixed_release(&mut self, slot: Option<u32>) {
        let Some(slot) = slot else { return };
        match self.ring.submitter().register_files_update(slot, &[-1]) {
            Ok(_) => {
                self.stats.registered_files.fetch_sub(1, Ordering::Relaxed);
                self.fixed_free.push(slot);
            }
            // The slot keeps its file until the ring goes; never hand it out again.
            Err(e) => warn!(shard = self.index, "unregistering a file failed: {e}"),
        }
    }

    /// Polls the ring without sleeping until a completion is ready or `until` passes; returns
    /// whether one is ready. Submits what is queued first. Between looks it yields the core, so
    /// another thread pinned to it (the other end of a loopback session, a backend) still runs.
    /// Publishes that this shard polls until `until` for its own traffic. When it starts
    /// polling after a quiet spell, it kicks the keep-awake threads of the other cores (one
    /// eventfd write each, once per spell), which then spin while it polls.
    fn publish_poll(&mut self, now: Instant, until: Instant) {
        let ns = self.poll_clock.ns(until);
        let mailboxes = &self.mailboxes;
        let mine = &mailboxes[self.index].poll_until.0;
        // Only this thread stores it, so the load is what it last published.
        let published = mine.load(Ordering::Relaxed);
        // Store at most every quarter window: the line is read by the other cores.
        let window = if self.occupy {
            OCCUPY_WINDOW
        } else {
            self.busy_poll
        };
        let step = u64::try_from(window.as_nanos() / 4).unwrap_or(u64::MAX);
        if ns < published.saturating_add(step) {
            return;
        }
        let lapsed = published <= self.poll_clock.ns(now);
        mine.store(ns, Ordering::Relaxed);
        if lapsed {
            for (i, mb) in mailboxes.iter().enumerate() {
                if i != self.index
                    && mb.light.load(Ordering::Relaxed)
                    && !mb.awake_kicked.swap(true, Ordering::SeqCst)
                {
                    sys::eventfd_wake(mb.awake.as_raw_fd());
                }
            }
        }
    }

    /// Before a busy poll (`busy_poll_sched_idle`): becomes `SCHED_IDLE` unless the core was
    /// recently found taken. As `SCHED_IDLE` the shard's core counts as idle when the scheduler
    /// places a thread its sends wake (the visitor's program, the service, the other end of a
    /// loopback session), so that thread runs here, preempting the poll at once, instead of on
    /// another core: a wake-up across cores cost ~30 µs on the VM the results were measured on
    /// (perf/results/2026-12-02-6cae71d-sched-idle-poll/). Every `IDLE_PROBE_EVERY` it first
    /// looks at the core as `SCHED_OTHER`: one `sched_yield`, and if that gave the core away
    /// for `CORE_TAKEN` or more, another thread has work here and it backs off.
    fn idle_class_enter(&mut self) {
        if !self.sched_idle {
            return;
        }
        let now = clock::now();
        if now < self.idle_blocked_until {
            return;
        }
        if self.in_idle_class {
            if now < self.idle_probe_due {
                return;
            }
            self.idle_class_leave();
        }
        std::thread::yield_now();
        let after = clock::now();
        if after.saturating_duration_since(now) >= CORE_TAKEN {
            self.idle_class_backoff(after);
            return;
        }
        match sys::set_idle_class(true) {
            Ok(()) => {
                self.in_idle_class = true;
                self.idle_probe_due = after + IDLE_PROBE_EVERY;
                self.stats.idle_class_polls.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(
                    shard = self.index,
                    "busy polls stay SCHED_OTHER: sched_setscheduler(SCHED_IDLE) failed: {e}"
                );
                self.sched_idle = false;
            }
        }
    }

    /// Back to `SCHED_OTHER` (before sleeping, under load, or to look at the core).
    fn idle_class_leave(&mut self) {
        if !self.in_idle_class {
            return;
        }
        self.in_idle_class = false;
        if let Err(e) = sys::set_idle_class(false) {
            // The start-up probe said this works; if it stops working, stop switching.
            warn!(
                shard = self.index,
                "cannot leave SCHED_IDLE ({e}): this shard thread stays SCHED_IDLE"
            );
            self.sched_idle = false;
        }
    }

    /// The core was found taken by other work: poll as `SCHED_OTHER` for a back-off that
    /// doubles while this keeps happening.
    fn idle_class_backoff(&mut self, now: Instant) {
        self.idle_class_leave();
        if now < self.idle_blocked_until {
            // Still backing off (a SCHED_OTHER poll saw it again): extend, same length.
            self.idle_blocked_until = now + self.idle_backoff;
            return;
        }
        self.idle_backoff = if self.idle_backoff.is_zero()
            || now.saturating_duration_since(self.idle_blocked_until) > IDLE_BACKOFF_MAX
        {
            IDLE_BACKOFF_MIN
        } else {
            (self.idle_backoff * 2).min(IDLE_BACKOFF_MAX)
        };
        self.idle_blocked_until = now + self.idle_backoff;
        self.stats
            .idle_class_backoffs
            .fetch_add(1, Ordering::Relaxed);
        debug!(
            shard = self.index,
            backoff_s = self.idle_backoff.as_secs(),
            "core taken by other work during a busy poll: polling as SCHED_OTHER for a while"
        );
    }

    fn busy_wait(&mut self, until: Instant) -> bool {
        if let Err(e) = self.ring.submit() {
            if !matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINTR)) {
                return false;
            }
        }
        let mut spins: u32 = 0;
        let mut last_look = clock::now();
        loop {
            if !self.ring.completion().is_empty() {
                return true;
            }
            spins = spins.wrapping_add(1);
            // Deferred task work (DEFER_TASKRUN) runs only inside io_uring_enter: enter when the
            // kernel flags some, and every 8th look in case the flag is not offered.
            if self.ring.submission().taskrun() || spins % 8 == 0 {
                // SAFETY: GETEVENTS with min_complete 0 and no argument: runs pending task
                // work and returns at once; submits nothing (the queue was flushed above).
                let _ = unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        0,
                        0,
                        IORING_ENTER_GETEVENTS,
                        None,
                    )
                };
                self.ring.completion().sync();
                if !self.ring.completion().is_empty() {
                    return true;
                }
            }
            let now = clock::now();
            if self.sched_idle && now.saturating_duration_since(last_look) >= CORE_TAKEN {
                self.idle_class_backoff(now);
            }
            last_look = now;
            if now >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    // ----- mailbox -------------------------------------------------------------------------

    fn arm_mailbox(&mut self) {
        let fd = self.mailboxes[self.index].wake.as_raw_fd();
        let buf: *mut u64 = &mut *self.mailbox_buf;
        let e = opcode::Read::new(types::Fd(fd), buf.cast(), 8)
            .build()
            .user_data(user_data(Op::Mailbox, Key { index: 0, gen: 0 }));
        self.push(&e);
        self.mailbox_armed = true;
    }

    fn drain_mailbox(&mut self) {
        let mailboxes = self.mailboxes.clone();
        let mb = &mailboxes[self.index];
        mb.woken.store(false, Ordering::SeqCst);
        while let Some(cmd) = mb.queue.pop() {
            self.handle_command(cmd);
            if self.stopping {
                return;
            }
        }
    }

    fn handle_command(&mut self, cmd: ShardCommand) {
        match cmd {
            ShardCommand::Session(h) => self.add_session(*h),
            ShardCommand::Listener { service, listener } => {
                if let Err(e) = listener.set_nonblocking(true) {
                    warn!(shard = self.index, %service, "cannot use listener: {e}");
                    return;
                }
                let fixed = self.fixed_register(listener.as_raw_fd());
                let k = self.listeners.insert(Listener {
                    sock: listener,
                    fixed,
                    service,
                    armed: false,
                    closing: false,
                });
                self.arm_accept(k);
            }
            ShardCommand::Visitor {
                service,
                sock,
                peer,
            } => self.route_visitor(service, sock, peer, false),
            ShardCommand::ServiceAddr { addr, resolved } => {
                self.service_addrs.insert(addr, resolved);
            }
            ShardCommand::Drain { reason } => {
                self.draining = true;
                for k in self.listeners.keys() {
                    self.close_listener(k);
                }
                for k in self.sessions.keys() {
                    if let Some(s) = self.sessions.get(k) {
                        s.core.go_away(GoAwayCode::NoError, &reason);
                        self.dirty_sessions.push(k);
                    }
                }
            }
            ShardCommand::Stop => self.stopping = true,
        }
    }

    // ----- listeners -----------------------------------------------------------------------

    fn arm_accept(&mut self, k: Key) {
        let Some(l) = self.listeners.get(k) else {
            return;
        };
        if l.armed || l.closing {
            return;
        }
        l.armed = true;
        let fd = l.sock.as_raw_fd();
        let e = target!(l.fixed, fd, |t| opcode::AcceptMulti::new(t)
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build())
        .user_data(user_data(Op::Accept, k));
        self.push(&e);
    }

    fn close_listener(&mut self, k: Key) {
        let Some(l) = self.listeners.get(k) else {
            return;
        };
        l.closing = true;
        if l.armed {
            let e = opcode::AsyncCancel::new(user_data(Op::Accept, k))
                .build()
                .user_data(user_data(Op::Cancel, k));
            self.push(&e);
        } else if let Some(l) = self.listeners.remove(k) {
            self.fixed_release(l.fixed);
        }
    }

    fn on_accept(&mut self, k: Key, res: i32, more: bool) {
        let Some(l) = self.listeners.get(k) else {
            if res >= 0 {
                // SAFETY: a fresh fd from accept that nobody else owns.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            return;
        };
        if !more {
            l.armed = false;
        }
        let closing = l.closing;
        let service = l.service.clone();
        if res >= 0 {
            // SAFETY: a fresh fd from accept that nobody else owns.
            let sock = unsafe { TcpStream::from_raw_fd(res) };
            if closing || self.draining {
                return;
            }
            self.stats.visitors_accepted.fetch_add(1, Ordering::Relaxed);
            let peer = sock
                .peer_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            self.route_visitor(service, sock, peer, true);
        } else if res != -libc::ECANCELED {
            let e = io::Error::from_raw_os_error(-res);
            warn!(shard = self.index, %service, "accept failed: {e}");
        }
        if closing && !more {
            if let Some(l) = self.listeners.remove(k) {
                self.fixed_release(l.fixed);
            }
        } else if !more && !closing {
            // EMFILE and friends end the multishot; re-arm on the next turn rather than spin.
            self.listeners_need_arm.push(k);
        }
    }

    /// Reads what a new visitor has already sent, before its first session flush: a visitor
    /// that speaks first (HTTP, a TLS hello) has usually sent its request by the time the
    /// accept completes, and its bytes then leave in the same session send as the OPEN frame:
    /// one session send and one wake of the client fewer per connection. Nothing there
    /// (EAGAIN; SSH-like protocols where the service speaks first) costs one syscall; the
    /// multishot receive armed next takes everything after.
    fn first_read(&mut self, k: Key) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        let mut buf = [0u8; FIRST_READ];
        // SAFETY: recv into a stack buffer of its length, on a socket the slot owns.
        let n = unsafe {
            libc::recv(
                st.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            n if n > 0 => {
                let n = n as usize;
                st.held.push_back(Bytes::copy_from_slice(&buf[..n]));
                st.held_bytes += n;
            }
            0 => st.read_eof = true,
            // EAGAIN, or an error the receive armed next reports.
            _ => {}
        }
    }

    /// Serves a visitor through a session on this shard, or hands it to a shard that has one.
    fn route_visitor(
        &mut self,
        service: Arc<str>,
        sock: TcpStream,
        peer: SocketAddr,
        may_hand_off: bool,
    ) {
        // A scratch list kept across visitors: no allocation per connection.
        let mut candidates = std::mem::take(&mut self.route_scratch);
        candidates.clear();
        candidates.extend(self.sessions.iter_mut().filter_map(|(k, s)| {
            (s.ending.is_none()
                && matches!(&s.role, SessionRole::Server { services } if services.iter().any(|x| **x == *service)))
            .then_some(k)
        }));
        let start = self.rr;
        self.rr = self.rr.wrapping_add(1);
        let n = candidates.len();
        let mut opened = None;
        for i in 0..n {
            let sk = candidates[(start + i) % n];
            let Some(s) = self.sessions.get(sk) else {
                continue;
            };
            match s.core.open_stream(&service, Some(peer)) {
                Ok(id) => {
                    opened = Some((sk, id, s.can_splice));
                    break;
                }
                Err(e) => debug!(session = s.id, %service, "cannot open stream: {e}"),
            }
        }
        self.route_scratch = candidates;
        if let Some((sk, id, splice)) = opened {
            let st = self.new_stream(
                sk,
                id,
                sock,
                LocalEnd::Visitor,
                service,
                StreamState::Open,
                splice,
            );
            if let Some(s) = self.sessions.get(sk) {
                s.streams.insert(id, st);
            }
            self.first_read(st);
            self.dirty_sessions.push(sk);
            self.dirty_streams.push(st);
            return;
        }
        if may_hand_off {
            if let Some(other) = self.board.find_other(&service, self.index) {
                let cmd = ShardCommand::Visitor {
                    service: service.clone(),
                    sock,
                    peer,
                };
                if self.mailboxes[other].push(cmd).is_ok() {
                    return;
                }
                warn!(shard = self.index, %service, "shard {other} queue full; visitor {peer} dropped");
                self.stats.visitors_unrouted.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.stats.visitors_unrouted.fetch_add(1, Ordering::Relaxed);
        info!(%service, %peer, "visitor refused: no client is connected for this service");
    }

    // ----- sessions ------------------------------------------------------------------------

    fn add_session(&mut self, h: SessionHandoff) {
        let parts = h.parts;
        if let Err(e) = parts.sock.set_nonblocking(true) {
            warn!(
                session = h.session_id,
                "cannot register session socket: {e}"
            );
            if let Some(done) = h.done {
                let _ = done.send(SessionEnd {
                    error: Some(e.to_string()),
                });
            }
            return;
        }
        let _ = parts.sock.set_nodelay(true);
        let can_splice = parts.tls.is_none() && parts.records.is_none() && self.cfg.pipe_pool > 0;
        let config = spliced_session_config(h.config, can_splice, self.pipe_capacity);
        let fixed = self.fixed_register(parts.sock.as_raw_fd());
        let slot = SessionSlot {
            sock: parts.sock,
            fixed,
            tls: parts.tls,
            records: parts.records,
            core: Session::new(config, clock::now()),
            id: h.session_id,
            peer_name: h.peer_name,
            role: h.role,
            done: h.done,
            input: parts.leftover,
            out: Vec::with_capacity(TRANSMIT_CHUNK + 64 * 1024),
            out_sent: 0,
            plain: Vec::new(),
            close_sealed: false,
            splice: None,
            splice_ready: VecDeque::new(),
            streams: HashMap::new(),
            recv_armed: false,
            send_inflight: false,
            poll_inflight: false,
            inflight: 0,
            ending: None,
            write_failed: false,
            published: Published::default(),
            can_splice,
            rx_splice_mode: false,
            rx_expect_large: false,
            rx_switching: false,
            rx_quiet: 0,
            rx_op: Op::SessionRecv,
            rx_ready: true,
            rx_hup: false,
            rx_splice: None,
        };
        if let SessionRole::Server { services } = &slot.role {
            for s in services {
                self.board.add(s, self.index);
            }
        }
        let tls = match (&slot.tls, &slot.records) {
            (Some(_), _) => "rustls",
            (None, Some(_)) => "own-records",
            (None, None) => "none",
        };
        let k = self.sessions.insert(slot);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.sessions.get(k) {
            info!(shard = self.index, session = s.id, peer = %s.peer_name, tls, registered_fd = s.fixed.is_some(), backend = "uring", "session running");
            if self.draining {
                s.core.go_away(GoAwayCode::NoError, "shutting down");
            }
        }
        self.arm_session_recv(k);
        self.dirty_sessions.push(k);
    }

    fn arm_session_recv(&mut self, k: Key) {
        let bgid = self.bufs.bgid();
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        if s.recv_armed || s.ending.is_some() {
            return;
        }
        s.recv_armed = true;
        s.inflight += 1;
        s.rx_op = if s.rx_splice_mode {
            Op::SessionPollIn
        } else {
            Op::SessionRecv
        };
        let fd = s.sock.as_raw_fd();
        let e = if s.rx_splice_mode {
            target!(s.fixed, fd, |t| opcode::PollAdd::new(
                t,
                (libc::POLLIN | libc::POLLRDHUP) as u32
            )
            .multi(true)
            .build())
            .user_data(user_data(Op::SessionPollIn, k))
        } else {
            target!(s.fixed, fd, |t| opcode::RecvMulti::new(t, bgid).build())
                .user_data(user_data(Op::SessionRecv, k))
        };
        self.push(&e);
    }

    fn on_session_pollin(&mut self, k: Key, res: i32, flags: u32) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        if !cqueue::more(flags) {
            s.recv_armed = false;
            s.inflight -= 1;
        }
        if s.ending.is_some() {
            self.dirty_sessions.push(k);
            return;
        }
        if res < 0 && res != -libc::ECANCELED {
            s.core.handle_connection_lost(&format!(
                "session socket: {}",
                io::Error::from_raw_os_error(-res)
            ));
        } else {
            s.rx_ready = true;
            if res > 0 && (res as i16 & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR)) != 0 {
                s.rx_hup = true;
            }
        }
        self.dirty_sessions.push(k);
        // Re-arm when the poll ended on its own, or was cancelled to go back to multishot recv.
        if !cqueue::more(flags) && (res >= 0 || res == -libc::ECANCELED) {
            self.arm_session_recv(k);
        }
    }

    /// Splice-receive mode: reads the session socket in small pieces, feeds complete frames to
    /// the core, and splices a large DATA payload straight into its stream's pipe.
    fn session_read(&mut self, k: Key) {
        let now = clock::now();
        let mut budget = RX_BUDGET;
        // A read that returned less than asked found the socket drained: process what came in,
        // then stop without another (EAGAIN) read; the readiness poll reports new bytes.
        let mut drained = false;
        // Whether this turn moved a large payload (spliced or being spliced).
        let mut active = false;
        loop {
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            if !s.rx_ready || s.ending.is_some() || s.core.is_closed() {
                return;
            }
            if budget == 0 {
                self.dirty_sessions.push(k);
                return;
            }
            let fd = s.sock.as_raw_fd();
            // 1. A payload on its way into a pipe.
            if let Some(rx) = s.rx_splice.as_mut() {
                let (sk, left, copying) = (rx.stream, rx.left, rx.copying);
                let Some(st) = self.streams.get(sk) else {
                    let s = self.sessions.get(k).expect("checked above");
                    s.core
                        .handle_connection_lost("internal: a receiving stream vanished mid-frame");
                    return;
                };
                let r = if copying {
                    // Never past this payload: the next frame's bytes belong to `input`.
                    let want = short_io::cap(left.min(RX_READ * 4));
                    let mut buf = BytesMut::with_capacity(want);
                    // SAFETY: reads at most `want` bytes into the spare capacity of `buf`
                    // (at least `want` long), then sets the length to what the kernel wrote.
                    let n = unsafe {
                        libc::recv(fd, buf.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT)
                    };
                    if n > 0 {
                        // SAFETY: the kernel initialised `n` bytes.
                        unsafe { buf.set_len(n as usize) };
                        st.rx_overflow.push_back(buf.freeze());
                        Ok(n as usize)
                    } else if n == 0 {
                        Ok(0)
                    } else {
                        Err(io::Error::last_os_error())
                    }
                } else {
                    let pipe = st.rx_pipe.as_ref().expect("a receiving stream has a pipe");
                    match sys::splice(fd, pipe.write.as_raw_fd(), short_io::cap(left)) {
                        Ok(n) => {
                            st.rx_pipe_bytes += n;
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                };
                let s = self.sessions.get(k).expect("checked above");
                match r {
                    Ok(0) => {
                        s.core.handle_connection_lost(&format!(
                            "the peer closed the connection inside a DATA frame ({left} bytes missing)"
                        ));
                        return;
                    }
                    Ok(n) => {
                        active = true;
                        budget = budget.saturating_sub(n);
                        let rx = s.rx_splice.as_mut().expect("checked above");
                        rx.left -= n;
                        if rx.left == 0 {
                            s.rx_splice = None;
                            self.dirty_streams.push(sk);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Socket empty, or the pipe is full by slots (small segments): ask the
                        // socket. With bytes waiting, read the rest into memory instead.
                        let mut avail: libc::c_int = 0;
                        // SAFETY: FIONREAD writes one int.
                        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) };
                        if r == 0 && avail > 0 && !copying {
                            if let Some(rx) = s.rx_splice.as_mut() {
                                rx.copying = true;
                            }
                            continue;
                        }
                        s.rx_ready = false;
                        return;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        s.core
                            .handle_connection_lost(&format!("reading the session socket: {e}"));
                        return;
                    }
                }
                continue;
            }
            // 2. Complete frames in `input`; a large DATA frame whose payload is still mostly
            //    in the socket goes to its stream's pipe.
            if !s.input.is_empty() {
                let _ = s.core.handle_input(now, &mut s.input);
                if s.core.is_closed() {
                    return;
                }
                if let Some((id, len)) = s.core.peek_data(&s.input) {
                    let have = s.input.len() - warren_proto::frame::HEADER_LEN;
                    let rest = (len as usize).saturating_sub(have);
                    // A frame behind bytes the core still holds for the stream (a frame that
                    // was copied: its rest was small, it came before splice mode, or the pipe
                    // was full): those bytes go into the pipe first, so one copied frame does
                    // not make every later one wait behind it and be copied too.
                    let held = if rest < RX_SPLICE_MIN {
                        None
                    } else if s.core.stream_can_take_external(id, len) {
                        Some(0)
                    } else {
                        s.core.stream_buffered_before_external(id, len)
                    };
                    if let (Some(held), Some(sk)) = (held, s.streams.get(&id).copied()) {
                        if self.rx_pipe_ready(sk, held as usize + len as usize)
                            && (held == 0 || self.rx_pipe_take_core(k, sk, id))
                        {
                            active = true;
                            self.start_rx_splice(k, sk, now);
                            if let Some(s) = self.sessions.get(k) {
                                s.rx_expect_large = true;
                            }
                            continue;
                        }
                    }
                }
                let Some(s) = self.sessions.get(k) else {
                    return;
                };
                if s.input.len() >= warren_proto::frame::HEADER_LEN {
                    // A header that did not start a splice: small frames again.
                    s.rx_expect_large = false;
                }
            }
            // 3. Read more.
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            if drained && s.rx_splice.is_none() {
                s.rx_ready = false;
                self.rx_quiet_tick(k, active);
                return;
            }
            let want = match s.core.peek_data(&s.input) {
                // The rest of a DATA frame that is being copied: exactly that, so the next
                // frame starts a fresh read.
                Some((_, len)) => {
                    let have = s.input.len() - warren_proto::frame::HEADER_LEN;
                    (len as usize).saturating_sub(have).clamp(1, RX_READ * 4)
                }
                None if s.rx_expect_large && s.input.len() < warren_proto::frame::HEADER_LEN => {
                    warren_proto::frame::HEADER_LEN - s.input.len()
                }
                None => RX_READ,
            };
            s.input.reserve(want);
            let spare = s.input.spare_capacity_mut();
            let want = short_io::cap(want.min(spare.len()));
            // SAFETY: reads into the spare capacity of `input`, then sets the length to what
            // the kernel wrote.
            let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
            if n > 0 {
                let len = s.input.len() + n as usize;
                // SAFETY: the kernel initialised `n` more bytes.
                unsafe { s.input.set_len(len) };
                budget = budget.saturating_sub(n as usize);
                // (Unless the peer's FIN was reported: it may wait behind these bytes.)
                drained = (n as usize) < want && !s.rx_hup;
            } else if n == 0 {
                s.core
                    .handle_connection_lost(&warren_compat::transport::peer_closed(s.input.len()));
                return;
            } else {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        s.rx_ready = false;
                        self.rx_quiet_tick(k, active);
                        return;
                    }
                    io::ErrorKind::Interrupted => {}
                    _ => {
                        s.core
                            .handle_connection_lost(&format!("reading the session socket: {e}"));
                        return;
                    }
                }
            }
        }
    }

    /// Splice-receive mode found the socket drained. After `RX_QUIET_SWITCH` such turns in a row
    /// without a large payload, the session goes back to multishot recv (cheaper for small
    /// frames: no read syscall); the poll is cancelled and its last completion arms the recv.
    fn rx_quiet_tick(&mut self, k: Key, active: bool) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        if active {
            s.rx_quiet = 0;
            return;
        }
        s.rx_quiet += 1;
        if s.rx_quiet < RX_QUIET_SWITCH || s.rx_splice.is_some() || s.ending.is_some() {
            return;
        }
        s.rx_quiet = 0;
        s.rx_splice_mode = false;
        if !s.recv_armed {
            self.arm_session_recv(k);
        } else if s.rx_op == Op::SessionPollIn {
            let e = opcode::AsyncCancel::new(user_data(Op::SessionPollIn, k))
                .build()
                .user_data(user_data(Op::Cancel, k));
            self.push(&e);
        }
    }

    /// A pipe for a stream: a pooled one, or a new one while fewer than `pipe_pool` are out.
    /// New pipes ask for the capacity the shard's first pipe was granted, so a size over
    /// `fs.pipe-max-size` is not asked for (and refused) again per pipe.
    fn pipe_from_pool(&mut self) -> Option<Pipe> {
        let p = match self.pipes.pop() {
            Some(p) => p,
            None if self.pipes_out < self.cfg.pipe_pool => Pipe::new(self.pipe_capacity).ok()?,
            None => return None,
        };
        self.pipes_out += 1;
        Some(p)
    }

    /// Gives stream `sk` a receive pipe with room for a `len`-byte payload, if it can have one.
    fn rx_pipe_ready(&mut self, sk: Key, len: usize) -> bool {
        let Some(st) = self.streams.get(sk) else {
            return false;
        };
        if st.closing.is_some() || !st.rx_overflow.is_empty() || st.sending_external {
            return false;
        }
        if st.rx_pipe.is_none() {
            let Some(p) = self.pipe_from_pool() else {
                return false;
            };
            let st = self.streams.get(sk).expect("checked above");
            st.rx_pipe = Some(p);
        }
        let st = self.streams.get(sk).expect("checked above");
        let cap = st.rx_pipe.as_ref().map_or(0, |p| p.capacity);
        cap.saturating_sub(st.rx_pipe_bytes) >= len
    }

    /// Moves the bytes the core holds for stream `sk` (`id` on session `k`) into its receive
    /// pipe, behind what the pipe holds (`rx_pipe_ready` checked the room by bytes and that
    /// nothing waits in memory). True when all of them went in; when the pipe ran out of slots,
    /// the rest waits in memory, in order, and the next payload cannot be spliced behind it.
    fn rx_pipe_take_core(&mut self, k: Key, sk: Key, id: StreamId) -> bool {
        let Some(s) = self.sessions.get(k) else {
            return false;
        };
        let chunks = s.core.stream_take_buffered(id);
        let Some(st) = self.streams.get(sk) else {
            return false;
        };
        let pipe = st.rx_pipe.as_ref().expect("rx_pipe_ready gave it one");
        let mut all_in = true;
        for chunk in chunks {
            // After a short write every later chunk waits in memory too, in order.
            let off = if all_in { pipe.write_some(&chunk) } else { 0 };
            st.rx_pipe_bytes += off;
            if off < chunk.len() {
                all_in = false;
                st.rx_overflow.push_back(chunk.freeze().slice(off..));
            }
        }
        self.dirty_streams.push(sk);
        all_in
    }

    fn start_rx_splice(&mut self, k: Key, sk: Key, now: Instant) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        let (_, len, head) = match s.core.take_external_data(now, &mut s.input) {
            Ok(x) => x,
            Err(e) => {
                s.core.handle_connection_lost(&e.to_string());
                return;
            }
        };
        let left = len as usize - head.len();
        if left > 0 {
            s.rx_splice = Some(RxSplice {
                stream: sk,
                left,
                copying: false,
            });
        }
        let Some(st) = self.streams.get(sk) else {
            return;
        };
        if !head.is_empty() {
            // The bytes that came with the header go into the pipe first, by copy.
            // The pipe had room for the whole payload by bytes; by slots it may not: the
            // rest waits in memory, in order.
            let pipe = st.rx_pipe.as_ref().expect("rx_pipe_ready gave it one");
            let off = pipe.write_some(&head);
            st.rx_pipe_bytes += off;
            if off < head.len() {
                st.rx_overflow.push_back(head.slice(off..));
                if let Some(s) = self.sessions.get(k) {
                    if let Some(rx) = s.rx_splice.as_mut() {
                        rx.copying = true;
                    }
                }
            }
        }
        self.dirty_streams.push(sk);
    }

    /// The ring buffer a receive completion filled, if it carried data.
    fn take_buffer(&mut self, res: i32, flags: u32) -> Option<Bytes> {
        if res <= 0 {
            return None;
        }
        sys::note_moved(res as usize);
        cqueue::buffer_select(flags).map(|bid| self.bufs.take(bid, res as usize))
    }

    fn on_session_recv(&mut self, k: Key, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let mut cancel_recv = false;
        let data = self.take_buffer(res, flags);
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        if !more {
            s.recv_armed = false;
            s.inflight -= 1;
        }
        if s.ending.is_some() {
            return;
        }
        let now = clock::now();
        if let Some(data) = data {
            let fed = match (s.tls.as_mut(), s.records.as_mut()) {
                (Some(tls), _) => feed_tls(tls, &data, &mut s.input),
                (None, Some(records)) => records.open(&data, &mut s.input),
                (None, None) => {
                    s.input.extend_from_slice(&data);
                    Ok(())
                }
            };
            drop(data);
            if let Err(e) = fed {
                s.core
                    .handle_connection_lost(&format!("TLS error from the peer: {e}"));
            } else if !s.input.is_empty() {
                let _ = s.core.handle_input(now, &mut s.input);
                // A large payload still mostly in the socket: splice it (and what follows)
                // instead of copying. Stop the multishot recv first.
                if s.can_splice && !s.rx_switching && s.tls.is_none() && !s.core.is_closed() {
                    if let Some((id, len)) = s.core.peek_data(&s.input) {
                        let have = s.input.len() - warren_proto::frame::HEADER_LEN;
                        let rest = (len as usize).saturating_sub(have);
                        if rest >= RX_SPLICE_MIN
                            && (s.core.stream_can_take_external(id, len)
                                || s.core.stream_buffered_before_external(id, len).is_some())
                        {
                            s.rx_switching = true;
                            cancel_recv = more;
                        }
                    }
                }
            }
        } else if res == 0 {
            s.core
                .handle_connection_lost(&warren_compat::transport::peer_closed(s.input.len()));
        } else if res == -libc::ENOBUFS {
            // The shard ran out of receive buffers; re-armed once some come back (or now, in
            // splice mode, which needs none).
            if !s.rx_switching {
                self.starved_sessions.push(k);
            }
        } else if res < 0 && res != -libc::ECANCELED {
            let e = io::Error::from_raw_os_error(-res);
            s.core
                .handle_connection_lost(&format!("reading the session socket: {e}"));
        }
        self.dirty_sessions.push(k);
        if cancel_recv {
            let e = opcode::AsyncCancel::new(user_data(Op::SessionRecv, k))
                .build()
                .user_data(user_data(Op::Cancel, k));
            self.push(&e);
        }
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        if !more && s.rx_switching {
            // The multishot recv is over: from here the socket is read by readiness + reads.
            s.rx_switching = false;
            if !s.core.is_closed() && (res >= 0 || res == -libc::ECANCELED || res == -libc::ENOBUFS)
            {
                s.rx_splice_mode = true;
                s.rx_ready = true;
                s.rx_quiet = 0;
                self.arm_session_recv(k);
            }
            return;
        }
        if !more && res != -libc::ENOBUFS && res > 0 {
            // Multishot ended for another reason (e.g. the kernel's retry cap): re-arm.
            self.arm_session_recv(k);
        }
    }

    /// Produces output and starts the next send if none is in flight.
    fn session_transmit(&mut self, k: Key) {
        let mut frames = 0;
        loop {
            frames += 1;
            if frames > 64 {
                // Let the rest of the shard run; carry on next round.
                self.dirty_sessions.push(k);
                return;
            }
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            if s.send_inflight || s.poll_inflight || s.write_failed {
                return;
            }
            // 1. Unsent bytes before a pending splice (or with none): send them.
            let end = s.splice.as_ref().map_or(s.out.len(), |sp| sp.after);
            if s.out_sent < end {
                let more = s.splice.is_some();
                let fd = s.sock.as_raw_fd();
                if more {
                    // A spliced frame's header: write it now, in this thread, so the payload
                    // follows without a round trip through the ring. Only what the socket
                    // does not take goes through the ring.
                    // SAFETY: sends from a live slice of `out`; plain syscall.
                    let r = unsafe {
                        libc::send(
                            fd,
                            s.out[s.out_sent..end].as_ptr().cast(),
                            short_io::cap(end - s.out_sent),
                            libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    if r > 0 {
                        s.out_sent += r as usize;
                        continue;
                    }
                }
                let ptr = s.out[s.out_sent..].as_ptr();
                let len = short_io::cap(end - s.out_sent) as u32;
                s.send_inflight = true;
                s.inflight += 1;
                let mut flags = libc::MSG_NOSIGNAL;
                if more {
                    flags |= libc::MSG_MORE;
                }
                let e = target!(s.fixed, fd, |t| opcode::Send::new(t, ptr, len)
                    .flags(flags)
                    .build())
                .user_data(user_data(Op::SessionSend, k));
                self.push(&e);
                return;
            }
            // 2. Header written: splice the payload.
            if s.splice.is_some() {
                match self.splice_out(k) {
                    SpliceStep::Done => {}
                    SpliceStep::Wait | SpliceStep::Failed => return,
                }
            }
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            // 3. Everything written: produce more.
            s.out.clear();
            s.out_sent = 0;
            if s.out.capacity() > 4 * TRANSMIT_CHUNK {
                s.out = Vec::with_capacity(TRANSMIT_CHUNK + 64 * 1024);
            }
            s.produce();
            // 4. A spliced stream's turn, when there is room in this send.
            if s.can_splice && s.out.len() < TRANSMIT_CHUNK && s.ending.is_none() {
                self.start_splice_frame(k);
            }
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            if s.out.is_empty() && s.splice.is_none() {
                return;
            }
        }
    }

    fn on_session_send(&mut self, k: Key, res: i32) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        s.send_inflight = false;
        s.inflight -= 1;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            s.write_failed = true;
            s.core
                .handle_connection_lost(&format!("writing to the session socket: {e}"));
        } else if res == 0 {
            s.write_failed = true;
            s.core
                .handle_connection_lost("writing to the session socket: wrote zero bytes");
        } else {
            s.out_sent += res as usize;
        }
        self.dirty_sessions.push(k);
    }

    fn on_session_pollout(&mut self, k: Key, res: i32) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        s.poll_inflight = false;
        s.inflight -= 1;
        if res < 0 && res != -libc::ECANCELED {
            s.write_failed = true;
            s.core.handle_connection_lost(&format!(
                "session socket: {}",
                io::Error::from_raw_os_error(-res)
            ));
        }
        self.dirty_sessions.push(k);
    }

    /// Picks the next spliced stream with bytes and credit and appends its frame header.
    fn start_splice_frame(&mut self, k: Key) {
        let max_chunk = self.cfg.pipe_size.max(64 * 1024) as u32;
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        let turns = s.splice_ready.len();
        for _ in 0..turns {
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            let Some(sk) = s.splice_ready.pop_front() else {
                return;
            };
            let Some(st) = self.streams.get(sk) else {
                continue;
            };
            st.in_splice_ready = false;
            if st.pipe_bytes == 0 || st.closing.is_some() {
                continue;
            }
            let id = st.id;
            let avail = st.pipe_bytes.min(max_chunk as usize) as u32;
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            match s.core.stream_send_external(id, avail) {
                Some((header, n)) => {
                    s.out.extend_from_slice(&header);
                    s.splice = Some(SpliceOut {
                        stream: sk,
                        after: s.out.len(),
                        left: n as usize,
                    });
                    return;
                }
                None => {
                    // No credit: the stream is served again on StreamWritable.
                    self.dirty_streams.push(sk);
                }
            }
        }
    }

    /// Moves the pending spliced payload from its pipe into the session socket.
    fn splice_out(&mut self, k: Key) -> SpliceStep {
        let Some(s) = self.sessions.get(k) else {
            return SpliceStep::Failed;
        };
        let Some(sp) = s.splice.as_mut() else {
            return SpliceStep::Done;
        };
        let sock_fd = s.sock.as_raw_fd();
        let sk = sp.stream;
        let mut left = sp.left;
        let st = self.streams.get(sk);
        let Some(st) = st else {
            // The stream vanished with its pipe: the frame cannot be completed.
            let s = self.sessions.get(k).expect("checked above");
            s.write_failed = true;
            s.core
                .handle_connection_lost("internal: a spliced stream vanished mid-frame");
            return SpliceStep::Failed;
        };
        let Some(pipe) = st.pipe.as_ref() else {
            let s = self.sessions.get(k).expect("checked above");
            s.write_failed = true;
            s.core
                .handle_connection_lost("internal: a spliced stream lost its pipe mid-frame");
            return SpliceStep::Failed;
        };
        let pipe_fd = pipe.read.as_raw_fd();
        let mut result = SpliceStep::Done;
        let mut error = None;
        while left > 0 {
            match sys::splice(pipe_fd, sock_fd, short_io::cap(left)) {
                Ok(0) => {
                    error = Some("internal: the splice pipe ran dry mid-frame".to_string());
                    break;
                }
                Ok(n) => {
                    left -= n;
                    st.pipe_bytes -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    result = SpliceStep::Wait;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(format!("writing to the session socket: {e}"));
                    break;
                }
            }
        }
        let pipe_empty = st.pipe_bytes == 0;
        let s = self.sessions.get(k).expect("checked above");
        if let Some(why) = error {
            s.write_failed = true;
            s.core.handle_connection_lost(&why);
            return SpliceStep::Failed;
        }
        if let Some(sp) = s.splice.as_mut() {
            sp.left = left;
        }
        match result {
            SpliceStep::Wait => {
                s.poll_inflight = true;
                s.inflight += 1;
                let e = target!(s.fixed, sock_fd, |t| opcode::PollAdd::new(
                    t,
                    libc::POLLOUT as u32
                )
                .build())
                .user_data(user_data(Op::SessionPollOut, k));
                self.push(&e);
                SpliceStep::Wait
            }
            _ => {
                s.splice = None;
                // Drop the header and everything before it.
                s.out.clear();
                s.out_sent = 0;
                if !pipe_empty {
                    // More in the pipe: back in line, behind the other spliced streams.
                    s.splice_ready.push_back(sk);
                    if let Some(st) = self.streams.get(sk) {
                        st.in_splice_ready = true;
                    }
                }
                // The stream may splice more, finish, or give its pipe back.
                self.dirty_streams.push(sk);
                SpliceStep::Done
            }
        }
    }

    /// Turns core events into stream work, and ends the session when it is over.
    fn serve_session(&mut self, k: Key) {
        if self
            .sessions
            .get(k)
            .is_some_and(|s| s.rx_splice_mode && s.rx_ready)
        {
            self.session_read(k);
        }
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        // Events first: they may open streams or wake them.
        let mut opened = Vec::new();
        while let Some(ev) = s.core.poll_event() {
            match ev {
                Event::StreamReadable(id)
                | Event::StreamWritable(id)
                | Event::StreamReset { id, .. } => {
                    if let Some(st) = s.streams.get(&id) {
                        self.dirty_streams.push(*st);
                    }
                }
                Event::StreamOpened {
                    id,
                    service,
                    visitor,
                } => opened.push((id, service, visitor)),
                Event::GoAway { code, reason } => {
                    info!(session = s.id, peer = %s.peer_name, "peer sent GOAWAY ({code}): {reason}");
                }
            }
        }
        for (id, service, visitor) in opened {
            self.open_service_stream(k, id, service, visitor);
        }

        if self.sessions.get(k).is_some_and(|s| s.ending.is_none()) {
            self.session_transmit(k);
        }
        self.publish(k);
        self.check_session_end(k);
    }

    fn publish(&mut self, k: Key) {
        let stats = self.stats.clone();
        if let Some(s) = self.sessions.get(k) {
            s.published.update(&stats, s.core.stats());
        }
    }

    fn check_session_end(&mut self, k: Key) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        let now = clock::now();
        if s.ending.is_none() {
            let over = if let Some(e) = s.core.error() {
                Some(Some(e.to_string()))
            } else if s.core.is_drained()
                && s.out_sent >= s.out.len()
                && s.splice.is_none()
                && !s.core.has_transmit()
            {
                Some(None)
            } else {
                None
            };
            let Some(why) = over else {
                return;
            };
            s.ending = Some((why, now + CLOSE_FLUSH));
            // Flush what the core still has (GOAWAY, close_notify), then close.
            if !s.write_failed && !s.send_inflight && !s.poll_inflight && s.splice.is_none() {
                s.out.drain(..s.out_sent);
                s.out_sent = 0;
                s.produce();
            }
            if s.recv_armed {
                let e = opcode::AsyncCancel::new(user_data(s.rx_op, k))
                    .build()
                    .user_data(user_data(Op::Cancel, k));
                self.push(&e);
            }
            // Every stream of the session ends with it.
            let Some(s) = self.sessions.get(k) else {
                return;
            };
            if !s.core.is_closed() {
                s.core.handle_connection_lost("session closed");
            }
            let streams: Vec<Key> = s.streams.values().copied().collect();
            for st in streams {
                self.close_stream(st, true, None);
            }
        }
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        let (_, deadline) = s.ending.as_ref().expect("set above");
        let timed_out = now >= *deadline;
        // The session ended while a send was in flight: once that is written, take what the
        // core still has (GOAWAY, close_notify) so the peer learns why.
        if !s.write_failed
            && !timed_out
            && !s.send_inflight
            && !s.poll_inflight
            && s.splice.is_none()
            && s.out_sent >= s.out.len()
            && s.core.has_transmit()
        {
            s.out.clear();
            s.out_sent = 0;
            s.produce();
        }
        // Keep flushing until written, failed or out of time.
        let pending = s.out_sent < s.out.len() && s.splice.is_none();
        if pending && !s.write_failed && !timed_out {
            if !s.send_inflight && !s.poll_inflight {
                let fd = s.sock.as_raw_fd();
                let ptr = s.out[s.out_sent..].as_ptr();
                let len = (s.out.len() - s.out_sent) as u32;
                s.send_inflight = true;
                s.inflight += 1;
                let e = target!(s.fixed, fd, |t| opcode::Send::new(t, ptr, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build())
                .user_data(user_data(Op::SessionSend, k));
                self.push(&e);
            }
            return;
        }
        if s.inflight > 0 {
            if timed_out || s.write_failed {
                let sk = k;
                for op in [
                    Op::SessionSend,
                    Op::SessionPollOut,
                    Op::SessionRecv,
                    Op::SessionPollIn,
                ] {
                    let e = opcode::AsyncCancel::new(user_data(op, sk))
                        .build()
                        .user_data(user_data(Op::Cancel, sk));
                    self.push(&e);
                }
                // Make sure the cancels do not repeat every turn.
                if let Some(s) = self.sessions.get(k) {
                    s.write_failed = true;
                    if let Some(e) = s.ending.as_mut() {
                        e.1 = now + Duration::from_secs(3600);
                    }
                }
            }
            return;
        }
        // Nothing in flight: close.
        let Some(s) = self.sessions.remove(k) else {
            return;
        };
        self.fixed_release(s.fixed);
        let _ = SockRef::from(&s.sock).shutdown(std::net::Shutdown::Both);
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        if let SessionRole::Server { services } = &s.role {
            for svc in services {
                self.board.remove(svc, self.index);
            }
        }
        let final_stats = s.core.stats();
        s.published.retire(&self.stats, final_stats);
        let peer_fault = s.core.error().is_some_and(|e| e.is_peer_fault());
        let role = s.core.config().role;
        let side = match (peer_fault, role) {
            (true, Role::Server) => "client side",
            (true, Role::Client) => "server side",
            (false, _) => "connection",
        };
        let why = s.ending.and_then(|e| e.0);
        match &why {
            None => info!(session = s.id, peer = %s.peer_name, "session closed cleanly"),
            Some(e) => warn!(session = s.id, peer = %s.peer_name, "session ended ({side}): {e}"),
        }
        if let Some(done) = s.done {
            let _ = done.send(SessionEnd { error: why });
        }
        // A closing stream whose pipe was mid-frame waited for this session to let go of it
        // (`finish_close`); nothing else would wake it, and its socket would stay open.
        let held = s.splice.map(|sp| sp.stream).into_iter();
        for st in held.chain(s.rx_splice.map(|r| r.stream)) {
            if self.streams.get(st).is_some_and(|st| st.closing.is_some()) {
                self.finish_close(st);
            }
        }
    }

    fn open_service_stream(
        &mut self,
        k: Key,
        id: StreamId,
        service: String,
        visitor: Option<SocketAddr>,
    ) {
        let Some(s) = self.sessions.get(k) else {
            return;
        };
        let target: Option<LocalService> = match &s.role {
            SessionRole::Client { services } => services.get(&service).cloned(),
            SessionRole::Server { .. } => {
                // Protocol version 1 has no client-initiated streams.
                s.core.stream_reset(id, ResetCode::Refused);
                return;
            }
        };
        let Some(target) = target else {
            warn!(session = s.id, %service, "server opened a stream for a service this client does not offer");
            s.core.stream_reset(id, ResetCode::UnknownService);
            return;
        };
        let sid = s.id;
        let splice = s.can_splice;
        let (addr, rest) = match service_addr(&target.addr, &self.service_addrs) {
            Ok(a) => a,
            Err(e) => {
                warn!(session = sid, %id, %service, addr = %target.addr, "service unavailable (service side): {e}");
                if let Some(s) = self.sessions.get(k) {
                    s.core.stream_reset(id, ResetCode::ServiceUnavailable);
                }
                return;
            }
        };
        let sock = match service_socket(addr, &self.cfg.shards.loopback_cc) {
            Ok(s) => s,
            Err(e) => {
                warn!(session = sid, %id, %service, "cannot create a socket for the service: {e}");
                if let Some(s) = self.sessions.get(k) {
                    s.core.stream_reset(id, ResetCode::Internal);
                }
                return;
            }
        };
        debug!(session = sid, %id, %service, ?visitor, "dialling service");
        let st = self.new_stream(
            k,
            id,
            sock,
            LocalEnd::Service,
            Arc::from(service.as_str()),
            StreamState::Connecting,
            splice,
        );
        if let Some(s) = self.sessions.get(k) {
            s.streams.insert(id, st);
        }
        let Some(slot) = self.streams.get(st) else {
            return;
        };
        slot.dial_rest = rest;
        slot.dial_timeout = target.connect_timeout;
        self.submit_connect(st, addr);
    }

    /// Submits the connect of a service stream's socket to `addr`, linked to its timeout.
    /// The socket must have no operation in flight.
    fn submit_connect(&mut self, st: Key, addr: SocketAddr) {
        let Some(slot) = self.streams.get(st) else {
            return;
        };
        let sa = Box::new(SockAddr::from(addr));
        let (ptr, len) = (sa.as_ptr(), sa.len());
        slot.connect_addr = Some(sa);
        slot.inflight += 2;
        let fd = slot.sock.as_raw_fd();
        let ts = Box::new(types::Timespec::from(slot.dial_timeout));
        let ts_ptr: *const types::Timespec = &*ts;
        slot.connect_timeout = Some(ts);
        let connect = opcode::Connect::new(types::Fd(fd), ptr.cast(), len)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(Op::Connect, st));
        let timeout = opcode::LinkTimeout::new(ts_ptr)
            .build()
            .user_data(user_data(Op::ConnectTimeout, st));
        self.push(&connect);
        self.push(&timeout);
    }

    /// A connect failed and the service has another address: once the failed try is over
    /// (its connect and its timeout both completed), dial the next address on a new socket.
    fn redial_if_ready(&mut self, k: Key) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if !st.redial || st.inflight > 0 || st.closing.is_some() {
            return;
        }
        st.redial = false;
        let Some(addr) = st.dial_rest.pop() else {
            return;
        };
        match service_socket(addr, &self.cfg.shards.loopback_cc) {
            Ok(sock) => {
                let _ = sock.set_nodelay(true);
                // The old socket has nothing in flight: dropping it closes it.
                st.sock = sock;
                self.submit_connect(k, addr);
            }
            Err(e) => {
                let (sk, id, service) = (st.session, st.id, st.service.clone());
                if let Some(s) = self.sessions.get(sk) {
                    warn!(session = s.id, %id, %service, "cannot create a socket for the service: {e}");
                }
                self.close_stream(k, false, Some(ResetCode::ServiceUnavailable));
            }
        }
    }

    // ----- streams -------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn new_stream(
        &mut self,
        session: Key,
        id: StreamId,
        sock: TcpStream,
        end: LocalEnd,
        service: Arc<str>,
        state: StreamState,
        splice: bool,
    ) -> Key {
        // Non-blocking already: accepted with SOCK_NONBLOCK, or created non-blocking for the
        // connect. Accepted sockets inherit TCP_NODELAY from the listener (set on every public
        // listener); a dialled one gets it here. Two syscalls fewer per visitor.
        if end == LocalEnd::Service {
            let _ = sock.set_nodelay(true);
        }
        self.last_open = clock::now();
        self.streams.insert(StreamSlot {
            sock,
            session,
            id,
            end,
            state,
            connect_addr: None,
            connect_timeout: None,
            dial_rest: Vec::new(),
            dial_timeout: Duration::ZERO,
            redial: false,
            service,
            recv_armed: false,
            starved: false,
            send_inflight: false,
            poll_armed: false,
            inflight: 0,
            sending: None,
            held: VecDeque::new(),
            held_bytes: 0,
            held_on_ring: false,
            recv_cancelling: false,
            read_eof: false,
            fin_queued: false,
            write_done: false,
            pipe: None,
            pipe_bytes: 0,
            splice_mode: false,
            splice_ok: splice,
            to_splice: false,
            small_reads: true,
            readable: true,
            hup_seen: false,
            in_splice_ready: false,
            closing: None,
            rx_pipe: None,
            rx_pipe_bytes: 0,
            rx_overflow: VecDeque::new(),
            sending_external: false,
            pollout_armed: false,
        })
    }

    fn on_connect(&mut self, k: Key, res: i32) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        st.inflight -= 1;
        if st.closing.is_some() {
            self.dirty_streams.push(k);
            return;
        }
        if res < 0 {
            let sk = st.session;
            let id = st.id;
            let service = st.service.clone();
            let why = if res == -libc::ECANCELED {
                "no answer within the connect timeout".to_string()
            } else {
                io::Error::from_raw_os_error(-res).to_string()
            };
            if !st.dial_rest.is_empty() {
                // A host name with more addresses (say ::1 and 127.0.0.1): try the next.
                st.redial = true;
                if let Some(s) = self.sessions.get(sk) {
                    debug!(session = s.id, %id, %service, "service address failed ({why}); trying the next");
                }
                self.redial_if_ready(k);
                return;
            }
            if let Some(s) = self.sessions.get(sk) {
                warn!(session = s.id, %id, %service, "service unavailable (service side): {why}");
            }
            self.close_stream(k, false, Some(ResetCode::ServiceUnavailable));
            return;
        }
        st.state = StreamState::Open;
        self.dirty_streams.push(k);
    }

    fn on_stream_recv(&mut self, k: Key, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let data = self.take_buffer(res, flags);
        let full = self.cfg.shards.read_buffer.max(4096);
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if !more {
            st.recv_armed = false;
            st.recv_cancelling = false;
            st.inflight -= 1;
        }
        if st.closing.is_some() {
            self.dirty_streams.push(k);
            return;
        }
        let mut cancel_recv = false;
        match data {
            Some(d) => {
                if d.len() >= full && st.splice_ok && !st.splice_mode && !st.to_splice {
                    // A whole buffer: bulk. Splice from here on (after this recv is over).
                    st.to_splice = true;
                    cancel_recv = more && !st.recv_cancelling;
                    st.recv_cancelling |= cancel_recv;
                }
                st.held_bytes += d.len();
                st.held.push_back(d);
                st.held_on_ring = true;
            }
            None if res == 0 => st.read_eof = true,
            None if res == -libc::ENOBUFS => {
                st.starved = true;
                self.starved.push(k);
            }
            None if res == -libc::ECANCELED => {}
            None => {
                let e = io::Error::from_raw_os_error(-res);
                let code = st.end.error_code();
                debug!(stream = %st.id, "stream reset ({} side): reading: {e}", st.end.name());
                self.close_stream(k, false, Some(code));
                return;
            }
        }
        if !more && st.to_splice {
            // The recv is over: the socket is read by readiness + splice from here on. Bytes
            // already received (`held`) go to the core first, and the core sends spliced
            // payloads only behind them.
            st.to_splice = false;
            st.splice_mode = true;
            st.small_reads = false;
            st.readable = true;
            if st.starved {
                st.starved = false;
                self.starved.retain(|x| *x != k);
            }
        }
        if cancel_recv {
            let e = opcode::AsyncCancel::new(user_data(Op::StreamRecv, k))
                .build()
                .user_data(user_data(Op::Cancel, k));
            self.push(&e);
        }
        self.dirty_streams.push(k);
    }

    fn on_stream_send(&mut self, k: Key, res: i32) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        st.send_inflight = false;
        st.inflight -= 1;
        if st.closing.is_some() {
            st.sending = None;
            self.dirty_streams.push(k);
            return;
        }
        if res <= 0 {
            let e = if res == 0 {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::from_raw_os_error(-res)
            };
            let code = st.end.error_code();
            debug!(stream = %st.id, "stream reset ({} side): writing: {e}", st.end.name());
            st.sending = None;
            self.close_stream(k, false, Some(code));
            return;
        }
        if let Some(b) = st.sending.as_mut() {
            b.advance(res as usize);
            if b.is_empty() {
                st.sending = None;
            }
        }
        if st.sending_external {
            if st.sending.is_none() {
                st.sending_external = false;
            }
            let (sk, id, backlog) = (st.session, st.id, st.rx_backlog());
            if let Some(s) = self.sessions.get(sk) {
                s.core
                    .stream_consumed_external(clock::now(), id, res as u32, backlog);
                self.dirty_sessions.push(sk);
            }
        }
        self.dirty_streams.push(k);
    }

    fn on_stream_pollin(&mut self, k: Key, res: i32, flags: u32) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if !cqueue::more(flags) {
            st.poll_armed = false;
            st.inflight -= 1;
        }
        // Readable, or the poll ended: either way the next serve reads (and re-arms).
        st.readable = true;
        if res > 0 && (res as i16 & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR)) != 0 {
            st.hup_seen = true;
        }
        if res < 0 && res != -libc::ECANCELED && st.closing.is_none() {
            let code = st.end.error_code();
            self.close_stream(k, false, Some(code));
            return;
        }
        self.dirty_streams.push(k);
    }

    /// Moves bytes between one local socket and its stream, within the credit the core allows.
    fn serve_stream(&mut self, k: Key) {
        let now = clock::now();
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.closing.is_some() {
            self.finish_close(k);
            return;
        }
        if st.state == StreamState::Connecting {
            return;
        }
        let sk = st.session;
        let id = st.id;
        let Some(s) = self.sessions.get(sk) else {
            self.close_stream(k, true, None);
            return;
        };
        if !s.core.stream_exists(id) {
            // Reset by the peer or the session: abort the local connection too.
            self.close_stream(k, true, None);
            return;
        }
        let mut session_dirty = false;
        // Session -> local socket.
        let st = self.streams.get(k).expect("checked above");
        let rx_busy = st.send_inflight || st.sending.is_some() || st.pollout_armed || st.write_done;
        if !rx_busy && st.rx_pipe_bytes > 0 {
            // Spliced payload first: pipe -> local socket.
            let pipe = st.rx_pipe.as_ref().expect("bytes imply a pipe");
            match sys::splice(
                pipe.read.as_raw_fd(),
                st.sock.as_raw_fd(),
                short_io::cap(st.rx_pipe_bytes),
            ) {
                Ok(n) => {
                    st.rx_pipe_bytes -= n;
                    let backlog = st.rx_backlog();
                    // More may follow: the rest of the pipe, memory overflow, queued frames.
                    self.dirty_streams.push(k);
                    let s = self.sessions.get(sk).expect("checked above");
                    s.core.stream_consumed_external(now, id, n as u32, backlog);
                    session_dirty = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    st.pollout_armed = true;
                    st.inflight += 1;
                    let e =
                        opcode::PollAdd::new(types::Fd(st.sock.as_raw_fd()), libc::POLLOUT as u32)
                            .build()
                            .user_data(user_data(Op::StreamPollOut, k));
                    self.push(&e);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.dirty_streams.push(k),
                Err(e) => {
                    let code = st.end.error_code();
                    debug!(stream = %id, "stream reset ({} side): writing: {e}", st.end.name());
                    self.close_stream(k, false, Some(code));
                    return;
                }
            }
        } else if !rx_busy && !st.rx_overflow.is_empty() {
            st.sending = st.rx_overflow.pop_front();
            st.sending_external = true;
        } else if !rx_busy {
            // Give an empty receive pipe back unless a payload is still on its way into it.
            let receiving = self
                .sessions
                .get(sk)
                .is_some_and(|s| s.rx_splice.as_ref().is_some_and(|r| r.stream == k));
            let st = self.streams.get(k).expect("checked above");
            if !receiving && st.rx_pipe.is_some() && st.rx_pipe_bytes == 0 {
                if let Some(p) = st.rx_pipe.take() {
                    self.pipes_out -= 1;
                    self.pipes.push(p);
                }
            }
            let s = self.sessions.get(sk).expect("checked above");
            match s.core.stream_read(now, id, WRITE_CHUNK) {
                Readable::Data(b) => {
                    let st = self.streams.get(k).expect("checked above");
                    st.sending = Some(b);
                }
                Readable::Fin => {
                    let st = self.streams.get(k).expect("checked above");
                    st.write_done = true;
                    // Half-close. When this side's read already ended (FIN queued), the stream
                    // closes below and close() sends the FIN: one syscall fewer per connection.
                    if !st.fin_queued {
                        let _ = SockRef::from(&st.sock).shutdown(std::net::Shutdown::Write);
                    }
                }
                Readable::Pending => {}
                Readable::Gone => {
                    self.close_stream(k, true, None);
                    return;
                }
            }
            session_dirty = true;
        }
        let st = self.streams.get(k).expect("checked above");
        if !st.send_inflight {
            if let Some(b) = st.sending.as_ref() {
                let e = opcode::Send::new(
                    types::Fd(st.sock.as_raw_fd()),
                    b.as_ptr(),
                    short_io::cap(b.len()) as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data(Op::StreamSend, k));
                st.send_inflight = true;
                st.inflight += 1;
                self.push(&e);
            }
        }
        // Local socket -> session.
        let st = self.streams.get(k).expect("checked above");
        if !st.fin_queued {
            let s = self.sessions.get(sk).expect("checked above");
            let mut cap = s.core.stream_send_capacity(id);
            let st = self.streams.get(k).expect("checked above");
            while cap > 0 {
                let Some(mut b) = st.held.pop_front() else {
                    break;
                };
                let part = if b.len() > cap {
                    let head = b.split_to(cap);
                    // Copy the rest off the ring: a stalled stream must not pin its buffers.
                    st.held.push_front(Bytes::copy_from_slice(&b));
                    head
                } else {
                    b
                };
                st.held_bytes -= part.len();
                cap -= part.len();
                let s = self.sessions.get(sk).expect("checked above");
                if let Err(e) = s.core.stream_write(id, part) {
                    self.close_stream(k, false, Some(ResetCode::Internal));
                    debug!(%id, "stream write refused: {e}");
                    return;
                }
                session_dirty = true;
            }
            if cap == 0 {
                // Registers interest: the core signals StreamWritable when credit returns.
                let s = self.sessions.get(sk).expect("checked above");
                cap = s.core.stream_send_capacity(id);
            }
            let st = self.streams.get(k).expect("checked above");
            if cap == 0 && st.held_on_ring {
                // Over credit: keep what arrived, but off the ring, so a stalled stream never
                // pins the shard's receive buffers.
                for b in st.held.iter_mut() {
                    *b = Bytes::copy_from_slice(b);
                }
                st.held_on_ring = false;
            }
            let st = self.streams.get(k).expect("checked above");
            if st.splice_mode && st.readable && st.held.is_empty() && !st.read_eof {
                self.splice_in(k, cap);
            }
            self.queue_splice(k);
            let st = self.streams.get(k).expect("checked above");
            if st.held.is_empty() && st.read_eof && st.pipe_bytes == 0 && !st.fin_queued {
                st.fin_queued = true;
                let s = self.sessions.get(sk).expect("checked above");
                let _ = s.core.stream_finish(id);
                session_dirty = true;
            }
            let st = self.streams.get(k).expect("checked above");
            let want_recv = !st.splice_mode
                && !st.to_splice
                && cap > 0
                && !st.read_eof
                && !st.recv_armed
                && !st.starved
                && st.held.is_empty();
            if want_recv {
                self.arm_stream_recv(k, cap);
            }
            let st = self.streams.get(k).expect("checked above");
            if cap == 0 && st.recv_armed && !st.recv_cancelling {
                st.recv_cancelling = true;
                // Out of credit: stop receiving until credit returns (StreamWritable).
                let e = opcode::AsyncCancel::new(user_data(Op::StreamRecv, k))
                    .build()
                    .user_data(user_data(Op::Cancel, k));
                self.push(&e);
            }
        }
        if session_dirty {
            self.dirty_sessions.push(sk);
        }
        // Both directions done: the stream completed.
        let st = self.streams.get(k).expect("checked above");
        if st.fin_queued && st.write_done && st.sending.is_none() && !st.send_inflight {
            self.close_stream(k, false, None);
        }
    }

    /// Arms a receive on the local socket. With room for several buffers it is a multishot
    /// receive (one submission, a completion per buffer); with less credit than that it is a
    /// single receive of at most `cap` bytes, so the stream never reads far past its credit.
    /// Either way the kernel picks the buffer only when data arrives.
    fn arm_stream_recv(&mut self, k: Key, cap: usize) {
        let bgid = self.bufs.bgid();
        let buf = self.cfg.shards.read_buffer.max(4096);
        let Some(st) = self.streams.get(k) else {
            return;
        };
        st.recv_armed = true;
        st.inflight += 1;
        let fd = types::Fd(st.sock.as_raw_fd());
        let e = if cap >= 2 * buf {
            opcode::RecvMulti::new(fd, bgid).build()
        } else {
            opcode::Recv::new(fd, std::ptr::null_mut(), short_io::cap(cap.min(buf)) as u32)
                .buf_group(bgid)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        };
        self.push(&e.user_data(user_data(Op::StreamRecv, k)));
    }

    /// Splice mode: moves what the local socket has (within credit) into the stream's pipe.
    /// In the small-message phase a read into memory comes first (see `small_reads`).
    fn splice_in(&mut self, k: Key, cap: usize) {
        let mut credit = {
            let Some(st) = self.streams.get(k) else {
                return;
            };
            let (sk, id) = (st.session, st.id);
            let Some(s) = self.sessions.get(sk) else {
                return;
            };
            s.core.stream_send_credit(id) as usize
        };
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.small_reads && st.pipe_bytes == 0 {
            match self.small_read(k, cap) {
                // Filled: more is likely waiting; splice it (bulk phase).
                Some(n) => credit = credit.saturating_sub(n),
                None => return,
            }
        }
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.pipe.is_none() {
            let pipe = self.pipe_from_pool();
            let st = self.streams.get(k).expect("checked above");
            match pipe {
                Some(p) => st.pipe = Some(p),
                None => {
                    // Pool empty: this stream copies instead, for the rest of its life.
                    st.splice_mode = false;
                    st.splice_ok = false;
                    if st.poll_armed {
                        let e = opcode::AsyncCancel::new(user_data(Op::StreamPollIn, k))
                            .build()
                            .user_data(user_data(Op::Cancel, k));
                        self.push(&e);
                    }
                    self.dirty_streams.push(k);
                    return;
                }
            }
        }
        let st = self.streams.get(k).expect("checked above");
        let pipe = st.pipe.as_ref().expect("set above");
        let room = pipe
            .capacity
            .saturating_sub(st.pipe_bytes)
            .min(credit.saturating_sub(st.pipe_bytes));
        if room == 0 {
            // Pipe full (the session drains it and serves us again) or no credit left beyond
            // what is queued: ask the core to report StreamWritable when there is.
            let (sk, id) = (st.session, st.id);
            if let Some(s) = self.sessions.get(sk) {
                let _ = s.core.stream_send_capacity(id);
            }
            self.release_pipe(k);
            return;
        }
        let mut eof = false;
        let mut failed = None;
        let st = self.streams.get(k).expect("checked above");
        let pipe = st.pipe.as_ref().expect("set above");
        let r = sys::splice(
            st.sock.as_raw_fd(),
            pipe.write.as_raw_fd(),
            short_io::cap(room),
        );
        let was_empty = st.pipe_bytes == 0;
        match r {
            Ok(0) => eof = true,
            Ok(n) => {
                st.pipe_bytes += n;
                // A trickle into an empty pipe: back to reading small messages into memory.
                if was_empty && n < SMALL_READ && n < room {
                    st.small_reads = true;
                }
            }
            // Drained. (A short splice is not proof of that: it also stops when the pipe runs
            // out of slots.)
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => st.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => failed = Some(e),
        }
        if let Some(e) = failed {
            let code = st.end.error_code();
            debug!(stream = %st.id, "stream reset ({} side): reading: {e}", st.end.name());
            self.close_stream(k, false, Some(code));
            return;
        }
        if eof {
            st.read_eof = true;
        }
        if !st.readable {
            // Not read again until the readiness poll fires: it must be armed even when the pipe
            // still holds bytes.
            self.arm_pollin(k);
        }
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.pipe_bytes > 0 {
            if !st.in_splice_ready {
                st.in_splice_ready = true;
                let sk = st.session;
                if let Some(s) = self.sessions.get(sk) {
                    s.splice_ready.push_back(k);
                }
                self.dirty_sessions.push(sk);
            }
        } else {
            self.release_pipe(k);
            let st = self.streams.get(k).expect("checked above");
            if st.read_eof {
                self.dirty_streams.push(k);
            } else {
                // Wait for the socket to become readable again.
                self.arm_pollin(k);
            }
        }
    }

    /// The small-message phase of a spliced stream: reads up to `SMALL_READ` bytes (within
    /// `cap`, the core's capacity for this stream) into memory and queues them in the core as
    /// ordinary DATA. Returns the bytes read when the read filled its request (the stream is
    /// moving bulk: it switches to splicing, and the caller splices what follows); otherwise
    /// the stream is finished for this readiness and None is returned.
    fn small_read(&mut self, k: Key, cap: usize) -> Option<usize> {
        let st = self.streams.get(k)?;
        let want = cap.min(SMALL_READ);
        if want == 0 {
            // No room in the core: served again on StreamWritable.
            self.release_pipe(k);
            return None;
        }
        let want = short_io::cap(want);
        let mut buf = BytesMut::with_capacity(want);
        // SAFETY: reads at most `want` bytes into the spare capacity of `buf` (at least `want`
        // long), then sets the length to what the kernel wrote.
        let n = unsafe {
            libc::recv(
                st.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                want,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    st.readable = false;
                    self.release_pipe(k);
                    self.arm_pollin(k);
                }
                io::ErrorKind::Interrupted => self.dirty_streams.push(k),
                _ => {
                    let code = st.end.error_code();
                    debug!(stream = %st.id, "stream reset ({} side): reading: {e}", st.end.name());
                    self.close_stream(k, false, Some(code));
                }
            }
            return None;
        }
        if n == 0 {
            st.read_eof = true;
            self.release_pipe(k);
            self.dirty_streams.push(k);
            return None;
        }
        let n = n as usize;
        // SAFETY: the kernel initialised `n` bytes.
        unsafe { buf.set_len(n) };
        let (sk, id) = (st.session, st.id);
        let s = self.sessions.get(sk)?;
        if let Err(e) = s.core.stream_write(id, buf.freeze()) {
            debug!(%id, "stream write refused: {e}");
            self.close_stream(k, false, Some(ResetCode::Internal));
            return None;
        }
        self.dirty_sessions.push(sk);
        if n < want {
            if let Some(st) = self.streams.get(k) {
                if st.hup_seen {
                    // The FIN may follow the data: read on until EOF.
                    self.dirty_streams.push(k);
                    return None;
                }
                st.readable = false;
            }
            // Drained (a TCP read returns less than asked only when the queue ran empty): the
            // readiness poll reports the next bytes.
            self.release_pipe(k);
            self.arm_pollin(k);
            return None;
        }
        let st = self.streams.get(k).expect("checked above");
        st.small_reads = false;
        Some(n)
    }

    /// Puts a stream whose pipe holds bytes in its session's splice line (once).
    fn queue_splice(&mut self, k: Key) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.pipe_bytes == 0 || st.in_splice_ready || st.closing.is_some() {
            return;
        }
        st.in_splice_ready = true;
        let sk = st.session;
        if let Some(s) = self.sessions.get(sk) {
            s.splice_ready.push_back(k);
        }
        self.dirty_sessions.push(sk);
    }

    /// Arms the multishot readiness poll on a spliced stream's local socket (once).
    fn arm_pollin(&mut self, k: Key) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.poll_armed || st.read_eof || st.closing.is_some() {
            return;
        }
        st.poll_armed = true;
        st.inflight += 1;
        let e = opcode::PollAdd::new(
            types::Fd(st.sock.as_raw_fd()),
            (libc::POLLIN | libc::POLLRDHUP) as u32,
        )
        .multi(true)
        .build()
        .user_data(user_data(Op::StreamPollIn, k));
        self.push(&e);
    }

    /// Returns an empty pipe to the pool (a pipe with bytes stays with its stream).
    fn release_pipe(&mut self, k: Key) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.pipe_bytes > 0 {
            return;
        }
        if let Some(p) = st.pipe.take() {
            self.pipes_out -= 1;
            self.pipes.push(p);
        }
    }

    /// Starts tearing a stream down. `abort` resets the local connection (RST) instead of a
    /// clean close; `code` resets the stream towards the peer.
    fn close_stream(&mut self, k: Key, abort: bool, code: Option<ResetCode>) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.closing.is_some() {
            return;
        }
        let abort = abort || code.is_some();
        st.closing = Some(abort);
        let (sk, id) = (st.session, st.id);
        let ops: Vec<Op> = [
            (st.recv_armed, Op::StreamRecv),
            (st.send_inflight, Op::StreamSend),
            (st.poll_armed, Op::StreamPollIn),
            (st.pollout_armed, Op::StreamPollOut),
            (st.state == StreamState::Connecting, Op::Connect),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, op)| *op)
        .collect();
        if abort {
            let _ = SockRef::from(&st.sock).set_linger(Some(Duration::ZERO));
        }
        for op in ops {
            let e = opcode::AsyncCancel::new(user_data(op, k))
                .build()
                .user_data(user_data(Op::Cancel, k));
            self.push(&e);
        }
        if let Some(s) = self.sessions.get(sk) {
            if let Some(code) = code {
                if s.core.stream_exists(id) {
                    s.core.stream_reset(id, code);
                    self.dirty_sessions.push(sk);
                }
            }
            if let Some(s) = self.sessions.get(sk) {
                s.streams.remove(&id);
                s.splice_ready.retain(|x| *x != k);
            }
            // The session may be drained now, or have a RST to send.
            self.dirty_sessions.push(sk);
        }
        self.finish_close(k);
    }

    fn finish_close(&mut self, k: Key) {
        let Some(st) = self.streams.get(k) else {
            return;
        };
        if st.inflight > 0 {
            return;
        }
        // A pipe mid-frame stays until the session is done with it.
        let sk = st.session;
        if self.sessions.get(sk).is_some_and(|s| {
            s.splice.as_ref().is_some_and(|sp| sp.stream == k)
                || s.rx_splice.as_ref().is_some_and(|r| r.stream == k)
        }) {
            return;
        }
        let Some(mut st) = self.streams.remove(k) else {
            return;
        };
        if let Some(p) = st.pipe.take() {
            self.pipes_out -= 1;
            if st.pipe_bytes == 0 {
                self.pipes.push(p);
            }
        }
        if let Some(p) = st.rx_pipe.take() {
            self.pipes_out -= 1;
            if st.rx_pipe_bytes == 0 {
                self.pipes.push(p);
            }
        }
        // Dropping the socket closes it; with linger 0 that is an RST.
        drop(st);
    }

    // ----- the loop's bookkeeping -----------------------------------------------------------

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let Some((op, k)) = decode(ud) else {
            return;
        };
        match op {
            Op::Mailbox => {
                self.mailbox_armed = false;
                self.arm_mailbox();
            }
            Op::Accept => self.on_accept(k, res, cqueue::more(flags)),
            Op::SessionRecv => self.on_session_recv(k, res, flags),
            Op::SessionSend => self.on_session_send(k, res),
            Op::SessionPollOut => self.on_session_pollout(k, res),
            Op::SessionPollIn => self.on_session_pollin(k, res, flags),
            Op::StreamPollOut => {
                if let Some(st) = self.streams.get(k) {
                    st.pollout_armed = false;
                    st.inflight -= 1;
                    self.dirty_streams.push(k);
                }
            }
            Op::StreamRecv => self.on_stream_recv(k, res, flags),
            Op::StreamSend => self.on_stream_send(k, res),
            Op::StreamPollIn => self.on_stream_pollin(k, res, flags),
            Op::Connect => self.on_connect(k, res),
            Op::ConnectTimeout => {
                if let Some(st) = self.streams.get(k) {
                    st.inflight -= 1;
                    // Connect and its timeout have both completed only when this arrives
                    // after the connect; keep the address and timespec until then.
                    if st.state != StreamState::Connecting || st.closing.is_some() {
                        st.connect_addr = None;
                        st.connect_timeout = None;
                    }
                    self.dirty_streams.push(k);
                    self.redial_if_ready(k);
                }
            }
            Op::Cancel => {}
        }
    }

    /// Serves everything the last completions touched, until nothing changes.
    fn serve(&mut self) {
        for k in std::mem::take(&mut self.listeners_need_arm) {
            self.arm_accept(k);
        }
        self.bufs.recycle();
        if self.bufs.available() > 0 {
            // Sessions first: they carry every stream's frames and the keepalives.
            for k in std::mem::take(&mut self.starved_sessions) {
                self.arm_session_recv(k);
            }
            for k in std::mem::take(&mut self.starved) {
                if let Some(st) = self.streams.get(k) {
                    st.starved = false;
                    self.dirty_streams.push(k);
                }
            }
        }
        for _ in 0..SERVE_ROUNDS {
            if self.dirty_streams.is_empty() && self.dirty_sessions.is_empty() {
                break;
            }
            let mut streams = std::mem::take(&mut self.dirty_streams);
            streams.sort_unstable_by_key(|k| (k.index, k.gen));
            streams.dedup();
            for k in streams {
                self.serve_stream(k);
            }
            let mut sessions = std::mem::take(&mut self.dirty_sessions);
            sessions.sort_unstable_by_key(|k| (k.index, k.gen));
            sessions.dedup();
            for k in sessions {
                self.serve_session(k);
            }
            self.bufs.recycle();
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for (_, s) in self.sessions.iter_mut() {
            let d = match &s.ending {
                Some((_, d)) => Some(*d),
                None => s.core.poll_timeout(),
            };
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        if !self.dirty_sessions.is_empty() || !self.dirty_streams.is_empty() {
            return Some(clock::now());
        }
        if let Some(last) = self.last_dump {
            let d = last + DUMP_EVERY;
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        next
    }

    /// Logs every session's and stream's state at debug level (`WARREN_DUMP_SHARDS=1`), at
    /// most every 2 s: for diagnosing stalls.
    fn dump_state(&mut self) {
        for k in self.sessions.keys() {
            if let Some(s) = self.sessions.get(k) {
                debug!(side = self.cfg.shards.name, shard = self.index, session = s.id, rx_ready = s.rx_ready, rx_splice_mode = s.rx_splice_mode, rx_switching = s.rx_switching, rx_splice = ?s.rx_splice, tx_splice = ?s.splice, out = s.out.len(), out_sent = s.out_sent, send_inflight = s.send_inflight, poll_inflight = s.poll_inflight, recv_armed = s.recv_armed, input = s.input.len(), splice_ready = s.splice_ready.len(), core_streams = s.core.stream_count(), rtt = ?s.core.stats().rtt, min_rtt = ?s.core.stats().min_rtt, drained = s.core.is_drained(), has_transmit = s.core.has_transmit(), "dump session");
            }
        }
        for k in self.streams.keys() {
            if let Some(st) = self.streams.get(k) {
                let window = self
                    .sessions
                    .get(st.session)
                    .map(|s| s.core.stream_recv_window(st.id));
                debug!(side = self.cfg.shards.name, shard = self.index, stream = %st.id, window = ?window, state = ?st.state, recv_armed = st.recv_armed, send_inflight = st.send_inflight, sending = st.sending.as_ref().map(|b| b.len()), poll_armed = st.poll_armed, pollout = st.pollout_armed, held = st.held_bytes, eof = st.read_eof, fin = st.fin_queued, write_done = st.write_done, pipe = st.pipe_bytes, splice_mode = st.splice_mode, to_splice = st.to_splice, readable = st.readable, small_reads = st.small_reads, in_ready = st.in_splice_ready, rx_pipe = st.rx_pipe_bytes, overflow = st.rx_overflow.len(), closing = ?st.closing, inflight = st.inflight, "dump stream");
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = clock::now();
        if self
            .last_dump
            .is_some_and(|last| now.duration_since(last) > DUMP_EVERY)
        {
            self.dump_state();
            self.last_dump = Some(now);
        }
        for (k, s) in self.sessions.iter_mut() {
            match &s.ending {
                Some((_, d)) if *d <= now => self.dirty_sessions.push(k),
                Some(_) => {}
                None => {
                    if s.core.poll_timeout().is_some_and(|d| d <= now) {
                        let _ = s.core.handle_timeout(now);
                        self.dirty_sessions.push(k);
                    }
                }
            }
        }
    }

    /// Stops: every session and stream is dropped; waits for in-flight operations briefly so
    /// no buffer is freed under the kernel.
    fn shutdown(&mut self) {
        for k in self.listeners.keys() {
            self.close_listener(k);
        }
        for k in self.streams.keys() {
            self.close_stream(k, true, None);
        }
        for k in self.sessions.keys() {
            if let Some(s) = self.sessions.get(k) {
                if s.ending.is_none() {
                    s.core.handle_connection_lost("shard stopped");
                    s.ending = Some((Some("shard stopped".into()), clock::now()));
                }
                s.write_failed = true;
            }
            for op in [
                Op::SessionSend,
                Op::SessionPollOut,
                Op::SessionRecv,
                Op::SessionPollIn,
            ] {
                let e = opcode::AsyncCancel::new(user_data(op, k))
                    .build()
                    .user_data(user_data(Op::Cancel, k));
                self.push(&e);
            }
        }
        let give_up = clock::now() + Duration::from_secs(2);
        while clock::now() < give_up {
            let busy = self
                .sessions
                .keys()
                .iter()
                .any(|k| self.sessions.get(*k).is_some_and(|s| s.inflight > 0))
                || self
                    .streams
                    .keys()
                    .iter()
                    .any(|k| self.streams.get(*k).is_some_and(|s| s.inflight > 0))
                || !self.listeners.keys().is_empty();
            if !busy {
                break;
            }
            let ts = types::Timespec::from(Duration::from_millis(10));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let cqes: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (ud, res, flags) in cqes {
                self.complete(ud, res, flags);
            }
            for k in self.streams.keys() {
                self.finish_close(k);
            }
        }
        for k in self.sessions.keys() {
            if let Some(s) = self.sessions.get(k) {
                s.inflight = 0;
            }
            self.check_session_end(k);
        }
    }
}

enum SpliceStep {
    Done,
    Wait,
    Failed,
}

/// Feeds received TLS records to rustls and appends the plaintext to `plain`.
fn feed_tls(tls: &mut rustls::Connection, mut data: &[u8], plain: &mut BytesMut) -> io::Result<()> {
    while !data.is_empty() {
        let n = tls.read_tls(&mut data)?;
        if n == 0 {
            break;
        }
        warren_compat::transport::process_into(tls, plain)?;
    }
    Ok(())
}

/// A service address: parsed directly when it is an IP:port (the usual case), otherwise the
/// control plane's latest answer for the host name. The shard never resolves: the system
/// resolver blocks, and a slow DNS answer would stall every stream on the core.
/// Returns the address to dial first and the others to try after it, next last (a host
/// name's addresses are tried in the resolver's order; no allocation for a single one).
fn service_addr(
    addr: &str,
    resolved: &HashMap<Arc<str>, Result<Arc<[SocketAddr]>, String>>,
) -> Result<(SocketAddr, Vec<SocketAddr>), String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok((a, Vec::new()));
    }
    match resolved.get(addr) {
        Some(Ok(a)) if !a.is_empty() => Ok((a[0], a[1..].iter().rev().copied().collect())),
        Some(Ok(_)) => Err("host name has no addresses".to_string()),
        Some(Err(e)) => Err(format!("host name does not resolve: {e}")),
        None => Err("host name not resolved yet".to_string()),
    }
}

/// A non-blocking socket of `addr`'s family, for a service dial; a loopback `addr` gets the
/// loopback congestion control before it connects (`warren_compat::congestion`).
fn service_socket(addr: SocketAddr, cc: &LoopbackCc) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    cc.apply(&sock, addr);
    Ok(sock.into())
}

/// A session's protocol config on this shard. On a session that splices (plain TCP, a pipe
/// pool), window bytes up to a pipe's capacity are spliced, never copied: windows may grow
/// that far on the smoothed RTT, beyond it only on the minimum RTT
/// (`SessionConfig::smoothed_rtt_window`). TLS sessions copy anyway and keep the rule given.
fn spliced_session_config(
    mut config: SessionConfig,
    can_splice: bool,
    pipe_capacity: usize,
) -> SessionConfig {
    if can_splice {
        let pipe = u32::try_from(pipe_capacity).unwrap_or(u32::MAX);
        config.smoothed_rtt_window = config.smoothed_rtt_window.min(pipe);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use awake_probe::AwakeProbe;

    #[test]
    fn a_stream_opened_within_the_churn_window_stops_the_busy_poll() {
        let quiet = CHURN_QUIET;
        assert!(light_traffic(true, 1, 1, quiet), "one quiet stream polls");
        assert!(
            !light_traffic(true, 1, 1, quiet - Duration::from_micros(1)),
            "a stream opened just now: no poll"
        );
        assert!(
            !light_traffic(true, 1, 1, Duration::ZERO),
            "a stream opened this instant: no poll"
        );
        // The other rules still hold once the churn window has passed.
        assert!(!light_traffic(false, 1, 1, quiet), "bulk: no poll");
        assert!(
            !light_traffic(true, BUSY_POLL_MAX_BATCH + 1, 1, quiet),
            "a big batch: no poll"
        );
        assert!(
            !light_traffic(true, 1, BUSY_POLL_MAX_STREAMS + 1, quiet),
            "many streams: no poll"
        );
        assert!(light_traffic(
            true,
            BUSY_POLL_MAX_BATCH,
            BUSY_POLL_MAX_STREAMS,
            quiet * 100
        ));
    }

    #[test]
    fn a_splicing_session_grows_windows_on_the_smoothed_rtt_only_up_to_the_pipe() {
        let tuning = warren_proto::session::SessionConfig {
            role: Role::Server,
            local: warren_proto::handshake::PeerParams {
                max_frame_payload: 1 << 20,
                initial_stream_window: 256 << 10,
                session_window: 16 << 20,
                max_streams: 100,
            },
            peer: warren_proto::handshake::PeerParams {
                max_frame_payload: 1 << 20,
                initial_stream_window: 256 << 10,
                session_window: 16 << 20,
                max_streams: 100,
            },
            max_stream_window: 16 << 20,
            smoothed_rtt_window: 16 << 20,
            quantum: 64 << 10,
            stream_send_buffer: 1 << 20,
            keepalive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        };
        let limit = |splice, cap| spliced_session_config(tuning.clone(), splice, cap);
        assert_eq!(limit(true, 1 << 20).smoothed_rtt_window, 1 << 20);
        assert_eq!(limit(true, 64 << 10).smoothed_rtt_window, 64 << 10);
        // Never above what the control plane set (max_stream_window), nor for TLS.
        assert_eq!(limit(true, 64 << 20).smoothed_rtt_window, 16 << 20);
        assert_eq!(limit(false, 1 << 20).smoothed_rtt_window, 16 << 20);
        assert_eq!(limit(true, usize::MAX).smoothed_rtt_window, 16 << 20);
        // Nothing else changes.
        assert_eq!(limit(true, 1 << 20).max_stream_window, 16 << 20);
    }
    use core_affinity::CoreId;

    fn probe(idle_us: u64, spinning_us: u64, local_us: u64) -> Result<AwakeProbe, String> {
        Ok(AwakeProbe {
            idle: Duration::from_micros(idle_us),
            spinning: Duration::from_micros(spinning_us),
            local: Duration::from_micros(local_us),
        })
    }

    #[test]
    fn auto_keep_awake_follows_the_probe() {
        let (c0, c1) = (Some(CoreId { id: 0 }), Some(CoreId { id: 1 }));
        // The probe runs between the first two shards' cores and decides.
        let mut asked = None;
        let mode = keep_awake_by_probe("test", c0, c1, |a, b| {
            asked = Some((a, b));
            probe(85, 66, 40)
        });
        assert_eq!(
            mode,
            AwakeMode::Spin,
            "a spinner that cuts the round trip to 78% turns them on"
        );
        assert_eq!(asked, Some((0, 1)));
        // The AMD host: a spinner does not help, a wake-up on one core is much cheaper.
        assert_eq!(
            keep_awake_by_probe("test", c0, c1, |_, _| probe(30, 38, 8)),
            AwakeMode::Occupy
        );
        // Neither pays.
        assert_eq!(
            keep_awake_by_probe("test", c0, c1, |_, _| probe(30, 38, 20)),
            AwakeMode::Off
        );
        assert_eq!(
            keep_awake_by_probe("test", c0, c1, |_, _| Err("no answer".into())),
            AwakeMode::Off
        );
        // No probe at all when the shards share a core or are not pinned.
        let never =
            |_: usize, _: usize| -> Result<AwakeProbe, String> { panic!("the probe must not run") };
        assert_eq!(keep_awake_by_probe("test", c0, c0, never), AwakeMode::Off);
        assert_eq!(keep_awake_by_probe("test", None, c1, never), AwakeMode::Off);
        assert_eq!(keep_awake_by_probe("test", c0, None, never), AwakeMode::Off);
    }
}
