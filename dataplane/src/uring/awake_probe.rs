//! `busy_poll_other_cores = "auto"`: do keep-awake threads make a cross-core wake-up faster on
//! this host, or slower?
//!
//! A keep-awake thread spins as `SCHED_IDLE` on another shard's core while one shard polls, so
//! that the threads a request wakes there find a running core instead of a halted one. Whether
//! that pays depends on the host, and it has gone both ways on the same VM type:
//! - Intel Xeon Firecracker VM with haltpoll: a direct cross-core rr-1 took p50 85 µs with the
//!   other core idle and 66 µs with a spinner on it; through the tunnel, rr-1 p50 went from
//!   96.8 µs without keep-awake threads to 42.7 with them
//!   (perf/results/2026-12-02-1f5cd4856d/).
//! - AMD EPYC Firecracker VM without a cpuidle driver: 28-31 µs idle against 37-39 with a
//!   spinner, and through the tunnel 105 µs without against 124 with
//!   (perf/results/2026-12-02-6d5e12e346/).
//!
//! So the shard set measures it once at start: two threads pinned to two of the shards' cores
//! ping-pong over blocking eventfds, in interleaved blocks with the far core idle and with a
//! `SCHED_IDLE` `sched_yield` spinner on it (what a keep-awake thread does). Keep-awake threads
//! run only if the spinner makes the round trip clearly faster. About 600 round trips: a few
//! tens of milliseconds.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{clock, sys};

/// Round trips per block; blocks alternate idle / spinner.
const BLOCK: usize = 50;
const BLOCKS: usize = 12;
/// Round trips before each block that are not counted (the spinner getting scheduled, caches).
const WARM: usize = 5;
/// The spinner must cut the median round trip to at most this fraction of the idle one.
const HELPS_BELOW: f64 = 0.9;
/// A round trip longer than this means the probe itself is stuck: give up.
const STUCK: Duration = Duration::from_secs(1);

/// What the probe measured: median cross-core round trips.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AwakeProbe {
    pub(crate) idle: Duration,
    pub(crate) spinning: Duration,
}

impl AwakeProbe {
    /// Keep-awake threads pay here: the spinner made the round trip clearly faster.
    pub(crate) fn helps(&self) -> bool {
        self.spinning.as_secs_f64() < self.idle.as_secs_f64() * HELPS_BELOW
    }
}

/// Measures cross-core round trips between `near` and `far` with `far` idle and with a
/// `SCHED_IDLE` spinner on it. Errors name what failed (thread, pinning, eventfd, a stuck
/// round trip).
pub(crate) fn measure(near: usize, far: usize) -> Result<AwakeProbe, String> {
    let ping: Arc<OwnedFd> =
        Arc::new(sys::eventfd_blocking().map_err(|e| format!("eventfd: {e}"))?);
    let pong: Arc<OwnedFd> =
        Arc::new(sys::eventfd_blocking().map_err(|e| format!("eventfd: {e}"))?);
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (ping, pong, stop) = (ping.clone(), pong.clone(), stop.clone());
        std::thread::Builder::new()
            .name("warren-awake-probe".into())
            .stack_size(64 * 1024)
            .spawn(move || -> Result<(), String> {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: far }) {
                    return Err(format!("cannot pin to CPU {far}"));
                }
                loop {
                    sys::eventfd_read_blocking(ping.as_raw_fd())
                        .map_err(|e| format!("read: {e}"))?;
                    if stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    sys::eventfd_wake(pong.as_raw_fd());
                }
            })
            .map_err(|e| format!("spawning the probe thread: {e}"))?
    };
    let result = run_blocks(near, far, &ping, &pong);
    stop.store(true, Ordering::SeqCst);
    sys::eventfd_wake(ping.as_raw_fd());
    let echoed = echo
        .join()
        .map_err(|_| "the probe thread panicked".to_string())?;
    let r = result?;
    echoed?;
    Ok(r)
}

