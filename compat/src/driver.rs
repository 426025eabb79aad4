//! Drives `warren-proto` sessions and streams on one shard.
//!
//! One task per session owns the session socket: it reads whatever arrives (always, whatever
//! the streams are doing) into the protocol core, writes what the core transmits, and fires
//! its deadlines. One task per stream owns the local socket (visitor or service) and moves
//! bytes between it and the core within the credit the core allows. They meet in a
//! `RefCell` on one thread and wake each other with per-task `Notify`s: no locks, no channels.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use warren_proto::frame::{GoAwayCode, ResetCode, StreamId};
use warren_proto::session::{Event, Readable, Role, Session};

use crate::clock::now;
use crate::shard::{LocalService, Published, SessionEnd, SessionHandoff, SessionRole, Shard};
use crate::short_io::ShortIo;
use crate::transport::{ReadOutcome, SessionIo};

/// Bytes of frames produced per transmit call before the socket gets them.
const TRANSMIT_CHUNK: usize = 256 * 1024;
/// Largest chunk a stream task takes from the core per write to its local socket.
const WRITE_CHUNK: usize = 256 * 1024;

/// Which local peer a stream talks to; decides whose fault a socket error is. Both data planes
/// use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalEnd {
    /// Server side: the visitor's connection.
    Visitor,
    /// Client side: the connection to the local service.
    Service,
}

impl LocalEnd {
    /// The reset code a socket error on this end is reported with.
    pub fn error_code(self) -> ResetCode {
        match self {
            LocalEnd::Visitor => ResetCode::VisitorError,
            LocalEnd::Service => ResetCode::ServiceError,
        }
    }

    /// "visitor" or "service", for logs.
    pub fn name(self) -> &'static str {
        match self {
            LocalEnd::Visitor => "visitor",
            LocalEnd::Service => "service",
        }
    }
}

/// The per-session state shared by its session task and stream tasks (same thread).
pub(crate) struct Core {
    pub(crate) session: Session,
    /// Wakes the stream task of each live stream.
    streams: HashMap<StreamId, Rc<Notify>>,
}

/// A session as the shard sees it.
pub(crate) struct SessionHandle {
    pub(crate) id: u64,
    peer_name: Arc<str>,
    role: SessionRole,
    pub(crate) core: RefCell<Core>,
    /// Wakes the session task: there is something to transmit.
    tx: Notify,
}

impl SessionHandle {
    pub(crate) fn serves(&self, service: &str) -> bool {
        match &self.role {
            SessionRole::Server { services } => services.iter().any(|s| &**s == service),
            SessionRole::Client { .. } => false,
        }
    }

    /// Opens a stream for a visitor (optimistic: no round trip).
    pub(crate) fn open_for_visitor(&self, service: &str, peer: SocketAddr) -> Option<StreamId> {
        let mut core = self.core.borrow_mut();
        match core.session.open_stream(service, Some(peer)) {
            Ok(id) => {
                core.streams.insert(id, Rc::new(Notify::new()));
                drop(core);
                self.tx.notify_one();
                Some(id)
            }
            Err(e) => {
                debug!(session = self.id, %service, "cannot open stream: {e}");
                None
            }
        }
    }

    pub(crate) fn go_away(&self, reason: &str) {
        self.core
            .borrow_mut()
            .session
            .go_away(GoAwayCode::NoError, reason);
        self.tx.notify_one();
    }
}

