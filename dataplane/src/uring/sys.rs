//! Thin, checked wrappers over the few raw syscalls the shard loop makes itself.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `uname -r`.
pub(crate) fn kernel_release() -> String {
    // SAFETY: `utsname` is plain data; uname fills it and returns 0 on success.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates `release`.
    let c = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    c.to_string_lossy().into_owned()
}

/// `RLIMIT_MEMLOCK` soft limit in bytes.
pub(crate) fn memlock_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 {
        return 0;
    }
    rl.rlim_cur
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A non-blocking, close-on-exec eventfd: the wake for a shard's command queue.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    eventfd_with(libc::EFD_NONBLOCK)
}

/// A blocking eventfd (for a thread that sleeps in `read`).
pub(crate) fn eventfd_blocking() -> io::Result<OwnedFd> {
    eventfd_with(0)
}

fn eventfd_with(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the returned OwnedFd.
    let fd = cvt(unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits for a blocking eventfd (`eventfd_blocking`) to be signalled and resets its counter,
/// retrying when a signal interrupts the read.
pub(crate) fn eventfd_read_blocking(fd: RawFd) -> io::Result<()> {
    let mut v = 0u64;
    loop {
        // SAFETY: reads 8 bytes into a live u64 from an eventfd the caller owns.
        let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let e = if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("eventfd read returned {n} bytes"),
            )
        };
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Adds 1 to an eventfd. EAGAIN (counter saturated) still means the reader will wake.
pub(crate) fn eventfd_wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an fd we own.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// A splice pipe: both ends non-blocking, capacity raised towards `size`.
#[derive(Debug)]
pub(crate) struct Pipe {
    pub(crate) read: OwnedFd,
    pub(crate) write: OwnedFd,
    /// Capacity the kernel granted.
    pub(crate) capacity: usize,
}

impl Pipe {
    pub(crate) fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe fd we own.
        let set = |size: usize| unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                size.min(i32::MAX as usize) as libc::c_int,
            )
        };
        let mut got = set(size);
        if got < 0 {
            // EPERM: over `fs.pipe-max-size` without CAP_SYS_RESOURCE (then the largest size
            // allowed is the best this pipe gets), or over the per-user pipe limit (then the
            // default size stays).
            if let Some(max) = pipe_max_size().filter(|m| *m < size) {
                got = set(max);
            }
        }
        let capacity = if got > 0 {
            got as usize
        } else {
            // SAFETY: as above, read-only query.
            let cur = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if cur > 0 {
                cur as usize
            } else {
                64 * 1024
            }
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

impl Pipe {
    /// Copies as much of `bytes` into the pipe as it takes now (non-blocking; a full pipe, by
    /// bytes or by slots, stops it) and returns how many went in.
    pub(crate) fn write_some(&self, bytes: &[u8]) -> usize {
        let mut off = 0;
        while off < bytes.len() {
            // SAFETY: writes from a live slice to a pipe fd we own.
            let n = unsafe {
                libc::write(
                    self.write.as_raw_fd(),
                    bytes[off..].as_ptr().cast(),
                    bytes.len() - off,
                )
            };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        off
    }
}

/// `/proc/sys/fs/pipe-max-size`: the largest pipe an unprivileged process may ask for.
pub(crate) fn pipe_max_size() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Non-blocking `splice(2)` of up to `len` bytes between two fds (one must be a pipe).
/// `Ok(0)` is end of file on the input.
pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds the caller owns; no user memory is touched.
    let r = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        note_moved(r as usize);
        Ok(r as usize)
    }
}

thread_local! {
    /// Payload bytes this thread moved (splices, ring receives) since `take_moved`. Each shard
    /// is one thread, so this is per shard with no sharing.
    static MOVED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts payload bytes moved by this shard thread (feeds the busy-poll policy).
pub(crate) fn note_moved(n: usize) {
    MOVED.with(|m| m.set(m.get().saturating_add(n)));
}

/// Bytes moved by this thread since the last call.
pub(crate) fn take_moved() -> usize {
    MOVED.with(|m| m.replace(0))
}

/// Sets the calling thread's scheduling policy: `SCHED_IDLE` when `idle`, else `SCHED_OTHER`
/// (at the thread's nice value, which `SCHED_IDLE` keeps).
pub(crate) fn set_idle_class(idle: bool) -> io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's policy from a live sched_param.
    cvt(unsafe { libc::sched_setscheduler(0, policy, &param) }).map(drop)
}

/// Sets the calling thread's nice value (raising it is always allowed).
pub(crate) fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's id; the kernel checks the value.
    cvt(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) }).map(drop)
}

/// Whether a thread of this process may set its nice value to 19 (seccomp could refuse
/// `setpriority`). Tried on a throwaway thread; the error names what refused.
pub(crate) fn nice_allowed() -> Result<(), String> {
    std::thread::Builder::new()
        .name("warren-nice-probe".into())
        .stack_size(64 * 1024)
        .spawn(|| set_thread_nice(19).map_err(|e| format!("setpriority(19): {e}")))
        .map_err(|e| format!("spawning the probe thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("the probe thread panicked".into()))
}

/// Whether a thread of this process may enter `SCHED_IDLE` and come back to `SCHED_OTHER`.
/// Coming back needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the thread's nice value
/// (20 for nice 0; systemd: `LimitNICE=+0`). Tried on a throwaway thread, so a refusal strands
/// nobody in `SCHED_IDLE`; the error names what refused.
pub(crate) fn idle_class_reversible() -> Result<(), String> {
    let t = std::thread::Builder::new()
        .name("warren-sched-probe".into())
        .stack_size(64 * 1024)
        .spawn(|| -> Result<(), String> {
            set_idle_class(true).map_err(|e| format!("sched_setscheduler(SCHED_IDLE): {e}"))?;
            set_idle_class(false).map_err(|e| {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: `rl` is a valid, writable rlimit.
                let nice = if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut rl) } == 0 {
                    rl.rlim_cur.to_string()
                } else {
                    "unknown".into()
                };
                format!(
                    "back to SCHED_OTHER: {e} (needs CAP_SYS_NICE or RLIMIT_NICE >= 20, \
                     systemd LimitNICE=+0; RLIMIT_NICE is {nice})"
                )
            })
        })
        .map_err(|e| format!("spawning the probe thread: {e}"))?;
    t.join()
        .unwrap_or_else(|_| Err("the probe thread panicked".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe asked for more than `fs.pipe-max-size` gets at least that much (the cap, or
    /// all of it with CAP_SYS_RESOURCE), never the 64 KiB default it silently kept before.
    #[test]
    fn a_pipe_over_the_system_maximum_gets_the_maximum() {
        let max = pipe_max_size().expect("/proc/sys/fs/pipe-max-size is readable");
        let p = Pipe::new(4 * max).unwrap();
        assert!(p.capacity >= max, "capacity {} below {max}", p.capacity);
        let small = Pipe::new(8 * 4096).unwrap();
        assert_eq!(small.capacity, 8 * 4096);
    }

    #[test]
    fn write_some_stops_at_a_full_pipe_and_keeps_order() {
        let p = Pipe::new(4096).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let n = p.write_some(&data);
        assert_eq!(n, p.capacity, "a full pipe takes exactly its capacity");
        assert_eq!(p.write_some(&data[n..]), 0, "and then nothing");
        let mut back = vec![0u8; n];
        // SAFETY: reads into a buffer of `n` bytes from a pipe fd we own.
        let r = unsafe { libc::read(p.read.as_raw_fd(), back.as_mut_ptr().cast(), n) };
        assert_eq!(r as usize, n);
        assert_eq!(back, data[..n]);
    }
}
