//! Is io_uring usable here, and with which setup flags? `auto` asks this once at start-up and
//! falls back to the portable backend with the cause in one log line; `uring` fails with it.

use std::fmt;

/// Why io_uring cannot carry the data plane on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// Not a Linux build.
    #[error("io_uring exists only on Linux")]
    NotLinux,
    /// `kernel.io_uring_disabled` forbids it.
    #[error("io_uring is disabled by sysctl kernel.io_uring_disabled = {0} (0 allows it; 1 allows only CAP_SYS_ADMIN or kernel.io_uring_group)")]
    DisabledBySysctl(u8),
    /// `io_uring_setup` returned EPERM while the sysctl allows it: a seccomp filter (Docker's
    /// default profile, systemd `SystemCallFilter=`) blocks it.
    #[error("io_uring_setup is refused with EPERM: a seccomp filter blocks io_uring (Docker's default profile does; allow io_uring_setup, io_uring_enter and io_uring_register)")]
    Seccomp,
    /// The kernel has no io_uring at all.
    #[error("this kernel has no io_uring (io_uring_setup returned ENOSYS)")]
    NotBuiltIn,
    /// The kernel lacks something the data plane needs.
    #[error("the kernel is too old for warren's io_uring data plane: {0} (kernel {1}; 6.1 or newer is recommended)")]
    KernelTooOld(String, String),
    /// Not enough locked memory for the rings.
    #[error("io_uring_setup failed with ENOMEM: RLIMIT_MEMLOCK ({0} bytes) is too low for the rings on this kernel; raise LimitMEMLOCK=")]
    Memlock(u64),
    /// Setup worked but a socketpair round trip did not.
    #[error("io_uring smoke test failed: {0}")]
    SmokeTest(String),
    /// Anything else, with the OS error.
    #[error("io_uring_setup failed: {0}")]
    Setup(String),
}

/// What the probe found; the shards set up their rings with the same flags.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// Ring setup flags that the kernel accepted.
    pub setup: SetupFlags,
    /// `RLIMIT_MEMLOCK` soft limit in bytes (registered buffers need it; they are optional).
    pub memlock_bytes: u64,
    /// `IORING_OP_SEND_ZC` is available.
    pub send_zc: bool,
    /// Kernel TLS offload: `Ok` when the kernel offers it, else why not. Sessions use rustls
    /// inside the shard either way (see ARCHITECTURE.md, "TLS sessions").
    pub ktls: Result<(), String>,
}

/// The ring setup flags in use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupFlags {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG` (6.1+): completions run only when the
    /// shard asks, on the shard's own thread.
    DeferTaskrun,
    /// `COOP_TASKRUN | TASKRUN_FLAG` (5.19+).
    CoopTaskrun,
    /// No flags.
    Plain,
}

impl fmt::Display for SetupFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SetupFlags::DeferTaskrun => "SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG",
            SetupFlags::CoopTaskrun => "COOP_TASKRUN|TASKRUN_FLAG",
            SetupFlags::Plain => "none",
        })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "io_uring on kernel {} (setup flags {}, RLIMIT_MEMLOCK {} KiB, send_zc {}, kernel TLS {})",
            self.kernel,
            self.setup,
            self.memlock_bytes / 1024,
            self.send_zc,
            match &self.ktls {
                Ok(()) => "available".to_string(),
                Err(e) => format!("unavailable: {e}"),
            }
        )
    }
}

/// Probes io_uring: setup flags, the opcodes the data plane uses, provided-buffer rings, and a
/// socketpair send/recv round trip through a ring (catches seccomp filters that allow setup but
/// not enter).
pub fn probe() -> Result<Probe, Unavailable> {
    #[cfg(target_os = "linux")]
    {
        crate::uring::probe::run()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(Unavailable::NotLinux)
    }
}
