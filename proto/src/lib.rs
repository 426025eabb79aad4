//! warren's protocol core, sans-IO.
//!
//! What it does: encodes and decodes frames, runs the versioned handshake (HMAC
//! challenge-response over a server nonce), and keeps the state of one session and all of its
//! streams: optimistic OPEN, FIN half-close, RST, per-stream credit windows plus a per-session
//! budget, RTT-driven window auto-tuning, round-robin sending with a quantum, keepalive and idle
//! deadlines.
//!
//! What it does not do: touch sockets, read clocks, spawn threads or pick random numbers. Bytes
//! and `now` go in through `handle_*`, frames, deadlines and events come out through `poll_*`.
//! The drivers (`warren-compat`, later the io_uring data plane) only move bytes.
#![forbid(unsafe_code)]

pub mod frame;
pub mod handshake;
pub mod session;
