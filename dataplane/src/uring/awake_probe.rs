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
//! `SCHED_IDLE` `sched_yield` spinner on it (what a keep-awake thread does); then two threads on
//! one core. Keep-awake threads spin as `SCHED_IDLE` if the spinner makes the cross-core round
//! trip clearly faster. If it does not, but the round trip on one core costs at most half the
//! cross-core one, they occupy the other cores instead (`AwakeMode::Occupy` in the shard: a nice
//! 19 spinner, so that the scheduler keeps a woken thread on its waker's core; measured on the
//! AMD host in perf/results/2026-12-07-occupy/). Otherwise none run. About 1,200 round trips: a
//! few tens of milliseconds.

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
/// A round trip between two threads on one core must be at most this fraction of the faster
/// cross-core one for occupying the other cores to pay.
const LOCAL_BELOW: f64 = 0.5;
/// A round trip longer than this means the probe itself is stuck: give up.
const STUCK: Duration = Duration::from_secs(1);

/// What the probe measured: median round trips across cores (far core idle, or running a
/// `SCHED_IDLE` spinner) and between two threads on one core.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AwakeProbe {
    pub(crate) idle: Duration,
    pub(crate) spinning: Duration,
    pub(crate) local: Duration,
}

impl AwakeProbe {
    /// Keep-awake threads pay here: the spinner made the round trip clearly faster.
    pub(crate) fn helps(&self) -> bool {
        self.spinning.as_secs_f64() < self.idle.as_secs_f64() * HELPS_BELOW
    }

    /// A wake-up on the waker's own core is much cheaper than one across cores, idle or
    /// spinning: then a chain of threads that wake each other is fastest on one core, and
    /// occupying the other cores (so the scheduler keeps a woken thread on its waker's core)
    /// pays.
    pub(crate) fn local_pays(&self) -> bool {
        let cross = self.idle.min(self.spinning).as_secs_f64();
        self.local.as_secs_f64() < cross * LOCAL_BELOW
    }
}

/// Measures round trips between `near` and `far` with `far` idle and with a `SCHED_IDLE`
/// spinner on it, then between two threads on `near`. Errors name what failed (thread,
/// pinning, eventfd, a stuck round trip).
pub(crate) fn measure(near: usize, far: usize) -> Result<AwakeProbe, String> {
    let (idle, spinning) = ping_pong(near, far, true)?;
    let (local, _) = ping_pong(near, near, false)?;
    Ok(AwakeProbe {
        idle,
        spinning,
        local,
    })
}

/// Median round trips from a thread on `near` to one on `far` and back: (far idle, far running
/// a spinner). Without `with_spinner` every block is an idle one and the second is zero.
fn ping_pong(near: usize, far: usize, with_spinner: bool) -> Result<(Duration, Duration), String> {
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
    let result = run_blocks(near, far, with_spinner, &ping, &pong);
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
    with_spinner: bool,
    ping: &OwnedFd,
    pong: &OwnedFd,
) -> Result<(Duration, Duration), String> {
    let (ping, pong) = (ping.as_raw_fd(), pong.as_raw_fd());
    std::thread::scope(|s| {
        s.spawn(move || -> Result<(Duration, Duration), String> {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: near }) {
                return Err(format!("cannot pin to CPU {near}"));
            }
            let mut idle = Vec::with_capacity(BLOCK * BLOCKS / 2);
            let mut spinning = Vec::with_capacity(BLOCK * BLOCKS / 2);
            for block in 0..BLOCKS {
                let spin = with_spinner && block % 2 == 1;
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
            Ok((median(&mut idle), median(&mut spinning)))
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
        eprintln!(
            "CPU {near} -> CPU {far}: {p:?}, helps: {}, local pays: {}",
            p.helps(),
            p.local_pays()
        );
        assert!(p.idle > Duration::ZERO && p.idle < STUCK, "{p:?}");
        assert!(p.spinning > Duration::ZERO && p.spinning < STUCK, "{p:?}");
        assert!(p.local > Duration::ZERO && p.local < STUCK, "{p:?}");
        // The decisions are pure functions of the three medians.
        let us = |idle, spinning, local| AwakeProbe {
            idle: Duration::from_micros(idle),
            spinning: Duration::from_micros(spinning),
            local: Duration::from_micros(local),
        };
        assert!(us(85, 66, 40).helps());
        assert!(!us(30, 38, 8).helps());
        assert!(
            !us(30, 29, 8).helps(),
            "within 10% is not worth a spinning thread"
        );
        assert!(
            us(30, 38, 8).local_pays(),
            "8 µs on one core against 30 across"
        );
        assert!(
            !us(30, 38, 16).local_pays(),
            "a local wake-up must cost at most half the cheaper cross-core one"
        );
        assert!(
            !us(85, 12, 8).local_pays(),
            "a spinner makes cross-core cheap enough"
        );
    }
}
