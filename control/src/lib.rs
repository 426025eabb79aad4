//! warren's control plane: CLI, TOML config, TLS setup, session handshakes and placement,
//! signals, and the in-process `demo`. It never sits on the per-byte path: once a session is
//! authenticated it is handed to a shard of the data plane.

pub mod backend;
pub mod bench;
pub mod client;
pub mod config;
pub mod demo;
pub mod loopback;
pub mod server;
pub mod setup;
pub mod signals;
pub mod tls;
