//! An in-process loopback tunnel: `warren`'s server and client started as a library on
//! 127.0.0.1 port 0 (one shard each, so one session), a local service, and blocking visitors.
//!
//! The service speaks a tiny protocol: the visitor sends `[op u8][len u64 BE]`. Op
//! [`OP_DOWNLOAD`]: the service sends `len` bytes, half-closes, and waits for the visitor to
//! close. Op [`OP_ECHO`]: the service echoes everything until the visitor half-closes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use warren::loopback::{Pair, PairSpec};

/// Service op: send `len` bytes to the visitor.
pub const OP_DOWNLOAD: u8 = 0;
/// Service op: echo until the visitor half-closes.
pub const OP_ECHO: u8 = 1;

/// Buffer size of the service and the visitors.
const IO_BUF: usize = 256 * 1024;

/// Which data plane carries the session. Bench groups are named after it, so a backend added
/// later is measured side by side with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The portable tokio backend (`warren-compat`).
    Compat,
    /// The Linux io_uring backend (`warren-dataplane`).
    Uring,
}

impl Backend {
    /// Every backend this build has, in the order benchmarks run them.
    pub const ALL: &'static [Backend] = &[Backend::Compat, Backend::Uring];

    /// The name used in benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Compat => "compat",
            Backend::Uring => "uring",
        }
    }
}

/// A running tunnel in front of a local benchmark service.
#[derive(Debug)]
pub struct Tunnel {
    /// The server and client.
    pair: Pair,
    /// The service's public address on the server: where visitors connect.
    pub public: SocketAddr,
    /// The service itself, for direct (untunnelled) comparisons.
    pub service: SocketAddr,
}

impl Tunnel {
    /// Starts the service, the server and the client, and waits until the session is
    /// registered on the server, so the first visitor is tunnelled at once.
    pub async fn start(backend: Backend) -> Result<Tunnel, String> {
        // Each backend is asked for explicitly: `uring` fails to start (with the cause) where
        // io_uring is unavailable, rather than quietly measuring compat twice.
        let backend = match backend {
            Backend::Compat => warren::backend::Backend::Compat,
            Backend::Uring => warren::backend::Backend::Uring,
        };
        let service = start_service().map_err(|e| format!("starting the service: {e}"))?;
        let pair = Pair::start(PairSpec {
            services: &[("bench", service)],
            backend,
            ..PairSpec::default()
        })
        .await
        .map_err(|e| format!("starting the tunnel: {e:#}"))?;
        let public = pair.public("bench");
        Ok(Tunnel {
            pair,
            public,
            service,
        })
    }

    /// Graceful stop of both ends.
    pub async fn shutdown(self) {
        self.pair.shutdown().await;
    }
}

/// The benchmark service on a thread per connection. Runs until the process exits.
fn start_service() -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || serve(s));
        }
    });
    Ok(addr)
}

fn serve(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut head = [0u8; 9];
    if s.read_exact(&mut head).is_err() {
        return;
    }
    let len = u64::from_be_bytes(head[1..].try_into().unwrap_or([0; 8]));
    let mut buf = vec![0x5au8; IO_BUF];
    match head[0] {
        OP_DOWNLOAD => {
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            // Wait for the visitor to close, so teardown is not part of the next measurement.
            let _ = s.read(&mut buf);
        }
        OP_ECHO => loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        },
        _ => {}
    }
}

/// Connects a visitor to `addr` and asks for `op` with `len`.
fn visit(addr: SocketAddr, op: u8, len: u64) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut head = [0u8; 9];
    head[0] = op;
    head[1..].copy_from_slice(&len.to_be_bytes());
    s.write_all(&head)?;
    Ok(s)
}

/// Downloads `len` bytes through `addr` with a new visitor connection; fails unless exactly
/// `len` bytes arrive before the service's half-close.
pub fn download(addr: SocketAddr, len: u64) -> std::io::Result<u64> {
    let mut s = visit(addr, OP_DOWNLOAD, len)?;
    let mut buf = vec![0u8; IO_BUF];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    if got != len {
        return Err(std::io::Error::other(format!(
            "download got {got} of {len} bytes"
        )));
    }
    Ok(got)
}

/// A visitor connection to the echo op, kept open across round trips.
#[derive(Debug)]
pub struct Echo {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Echo {
    /// Connects through `addr` and completes one round trip, so the stream is open end to end.
    pub fn connect(addr: SocketAddr, msg_len: usize) -> std::io::Result<Echo> {
        let mut e = Echo {
            stream: visit(addr, OP_ECHO, 0)?,
            buf: vec![0x42u8; msg_len],
        };
        e.round_trip()?;
        Ok(e)
    }

    /// Sends the message and reads it back whole.
    pub fn round_trip(&mut self) -> std::io::Result<()> {
        self.stream.write_all(&self.buf)?;
        self.stream.read_exact(&mut self.buf)
    }
}
