//! The session connection's byte pump: plain TCP or rustls over a non-blocking socket.
//!
//! Readiness-driven and synchronous: the caller waits for the socket to be readable or writable
//! (tokio's `readable()` / `writable()`), then calls [`SessionIo::read_into`] or
//! [`SessionIo::flush`], which never block. The same type carries the handshake in the control
//! plane and the session on a shard: [`SessionIo::into_parts`] / [`SessionIo::from_parts`] move it
//! between runtimes without losing TLS state or bytes already read.

use std::io::{self, BufRead, Read, Write};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

use crate::short_io::ShortIo;

/// TLS state of a session, when it has one.
pub type TlsConn = rustls::Connection;

/// Plain or TLS byte pump over one non-blocking TCP socket. See the module docs.
#[derive(Debug)]
pub struct SessionIo {
    sock: TcpStream,
    tls: Option<Box<TlsConn>>,
    /// Encoded bytes waiting for the socket (plain mode only; rustls keeps its own).
    out: BytesMut,
    /// Short-I/O injection for tests; zero-sized and inert in normal builds.
    short: ShortIo,
}

/// What [`SessionIo::read_into`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Some bytes arrived (possibly 0 plaintext bytes, e.g. a TLS record fragment).
    Progress,
    /// Nothing to read right now.
    WouldBlock,
    /// The peer closed the connection.
    Eof,
}

/// The pieces of a [`SessionIo`], to move it to another runtime (thread).
#[derive(Debug)]
pub struct SessionParts {
    /// The socket, still non-blocking.
    pub sock: std::net::TcpStream,
    /// TLS state, if any.
    pub tls: Option<Box<TlsConn>>,
    /// Plaintext bytes already read but not yet consumed (pipelined after the handshake).
    pub leftover: BytesMut,
}

/// Largest plaintext read per call, so one busy session cannot starve the shard's other work.
const READ_BUDGET: usize = 1024 * 1024;

struct SockReader<'a>(&'a TcpStream, &'a mut ShortIo);
impl Read for SockReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.1.cap(buf.len());
        self.0.try_read(&mut buf[..n])
    }
}
struct SockWriter<'a>(&'a TcpStream, &'a mut ShortIo);
impl Write for SockWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.1.cap(buf.len());
        self.0.try_write(&buf[..n])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decrypts what rustls has buffered and appends the plaintext to `plain`. Both data planes
/// use it after handing rustls received records.
pub fn process_into(tls: &mut TlsConn, plain: &mut BytesMut) -> io::Result<()> {
    let state = tls
        .process_new_packets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut avail = state.plaintext_bytes_to_read();
    if avail == 0 {
        return Ok(());
    }
    // Copied straight out of rustls's buffers: `Read::read` would need `plain` zero-filled
    // first (a memset of every received byte).
    plain.reserve(avail);
    let mut reader = tls.reader();
    while avail > 0 {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        plain.extend_from_slice(chunk);
        reader.consume(n);
        avail = avail.saturating_sub(n);
    }
    Ok(())
}

impl SessionIo {
    /// Wraps a connected socket; `tls` is a fresh or in-progress rustls connection.
    pub fn new(sock: TcpStream, tls: Option<TlsConn>) -> SessionIo {
        let _ = sock.set_nodelay(true);
        let mut tls = tls;
        if let Some(t) = tls.as_mut() {
            // The session driver bounds what it queues (one transmit chunk while the socket is
            // not writable); rustls's own 64 KiB default would refuse a full chunk.
            t.set_buffer_limit(None);
        }
        SessionIo {
            sock,
            tls: tls.map(Box::new),
            out: BytesMut::new(),
            short: ShortIo::default(),
        }
    }

    /// Re-creates the pump on the current runtime from [`SessionIo::into_parts`].
    pub fn from_parts(parts: SessionParts) -> io::Result<(SessionIo, BytesMut)> {
        parts.sock.set_nonblocking(true)?;
        let sock = TcpStream::from_std(parts.sock)?;
        Ok((
            SessionIo {
                sock,
                tls: parts.tls,
                out: BytesMut::new(),
                short: ShortIo::default(),
            },
            parts.leftover,
        ))
    }

