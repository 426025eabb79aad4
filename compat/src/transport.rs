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

use crate::records::Tls13Records;
use crate::short_io::ShortIo;

/// TLS state of a session, when it has one.
pub type TlsConn = rustls::Connection;

/// Plain or TLS byte pump over one non-blocking TCP socket. See the module docs.
#[derive(Debug)]
pub struct SessionIo {
    sock: TcpStream,
    tls: Option<Box<TlsConn>>,
    /// The session's records after the hand-over from rustls (then `tls` is None).
    records: Option<Box<Tls13Records>>,
    /// May take the record layer over from rustls at [`SessionIo::into_parts`] (its config
    /// enables secret extraction).
    takeover: bool,
    /// Where the reader is in the received TLS byte stream: rustls is only ever given whole
    /// records, so at the hand-over it holds none half-read.
    cursor: RecordCursor,
    /// Encoded bytes waiting for the socket (plain mode and own records; rustls keeps its own).
    out: BytesMut,
    /// Ciphertext read from the socket before it is opened (own records only).
    scratch: Vec<u8>,
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
    /// The TLS record layer, taken over from rustls (then `tls` is None): see
    /// [`crate::records`].
    pub records: Option<Box<Tls13Records>>,
}

/// Position in the received TLS stream, so that the handshake reader never hands rustls part
/// of a record (see [`SessionIo::into_parts`]).
#[derive(Debug, Default)]
struct RecordCursor {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl RecordCursor {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// How many bytes a read may take without passing the end of the current record (or of
    /// the next record's header).
    fn limit(&self, want: usize) -> usize {
        if self.body_left > 0 {
            want.min(self.body_left)
        } else {
            want.min(5 - self.header_len)
        }
    }

    fn advance(&mut self, read: &[u8]) {
        let mut read = read;
        while !read.is_empty() {
            if self.body_left > 0 {
                let n = read.len().min(self.body_left);
                self.body_left -= n;
                read = &read[n..];
            } else {
                let n = read.len().min(5 - self.header_len);
                self.header[self.header_len..self.header_len + n].copy_from_slice(&read[..n]);
                self.header_len += n;
                read = &read[n..];
                if self.header_len == 5 {
                    self.body_left = usize::from(self.header[3]) << 8 | usize::from(self.header[4]);
                    self.header_len = 0;
                }
            }
        }
    }
}

/// Largest plaintext read per call, so one busy session cannot starve the shard's other work.
const READ_BUDGET: usize = 1024 * 1024;

/// The socket as rustls reads it. With a cursor (only while a record takeover may follow) no
/// read passes a record boundary; without one, reads take what the buffer holds.
struct SockReader<'a>(&'a TcpStream, &'a mut ShortIo, Option<&'a mut RecordCursor>);
impl Read for SockReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = self.1.cap(buf.len());
        if let Some(c) = self.2.as_deref() {
            n = c.limit(n);
        }
        let n = self.0.try_read(&mut buf[..n])?;
        if let Some(c) = self.2.as_deref_mut() {
            c.advance(&buf[..n]);
        }
        Ok(n)
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

