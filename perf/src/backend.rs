//! The backends a tunnel forwards to: `sink` (the bulk protocol of [`crate::bulk`]), `echo`, and
//! `http`. Each accepts on one listener and serves every connection on its own task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::ServeError;
use crate::{bulk, http};

/// Read buffer of the echo backend.
const ECHO_BUF_BYTES: usize = 64 * 1024;

/// Pause after a failed accept (for example out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Which service a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Bulk protocol: download N bytes, or upload N bytes and get the count back.
    Sink,
    /// Writes back whatever it reads; closes its side after the client's EOF.
    Echo,
    /// HTTP/1.1 keep-alive: `/small` (2 bytes), `/large` (256 KiB), `/health` ("ok").
    Http,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sink => "sink",
            BackendKind::Echo => "echo",
            BackendKind::Http => "http",
        }
    }
}

/// Counters a backend keeps, for tests and for progress display.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections that ended with an I/O error (usually the client's doing).
    pub failed: AtomicU64,
}

/// A bound backend; [`Backend::run`] serves it.
#[derive(Debug)]
pub struct Backend {
    kind: BackendKind,
    listener: TcpListener,
    stats: Arc<BackendStats>,
}

impl Backend {
    /// Binds `addr` (port 0 picks a free port; see [`Backend::local_addr`]).
    pub async fn bind(kind: BackendKind, addr: SocketAddr) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(Backend {
            kind,
            listener,
            stats: Arc::default(),
        })
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address.
        self.listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    pub fn stats(&self) -> Arc<BackendStats> {
        self.stats.clone()
    }

    /// Accepts and serves connections until the task is dropped.
    pub async fn run(self) {
        let http = Arc::new(http::Responses::new());
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            // Small replies (echo, HTTP) must not wait for Nagle; failure only costs latency.
            stream.set_nodelay(true).ok();
            let stats = self.stats.clone();
            let kind = self.kind;
            let http = http.clone();
            tokio::spawn(async move {
                let result = match kind {
                    BackendKind::Sink => bulk::serve_sink(stream).await,
                    BackendKind::Echo => serve_echo(stream).await,
                    BackendKind::Http => http::serve(stream, &http).await,
                };
                if result.is_err() {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}

async fn serve_echo(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; ECHO_BUF_BYTES];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        stream.write_all(&buf[..n]).await?;
    }
}
