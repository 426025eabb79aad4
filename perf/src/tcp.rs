//! Socket helpers shared by the clients: resolve once, connect with `TCP_NODELAY`, and bound every
//! wait by the run's I/O timeout so a stuck tunnel fails the run instead of hanging it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{lookup_host, TcpStream};

use crate::error::{ConnError, RunError};

/// Resolves `target` (`host:port`) to its first address, once per run.
pub(crate) async fn resolve(target: &str) -> Result<SocketAddr, RunError> {
    let resolve_err = |reason: String| RunError::Resolve {
        target: target.to_owned(),
        reason,
    };
    lookup_host(target)
        .await
        .map_err(|e| resolve_err(e.to_string()))?
        .next()
        .ok_or_else(|| resolve_err("no addresses".to_owned()))
}

/// Connects to `addr` with `TCP_NODELAY` set (round trips must not wait for Nagle).
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnError> {
    let stream = within(timeout, "connect", async {
        TcpStream::connect(addr).await.map_err(ConnError::Connect)
    })
    .await?;
    stream.set_nodelay(true).map_err(ConnError::Connect)?;
    Ok(stream)
}

/// Runs `fut`, failing with [`ConnError::Timeout`] if it takes longer than `timeout`.
pub(crate) async fn within<T>(
    timeout: Duration,
    phase: &'static str,
    fut: impl Future<Output = Result<T, ConnError>>,
) -> Result<T, ConnError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(ConnError::Timeout {
            phase,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }),
    }
}

/// Runs an I/O future under the timeout, naming the phase in any error.
pub(crate) async fn io_within<T>(
    timeout: Duration,
    phase: &'static str,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, ConnError> {
    within(timeout, phase, async {
        fut.await.map_err(ConnError::io(phase))
    })
    .await
}
