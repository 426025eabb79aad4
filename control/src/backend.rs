//! Which data plane carries the bytes: the io_uring shards (`warren-dataplane`) or the portable
//! ones (`warren-compat`). Both take the same [`ShardCommand`]s and publish the same
//! [`ShardStats`], so the rest of the control plane holds a [`DataPlane`] and does not care.
//!
//! `tuning.backend = "auto"` (the default) probes io_uring once per process and falls back to
//! compat with one warning that names the cause; `"uring"` refuses to start without io_uring;
//! `"compat"` never touches it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Once, OnceLock};

use anyhow::Context;
use tracing::{info, warn};
use warren_compat::{RouteBoard, ShardCommand, ShardSetConfig, ShardStats};
use warren_dataplane::{Probe, Unavailable, UringConfig};

use crate::config::Tuning;

/// `tuning.backend`: which data plane to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Backend {
    /// io_uring when the probe passes, else compat (one warning names the cause).
    #[default]
    Auto,
    /// io_uring or nothing: startup fails with the probe's cause.
    Uring,
    /// The portable backend, whatever the kernel offers.
    Compat,
}

impl Backend {
    /// The spelling used in TOML and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Compat => "compat",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" => Ok(Backend::Uring),
            "compat" => Ok(Backend::Compat),
            _ => Err(format!(
                "{s:?} is not a backend (expected \"auto\", \"uring\" or \"compat\")"
            )),
        }
    }
}

/// The data plane actually running (what `auto` resolved to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `warren-dataplane`: io_uring completion loops.
    Uring,
    /// `warren-compat`: tokio current-thread runtimes.
    Compat,
}

impl BackendKind {
    /// `"uring"` / `"compat"`, as in logs and `warren bench --json`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::Compat => "compat",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The io_uring probe, run once per process: a server and a client in one process (loopback,
/// demo, bench) ask the kernel once and log the same answer.
pub fn probe() -> Result<Probe, Unavailable> {
    static PROBE: OnceLock<Result<Probe, Unavailable>> = OnceLock::new();
    PROBE.get_or_init(warren_dataplane::probe).clone()
}

/// The running shards of either backend. Same surface as `warren_compat::Shards`.
#[derive(Debug)]
pub enum DataPlane {
    /// The portable backend.
    Compat(warren_compat::Shards),
    /// The io_uring backend.
    Uring(warren_dataplane::Shards),
}

impl DataPlane {
    /// Starts the shards `tuning.backend` asks for. `shards.name` is the role (`"server"` or
    /// `"client"`), used in the TOML path of errors and in logs.
    pub fn start(
        tuning: &Tuning,
        shards: ShardSetConfig,
        board: Arc<RouteBoard>,
    ) -> anyhow::Result<DataPlane> {
        let role = shards.name;
        let uring = |probe: &Probe| -> anyhow::Result<DataPlane> {
            let cfg = UringConfig {
                shards: shards.clone(),
                buffer_count: tuning.buffer_count,
                pipe_size: tuning.pipe_size_bytes as usize,
                pipe_pool: tuning.pipe_pool_size as usize,
                busy_poll: std::time::Duration::from_micros(tuning.busy_poll_us.into()),
                busy_poll_other_cores: tuning.busy_poll_other_cores,
                busy_poll_sched_idle: tuning.busy_poll_sched_idle,
            };
            let set = warren_dataplane::Shards::start(cfg, board.clone())
                .context("starting io_uring shard threads")?;
            info!(shards = set.len(), "{role} data plane: uring, {probe}");
            Ok(DataPlane::Uring(set))
        };
        let plane = match tuning.backend {
            Backend::Compat => DataPlane::compat(shards, board)?,
            Backend::Uring => {
                let probe = probe().map_err(|cause| {
                    anyhow::anyhow!(
                        "{role}.tuning.backend = \"uring\": io_uring unavailable: {cause}"
                    )
                })?;
                uring(&probe).with_context(|| format!("{role}.tuning.backend = \"uring\""))?
            }
            Backend::Auto => match probe() {
                Ok(probe) => match uring(&probe) {
                    Ok(plane) => plane,
                    // The probe passed but the real rings did not (memlock for many shards,
                    // say): still a host problem, so `auto` still falls back.
                    Err(e) => {
                        warn!("io_uring shards failed to start ({e:#}); using the compat backend");
                        DataPlane::compat(shards, board)?
                    }
                },
                Err(cause) => {
                    // A server and a client in one process probe once and warn once.
                    static WARNED: Once = Once::new();
                    WARNED.call_once(|| {
                        warn!("io_uring unavailable ({cause}); using the compat backend");
                    });
                    DataPlane::compat(shards, board)?
                }
            },
        };
        Ok(plane)
    }

