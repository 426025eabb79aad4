//! The one place the portable data plane reads the clock. `warren-proto` never does; it gets
//! `now` from here.

use std::time::Instant;

/// Current monotonic time.
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}
