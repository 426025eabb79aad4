//! Fixtures for warren's criterion benchmarks (the bench targets live in `benches/benches/`).
//!
//! Does: build the things a benchmark measures, outside the timed region: an in-memory
//! server/client [`pair::Pair`] of protocol sessions with a virtual clock, sessions loaded with
//! queued data for the scheduler, and an in-process loopback [`tunnel::Tunnel`] (server, client,
//! a local service and blocking visitors) on port 0.
//!
//! Does not: measure anything by itself, assert speeds, or touch the network beyond 127.0.0.1.
//! Numbers are read from criterion's output; see `benches/README.md`.

pub mod pair;
pub mod tunnel;
