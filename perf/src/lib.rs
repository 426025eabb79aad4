//! warren's load tool: the backends a tunnel forwards to and the clients that drive traffic
//! through it, each run summarised as one JSON [`Report`].
//!
//! What it does: serves three backends on plain TCP — [`BackendKind::Sink`] (the bulk protocol
//! of [`bulk`]: download N bytes, or upload N bytes and get the count acknowledged),
//! [`BackendKind::Echo`] and [`BackendKind::Http`] (a minimal HTTP/1.1 keep-alive server for
//! `oha`/`wrk`) — and runs four client workloads against a target address: [`bulk`] (N streams x
//! M bytes, up or down), [`rr`] (fixed-size echo round trips, HDR histogram), [`connrate`]
//! (connect + small echo + close at a concurrency) and [`hold`] (open and hold N live
//! connections). Every byte it moves follows a deterministic [`pattern`], so the receiver checks
//! content as well as count: a benchmark that loses or corrupts data fails instead of reporting
//! a number.
//!
//! What it does not do: know anything about warren. It speaks TCP to a target address, which is
//! a tunnel's public port or the backend itself ("direct"); starting tunnels, comparing systems
//! and measuring their CPU and memory belong to `perf/compare`. It does not print: progress is
//! published through [`Live`] counters that the caller polls (the `warren-load` binary prints
//! them to stderr; `warren bench` can draw a bar from the same counters).

pub mod backend;
pub mod bulk;
pub mod clock;
pub mod connrate;
pub mod error;
pub mod hold;
mod http;
pub mod pattern;
pub mod report;
pub mod rr;
mod tcp;

pub use backend::{Backend, BackendKind};
pub use error::{ConnError, RunError, ServeError};
pub use report::{LatencySummary, Live, Report};
