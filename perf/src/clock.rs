//! The one place the load tool reads the wall clock.

use std::time::Instant;

/// The current instant.
///
/// `clippy.toml` forbids `Instant::now` because shard code must take `now` from its driver. A
/// load generator measures wall time by definition, so it reads the clock here and nowhere else.
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}
