//! The io_uring backend proper (Linux only).

pub(crate) mod awake_probe;
pub(crate) mod bufring;
pub(crate) mod bulk;
pub(crate) mod clock;
pub(crate) mod probe;
pub(crate) mod shard;
pub(crate) mod short_io;
pub(crate) mod sys;

use io_uring::IoUring;

use crate::probe::SetupFlags;

/// Builds a ring with `flags`, sized for `entries` submissions and four times as many
/// completions (multishot receives and accepts post many completions per submission).
pub(crate) fn build_ring(flags: SetupFlags, entries: u32) -> std::io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(entries * 4).setup_clamp();
    match flags {
        SetupFlags::DeferTaskrun => {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }
        SetupFlags::CoopTaskrun => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        SetupFlags::Plain => {}
    }
    b.build(entries)
}