/// Starts a session task on this shard.
pub(crate) fn spawn_session(shard: Rc<Shard>, h: SessionHandoff) {
    let (io, leftover) = match SessionIo::from_parts(h.parts) {
        Ok(x) => x,
        Err(e) => {
            warn!(
                session = h.session_id,
                "cannot register session socket: {e}"
            );
            if let Some(done) = h.done {
                let _ = done.send(SessionEnd {
                    error: Some(e.to_string()),
                });
            }
            return;
        }
    };
    let role_kind = h.config.role;
    let handle = Rc::new(SessionHandle {
        id: h.session_id,
        peer_name: h.peer_name,
        role: h.role,
        core: RefCell::new(Core {
            session: Session::new(h.config, now()),
            streams: HashMap::new(),
        }),
        tx: Notify::new(),
    });
    if let SessionRole::Server { services } = &handle.role {
        for s in services {
            shard.board.add(s, shard.index);
        }
    }
    shard.sessions.borrow_mut().push(handle.clone());
    shard.stats.sessions.fetch_add(1, Ordering::Relaxed);
    if shard.draining.get() {
        handle.go_away("shutting down");
    }
    info!(
        shard = shard.index,
        session = handle.id,
        peer = %handle.peer_name,
        tls = io.tls_kind(),
        "session running"
    );
    let done = h.done;
    tokio::task::spawn_local(async move {
        let result = run_session(&shard, &handle, io, leftover).await;
        shard
            .sessions
            .borrow_mut()
            .retain(|s| !Rc::ptr_eq(s, &handle));
        shard.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        if let SessionRole::Server { services } = &handle.role {
            for s in services {
                shard.board.remove(s, shard.index);
            }
        }
        // Whose fault: the core knows whether the peer broke a rule (or went silent) or the
        // connection itself failed.
        let peer_fault = handle
            .core
            .borrow()
            .session
            .error()
            .is_some_and(|e| e.is_peer_fault());
        let side = match (peer_fault, role_kind) {
            (true, Role::Server) => "client side",
            (true, Role::Client) => "server side",
            (false, _) => "connection",
        };
        match &result {
            Ok(()) => {
                info!(session = handle.id, peer = %handle.peer_name, "session closed cleanly")
            }
            Err(e) => {
                warn!(session = handle.id, peer = %handle.peer_name, "session ended ({side}): {e}")
            }
        }
        if let Some(done) = done {
            let _ = done.send(SessionEnd {
                error: result.err(),
            });
        }
    });
}

enum Wake {
    Readable,
    Writable,
    Notified,
    Timer,
}

async fn run_session(
    shard: &Rc<Shard>,
    handle: &Rc<SessionHandle>,
    mut io: SessionIo,
    mut input: BytesMut,
) -> Result<(), String> {
    let mut out = Vec::with_capacity(TRANSMIT_CHUNK + 64 * 1024);
    let mut published = Published::default();
    let result = loop {
        let (closed, drained, deadline) = {
            let mut core = handle.core.borrow_mut();
            if !input.is_empty() {
                // Errors close the session inside the core and queue a GOAWAY; we flush it below.
                let _ = core.session.handle_input(now(), &mut input);
            }
            dispatch(shard, handle, &mut core);
            if !io.wants_write() && core.session.has_transmit() {
                out.clear();
                core.session.poll_transmit(&mut out, TRANSMIT_CHUNK);
                if let Err(e) = io.queue(&out) {
                    core.session.handle_connection_lost(&e.to_string());
                }
                dispatch(shard, handle, &mut core);
            }
            published.update(&shard.stats, core.session.stats());
            (
                core.session.error().cloned(),
                core.session.is_drained(),
                core.session.poll_timeout(),
            )
        };
        if io.wants_write() {
            if let Err(e) = io.flush() {
                lose(
                    shard,
                    handle,
                    &format!("writing to the session socket: {e}"),
                );
                // Nothing more can be written. Retrying the flush (the output is still
                // pending) would spin without yielding and wedge the shard.
                let why = handle.core.borrow().session.error().map(|e| e.to_string());
                break Err(why.unwrap_or_else(|| e.to_string()));
            }
        }
        if let Some(e) = closed {
            // Best effort: get the GOAWAY out (it may still be behind earlier output), then close.
            {
                let mut core = handle.core.borrow_mut();
                out.clear();
                core.session.poll_transmit(&mut out, TRANSMIT_CHUNK);
            }
            let _ = io.queue(&out);
            let _ = tokio::time::timeout(Duration::from_secs(1), io.flush_all()).await;
            break Err(e.to_string());
        }
        if drained && !io.wants_write() {
            io.close().await;
            break Ok(());
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            r = io.socket().readable() => r.map(|_| Wake::Readable),
            r = io.socket().writable(), if io.wants_write() => r.map(|_| Wake::Writable),
            _ = handle.tx.notified(), if !io.wants_write() => Ok(Wake::Notified),
            _ = sleep => Ok(Wake::Timer),
        };
        match wake {
            Ok(Wake::Readable) => match io.read_into(&mut input) {
                Ok(ReadOutcome::Eof) => {
                    let why = crate::transport::peer_closed(input.len());
                    // Process what is complete before declaring the loss.
                    let mut core = handle.core.borrow_mut();
                    let _ = core.session.handle_input(now(), &mut input);
                    input.clear();
                    drop(core);
                    lose(shard, handle, &why);
                }
                Ok(_) => {}
                Err(e) => lose(shard, handle, &format!("reading the session socket: {e}")),
            },
            Ok(Wake::Timer) => {
                let mut core = handle.core.borrow_mut();
                let _ = core.session.handle_timeout(now());
            }
            Ok(Wake::Writable | Wake::Notified) => {}
            Err(e) => lose(shard, handle, &format!("session socket: {e}")),
        }
    };
    let mut core = handle.core.borrow_mut();
    if !core.session.is_closed() {
        core.session.handle_connection_lost("session closed");
    }
    dispatch(shard, handle, &mut core);
    published.update(&shard.stats, core.session.stats());
    result
}

