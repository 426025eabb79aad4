//! warren's portable data plane.
//!
//! What it does: runs the shard model of DESIGN.md on readiness-based I/O. Each shard is one
//! thread (pinned where the OS allows) with its own tokio current-thread runtime; it owns its
//! sessions, their streams, and its per-shard `SO_REUSEPORT` listeners. A visitor accepted by a
//! shard is served through a session on the same shard. The shards drive `warren-proto`
//! sessions: socket bytes in, frames out, nothing else.
//!
//! What it does not do: protocol logic (that is `warren-proto`), config, auth or placement
//! decisions (that is the control plane, which hands authenticated sessions to a shard through
//! a bounded lock-free queue). It builds on Linux and macOS; Linux-only calls sit behind `cfg`.

pub mod clock;
pub mod congestion;
mod driver;
pub mod listener;
pub mod records;
mod shard;
mod short_io;
pub mod transport;

pub use driver::LocalEnd;
pub use shard::{
    LocalService, Published, RouteBoard, SessionEnd, SessionHandoff, SessionRole, ShardCommand,
    ShardSetConfig, ShardStats, Shards,
};
