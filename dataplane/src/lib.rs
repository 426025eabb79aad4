//! warren's Linux data plane: one pinned shard thread per core, each running a hand-written
//! io_uring completion loop.
//!
//! What it does: owns sockets, rings, provided-buffer rings, pipes and the cross-shard command
//! queues. The loop translates completions into `warren-proto` input and `warren-proto` output
//! into submissions. What it does not do: protocol logic (framing, flow control, keepalive live
//! in `warren-proto`), config, auth or placement (the control plane). It accepts the same
//! [`ShardCommand`]s as the portable backend (`warren-compat`), so the control plane drives both
//! the same way. Off Linux it builds to [`probe`] returning [`Unavailable::NotLinux`].
#![allow(unsafe_code)]

#[cfg(target_os = "linux")]
pub mod diag;
mod probe;
#[cfg(target_os = "linux")]
mod uring;

pub use probe::{probe, Probe, Unavailable};
pub use warren_compat::{
    LocalService, RouteBoard, SessionEnd, SessionHandoff, SessionRole, ShardCommand,
    ShardSetConfig, ShardStats,
};

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Whether busy polls may run as `SCHED_IDLE` here (`busy_poll_sched_idle`): a thread of this
/// process can enter `SCHED_IDLE` and come back to `SCHED_OTHER`, which needs `CAP_SYS_NICE`
/// or `RLIMIT_NICE` >= 20. The shard set asks this once at start; the error names what
/// refused.
pub fn sched_idle_probe() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        uring::sys::idle_class_reversible()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err("SCHED_IDLE busy polls exist only on Linux".into())
    }
}

/// `busy_poll_other_cores`: whether and how the shard set runs keep-awake threads on the other
/// shards' cores during light traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepAwake {
    /// Measure at start (two pinned threads ping-pong across two shard cores, with the far core
    /// idle and with a `SCHED_IDLE` spinner on it, then on one core): `On` if the spinner makes
    /// the round trip at least 10% faster, else `Occupy` if the one-core round trip is at most
    /// half the cheaper cross-core one, else `Off`. `SCHED_IDLE` spinners helped on one VM host
    /// and hurt on another (perf/results/2026-12-02-6d5e12e346/NOTES.md); occupying paid there
    /// (perf/results/2026-12-07-occupy/).
    #[default]
    Auto,
    /// Always (with more than one shard and `busy_poll_us` > 0).
    On,
    /// Occupy the other shards' cores with nice-19 spinners while a shard serves light traffic
    /// (and for 1 ms after), and do not busy-poll, so that the threads a shard wakes stay on its
    /// core (with more than one shard and `busy_poll_us` > 0). `Auto` picks it where a wake-up
    /// on one core is much cheaper than one across cores.
    Occupy,
    /// Never.
    Off,
}

impl KeepAwake {
    /// The TOML spelling: `"auto"`, `true`, `"occupy"`, `false`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeepAwake::Auto => "auto",
            KeepAwake::On => "true",
            KeepAwake::Occupy => "occupy",
            KeepAwake::Off => "false",
        }
    }
}

impl std::fmt::Display for KeepAwake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to start the io_uring shard set.
#[derive(Debug, Clone)]
pub struct UringConfig {
    /// Shard count, cores, thread names, command queue size; `read_buffer` is the size of each
    /// provided receive buffer.
    pub shards: ShardSetConfig,
    /// Provided receive buffers per shard (rounded up to a power of two, at most 32768).
    pub buffer_count: u32,
    /// Capacity asked of each splice pipe (`F_SETPIPE_SZ`, bounded by `fs.pipe-max-size`).
    pub pipe_size: usize,
    /// Pipes per shard for splicing plaintext payloads into plain-TCP sessions; 0 turns splice
    /// off. A stream that finds the pool empty copies instead.
    pub pipe_pool: usize,
    /// How long a shard polls its ring without sleeping after the last completion (yielding
    /// the core between looks); zero sleeps at once.
    pub busy_poll: std::time::Duration,
    /// While one shard busy-polls for its traffic, a `SCHED_IDLE` keep-awake thread on each
    /// other shard's core spins, so no core of the process halts between the hops of a request:
    /// always, never, or where a start-up probe finds that it makes a cross-core wake-up faster.
    pub busy_poll_other_cores: KeepAwake,
    /// A shard busy-polls as `SCHED_IDLE` (back to `SCHED_OTHER` before it sleeps), so the
    /// scheduler counts its core as idle and places the threads its sends wake (the visitor's
    /// program, the service) there instead of waking another core. Needs `CAP_SYS_NICE` or
    /// `RLIMIT_NICE` >= 20 to come back; without, it is off with a log line.
    pub busy_poll_sched_idle: bool,
}

/// The running io_uring shards. Same surface as `warren_compat::Shards`.
#[derive(Debug)]
pub struct Shards {
    #[cfg(target_os = "linux")]
    inner: uring::shard::ShardSet,
    stats: Vec<Arc<ShardStats>>,
    board: Arc<RouteBoard>,
}

/// glibc gives freed heap back to the kernel (`madvise`) as soon as 128 KiB lie free at the top
/// of an arena, and the next allocation faults those pages in again: on the copy path (TLS
/// sessions, an empty pipe pool) that was 221-865 `madvise` calls per GiB and 7% of the
/// server's samples in page faults (perf/results/2026-12-02-c200aedd18-bulk-up-vs-mux/). Keep
/// up to 8 MiB free per arena, and serve allocations below 4 MiB from the heap, not `mmap`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_heap_resident() {
    // SAFETY: mallopt only sets allocator parameters; it takes glibc's own lock.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

#[cfg(all(target_os = "linux", not(target_env = "gnu")))]
fn keep_heap_resident() {}

impl Shards {
    /// Starts the shard threads. Fails when a ring cannot be set up (call [`probe`] first to
    /// learn why in a form fit for a log line).
    pub fn start(cfg: UringConfig, board: Arc<RouteBoard>) -> io::Result<Shards> {
        #[cfg(target_os = "linux")]
        {
            keep_heap_resident();
            let (inner, stats) = uring::shard::ShardSet::start(cfg, board.clone())?;
            Ok(Shards {
                inner,
                stats,
                board,
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (cfg, board);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                Unavailable::NotLinux.to_string(),
            ))
        }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.stats.len()
    }

    /// Never true: there is always at least one shard.
    pub fn is_empty(&self) -> bool {
        self.stats.is_empty()
    }

    /// Queues a command for shard `shard`; returns it when the queue is full.
    pub fn send(&self, shard: usize, cmd: ShardCommand) -> Result<(), ShardCommand> {
        #[cfg(target_os = "linux")]
        {
            self.inner.send(shard, cmd)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = shard;
            Err(cmd)
        }
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
        for i in 0..self.len() {
            let mut cmd = ShardCommand::Drain {
                reason: reason.to_string(),
            };
            for _ in 0..1000 {
                match self.send(i, cmd) {
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
        #[cfg(target_os = "linux")]
        self.inner.stop();
    }
}