/// The measuring side, on a throwaway thread pinned to `near` (the caller's affinity stays).
fn run_blocks(
    near: usize,
    far: usize,
    ping: &OwnedFd,
    pong: &OwnedFd,
) -> Result<AwakeProbe, String> {
    let (ping, pong) = (ping.as_raw_fd(), pong.as_raw_fd());
    std::thread::scope(|s| {
        s.spawn(move || -> Result<AwakeProbe, String> {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: near }) {
                return Err(format!("cannot pin to CPU {near}"));
            }
            let mut idle = Vec::with_capacity(BLOCK * BLOCKS / 2);
            let mut spinning = Vec::with_capacity(BLOCK * BLOCKS / 2);
            for block in 0..BLOCKS {
                let spin = block % 2 == 1;
                let spinner = spin.then(|| Spinner::start(far)).transpose()?;
                for i in 0..WARM + BLOCK {
                    let t0 = clock::now();
                    sys::eventfd_wake(ping);
                    read_within(pong)?;
                    let rt = t0.elapsed();
                    if rt > STUCK {
                        return Err(format!("a round trip took {rt:?}"));
                    }
                    if i >= WARM {
                        if spin { &mut spinning } else { &mut idle }.push(rt);
                    }
                }
                if let Some(s) = spinner {
                    s.stop();
                }
            }
            Ok(AwakeProbe {
                idle: median(&mut idle),
                spinning: median(&mut spinning),
            })
        })
        .join()
        .map_err(|_| "the probe thread panicked".to_string())?
    })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// A `SCHED_IDLE` `sched_yield` loop pinned to one CPU: what a keep-awake thread does.
struct Spinner {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Spinner {
    fn start(cpu: usize) -> Result<Spinner, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("warren-awake-spin".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let ok = if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                    Err(format!("cannot pin the spinner to CPU {cpu}"))
                } else {
                    sys::set_idle_class(true).map_err(|e| format!("SCHED_IDLE: {e}"))
                };
                let go = ok.is_ok();
                let _ = ready_tx.send(ok);
                while go && !flag.load(Ordering::Relaxed) {
                    std::thread::yield_now();
                }
            })
            .map_err(|e| format!("spawning the spinner: {e}"))?;
        let ready = ready_rx
            .recv_timeout(STUCK)
            .map_err(|_| format!("the spinner did not start within {STUCK:?}"));
        let s = Spinner { stop, thread };
        match ready {
            Ok(Ok(())) => Ok(s),
            Ok(Err(e)) | Err(e) => {
                s.stop();
                Err(e)
            }
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Waits at most `STUCK` for the eventfd to be readable, then reads it.
fn read_within(fd: RawFd) -> Result<(), String> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(STUCK.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: polls one live pollfd for the eventfd the caller owns.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return sys::eventfd_read_blocking(fd).map_err(|e| format!("read: {e}"));
        }
        if n == 0 {
            return Err(format!("no answer within {STUCK:?}"));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("poll: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_both_modes_between_two_cpus() {
        let cpus = core_affinity::get_core_ids().unwrap_or_default();
        let (near, far) = match cpus.as_slice() {
            [a, b, ..] => (a.id, b.id),
            // One allowed CPU: the probe still runs (both threads on it); auto never asks
            // for it then, since keep-awake threads need a second shard core.
            [a] => (a.id, a.id),
            // No CPU listed: the probe cannot pin. Under CI that is a broken runner, not a
            // reason to skip.
            [] => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "core_affinity lists no CPU under CI=true: the probe cannot be tested"
                );
                return;
            }
        };
        let p = measure(near, far).expect("the probe runs");
        eprintln!("CPU {near} -> CPU {far}: {p:?}, helps: {}", p.helps());
        assert!(p.idle > Duration::ZERO && p.idle < STUCK, "{p:?}");
        assert!(p.spinning > Duration::ZERO && p.spinning < STUCK, "{p:?}");
        // The decision is a pure function of the two medians.
        let faster = AwakeProbe {
            idle: Duration::from_micros(85),
            spinning: Duration::from_micros(66),
        };
        let slower = AwakeProbe {
            idle: Duration::from_micros(30),
            spinning: Duration::from_micros(38),
        };
        let even = AwakeProbe {
            idle: Duration::from_micros(30),
            spinning: Duration::from_micros(29),
        };
        assert!(faster.helps());
        assert!(!slower.helps());
        assert!(!even.helps(), "within 10% is not worth a spinning thread");
    }
}
