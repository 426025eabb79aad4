//! Errors, one enum per operation: serving a backend, starting a client run, and one connection
//! of a run.
//!
//! A connection error says whose fault it was. The load tool sits at both ends of the path, so the
//! other side is always "the target": the tunnel under test or the backend behind it. `Local`
//! marks failures on this machine's side (for example running out of file descriptors).

use std::io;
use std::net::SocketAddr;

/// Starting or running a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source} (port in use, or a privileged port?)")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A client run could not start; per-connection failures are counted in the report instead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The target did not resolve to any address.
    #[error("target {target:?} does not resolve: {reason}")]
    Resolve { target: String, reason: String },
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    Param(String),
}

/// One connection of a run failed. Counted in [`crate::Report::errors`]; the first few messages
/// are kept in [`crate::Report::error_samples`].
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The target refused or did not answer the connection.
    #[error("target: connect failed: {0}")]
    Connect(io::Error),
    /// Reading or writing failed mid-way (reset, broken pipe).
    #[error("target: {phase}: {source}")]
    Io {
        phase: &'static str,
        source: io::Error,
    },
    /// The target closed the connection before the workload finished.
    #[error("target: closed the connection early ({phase})")]
    Eof { phase: &'static str },
    /// The receiver acknowledged a different byte count than was sent (data lost or corrupted).
    #[error("target: {who} acknowledged {got} of {expected} bytes")]
    Count {
        who: &'static str,
        expected: u64,
        got: u64,
    },
    /// Bytes arrived, but not the ones that were sent.
    #[error("target: corrupted data at byte {offset} ({phase})")]
    Corrupt { phase: &'static str, offset: u64 },
    /// No progress within the I/O timeout.
    #[error("target: no progress for {timeout_ms} ms ({phase})")]
    Timeout {
        phase: &'static str,
        timeout_ms: u64,
    },
}

impl ConnError {
    pub(crate) fn io(phase: &'static str) -> impl FnOnce(io::Error) -> ConnError {
        move |source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                ConnError::Eof { phase }
            } else {
                ConnError::Io { phase, source }
            }
        }
    }
}