    fn compat(shards: ShardSetConfig, board: Arc<RouteBoard>) -> anyhow::Result<DataPlane> {
        let set_name = shards.name;
        let set =
            warren_compat::Shards::start(shards, board).context("starting compat shard threads")?;
        info!(shards = set.len(), "{set_name} data plane: compat");
        Ok(DataPlane::Compat(set))
    }

    /// Which backend is running.
    pub fn kind(&self) -> BackendKind {
        match self {
            DataPlane::Compat(_) => BackendKind::Compat,
            DataPlane::Uring(_) => BackendKind::Uring,
        }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        match self {
            DataPlane::Compat(s) => s.len(),
            DataPlane::Uring(s) => s.len(),
        }
    }

    /// Never true: there is always at least one shard.
    pub fn is_empty(&self) -> bool {
        match self {
            DataPlane::Compat(s) => s.is_empty(),
            DataPlane::Uring(s) => s.is_empty(),
        }
    }

    /// Queues a command for shard `shard`; returns it when the queue is full.
    pub fn send(&self, shard: usize, cmd: ShardCommand) -> Result<(), ShardCommand> {
        match self {
            DataPlane::Compat(s) => s.send(shard, cmd),
            DataPlane::Uring(s) => s.send(shard, cmd),
        }
    }

    /// Counters of one shard.
    pub fn stats(&self, shard: usize) -> &ShardStats {
        match self {
            DataPlane::Compat(s) => s.stats(shard),
            DataPlane::Uring(s) => s.stats(shard),
        }
    }

    /// Sum of one counter over all shards.
    pub fn total(&self, f: impl Fn(&ShardStats) -> &AtomicU64) -> u64 {
        match self {
            DataPlane::Compat(s) => s.total(f),
            DataPlane::Uring(s) => s.total(f),
        }
    }

    /// The service board shared by the shards.
    pub fn board(&self) -> &RouteBoard {
        match self {
            DataPlane::Compat(s) => s.board(),
            DataPlane::Uring(s) => s.board(),
        }
    }

    /// GOAWAY on every session; shards stop taking visitors.
    pub fn drain(&self, reason: &str) {
        match self {
            DataPlane::Compat(s) => s.drain(reason),
            DataPlane::Uring(s) => s.drain(reason),
        }
    }

    /// Stops every shard and joins the threads. Idempotent.
    pub fn stop(&self) {
        match self {
            DataPlane::Compat(s) => s.stop(),
            DataPlane::Uring(s) => s.stop(),
        }
    }
}

/// The congestion control for loopback connections that `tuning` asks for, checked against
/// this kernel. A refusal is one warning naming the key, and loopback connections keep the
/// system default: a tuning the kernel cannot honour must not stop the tunnel.
pub fn loopback_cc(tuning: &Tuning, role: &str) -> warren_compat::congestion::LoopbackCc {
    match warren_compat::congestion::LoopbackCc::checked(&tuning.loopback_congestion_control) {
        Ok(cc) => cc,
        Err(e) => {
            warn!(
                "{role}.tuning.loopback_congestion_control: {e}; loopback connections keep the system default"
            );
            warren_compat::congestion::LoopbackCc::off()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_spellings_round_trip_and_bad_ones_list_the_choices() {
        for b in [Backend::Auto, Backend::Uring, Backend::Compat] {
            assert_eq!(b.as_str().parse::<Backend>(), Ok(b));
        }
        let err = "io_uring".parse::<Backend>().unwrap_err();
        assert_eq!(
            err,
            "\"io_uring\" is not a backend (expected \"auto\", \"uring\" or \"compat\")"
        );
        assert_eq!(Backend::default(), Backend::Auto);
        assert_eq!(BackendKind::Uring.to_string(), "uring");
        assert_eq!(BackendKind::Compat.to_string(), "compat");
    }
}