fn lose(shard: &Rc<Shard>, handle: &Rc<SessionHandle>, why: &str) {
    let mut core = handle.core.borrow_mut();
    core.session.handle_connection_lost(why);
    dispatch(shard, handle, &mut core);
}

/// Turns core events into wake-ups and new stream tasks. Runs on the session task only, which
/// checks for output itself; waking it from here would make it spin while the socket is full.
fn dispatch(shard: &Rc<Shard>, handle: &Rc<SessionHandle>, core: &mut Core) {
    while let Some(ev) = core.session.poll_event() {
        match ev {
            Event::StreamReadable(id)
            | Event::StreamWritable(id)
            | Event::StreamReset { id, .. } => {
                if let Some(n) = core.streams.get(&id) {
                    n.notify_one();
                }
            }
            Event::StreamOpened {
                id,
                service,
                visitor,
            } => match &handle.role {
                SessionRole::Client { services } => match services.get(&service) {
                    Some(target) => {
                        core.streams.insert(id, Rc::new(Notify::new()));
                        let target = target.clone();
                        tokio::task::spawn_local(dial_service(
                            shard.clone(),
                            handle.clone(),
                            id,
                            service,
                            visitor,
                            target,
                        ));
                    }
                    None => {
                        warn!(session = handle.id, %service, "server opened a stream for a service this client does not offer");
                        core.session.stream_reset(id, ResetCode::UnknownService);
                    }
                },
                SessionRole::Server { .. } => {
                    // Protocol version 1 has no client-initiated streams.
                    core.session.stream_reset(id, ResetCode::Refused);
                }
            },
            Event::GoAway { code, reason } => {
                info!(session = handle.id, peer = %handle.peer_name, "peer sent GOAWAY ({code}): {reason}");
            }
        }
    }
}

async fn dial_service(
    shard: Rc<Shard>,
    handle: Rc<SessionHandle>,
    id: StreamId,
    service: String,
    visitor: Option<SocketAddr>,
    target: LocalService,
) {
    let dial = tokio::time::timeout(target.connect_timeout, TcpStream::connect(&target.addr)).await;
    let sock = match dial {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refuse(&handle, id, &service, &target, &e.to_string()),
        Err(_) => {
            let why = format!("no answer within {} ms", target.connect_timeout.as_millis());
            return refuse(&handle, id, &service, &target, &why);
        }
    };
    if shard.loopback_cc.name().is_some() {
        // An IP address is the peer as written; a host name asks the socket which one it got.
        let peer = target
            .addr
            .parse::<SocketAddr>()
            .or_else(|_| sock.peer_addr());
        if let Ok(peer) = peer {
            shard.loopback_cc.apply(&sock, peer);
        }
    }
    debug!(session = handle.id, %id, %service, ?visitor, "service connected");
    run_stream(shard, handle, id, sock, LocalEnd::Service).await;
}

fn refuse(handle: &SessionHandle, id: StreamId, service: &str, target: &LocalService, why: &str) {
    warn!(session = handle.id, %id, %service, addr = %target.addr, "service unavailable (service side): {why}");
    let mut core = handle.core.borrow_mut();
    core.streams.remove(&id);
    core.session.stream_reset(id, ResetCode::ServiceUnavailable);
    drop(core);
    handle.tx.notify_one();
}

/// Starts the task that moves one visitor's bytes (server side).
pub(crate) fn spawn_stream(
    shard: Rc<Shard>,
    handle: Rc<SessionHandle>,
    id: StreamId,
    sock: TcpStream,
    end: LocalEnd,
) {
    tokio::task::spawn_local(run_stream(shard, handle, id, sock, end));
}