    /// Takes the pump apart; `leftover` is plaintext read but not consumed. Fails if encoded
    /// bytes are still waiting to be written (flush first).
    pub fn into_parts(self, leftover: BytesMut) -> io::Result<SessionParts> {
        if self.wants_write() {
            return Err(io::Error::other(
                "session output not flushed before handoff",
            ));
        }
        Ok(SessionParts {
            sock: self.sock.into_std()?,
            tls: self.tls,
            leftover,
        })
    }

    /// The socket, to wait for readiness.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// True when this session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True while the TLS handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Reads what the socket has (up to a budget) and appends the plaintext to `plain`.
    pub fn read_into(&mut self, plain: &mut BytesMut) -> io::Result<ReadOutcome> {
        let Some(tls) = self.tls.as_mut() else {
            let mut got = 0;
            while got < READ_BUDGET {
                plain.reserve(64 * 1024);
                match self.sock.try_read_buf(&mut self.short.read_buf(plain)) {
                    Ok(0) => {
                        return Ok(if got == 0 {
                            ReadOutcome::Eof
                        } else {
                            ReadOutcome::Progress
                        })
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            return Ok(if got == 0 {
                ReadOutcome::WouldBlock
            } else {
                ReadOutcome::Progress
            });
        };
        let mut got = 0;
        let mut eof = false;
        while got < READ_BUDGET {
            match tls.read_tls(&mut SockReader(&self.sock, &mut self.short)) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
            process_into(tls, plain)?;
        }
        if eof {
            // A clean close_notify or a plain TCP close: either way nothing more will come.
            let _ = tls.process_new_packets();
            return Ok(if got == 0 {
                ReadOutcome::Eof
            } else {
                ReadOutcome::Progress
            });
        }
        Ok(if got == 0 {
            ReadOutcome::WouldBlock
        } else {
            ReadOutcome::Progress
        })
    }

    /// Queues plaintext for the peer. Call [`SessionIo::flush`] to put it on the wire.
    pub fn queue(&mut self, plain: &[u8]) -> io::Result<()> {
        match self.tls.as_mut() {
            None => {
                self.out.extend_from_slice(plain);
                Ok(())
            }
            Some(tls) => tls.writer().write_all(plain),
        }
    }

    /// True while encoded bytes wait for the socket.
    pub fn wants_write(&self) -> bool {
        match &self.tls {
            None => !self.out.is_empty(),
            Some(t) => t.wants_write(),
        }
    }

    /// Writes as much pending output as the socket takes without blocking. Returns true when
    /// everything was written.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self.tls.as_mut() {
            None => {
                while !self.out.is_empty() {
                    let n = self.short.cap(self.out.len());
                    match self.sock.try_write(&self.out[..n]) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => self.out.advance(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
                // Keep an idle session from holding a large buffer.
                if self.out.capacity() > 4 * 1024 * 1024 {
                    self.out = BytesMut::new();
                }
                Ok(true)
            }
            Some(tls) => {
                while tls.wants_write() {
                    match tls.write_tls(&mut SockWriter(&self.sock, &mut self.short)) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
                Ok(true)
            }
        }
    }

    /// Writes everything pending, waiting for writability as needed.
    pub async fn flush_all(&mut self) -> io::Result<()> {
        while !self.flush()? {
            self.sock.writable().await?;
        }
        Ok(())
    }

    /// Waits until the socket is readable, then reads into `plain`.
    pub async fn read_some(&mut self, plain: &mut BytesMut) -> io::Result<ReadOutcome> {
        loop {
            match self.read_into(plain)? {
                ReadOutcome::WouldBlock => {}
                other => {
                    // TLS may need to answer (handshake messages, key updates).
                    if self.wants_write() {
                        self.flush_all().await?;
                    }
                    return Ok(other);
                }
            }
            if self.wants_write() {
                self.flush_all().await?;
            }
            self.sock.readable().await?;
        }
    }

    /// Drives a TLS handshake to completion (no-op for plain TCP).
    pub async fn complete_tls_handshake(&mut self, plain: &mut BytesMut) -> io::Result<()> {
        while self.is_handshaking() {
            self.flush_all().await?;
            if !self.is_handshaking() {
                break;
            }
            if self.read_some(plain).await? == ReadOutcome::Eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
        }
        self.flush_all().await
    }

    /// Sends TLS close_notify (if TLS) and flushes, best effort.
    pub async fn close(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
        }
        let _ = self.flush_all().await;
        let _ = socket2::SockRef::from(&self.sock).shutdown(std::net::Shutdown::Write);
    }
}