/// Why a session ended when its socket read EOF with `pending` bytes not yet decoded (a partial
/// frame), in the words both data planes log.
pub fn peer_closed(pending: usize) -> String {
    if pending == 0 {
        "the peer closed the connection".to_string()
    } else {
        format!("the peer closed the connection inside a frame ({pending} bytes pending)")
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
            records: None,
            takeover: false,
            cursor: RecordCursor::default(),
            out: BytesMut::new(),
            scratch: Vec::new(),
            short: ShortIo::default(),
        }
    }

    /// Lets [`SessionIo::into_parts`] take the record layer over from rustls (TLS 1.3 with a
    /// suite [`crate::records`] implements). Call it only when the connection's config sets
    /// `enable_secret_extraction`.
    pub fn allow_record_takeover(&mut self) {
        self.takeover = true;
    }

    /// Re-creates the pump on the current runtime from [`SessionIo::into_parts`].
    pub fn from_parts(parts: SessionParts) -> io::Result<(SessionIo, BytesMut)> {
        parts.sock.set_nonblocking(true)?;
        let sock = TcpStream::from_std(parts.sock)?;
        Ok((
            SessionIo {
                sock,
                tls: parts.tls,
                records: parts.records,
                takeover: false,
                cursor: RecordCursor::default(),
                out: BytesMut::new(),
                scratch: Vec::new(),
                short: ShortIo::default(),
            },
            parts.leftover,
        ))
    }

    /// Takes the pump apart; `leftover` is plaintext read but not consumed. Fails if encoded
    /// bytes are still waiting to be written (flush first). A finished TLS 1.3 handshake whose
    /// reader stopped at a record boundary hands its record layer over to
    /// [`Tls13Records`] when [`SessionIo::allow_record_takeover`] was called.
    pub fn into_parts(self, leftover: BytesMut) -> io::Result<SessionParts> {
        if self.wants_write() {
            return Err(io::Error::other(
                "session output not flushed before handoff",
            ));
        }
        let (mut tls, mut records) = (self.tls, self.records);
        if let Some(t) = tls.take_if(|t| {
            self.takeover && self.cursor.at_boundary() && Tls13Records::can_take_over(t).is_ok()
        }) {
            records = Some(Box::new(
                Tls13Records::take_over(*t).map_err(io::Error::other)?,
            ));
        }
        Ok(SessionParts {
            sock: self.sock.into_std()?,
            tls,
            leftover,
            records,
        })
    }

    /// The socket, to wait for readiness.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// True when this session is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some() || self.records.is_some()
    }

    /// Who seals and opens the session's records: "own-records" ([`crate::records`]),
    /// "rustls", or "none" (plain TCP). For the "session running" log line.
    pub fn tls_kind(&self) -> &'static str {
        match (&self.tls, &self.records) {
            (Some(_), _) => "rustls",
            (None, Some(_)) => "own-records",
            (None, None) => "none",
        }
    }

    /// True while the TLS handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Reads what the socket has (up to a budget) and appends the plaintext to `plain`.
    pub fn read_into(&mut self, plain: &mut BytesMut) -> io::Result<ReadOutcome> {
        if let Some(records) = self.records.as_mut() {
            let mut got = 0;
            while got < READ_BUDGET {
                if self.scratch.len() < 64 * 1024 {
                    self.scratch.resize(64 * 1024, 0);
                }
                let n = self.short.cap(self.scratch.len());
                match self.sock.try_read(&mut self.scratch[..n]) {
                    Ok(0) => {
                        return Ok(if got == 0 {
                            ReadOutcome::Eof
                        } else {
                            ReadOutcome::Progress
                        })
                    }
                    Ok(n) => {
                        got += n;
                        records.open(&self.scratch[..n], plain)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            return Ok(if got == 0 {
                ReadOutcome::WouldBlock
            } else {
                ReadOutcome::Progress
            });
        }
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
        let start = plain.len();
        while got < READ_BUDGET {
            let cursor = self.takeover.then_some(&mut self.cursor);
            match tls.read_tls(&mut SockReader(&self.sock, &mut self.short, cursor)) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
            process_into(tls, plain)?;
            if self.takeover && plain.len() > start && self.cursor.at_boundary() {
                // Stop after the first whole record with plaintext: the caller may be about
                // to hand the session over, and what follows belongs to the new owner.
                break;
            }
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
        if let Some(records) = self.records.as_mut() {
            return records.seal(plain, &mut self.out);
        }
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
        if self.records.is_some() {
            return !self.out.is_empty();
        }
        match &self.tls {
            None => !self.out.is_empty(),
            Some(t) => t.wants_write(),
        }
    }

    /// Writes as much pending output as the socket takes without blocking. Returns true when
    /// everything was written.
    pub fn flush(&mut self) -> io::Result<bool> {
        match self.tls.as_mut() {
            // Plain TCP, or records sealed by warren (queued in `out` too).
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
        if let Some(records) = self.records.as_mut() {
            let _ = records.seal_close_notify(&mut self.out);
        }
        let _ = self.flush_all().await;
        let _ = socket2::SockRef::from(&self.sock).shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::records::tests::{configs, SUITES};

    /// A TLS session over loopback TCP: `server` runs on a spawned task with the server end
    /// (handshake done); the client end, handshake done too, is returned with the task.
    async fn tls_pair<F, Fut, T>(
        takeover: bool,
        server: F,
    ) -> (SessionIo, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(SessionIo) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (sc, cc) = configs(SUITES[0]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let tls = TlsConn::from(ServerConnection::new(sc).unwrap());
            let mut io = SessionIo::new(sock, Some(tls));
            io.complete_tls_handshake(&mut BytesMut::new())
                .await
                .unwrap();
            server(io).await
        });
        let sock = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("warren.test").unwrap();
        let tls = TlsConn::from(ClientConnection::new(cc, name).unwrap());
        let mut io = SessionIo::new(sock, Some(tls));
        if takeover {
            io.allow_record_takeover();
        }
        io.complete_tls_handshake(&mut BytesMut::new())
            .await
            .unwrap();
        (io, task)
    }

    /// Reads until `plain` holds at least `n` bytes.
    async fn read_at_least(io: &mut SessionIo, plain: &mut BytesMut, n: usize) {
        while plain.len() < n {
            assert_eq!(io.read_some(plain).await.unwrap(), ReadOutcome::Progress);
        }
    }

    /// The server writes its last handshake-phase message and the first record of the next
    /// owner in one write, as a server shard that sends frames right after the accept does.
    /// The client's handshake reader stops at the end of the first record, so the second one
    /// is opened by the records taken over at the hand-over, not lost inside rustls.
    #[tokio::test(flavor = "current_thread")]
    async fn a_record_pipelined_behind_the_last_handshake_message_survives_the_hand_over() {
        let (mut io, server) = tls_pair(true, |mut io| async move {
            // Two records in one write.
            io.queue(b"accept").unwrap();
            io.queue(b"first frame after the hand-over").unwrap();
            io.flush_all().await.unwrap();
            let mut plain = BytesMut::new();
            read_at_least(&mut io, &mut plain, 5).await;
            plain
        })
        .await;
        let mut plain = BytesMut::new();
        read_at_least(&mut io, &mut plain, 6).await;
        assert_eq!(
            &plain[..],
            b"accept",
            "the reader went past the first record"
        );
        let parts = io.into_parts(BytesMut::new()).unwrap();
        assert!(parts.tls.is_none() && parts.records.is_some());
        let (mut io, _) = SessionIo::from_parts(parts).unwrap();
        assert_eq!(io.tls_kind(), "own-records");
        let want = b"first frame after the hand-over";
        let mut plain = BytesMut::new();
        read_at_least(&mut io, &mut plain, want.len()).await;
        assert_eq!(&plain[..], want);
        io.queue(b"hello").unwrap();
        io.flush_all().await.unwrap();
        assert_eq!(&server.await.unwrap()[..], b"hello");
    }

    /// Without the takeover the same bytes all go through rustls (and reads are not cut at
    /// record boundaries).
    #[tokio::test(flavor = "current_thread")]
    async fn without_the_takeover_rustls_keeps_the_records() {
        let (mut io, server) = tls_pair(false, |mut io| async move {
            io.queue(b"one").unwrap();
            io.flush_all().await.unwrap();
        })
        .await;
        read_at_least(&mut io, &mut BytesMut::new(), 3).await;
        server.await.unwrap();
        let parts = io.into_parts(BytesMut::new()).unwrap();
        assert!(parts.tls.is_some() && parts.records.is_none());
    }
}