enum StreamWake {
    Writable,
    Readable,
    Notified,
}

/// Moves bytes between one local socket and its stream until both directions finish or the
/// stream is reset. Credit decides when the local socket is read; the core decides when it is
/// written.
async fn run_stream(
    shard: Rc<Shard>,
    handle: Rc<SessionHandle>,
    id: StreamId,
    sock: TcpStream,
    end: LocalEnd,
) {
    let _ = sock.set_nodelay(true);
    let Some(notify) = handle.core.borrow().streams.get(&id).cloned() else {
        return;
    };
    let mut pending: Option<Bytes> = None;
    let mut read_done = false;
    let mut write_done = false;
    let mut short = ShortIo::default();
    let outcome: Result<(), (ResetCode, String)> = loop {
        let cap = {
            let mut core = handle.core.borrow_mut();
            if !core.session_has(id) {
                break Err((ResetCode::Cancelled, String::new()));
            }
            if pending.is_none() && !write_done {
                match core.session.stream_read(now(), id, WRITE_CHUNK) {
                    Readable::Data(b) => pending = Some(b),
                    Readable::Fin => {
                        write_done = true;
                        let _ = socket2::SockRef::from(&sock).shutdown(std::net::Shutdown::Write);
                    }
                    Readable::Pending => {}
                    Readable::Gone => break Err((ResetCode::Cancelled, String::new())),
                }
                if core.session.has_transmit() {
                    handle.tx.notify_one();
                }
            }
            if read_done && write_done && pending.is_none() {
                break Ok(());
            }
            if read_done {
                0
            } else {
                core.session.stream_send_capacity(id)
            }
        };
        let wake = tokio::select! {
            biased;
            r = sock.writable(), if pending.is_some() => r.map(|_| StreamWake::Writable),
            r = sock.readable(), if cap > 0 => r.map(|_| StreamWake::Readable),
            _ = notify.notified() => Ok(StreamWake::Notified),
        };
        match wake {
            Err(e) => break Err((end.error_code(), e.to_string())),
            Ok(StreamWake::Notified) => {}
            Ok(StreamWake::Writable) => {
                let Some(chunk) = pending.as_mut() else {
                    continue;
                };
                let n = short.cap(chunk.len());
                match sock.try_write(&chunk[..n]) {
                    Ok(n) => {
                        chunk.advance(n);
                        if chunk.is_empty() {
                            pending = None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break Err((end.error_code(), format!("writing: {e}"))),
                }
            }
            Ok(StreamWake::Readable) => {
                // A fresh buffer per read, handed whole to the core: between reads an idle
                // stream holds no buffer at all.
                let mut rbuf = BytesMut::with_capacity(cap.min(shard.read_buffer));
                let limit = short.cap(cap.min(shard.read_buffer));
                let mut limited = bytes::BufMut::limit(&mut rbuf, limit);
                match sock.try_read_buf(&mut limited) {
                    Ok(0) => {
                        read_done = true;
                        let _ = handle.core.borrow_mut().session.stream_finish(id);
                        handle.tx.notify_one();
                    }
                    Ok(_) => {
                        let data = rbuf.freeze();
                        let mut core = handle.core.borrow_mut();
                        if let Err(e) = core.session.stream_write(id, data) {
                            break Err((ResetCode::Internal, e.to_string()));
                        }
                        drop(core);
                        handle.tx.notify_one();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break Err((end.error_code(), format!("reading: {e}"))),
                }
            }
        }
    };
    let mut core = handle.core.borrow_mut();
    core.streams.remove(&id);
    if let Err((code, why)) = outcome {
        if core.session_has(id) {
            // Our side failed: tell the peer whose fault it was.
            let side = match end {
                LocalEnd::Visitor => "visitor",
                LocalEnd::Service => "service",
            };
            debug!(session = handle.id, %id, "stream reset ({side} side): {why}");
            core.session.stream_reset(id, code);
            drop(core);
            handle.tx.notify_one();
        } else {
            drop(core);
        }
        // The peer (or the session) reset it: abort the local connection too.
        let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    }
}

impl Core {
    fn session_has(&self, id: StreamId) -> bool {
        self.session.stream_exists(id)
    }
}
