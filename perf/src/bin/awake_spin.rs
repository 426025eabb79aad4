//! `awake_spin`: keeps every CPU this process may run on from halting, with the cheapest possible
//! competitor, to measure what a tunnel's keep-awake threads (`busy_poll_other_cores`) can give at
//! best.
//!
//! One thread per CPU (`sched_getaffinity`), each pinned to its CPU and set to `SCHED_IDLE`,
//! spinning on `sched_yield` for as long as the process lives: the same policy and the same loop
//! as warren's keep-awake threads, but never asleep and never gated. `SCHED_IDLE` gets a CPU only
//! when nothing else wants it and the scheduler counts that CPU as idle when it places a woken
//! thread, so any thread woken on these CPUs (a load generator, an echo backend, a tunnel) is
//! woken on a running vCPU instead of a halted one. perf/compare's `direct-awake` runs the direct
//! connection with it: a floor for the round-trip latency of any tunnel on this host, since a
//! tunnel's path holds the direct path's two endpoints plus its own hops.
//!
//! Prints one JSON line (`{"ready":true,"cpus":N}`) once every thread is pinned and idle-class,
//! then spins until killed (SIGTERM, SIGINT). Exits 1 naming the cause if a thread cannot be
//! pinned or cannot get `SCHED_IDLE`.

// sched_getaffinity, sched_setaffinity and sched_setscheduler are FFI calls that need `unsafe`,
// which the workspace denies by default.
#![allow(unsafe_code)]

#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("awake_spin: Linux only (sched_setaffinity, SCHED_IDLE)");
    std::process::ExitCode::from(2)
}

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
    use std::sync::mpsc;

    let cpus = match linux::allowed_cpus() {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => {
            eprintln!("awake_spin: sched_getaffinity returned no CPU");
            return std::process::ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("awake_spin: sched_getaffinity: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let (tx, rx) = mpsc::channel();
    for &cpu in &cpus {
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("awake-{cpu}"))
            .stack_size(64 << 10)
            .spawn(move || {
                let r = linux::pin_idle(cpu);
                let ok = r.is_ok();
                let _ = tx.send(r.map_err(|e| format!("cpu {cpu}: {e}")));
                if ok {
                    loop {
                        std::thread::yield_now();
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("awake_spin: spawning the thread of cpu {cpu}: {e}");
            return std::process::ExitCode::from(1);
        }
    }
    drop(tx);
    for r in rx.iter().take(cpus.len()) {
        if let Err(e) = r {
            eprintln!("awake_spin: {e}");
            return std::process::ExitCode::from(1);
        }
    }
    ready_line(cpus.len());
    loop {
        std::thread::park();
    }
}

/// Stdout carries only the ready line; messages go to stderr.
#[cfg(target_os = "linux")]
#[allow(clippy::print_stdout)]
fn ready_line(cpus: usize) {
    use std::io::Write;
    println!("{{\"ready\":true,\"cpus\":{cpus}}}");
    let _ = std::io::stdout().flush();
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;

    /// The CPUs this process may run on, in ascending order.
    pub fn allowed_cpus() -> io::Result<Vec<usize>> {
        // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: passes the size of and a pointer to a live cpu_set_t.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            // SAFETY: reads a bit of the live set within CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect())
    }

    /// Pins the calling thread to `cpu` and makes it `SCHED_IDLE`.
    pub fn pin_idle(cpu: usize) -> io::Result<()> {
        // SAFETY: as above.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: sets a bit of the live set; cpu came from sched_getaffinity, so < CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: passes the size of and a pointer to a live cpu_set_t, for the calling thread.
        if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
            return Err(io::Error::other(format!(
                "sched_setaffinity: {}",
                io::Error::last_os_error()
            )));
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sets the calling thread's policy from a live sched_param.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            return Err(io::Error::other(format!(
                "sched_setscheduler(SCHED_IDLE): {}",
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}
