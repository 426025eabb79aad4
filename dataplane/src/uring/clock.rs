//! The one place the io_uring data plane reads the clock. `warren-proto` never does; it gets
//! `now` from here.

use std::time::Instant;

/// Current monotonic time.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}
