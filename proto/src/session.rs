//! One session and all of its streams, as a deterministic state machine.
//!
//! Input: [`Session::handle_input`] (bytes read from the session socket), [`Session::handle_timeout`],
//! and the stream calls a driver makes on behalf of local sockets ([`Session::stream_write`],
//! [`Session::stream_read`], [`Session::stream_finish`], [`Session::stream_reset`],
//! [`Session::open_stream`]). Output: [`Session::poll_transmit`] (bytes to write to the session
//! socket), [`Session::poll_event`] and [`Session::poll_timeout`]. The caller owns every clock
//! read and every socket.
//!
//! Flow control: each stream has a receive window granted to the peer as credit; credit comes
//! back only when the driver *consumes* bytes through [`Session::stream_read`], so a stalled local
//! consumer stalls only its own stream. A per-session budget bounds the bytes buffered across all
//! streams. The session socket is therefore always readable without unbounded buffering: the peer
//! cannot send more than it was granted, and sending more is a flow-control error.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::frame::{
    data_header, is_valid_name, Frame, FrameError, FrameType, GoAwayCode, Header, ResetCode,
    StreamId, HEADER_LEN,
};
use crate::handshake::PeerParams;

/// Which end of the session this is. Decides stream id parity: the server opens odd ids, the
/// client even ones, so both can open streams without coordination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The public relay.
    Server,
    /// The agent behind NAT.
    Client,
}

/// Everything a session needs to know, fixed at creation (after the handshake).
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our end.
    pub role: Role,
    /// What we advertised we will receive (our windows, frame size, stream limit).
    pub local: PeerParams,
    /// What the peer advertised it will receive.
    pub peer: PeerParams,
    /// Ceiling for auto-tuned per-stream receive windows.
    pub max_stream_window: u32,
    /// Receive windows smaller than this grow on the smoothed RTT, larger ones only on the
    /// minimum RTT. The smoothed RTT includes the queueing a stream's own bulk data causes, so
    /// it lets a window grow for that queue; that costs nothing while the driver moves the
    /// window's bytes without copying them (the io_uring driver sets this to its splice pipe's
    /// capacity) and memory and copies beyond it. `max_stream_window` keeps the smoothed RTT
    /// throughout.
    pub smoothed_rtt_window: u32,
    /// Bytes one stream may send before the scheduler moves to the next ready stream.
    pub quantum: u32,
    /// Bytes a stream may hold queued in userspace for sending (beyond that the driver stops
    /// reading its local socket; the kernel buffers the rest).
    pub stream_send_buffer: u32,
    /// A PING is sent after this much time without one.
    pub keepalive_interval: Duration,
    /// The session ends if nothing at all was received for this long.
    pub idle_timeout: Duration,
}

/// Something the driver should react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream. The driver connects it to `service` (or resets it).
    StreamOpened {
        /// The new stream.
        id: StreamId,
        /// Which service the visitor wants.
        service: String,
        /// Who the visitor is, when the server knows.
        visitor: Option<SocketAddr>,
    },
    /// Data or FIN is waiting in [`Session::stream_read`].
    StreamReadable(StreamId),
    /// [`Session::stream_send_capacity`] went from 0 to more than 0.
    StreamWritable(StreamId),
    /// The stream is gone (reset by the peer, or the session ended). The driver closes its socket.
    StreamReset {
        /// The stream.
        id: StreamId,
        /// Why.
        code: ResetCode,
    },
    /// The peer will accept no new streams.
    GoAway {
        /// Why.
        code: GoAwayCode,
        /// The peer's words.
        reason: String,
    },
}

/// What [`Session::stream_read`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readable {
    /// Bytes for the local socket. Credit for them has been (or will be) returned to the peer.
    Data(Bytes),
    /// The peer half-closed; shut down the local socket's write side.
    Fin,
    /// Nothing yet; an [`Event::StreamReadable`] will follow.
    Pending,
    /// The stream does not exist (any more): it was reset or has completed.
    Gone,
}

/// Why a session ended. Every variant says whose fault it was through [`SessionError::is_peer_fault`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent a frame we cannot accept.
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer broke a protocol rule about stream ids or ordering.
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    /// The peer sent more than the credit it was granted.
    #[error("peer exceeded its flow-control credit on {scope} ({sent} bytes over)")]
    FlowControl {
        /// "stream N" or "the session".
        scope: String,
        /// How far over.
        sent: u64,
    },
    /// Nothing was received within the idle timeout.
    #[error("nothing received from the peer for {idle_ms} ms")]
    IdleTimeout {
        /// The configured timeout.
        idle_ms: u64,
    },
    /// The peer queued more control work than we are willing to buffer (it is not reading).
    #[error("peer caused more than {limit} bytes of queued control frames without reading them")]
    ControlFlood {
        /// The limit.
        limit: usize,
    },
    /// The peer sent GOAWAY with an error code.
    #[error("peer closed the session: {code}: {reason}")]
    PeerGoAway {
        /// Its code.
        code: GoAwayCode,
        /// Its words.
        reason: String,
    },
    /// The connection carrying the session broke.
    #[error("session connection lost: {0}")]
    ConnectionLost(String),
}

impl SessionError {
    /// True when the peer caused it (bad input, timeouts, its own GOAWAY); false for local causes.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, SessionError::ConnectionLost(_))
    }

    fn goaway_code(&self) -> GoAwayCode {
        match self {
            SessionError::FlowControl { .. } => GoAwayCode::FlowControlError,
            SessionError::IdleTimeout { .. } => GoAwayCode::IdleTimeout,
            SessionError::PeerGoAway { .. } | SessionError::ConnectionLost(_) => {
                GoAwayCode::NoError
            }
            _ => GoAwayCode::ProtocolError,
        }
    }
}

/// Errors from the stream calls a driver makes. These are driver bugs or races with a reset, never
/// peer faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream was reset or has completed.
    #[error("stream {0} does not exist")]
    Gone(StreamId),
    /// More bytes were written than [`Session::stream_send_capacity`] allowed.
    #[error("stream {id}: wrote {len} bytes with only {capacity} of capacity")]
    OverCapacity {
        /// The stream.
        id: StreamId,
        /// Bytes offered.
        len: usize,
        /// Bytes allowed.
        capacity: usize,
    },
    /// Data written after [`Session::stream_finish`].
    #[error("stream {0} is already finished")]
    Finished(StreamId),
}

/// Why a new stream could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// GOAWAY was sent or received, or the session is closed.
    #[error("the session is going away")]
    GoingAway,
    /// The peer's concurrent stream limit is reached.
    #[error("the peer's limit of {0} concurrent streams is reached")]
    TooManyStreams(u32),
    /// The service name is not 1..=64 bytes of `[A-Za-z0-9_.-]`.
    #[error("invalid service name")]
    BadServiceName,
    /// This side has used every stream id.
    #[error("stream ids exhausted")]
    IdsExhausted,
}

/// Counters for metrics and tests. Cheap to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams currently open.
    pub streams: usize,
    /// Payload bytes sent in DATA frames.
    pub data_bytes_sent: u64,
    /// Payload bytes received in DATA frames.
    pub data_bytes_received: u64,
    /// Payload bytes currently buffered for local consumers, across streams.
    pub recv_buffered: u64,
    /// The most any single stream has ever had buffered.
    pub max_stream_recv_buffered: u32,
    /// Sum of the current receive windows of open streams: a stream never buffers more than
    /// its window, so this bounds what the open streams can make us hold.
    pub recv_windows: u64,
    /// Smoothed round-trip time from PING/PONG, once measured.
    pub rtt: Option<Duration>,
    /// The smallest round-trip time measured lately (see [`MIN_RTT_LIFETIME`]): the path's
    /// own delay without the queueing our traffic adds. Window auto-tuning uses it.
    pub min_rtt: Option<Duration>,
}

/// PINGs sent back to back when a session starts (each one as the previous PONG arrives), so
/// the minimum RTT that window auto-tuning uses does not rest on the first probe alone, which
/// pays for cold caches and sleeping threads.
const STARTUP_PINGS: u8 = 4;
/// How long the minimum RTT stands before a newer sample replaces it even if larger (a path
/// that really got slower); at the default keepalive that is 30 samples.
pub const MIN_RTT_LIFETIME: Duration = Duration::from_secs(300);
/// The smallest RTT auto-tuning assumes: below it, scheduling noise on a busy host, not the
/// path, decides how fast credit comes back.
const MIN_TUNING_RTT: Duration = Duration::from_micros(100);
/// Past `SessionConfig::smoothed_rtt_window`, the shortest time over which a consumption rate
/// may grow a window. On a path of a few hundred microseconds a whole window consumed at once
/// after a stall (a splice of a full pipe into a socket that just drained) looks, over one
/// RTT, many times faster than the consumer really is; over 10 ms such a burst adds at most a
/// window per 10 ms to the rate. A path with a longer RTT measures over its RTT as before.
const PAST_LIMIT_RATE_INTERVAL: Duration = Duration::from_millis(10);

/// A read that large is split so one stream cannot hand the driver an arbitrary amount.
const SMALL_CHUNK: usize = 16 * 1024;
/// Bound on queued control frames (window updates, PONGs, RSTs): a peer that floods us while not
/// reading hits it and loses its session.
const CONTROL_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug)]
struct Stream {
    // Receive half.
    recv: VecDeque<BytesMut>,
    recv_buffered: u32,
    /// Payload bytes received into the driver's own buffer (a splice pipe), not yet consumed.
    /// They come before everything in `recv`.
    recv_external: u32,
    /// Current window size (grows by auto-tuning).
    recv_window: u32,
    /// Bytes the peer may still send before breaking flow control.
    recv_credit: u64,
    /// Bytes consumed by the driver and not yet granted back.
    recv_unacked: u32,
    recv_fin: bool,
    /// Start of the interval over which auto-tuning measures the consumption rate (set by
    /// the first grant, restarted whenever a grant judges it), and the bytes consumed since.
    rate_since: Option<Instant>,
    rate_bytes: u32,
    readable_signalled: bool,
    high_water: u32,
    // Send half.
    send: VecDeque<Bytes>,
    send_queued: u32,
    /// Bytes the peer still lets us send on this stream.
    send_credit: u64,
    fin_queued: bool,
    fin_sent: bool,
    in_ready: bool,
    want_writable: bool,
    /// Listed in `Session::blocked_on_session`: waiting for session-level credit.
    session_blocked: bool,
    /// The driver has seen the FIN (or the stream was refused): the receive half is finished.
    recv_done: bool,
}

impl Stream {
    fn new(local_window: u32, peer_window: u32) -> Stream {
        Stream {
            recv: VecDeque::new(),
            recv_buffered: 0,
            recv_external: 0,
            recv_window: local_window,
            recv_credit: u64::from(local_window),
            recv_unacked: 0,
            recv_fin: false,
            rate_since: None,
            rate_bytes: 0,
            readable_signalled: false,
            high_water: 0,
            send: VecDeque::new(),
            send_queued: 0,
            send_credit: u64::from(peer_window),
            fin_queued: false,
            fin_sent: false,
            in_ready: false,
            want_writable: false,
            session_blocked: false,
            recv_done: false,
        }
    }
}

/// The state of one session: see the module docs.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    streams: HashMap<StreamId, Stream>,
    next_local_id: u32,
    last_peer_id: u32,
    /// Encoded control frames, sent before any data.
    control: Vec<u8>,
    /// Streams with data to send, in round-robin order.
    ready: VecDeque<StreamId>,
    send_session_credit: u64,
    recv_session_credit: u64,
    recv_session_unacked: u64,
    events: VecDeque<Event>,
    last_recv: Instant,
    next_ping: Instant,
    ping_in_flight: Option<(u64, Instant)>,
    ping_seq: u64,
    srtt: Option<Duration>,
    /// The smallest recent RTT sample and when it was taken (see [`MIN_RTT_LIFETIME`]).
    min_rtt: Option<(Duration, Instant)>,
    /// Start-up PINGs still to send (see [`STARTUP_PINGS`]).
    startup_pings: u8,
    goaway_sent: bool,
    goaway_received: bool,
    closed: Option<SessionError>,
    stats: SessionStats,
    /// Streams that asked for external send credit while the session window was used up; each
    /// gets `StreamWritable` when the peer grants session credit again. At most one entry per
    /// stream (`Stream::session_blocked`).
    blocked_on_session: Vec<StreamId>,
}

impl Session {
    /// A fresh session, right after the handshake. Queues a PING so the RTT (and with it window
    /// auto-tuning) is known from the start.
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        let next_local_id = match cfg.role {
            Role::Server => 1,
            Role::Client => 2,
        };
        let mut s = Session {
            blocked_on_session: Vec::new(),
            send_session_credit: u64::from(cfg.peer.session_window),
            recv_session_credit: u64::from(cfg.local.session_window),
            cfg,
            streams: HashMap::new(),
            next_local_id,
            last_peer_id: 0,
            control: Vec::new(),
            ready: VecDeque::new(),
            recv_session_unacked: 0,
            events: VecDeque::new(),
            last_recv: now,
            next_ping: now,
            ping_in_flight: None,
            ping_seq: 0,
            srtt: None,
            min_rtt: None,
            startup_pings: STARTUP_PINGS - 1,
            goaway_sent: false,
            goaway_received: false,
            closed: None,
            stats: SessionStats::default(),
        };
        s.send_ping(now);
        s
    }

    /// The configuration the session was built with.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Counters for metrics and tests.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            streams: self.streams.len(),
            rtt: self.srtt,
            min_rtt: self.min_rtt.map(|(rtt, _)| rtt),
            ..self.stats
        }
    }

    /// Bytes currently buffered for one stream's local consumer (0 for unknown streams).
    pub fn stream_recv_buffered(&self, id: StreamId) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.recv_buffered)
    }

    /// The current receive window of a stream (what the peer may have in flight to us).
    pub fn stream_recv_window(&self, id: StreamId) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.recv_window)
    }

    /// Why the session ended, once it has. The driver flushes [`Session::poll_transmit`] (which
    /// then holds the GOAWAY) and closes the connection.
    pub fn error(&self) -> Option<&SessionError> {
        self.closed.as_ref()
    }

    /// True once the session has ended; no more input is processed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// True when GOAWAY went either way and every stream has finished: the connection can close.
    pub fn is_drained(&self) -> bool {
        (self.goaway_sent || self.goaway_received || self.closed.is_some())
            && self.streams.is_empty()
    }

    /// True while the stream exists (not reset, not completed).
    pub fn stream_exists(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    // ----- input ---------------------------------------------------------------------------

    /// Consumes every complete frame at the front of `input` (bytes read from the session
    /// socket). Partial frames stay in `input`. On error the session is closed, a GOAWAY is queued
    /// and every stream is reported reset.
    pub fn handle_input(&mut self, now: Instant, input: &mut BytesMut) -> Result<(), SessionError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if !input.is_empty() {
            self.last_recv = now;
        }
        loop {
            let frame = match Frame::decode(input, self.cfg.local.max_frame_payload) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(self.fail(e.into())),
            };
            if let Err(e) = self.handle_frame(now, frame) {
                return Err(self.fail(e));
            }
        }
        if self.control.len() > CONTROL_LIMIT {
            return Err(self.fail(SessionError::ControlFlood {
                limit: CONTROL_LIMIT,
            }));
        }
        Ok(())
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Data { stream, payload } => self.on_data(stream, payload),
            Frame::Open {
                stream,
                service,
                visitor,
            } => self.on_open(stream, service, visitor),
            Frame::Fin { stream } => {
                self.check_known(stream, "FIN")?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    if s.recv_fin {
                        return Err(SessionError::Protocol(format!(
                            "second FIN on stream {stream}"
                        )));
                    }
                    s.recv_fin = true;
                    signal_readable(&mut self.events, stream, s);
                }
                Ok(())
            }
            Frame::Rst { stream, code } => {
                self.check_known(stream, "RST")?;
                if let Some(s) = self.remove_stream(stream) {
                    self.release_buffered(&s);
                    self.events
                        .push_back(Event::StreamReset { id: stream, code });
                }
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                let inc = u64::from(increment);
                if stream == StreamId::SESSION {
                    self.send_session_credit += inc;
                    if self.send_session_credit > u64::from(u32::MAX) * 4 {
                        return Err(SessionError::FlowControl {
                            scope: "the session window (over 16 GiB granted)".into(),
                            sent: 0,
                        });
                    }
                    // Streams that found the session window used up may send again.
                    let buffer = self.cfg.stream_send_buffer;
                    for id in std::mem::take(&mut self.blocked_on_session) {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.session_blocked = false;
                            signal_writable(&mut self.events, id, s, buffer);
                        }
                    }
                    return Ok(());
                }
                self.check_known(stream, "WINDOW_UPDATE")?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.send_credit += inc;
                    if s.send_credit > u64::from(u32::MAX) {
                        return Err(SessionError::FlowControl {
                            scope: format!("stream {stream} window (over 4 GiB granted)"),
                            sent: 0,
                        });
                    }
                    if !s.send.is_empty() && !s.in_ready {
                        s.in_ready = true;
                        self.ready.push_back(stream);
                    }
                    signal_writable(&mut self.events, stream, s, self.cfg.stream_send_buffer);
                }
                Ok(())
            }
            Frame::Ping { opaque } => {
                Frame::Pong { opaque }.encode(&mut self.control);
                Ok(())
            }
            Frame::Pong { opaque } => {
                if let Some((seq, sent)) = self.ping_in_flight {
                    if seq == opaque {
                        self.ping_in_flight = None;
                        let sample = now.saturating_duration_since(sent);
                        self.srtt = Some(match self.srtt {
                            None => sample,
                            Some(old) => (old * 7 + sample) / 8,
                        });
                        let stale = |(min, at): (Duration, Instant)| {
                            sample <= min || now.saturating_duration_since(at) > MIN_RTT_LIFETIME
                        };
                        if self.min_rtt.is_none_or(stale) {
                            self.min_rtt = Some((sample, now));
                        }
                        if self.startup_pings > 0 {
                            self.startup_pings -= 1;
                            self.send_ping(now);
                        }
                    }
                }
                Ok(())
            }
            Frame::GoAway { code, reason, .. } => {
                if code != GoAwayCode::NoError {
                    return Err(SessionError::PeerGoAway { code, reason });
                }
                if !self.goaway_received {
                    self.goaway_received = true;
                    self.events.push_back(Event::GoAway { code, reason });
                }
                Ok(())
            }
        }
    }

    fn is_local_id(&self, id: StreamId) -> bool {
        let odd = id.0 % 2 == 1;
        match self.cfg.role {
            Role::Server => odd,
            Role::Client => !odd,
        }
    }

    /// A frame for a stream that is not open is fine when the stream existed before (it may have
    /// been reset while the frame was in flight) and a protocol error when it never did.
    fn check_known(&self, id: StreamId, kind: &str) -> Result<(), SessionError> {
        let existed = if self.is_local_id(id) {
            id.0 < self.next_local_id
        } else {
            id.0 <= self.last_peer_id
        };
        if existed {
            Ok(())
        } else {
            Err(SessionError::Protocol(format!(
                "{kind} on stream {id}, which was never opened"
            )))
        }
    }

    fn on_data(&mut self, id: StreamId, payload: Bytes) -> Result<(), SessionError> {
        let len = payload.len() as u64;
        self.stats.data_bytes_received += len;
        if len > self.recv_session_credit {
            return Err(SessionError::FlowControl {
                scope: "the session".into(),
                sent: len - self.recv_session_credit,
            });
        }
        self.recv_session_credit -= len;
        self.check_known(id, "DATA")?;
        let Some(s) = self.streams.get_mut(&id) else {
            // Stream already gone: drop the bytes but give the session credit back.
            self.recv_session_unacked += len;
            self.maybe_grant_session();
            return Ok(());
        };
        if s.recv_fin {
            return Err(SessionError::Protocol(format!(
                "DATA after FIN on stream {id}"
            )));
        }
        if len > s.recv_credit {
            return Err(SessionError::FlowControl {
                scope: format!("stream {id}"),
                sent: len - s.recv_credit,
            });
        }
        s.recv_credit -= len;
        // Copy into the stream's own buffer: the session read buffer is recycled at once, and a
        // stalled stream then holds exactly its window, never pieces of larger allocations.
        match s.recv.back_mut() {
            Some(last) if last.len() + payload.len() <= SMALL_CHUNK || payload.len() < 512 => {
                last.extend_from_slice(&payload)
            }
            _ => s.recv.push_back(BytesMut::from(&payload[..])),
        }
        s.recv_buffered += len as u32;
        s.high_water = s.high_water.max(s.recv_buffered);
        self.stats.max_stream_recv_buffered = self.stats.max_stream_recv_buffered.max(s.high_water);
        self.stats.recv_buffered += len;
        signal_readable(&mut self.events, id, s);
        Ok(())
    }

    fn on_open(
        &mut self,
        id: StreamId,
        service: String,
        visitor: Option<SocketAddr>,
    ) -> Result<(), SessionError> {
        if self.is_local_id(id) {
            return Err(SessionError::Protocol(format!(
                "OPEN with stream id {id}, which belongs to our id space"
            )));
        }
        if id.0 <= self.last_peer_id {
            return Err(SessionError::Protocol(format!(
                "OPEN with stream id {id}, not above the previous {}",
                self.last_peer_id
            )));
        }
        self.last_peer_id = id.0;
        let full = self.streams.len() >= self.cfg.local.max_streams as usize;
        if full || self.goaway_sent {
            // Refused: pipelined DATA for it will be dropped and its session credit returned.
            Frame::Rst {
                stream: id,
                code: ResetCode::Refused,
            }
            .encode(&mut self.control);
            return Ok(());
        }
        self.insert_stream(id);
        self.events.push_back(Event::StreamOpened {
            id,
            service,
            visitor,
        });
        Ok(())
    }

    /// Returns the session credit of bytes that will never be consumed.
    fn release_buffered(&mut self, s: &Stream) {
        let n = u64::from(s.recv_buffered) + u64::from(s.recv_external);
        self.stats.recv_buffered -= n;
        self.recv_session_unacked += n;
        self.maybe_grant_session();
    }

    fn maybe_grant_session(&mut self) {
        if self.recv_session_unacked >= u64::from(self.cfg.local.session_window / 4) {
            let inc = self.recv_session_unacked as u32;
            Frame::WindowUpdate {
                stream: StreamId::SESSION,
                increment: inc,
            }
            .encode(&mut self.control);
            self.recv_session_credit += u64::from(inc);
            self.recv_session_unacked = 0;
        }
    }

    fn fail(&mut self, e: SessionError) -> SessionError {
        if self.closed.is_none() {
            if !matches!(
                e,
                SessionError::ConnectionLost(_) | SessionError::PeerGoAway { .. }
            ) {
                self.control.clear();
                Frame::GoAway {
                    last_stream: StreamId(self.last_peer_id),
                    code: e.goaway_code(),
                    reason: e.to_string(),
                }
                .encode(&mut self.control);
                self.goaway_sent = true;
            } else {
                self.control.clear();
            }
            self.ready.clear();
            let mut ids: Vec<StreamId> = self.streams.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                self.events.push_back(Event::StreamReset {
                    id,
                    code: ResetCode::SessionLost,
                });
            }
            self.streams.clear();
            self.stats.recv_buffered = 0;
            self.stats.recv_windows = 0;
            self.closed = Some(e.clone());
        }
        e
    }

    /// The driver saw the connection fail or close. Every stream is reported reset.
    pub fn handle_connection_lost(&mut self, why: &str) {
        self.fail(SessionError::ConnectionLost(why.to_string()));
    }

    // ----- time ----------------------------------------------------------------------------

    /// The next instant at which [`Session::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        Some(self.next_ping.min(self.last_recv + self.cfg.idle_timeout))
    }

    /// Fires keepalive and idle deadlines.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if let Some(e) = &self.closed {
            return Err(e.clone());
        }
        if now >= self.last_recv + self.cfg.idle_timeout {
            return Err(self.fail(SessionError::IdleTimeout {
                idle_ms: self.cfg.idle_timeout.as_millis() as u64,
            }));
        }
        if now >= self.next_ping {
            self.send_ping(now);
        }
        Ok(())
    }

    fn send_ping(&mut self, now: Instant) {
        self.next_ping = now + self.cfg.keepalive_interval;
        if self.ping_in_flight.is_some() {
            // Still unanswered: the idle timeout decides; do not pile up probes.
            return;
        }
        self.ping_seq += 1;
        self.ping_in_flight = Some((self.ping_seq, now));
        Frame::Ping {
            opaque: self.ping_seq,
        }
        .encode(&mut self.control);
    }

    // ----- output --------------------------------------------------------------------------

    /// True when [`Session::poll_transmit`] would produce bytes.
    pub fn has_transmit(&self) -> bool {
        !self.control.is_empty() || (self.send_session_credit > 0 && !self.ready.is_empty())
    }

    /// Appends frames for the session socket to `out` until it holds at least `limit` bytes or
    /// nothing more is sendable. Control frames first, then DATA round-robin, `quantum` bytes per
    /// stream per turn, within stream and session credit.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>, limit: usize) {
        out.extend_from_slice(&self.control);
        self.control.clear();
        if self.closed.is_some() {
            return;
        }
        let max_frame = self.cfg.peer.max_frame_payload as u64;
        while out.len() < limit && self.send_session_credit > 0 {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let mut budget = u64::from(self.cfg.quantum);
            while budget > 0 && s.send_credit > 0 && self.send_session_credit > 0 {
                let Some(front) = s.send.front_mut() else {
                    break;
                };
                let n = (front.len() as u64)
                    .min(s.send_credit)
                    .min(self.send_session_credit)
                    .min(max_frame)
                    .min(budget) as usize;
                out.extend_from_slice(&data_header(id, n as u32));
                if n == front.len() {
                    out.extend_from_slice(front);
                    s.send.pop_front();
                } else {
                    out.extend_from_slice(&front.split_to(n));
                }
                let n64 = n as u64;
                s.send_queued -= n as u32;
                s.send_credit -= n64;
                self.send_session_credit -= n64;
                self.stats.data_bytes_sent += n64;
                budget -= n64;
            }
            s.in_ready = false;
            if s.send.is_empty() {
                if s.fin_queued && !s.fin_sent {
                    s.fin_sent = true;
                    Frame::Fin { stream: id }.encode(out);
                }
            } else if s.send_credit > 0 {
                s.in_ready = true;
                self.ready.push_back(id);
            }
            signal_writable(&mut self.events, id, s, self.cfg.stream_send_buffer);
            self.maybe_free(id);
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- streams -------------------------------------------------------------------------

    /// Opens a stream towards the peer's `service`. The OPEN is queued at once and DATA written
    /// right after travels in the same transmit: no round trip before the first byte.
    pub fn open_stream(
        &mut self,
        service: &str,
        visitor: Option<SocketAddr>,
    ) -> Result<StreamId, OpenError> {
        if self.closed.is_some() || self.goaway_sent || self.goaway_received {
            return Err(OpenError::GoingAway);
        }
        if !is_valid_name(service) {
            return Err(OpenError::BadServiceName);
        }
        if self.streams.len() >= self.cfg.peer.max_streams as usize {
            return Err(OpenError::TooManyStreams(self.cfg.peer.max_streams));
        }
        let id = StreamId(self.next_local_id);
        self.next_local_id = self
            .next_local_id
            .checked_add(2)
            .ok_or(OpenError::IdsExhausted)?;
        Frame::Open {
            stream: id,
            service: service.to_string(),
            visitor,
        }
        .encode(&mut self.control);
        self.insert_stream(id);
        Ok(id)
    }

    /// How many bytes [`Session::stream_write`] accepts now. When 0, an
    /// [`Event::StreamWritable`] follows once credit arrives or the queue drains.
    pub fn stream_send_capacity(&mut self, id: StreamId) -> usize {
        let buffer = self.cfg.stream_send_buffer;
        let Some(s) = self.streams.get_mut(&id) else {
            return 0;
        };
        if s.fin_queued {
            return 0;
        }
        let cap = capacity(s, buffer);
        if cap == 0 {
            s.want_writable = true;
        }
        cap
    }

    /// Queues bytes read from the local socket. At most [`Session::stream_send_capacity`] bytes.
    pub fn stream_write(&mut self, id: StreamId, data: Bytes) -> Result<(), StreamError> {
        let buffer = self.cfg.stream_send_buffer;
        let s = self.streams.get_mut(&id).ok_or(StreamError::Gone(id))?;
        if s.fin_queued {
            return Err(StreamError::Finished(id));
        }
        let cap = capacity(s, buffer);
        if data.len() > cap {
            return Err(StreamError::OverCapacity {
                id,
                len: data.len(),
                capacity: cap,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        s.send_queued += data.len() as u32;
        s.send.push_back(data);
        if !s.in_ready && s.send_credit > 0 {
            s.in_ready = true;
            self.ready.push_back(id);
        }
        Ok(())
    }

    /// Sends up to `max` payload bytes that the driver moves itself (for example with
    /// `splice(2)` from a pipe straight into the session socket). Returns the DATA frame header
    /// and the payload length granted (within stream credit, session credit and the peer's
    /// frame limit); the driver must write the header and then exactly that many payload bytes
    /// before anything else, and must have written everything [`Session::poll_transmit`]
    /// produced before (that is where the stream's OPEN went). Only for a stream whose queued
    /// send buffer is empty: a stream is fed either through [`Session::stream_write`] or this
    /// call at any one time. `None` when no credit is available (an
    /// [`Event::StreamWritable`] follows when it arrives) or the stream cannot send.
    pub fn stream_send_external(
        &mut self,
        id: StreamId,
        max: u32,
    ) -> Option<([u8; HEADER_LEN], u32)> {
        if self.closed.is_some() {
            return None;
        }
        let max_frame = u64::from(self.cfg.peer.max_frame_payload);
        let s = self.streams.get_mut(&id)?;
        if s.fin_queued || !s.send.is_empty() {
            return None;
        }
        let n = u64::from(max)
            .min(s.send_credit)
            .min(self.send_session_credit)
            .min(max_frame);
        if n == 0 {
            s.want_writable = true;
            if s.send_credit > 0 && !s.session_blocked {
                s.session_blocked = true;
                self.blocked_on_session.push(id);
            }
            return None;
        }
        s.send_credit -= n;
        self.send_session_credit -= n;
        self.stats.data_bytes_sent += n;
        Some((data_header(id, n as u32), n as u32))
    }

    /// Credit the peer currently grants this stream, within the session budget: what
    /// [`Session::stream_send_external`] would grant at most. When that is 0 the driver is told
    /// by `StreamWritable` once credit returns (stream or session window).
    pub fn stream_send_credit(&mut self, id: StreamId) -> u64 {
        let session = self.send_session_credit;
        let Some(s) = self.streams.get_mut(&id) else {
            return 0;
        };
        let credit = s.send_credit.min(session);
        if credit == 0 && !s.fin_queued {
            s.want_writable = true;
            if s.send_credit > 0 && !s.session_blocked {
                s.session_blocked = true;
                self.blocked_on_session.push(id);
            }
        }
        credit
    }

    /// Half-closes our direction after everything queued has been sent.
    pub fn stream_finish(&mut self, id: StreamId) -> Result<(), StreamError> {
        let s = self.streams.get_mut(&id).ok_or(StreamError::Gone(id))?;
        if s.fin_queued {
            return Ok(());
        }
        s.fin_queued = true;
        if s.send.is_empty() {
            s.fin_sent = true;
            Frame::Fin { stream: id }.encode(&mut self.control);
            self.maybe_free(id);
        }
        Ok(())
    }

    /// Takes up to `max` bytes for the local socket. Taking them is consuming them: credit goes
    /// back to the peer from here, never on receipt.
    pub fn stream_read(&mut self, now: Instant, id: StreamId, max: usize) -> Readable {
        let Some(s) = self.streams.get_mut(&id) else {
            return Readable::Gone;
        };
        s.readable_signalled = false;
        if s.recv_external > 0 {
            // The driver still holds earlier bytes of this stream; they go first.
            return Readable::Pending;
        }
        let Some(front) = s.recv.front_mut() else {
            if s.recv_fin && !s.recv_done {
                s.recv_done = true;
                self.maybe_free(id);
                return Readable::Fin;
            }
            return Readable::Pending;
        };
        let chunk = if front.len() <= max {
            s.recv.pop_front().unwrap_or_default().freeze()
        } else {
            front.split_to(max).freeze()
        };
        let n = chunk.len() as u32;
        s.recv_buffered -= n;
        self.stats.recv_buffered -= u64::from(n);
        self.consumed(now, id, n, 0);
        Readable::Data(chunk)
    }

    /// `n` bytes of stream `id` reached the local socket: grant credit back (from here, never
    /// on receipt), auto-tuning the window. `driver_backlog`: bytes of the stream that have
    /// arrived and still wait in the driver's hands for the local socket (see
    /// [`Session::stream_consumed_external`]).
    fn consumed(&mut self, now: Instant, id: StreamId, n: u32, driver_backlog: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.recv_unacked += n;
        s.rate_bytes = s.rate_bytes.saturating_add(n);
        self.recv_session_unacked += u64::from(n);
        if !s.recv_fin && s.recv_unacked >= s.recv_window / 2 {
            let mut inc = s.recv_unacked;
            // Auto-tune: consuming faster than half a window per RTT means the window, not
            // the consumer, limits the stream; double it up to the ceiling.
            // - The rate is measured over at least one RTT, from one judging grant to the
            //   next: the io_uring driver consumes in bursts (a whole pipe per splice), so
            //   grants come once per round trip on a long path, or two in a row after a stall
            //   on loopback. Between two grants alone, the first case looked too slow and the
            //   second too fast.
            // - Past `smoothed_rtt_window` the RTT is the minimum, not the smoothed one: a PING
            //   that waited behind our own bulk data measures the queue a big window builds,
            //   and would let the window grow further for it (on the io_uring backend, past
            //   the splice pipe into copied memory: the "slow state" of bulk transfers).
            // - Past it, also over at least `PAST_LIMIT_RATE_INTERVAL`: on a short path a
            //   burst after a stall is not a rate (it grew loopback windows past the pipe).
            // - No growth while a quarter of the window has arrived and still waits for the
            //   local socket: then the consumer limits the stream, however fast its last burst
            //   was, and a bigger window would only pile more bytes up here.
            let backlog = u64::from(s.recv_buffered) + u64::from(driver_backlog);
            let past_limit = s.recv_window >= self.cfg.smoothed_rtt_window;
            let rtt = if past_limit {
                self.min_rtt.map(|(rtt, _)| rtt)
            } else {
                self.srtt
            };
            match (s.rate_since, rtt) {
                (Some(since), Some(rtt)) => {
                    let elapsed = now.saturating_duration_since(since);
                    let rtt = rtt.max(MIN_TUNING_RTT);
                    let interval = if past_limit {
                        rtt.max(PAST_LIMIT_RATE_INTERVAL)
                    } else {
                        rtt
                    };
                    if elapsed >= interval {
                        // rate_bytes / elapsed > (window / 2) / rtt, without dividing.
                        let fast = u128::from(s.rate_bytes) * rtt.as_nanos()
                            > u128::from(s.recv_window / 2) * elapsed.as_nanos();
                        if fast
                            && s.recv_window < self.cfg.max_stream_window
                            && backlog < u64::from(s.recv_window / 4)
                        {
                            let grow = s
                                .recv_window
                                .min(self.cfg.max_stream_window - s.recv_window);
                            s.recv_window += grow;
                            self.stats.recv_windows += u64::from(grow);
                            inc += grow;
                        }
                        s.rate_since = Some(now);
                        s.rate_bytes = 0;
                    }
                }
                _ => {
                    s.rate_since = Some(now);
                    s.rate_bytes = 0;
                }
            }
            s.recv_credit += u64::from(inc);
            s.recv_unacked = 0;
            Frame::WindowUpdate {
                stream: id,
                increment: inc,
            }
            .encode(&mut self.control);
        }
        self.maybe_grant_session();
    }

    // ----- payloads the driver moves itself (splice) -----------------------------------------

    /// The DATA frame at the start of `input`, if its header is complete: `(stream, payload
    /// length)`. A driver that can move large payloads without copying (splice on a plain TCP
    /// session) asks this before [`Session::handle_input`].
    pub fn peek_data(&self, input: &[u8]) -> Option<(StreamId, u32)> {
        let head = input.first_chunk::<HEADER_LEN>()?;
        let h = Header::parse(head);
        if h.kind != FrameType::Data as u8 || h.len > self.cfg.local.max_frame_payload {
            return None;
        }
        Some((h.stream, h.len))
    }

    /// True when a DATA frame of `len` bytes for `id` may be taken with
    /// [`Session::take_external_data`]: the stream is open for receiving, the frame is within
    /// its credit and the session's, and nothing of the stream is buffered in the core (order).
    /// Anything else (an unknown stream, a flow-control breach) goes through
    /// [`Session::handle_input`], which judges it.
    pub fn stream_can_take_external(&self, id: StreamId, len: u32) -> bool {
        if self.closed.is_some() || len == 0 {
            return false;
        }
        let Some(s) = self.streams.get(&id) else {
            return false;
        };
        !s.recv_fin
            && s.recv.is_empty()
            && u64::from(len) <= s.recv_credit
            && u64::from(len) <= self.recv_session_credit
    }

    /// For a DATA frame of `len` bytes for `id` that [`Session::stream_can_take_external`]
    /// refuses only because the core still holds earlier bytes of the stream: how many bytes
    /// it holds. The driver may then take them with [`Session::stream_take_buffered`], put them
    /// first, and take the frame externally behind them. `None` in every other case.
    pub fn stream_buffered_before_external(&self, id: StreamId, len: u32) -> Option<u32> {
        if self.closed.is_some() || len == 0 {
            return None;
        }
        let s = self.streams.get(&id)?;
        (!s.recv_fin
            && !s.recv.is_empty()
            && u64::from(len) <= s.recv_credit
            && u64::from(len) <= self.recv_session_credit)
            .then_some(s.recv_buffered)
    }

    /// Hands every byte of stream `id` buffered in the core to the driver, in order. From here
    /// they count as externally held, behind any the driver already holds: the driver delivers
    /// them after those and reports them with [`Session::stream_consumed_external`] like a
    /// payload it moved itself. Credit is not granted here: taking is not consuming. Empty when
    /// the core holds nothing of the stream (or the stream is gone).
    pub fn stream_take_buffered(&mut self, id: StreamId) -> VecDeque<BytesMut> {
        let Some(s) = self.streams.get_mut(&id) else {
            return VecDeque::new();
        };
        let taken = std::mem::take(&mut s.recv);
        s.recv_external += s.recv_buffered;
        s.recv_buffered = 0;
        taken
    }

    /// Takes the DATA frame at the start of `input` (checked with
    /// [`Session::stream_can_take_external`]) whose payload the driver moves itself. Removes the
    /// header and the payload bytes already in `input` and returns those bytes: the driver puts
    /// them first, then the remaining `len - returned.len()` payload bytes straight from the
    /// socket. The bytes count as buffered until [`Session::stream_consumed_external`].
    pub fn take_external_data(
        &mut self,
        now: Instant,
        input: &mut BytesMut,
    ) -> Result<(StreamId, u32, Bytes), SessionError> {
        let (id, len) = self
            .peek_data(input)
            .filter(|(id, len)| self.stream_can_take_external(*id, *len))
            .ok_or_else(|| {
                SessionError::Protocol("internal: no external DATA frame at the input".into())
            })?;
        self.last_recv = now;
        input.advance(HEADER_LEN);
        let have = input.len().min(len as usize);
        let head = input.split_to(have).freeze();
        let l64 = u64::from(len);
        self.stats.data_bytes_received += l64;
        self.recv_session_credit -= l64;
        let Some(s) = self.streams.get_mut(&id) else {
            return Err(SessionError::Protocol("internal: stream vanished".into()));
        };
        s.recv_credit -= l64;
        s.recv_external += len;
        let held = s.recv_external + s.recv_buffered;
        s.high_water = s.high_water.max(held);
        self.stats.max_stream_recv_buffered = self.stats.max_stream_recv_buffered.max(s.high_water);
        self.stats.recv_buffered += l64;
        Ok((id, len, head))
    }

    /// `n` externally held bytes of stream `id` reached the local socket. `backlog`: how many
    /// bytes of the stream the driver still holds that have already arrived (what is left in
    /// its pipe and in memory), so the window stops growing while the local consumer, not the
    /// window, is what limits the stream. Payload bytes still on their way from the session
    /// socket are not backlog.
    pub fn stream_consumed_external(&mut self, now: Instant, id: StreamId, n: u32, backlog: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = n.min(s.recv_external);
        s.recv_external -= n;
        let fin_next = s.recv_external == 0 && (s.recv_fin || !s.recv.is_empty());
        let backlog = backlog.min(s.recv_external);
        self.stats.recv_buffered -= u64::from(n);
        self.consumed(now, id, n, backlog);
        if fin_next {
            if let Some(s) = self.streams.get_mut(&id) {
                // What the core holds is readable now; an earlier signal was answered with
                // Pending while the external bytes went first.
                s.readable_signalled = false;
                signal_readable(&mut self.events, id, s);
            }
        }
    }

    /// Aborts the stream both ways. Queued data is dropped; the peer gets RST with `code`.
    pub fn stream_reset(&mut self, id: StreamId, code: ResetCode) {
        if let Some(s) = self.remove_stream(id) {
            self.release_buffered(&s);
            if self.closed.is_none() {
                Frame::Rst { stream: id, code }.encode(&mut self.control);
            }
        }
    }

    /// Sends GOAWAY: the peer may open no new streams; existing ones finish. Idempotent.
    pub fn go_away(&mut self, code: GoAwayCode, reason: &str) {
        if self.goaway_sent || self.closed.is_some() {
            return;
        }
        self.goaway_sent = true;
        Frame::GoAway {
            last_stream: StreamId(self.last_peer_id),
            code,
            reason: reason.to_string(),
        }
        .encode(&mut self.control);
    }

    fn insert_stream(&mut self, id: StreamId) {
        let s = Stream::new(
            self.cfg.local.initial_stream_window,
            self.cfg.peer.initial_stream_window,
        );
        self.stats.recv_windows += u64::from(s.recv_window);
        self.streams.insert(id, s);
    }

    fn remove_stream(&mut self, id: StreamId) -> Option<Stream> {
        let s = self.streams.remove(&id)?;
        self.stats.recv_windows -= u64::from(s.recv_window);
        if s.session_blocked {
            self.blocked_on_session.retain(|x| *x != id);
        }
        Some(s)
    }

    fn maybe_free(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get(&id) {
            if s.fin_sent && s.recv_done {
                self.remove_stream(id);
            }
        }
    }
}

fn capacity(s: &Stream, buffer: u32) -> usize {
    let by_credit = s.send_credit.saturating_sub(u64::from(s.send_queued));
    let by_buffer = u64::from(buffer.saturating_sub(s.send_queued));
    by_credit.min(by_buffer) as usize
}

fn signal_readable(events: &mut VecDeque<Event>, id: StreamId, s: &mut Stream) {
    if !s.readable_signalled {
        s.readable_signalled = true;
        events.push_back(Event::StreamReadable(id));
    }
}

fn signal_writable(events: &mut VecDeque<Event>, id: StreamId, s: &mut Stream, buffer: u32) {
    if s.want_writable && !s.fin_queued && capacity(s, buffer) > 0 {
        s.want_writable = false;
        events.push_back(Event::StreamWritable(id));
    }
}

/// Bytes of framing overhead per DATA frame, for drivers sizing buffers.
pub const DATA_OVERHEAD: usize = HEADER_LEN;

#[cfg(test)]
mod tests {
    //! In-memory pair tests: two sessions, a virtual clock, bytes shuttled by hand.
    use super::*;

    const WINDOW: u32 = 64 * 1024;

    fn params() -> PeerParams {
        PeerParams {
            max_frame_payload: 16 * 1024,
            initial_stream_window: WINDOW,
            session_window: 16 * WINDOW,
            max_streams: 100,
        }
    }

    fn config(role: Role) -> SessionConfig {
        SessionConfig {
            role,
            local: params(),
            peer: params(),
            max_stream_window: 4 * WINDOW,
            smoothed_rtt_window: 4 * WINDOW,
            quantum: 8 * 1024,
            stream_send_buffer: 32 * 1024,
            keepalive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// Server and client sessions joined by two in-memory pipes and a virtual clock.
    struct Pair {
        now: Instant,
        server: Session,
        client: Session,
        to_client: BytesMut,
        to_server: BytesMut,
        /// One-way delay applied by `advance` per pump round.
        step: Duration,
    }

    impl Pair {
        fn new() -> Pair {
            // The only clock read: the virtual clock's origin. Time then moves by `step`.
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            Pair {
                now,
                server: Session::new(config(Role::Server), now),
                client: Session::new(config(Role::Client), now),
                to_client: BytesMut::new(),
                to_server: BytesMut::new(),
                step: Duration::from_micros(50),
            }
        }

        /// A pair whose client grows windows on the smoothed RTT only up to
        /// `smoothed_rtt_window` (the io_uring driver's pipe), on the minimum RTT beyond.
        fn with_client_limit(smoothed_rtt_window: u32) -> Pair {
            let mut cfg = config(Role::Client);
            cfg.smoothed_rtt_window = smoothed_rtt_window;
            let mut p = Pair::new();
            p.client = Session::new(cfg, p.now);
            p
        }

        /// The server opens a stream and the client learns of it.
        fn open_to_client(&mut self) -> StreamId {
            let id = self.server.open_stream("bulk", None).unwrap();
            self.drive();
            Pair::events(&mut self.client);
            id
        }

        /// Moves bytes both ways until neither side has anything to send.
        fn drive(&mut self) {
            for _ in 0..10_000 {
                let mut out = Vec::new();
                self.server.poll_transmit(&mut out, 1 << 20);
                self.to_client.extend_from_slice(&out);
                let mut out2 = Vec::new();
                self.client.poll_transmit(&mut out2, 1 << 20);
                self.to_server.extend_from_slice(&out2);
                if out.is_empty() && out2.is_empty() {
                    return;
                }
                self.now += self.step;
                let now = self.now;
                self.client.handle_input(now, &mut self.to_client).unwrap();
                self.server.handle_input(now, &mut self.to_server).unwrap();
            }
            panic!("pair did not settle");
        }

        /// The server sends `want` bytes of stream `id` by the external path (headers only: a
        /// driver moves the payloads) and the client takes them.
        fn send_external(&mut self, id: StreamId, want: u32) {
            let mut sent = 0;
            while sent < want {
                let (header, len) = self.server.stream_send_external(id, want - sent).unwrap();
                let mut input = BytesMut::from(&header[..]);
                self.client
                    .take_external_data(self.now, &mut input)
                    .unwrap();
                sent += len;
            }
        }

        /// The server sends `len` bytes on stream `id` through the in-memory pipes; the client
        /// reads after every pump, then the clock moves on by `pause` (the consumer's pace).
        fn transfer_to_client(&mut self, id: StreamId, len: usize, pause: Duration) {
            let data = vec![3u8; len];
            let mut d = &data[..];
            let mut got = 0;
            while got < data.len() {
                write_some(&mut self.server, id, &mut d);
                self.drive();
                got += self.read_all(true, id).0.len();
                self.now += pause;
            }
        }

        /// The client's control frames (grants) reach the server; the clock does not move.
        fn deliver_grants(&mut self) {
            let mut out = Vec::new();
            self.client.poll_transmit(&mut out, 1 << 20);
            self.server
                .handle_input(self.now, &mut BytesMut::from(&out[..]))
                .unwrap();
        }

        fn events(s: &mut Session) -> Vec<Event> {
            std::iter::from_fn(|| s.poll_event()).collect()
        }

        fn read_all(&mut self, client: bool, id: StreamId) -> (Vec<u8>, bool) {
            let now = self.now;
            let s = if client {
                &mut self.client
            } else {
                &mut self.server
            };
            let mut got = Vec::new();
            loop {
                match s.stream_read(now, id, usize::MAX) {
                    Readable::Data(b) => got.extend_from_slice(&b),
                    Readable::Fin => return (got, true),
                    Readable::Pending | Readable::Gone => return (got, false),
                }
            }
        }
    }

    /// The pair's one-way delay per pump round (`Pair::step`); the RTT is two of them.
    fn p_step() -> Duration {
        Pair::new().step
    }

    fn write_some(s: &mut Session, id: StreamId, data: &mut &[u8]) -> usize {
        let cap = s.stream_send_capacity(id).min(data.len());
        if cap > 0 {
            s.stream_write(id, Bytes::copy_from_slice(&data[..cap]))
                .unwrap();
            *data = &data[cap..];
        }
        cap
    }

    #[test]
    fn open_is_pipelined_with_the_first_data() {
        let mut p = Pair::new();
        let visitor: SocketAddr = "203.0.113.7:5555".parse().unwrap();
        let id = p.server.open_stream("ssh", Some(visitor)).unwrap();
        p.server
            .stream_write(id, Bytes::from_static(b"hello"))
            .unwrap();
        let mut out = Vec::new();
        p.server.poll_transmit(&mut out, 1 << 20);
        // One transmit carries PING, OPEN and DATA: no round trip before the first byte.
        let mut buf = BytesMut::from(&out[..]);
        p.client.handle_input(p.now, &mut buf).unwrap();
        let ev = Pair::events(&mut p.client);
        assert!(ev.contains(&Event::StreamOpened {
            id,
            service: "ssh".into(),
            visitor: Some(visitor)
        }));
        assert!(ev.contains(&Event::StreamReadable(id)));
        assert_eq!(p.read_all(true, id), (b"hello".to_vec(), false));
    }

    /// The splice send path: the driver writes the header the core returns, then the payload
    /// itself; the peer decodes an ordinary DATA frame, and credit and order hold.
    #[test]
    fn externally_sent_payloads_are_ordinary_data_within_credit() {
        let mut p = Pair::new();
        let id = p.server.open_stream("bulk", None).unwrap();
        // OPEN (and the PING) first, as the driver does before any spliced frame.
        let mut out = Vec::new();
        p.server.poll_transmit(&mut out, 1 << 20);
        // More than the window is asked for: the core grants exactly the stream credit.
        let (header, n) = p.server.stream_send_external(id, 10 * WINDOW).unwrap();
        assert_eq!(n, params().max_frame_payload.min(WINDOW));
        out.extend_from_slice(&header);
        out.extend(std::iter::repeat_n(7u8, n as usize));
        let mut buf = BytesMut::from(&out[..]);
        p.client.handle_input(p.now, &mut buf).unwrap();
        let (got, fin) = p.read_all(true, id);
        assert_eq!((got.len(), fin), (n as usize, false));
        assert!(got.iter().all(|b| *b == 7));
        // Use up the rest of the window; then nothing more until the peer grants credit.
        let mut sent = n;
        while let Some((h, m)) = p.server.stream_send_external(id, WINDOW) {
            let mut frame = h.to_vec();
            frame.extend(std::iter::repeat_n(7u8, m as usize));
            p.to_client.extend_from_slice(&frame);
            sent += m;
        }
        assert_eq!(sent, WINDOW);
        // A stream with bytes queued through stream_write cannot also send externally.
        let other = p.server.open_stream("bulk", None).unwrap();
        p.server
            .stream_write(other, Bytes::from_static(b"queued"))
            .unwrap();
        assert!(p.server.stream_send_external(other, 1024).is_none());
    }

    /// The splice receive path: bytes the driver holds come before anything the core queues
    /// later, FIN waits for them, and credit returns only as they are consumed.
    #[test]
    fn externally_received_payloads_keep_order_and_return_credit_on_consumption() {
        let mut p = Pair::new();
        let id = p.open_to_client();
        // The server sends half a window through the external path, in two frames (16 KiB is
        // the frame limit here); of the first only the header and 100 bytes are in the input.
        let mut held = 0;
        let mut credit_after_send = 0;
        for first in [true, false] {
            let (header, len) = p.server.stream_send_external(id, WINDOW).unwrap();
            assert_eq!(len, params().max_frame_payload);
            credit_after_send = p.server.stream_send_credit(id);
            let mut input = BytesMut::from(&header[..]);
            input.extend_from_slice(&[1u8; 100]);
            assert_eq!(p.client.peek_data(&input), Some((id, len)));
            assert!(p.client.stream_can_take_external(id, len));
            assert!(!p.client.stream_can_take_external(id, WINDOW + 1));
            let (got_id, got_len, head) = p.client.take_external_data(p.now, &mut input).unwrap();
            assert_eq!((got_id, got_len, head.len()), (id, len, 100));
            assert!(input.is_empty());
            held += len;
            assert_eq!(
                p.client.stats().recv_buffered,
                u64::from(held),
                "first: {first}"
            );
        }
        let len = held;
        assert_eq!(len, WINDOW / 2);
        // A later frame and the FIN are queued in the core; they wait behind the held bytes.
        p.server
            .stream_write(id, Bytes::from_static(b"after"))
            .unwrap();
        p.server.stream_finish(id).unwrap();
        p.drive();
        Pair::events(&mut p.client);
        assert_eq!(
            p.client.stream_read(p.now, id, usize::MAX),
            Readable::Pending
        );
        assert!(
            !p.client.stream_can_take_external(id, 1),
            "the core holds bytes now"
        );
        // Received is not consumed: no credit back yet.
        assert_eq!(p.server.stream_send_credit(id), credit_after_send - 5);
        p.client.stream_consumed_external(p.now, id, len - 1, 0);
        assert_eq!(
            p.client.stream_read(p.now, id, usize::MAX),
            Readable::Pending
        );
        p.client.stream_consumed_external(p.now, id, 1, 0);
        assert!(Pair::events(&mut p.client).contains(&Event::StreamReadable(id)));
        assert_eq!(p.read_all(true, id), (b"after".to_vec(), true));
        assert_eq!(p.client.stats().recv_buffered, 0);
    }

    /// A spliced stream that finds the session window used up (its own window still open) is
    /// told `StreamWritable` when the peer grants session credit again; before that fix it
    /// waited forever, as nothing else wakes a stream that sends only external payloads.
    #[test]
    fn a_stream_waiting_for_session_credit_is_woken_when_it_returns() {
        let mut p = Pair::new();
        let ids: Vec<StreamId> = (0..17)
            .map(|_| p.server.open_stream("bulk", None).unwrap())
            .collect();
        p.drive();
        // Sixteen full stream windows use up the session window (16 x WINDOW).
        for id in &ids[..16] {
            while let Some((h, m)) = p.server.stream_send_external(*id, WINDOW) {
                p.to_client.extend_from_slice(&h);
                p.to_client.extend(std::iter::repeat_n(1u8, m as usize));
            }
        }
        let last = ids[16];
        assert_eq!(
            p.server.stream_send_credit(last),
            0,
            "the session window is used up"
        );
        assert!(p.server.stream_send_external(last, WINDOW).is_none());
        Pair::events(&mut p.server);
        // The client takes and consumes everything; session credit flows back.
        let now = p.now;
        p.client.handle_input(now, &mut p.to_client).unwrap();
        Pair::events(&mut p.client);
        let mut total = 0;
        for id in &ids[..16] {
            total += p.read_all(true, *id).0.len();
        }
        assert_eq!(total, 16 * WINDOW as usize);
        p.drive();
        assert!(
            Pair::events(&mut p.server).contains(&Event::StreamWritable(last)),
            "the waiting stream is woken by the session WINDOW_UPDATE"
        );
        assert!(p.server.stream_send_external(last, WINDOW).is_some());
    }

    /// A frame behind bytes queued in the core: the driver takes those bytes (they become
    /// externally held, in order, no credit back yet), then the frame; credit returns as both
    /// are consumed, and a FIN queued after them is readable only when all are delivered.
    /// (Credit coming back on consumption is `externally_received_bytes_return_credit_...`.)
    #[test]
    fn the_driver_takes_queued_bytes_so_a_later_frame_can_be_taken_externally() {
        let mut p = Pair::new();
        let id = p.open_to_client();
        assert!(
            p.client.stream_take_buffered(id).is_empty(),
            "nothing queued"
        );
        // Two small frames are copied into the core (as a driver does with a frame whose rest
        // is small), then a large one arrives.
        for part in [&b"first "[..], &b"second"[..]] {
            p.server
                .stream_write(id, Bytes::copy_from_slice(part))
                .unwrap();
            p.drive();
        }
        let credit = p.server.stream_send_credit(id);
        let (header, len) = p.server.stream_send_external(id, WINDOW / 2).unwrap();
        assert!(!p.client.stream_can_take_external(id, len));
        assert_eq!(p.client.stream_buffered_before_external(id, len), Some(12));
        assert_eq!(
            p.client.stream_buffered_before_external(id, WINDOW + 1),
            None,
            "beyond the credit: handle_input judges it"
        );
        let taken: Vec<u8> = p
            .client
            .stream_take_buffered(id)
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect();
        assert_eq!(taken, b"first second");
        assert_eq!(p.client.stream_buffered_before_external(id, len), None);
        assert!(p.client.stream_can_take_external(id, len));
        let mut input = BytesMut::from(&header[..]);
        p.client.take_external_data(p.now, &mut input).unwrap();
        assert_eq!(p.client.stats().recv_buffered, 12 + u64::from(len));
        // A FIN queued now waits behind all of it; taking is not consuming.
        p.server.stream_finish(id).unwrap();
        p.drive();
        Pair::events(&mut p.client);
        assert_eq!(
            p.client.stream_read(p.now, id, usize::MAX),
            Readable::Pending
        );
        assert_eq!(p.server.stream_send_credit(id), credit - u64::from(len));
        p.client.stream_consumed_external(p.now, id, 12, 0);
        assert_eq!(
            p.client.stream_read(p.now, id, usize::MAX),
            Readable::Pending
        );
        p.client.stream_consumed_external(p.now, id, len, 0);
        assert!(Pair::events(&mut p.client).contains(&Event::StreamReadable(id)));
        assert_eq!(p.read_all(true, id), (Vec::new(), true));
        assert_eq!(p.client.stats().recv_buffered, 0);
    }

    /// Externally held bytes return credit when the driver reports them consumed, exactly as
    /// `stream_read` does for queued bytes.
    #[test]
    fn externally_received_bytes_return_credit_when_consumed() {
        let mut p = Pair::new();
        let id = p.server.open_stream("bulk", None).unwrap();
        p.drive();
        let mut held = 0;
        while held < WINDOW / 2 {
            let (header, len) = p.server.stream_send_external(id, WINDOW).unwrap();
            let mut input = BytesMut::from(&header[..]);
            p.client.take_external_data(p.now, &mut input).unwrap();
            held += len;
        }
        let credit = p.server.stream_send_credit(id);
        p.client.stream_consumed_external(p.now, id, held - 1, 0);
        p.drive();
        assert_eq!(
            p.server.stream_send_credit(id),
            credit,
            "no grant before half a window"
        );
        p.client.stream_consumed_external(p.now, id, 1, 0);
        p.drive();
        assert!(p.server.stream_send_credit(id) >= credit + u64::from(held));
    }

    #[test]
    fn half_close_both_ways_then_the_stream_is_freed() {
        let mut p = Pair::new();
        let id = p.server.open_stream("web", None).unwrap();
        p.server
            .stream_write(id, Bytes::from_static(b"request"))
            .unwrap();
        p.server.stream_finish(id).unwrap();
        p.drive();
        assert_eq!(p.read_all(true, id), (b"request".to_vec(), true));
        // The client can still answer after the server half-closed.
        p.client
            .stream_write(id, Bytes::from_static(b"response"))
            .unwrap();
        p.client.stream_finish(id).unwrap();
        p.drive();
        assert_eq!(p.read_all(false, id), (b"response".to_vec(), true));
        p.drive();
        assert_eq!(p.server.stream_count(), 0);
        assert_eq!(p.client.stream_count(), 0);
    }

    #[test]
    fn a_stalled_stream_buffers_at_most_its_window_and_others_keep_flowing() {
        let mut p = Pair::new();
        let stalled = p.client.open_stream("bulk", None).unwrap();
        let busy = p.client.open_stream("bulk", None).unwrap();
        p.drive();
        let payload = vec![7u8; 4 * 1024 * 1024];
        let (mut a, mut b) = (&payload[..], &payload[..]);
        let mut received = 0usize;
        for _ in 0..100_000 {
            write_some(&mut p.client, stalled, &mut a);
            write_some(&mut p.client, busy, &mut b);
            p.drive();
            received += p.read_all(false, busy).0.len();
            // Nobody reads `stalled` on the server.
            assert!(p.server.stream_recv_buffered(stalled) <= WINDOW);
            if received == payload.len() {
                break;
            }
        }
        assert_eq!(received, payload.len(), "the busy stream must complete");
        assert_eq!(p.server.stream_recv_buffered(stalled), WINDOW);
        assert_eq!(p.server.stream_recv_window(stalled), WINDOW);
        // Once the stalled consumer reads, its bytes arrive too.
        let mut got = 0;
        for _ in 0..10_000 {
            got += p.read_all(false, stalled).0.len();
            write_some(&mut p.client, stalled, &mut a);
            p.drive();
            if got == payload.len() {
                break;
            }
        }
        assert_eq!(got, payload.len());
    }

    #[test]
    fn credit_is_granted_on_consumption_not_on_receipt() {
        let mut p = Pair::new();
        let id = p.server.open_stream("x", None).unwrap();
        let data = vec![1u8; WINDOW as usize * 2];
        let mut d = &data[..];
        for _ in 0..100 {
            write_some(&mut p.server, id, &mut d);
            p.drive();
        }
        // Nothing consumed: exactly one window crossed, the rest waits at the sender.
        assert_eq!(p.client.stream_recv_buffered(id), WINDOW);
        assert_eq!(p.server.stream_send_capacity(id), 0);
        let _ = p.read_all(true, id);
        p.drive();
        assert!(p.server.stream_send_capacity(id) > 0);
        assert!(Pair::events(&mut p.server).contains(&Event::StreamWritable(id)));
    }

    #[test]
    fn window_grows_when_the_consumer_keeps_up() {
        let mut p = Pair::new();
        // Measure the RTT first.
        p.drive();
        assert!(p.server.stats().rtt.is_some());
        let id = p.server.open_stream("x", None).unwrap();
        p.transfer_to_client(id, 8 * 1024 * 1024, Duration::ZERO);
        assert!(p.client.stream_recv_window(id) > WINDOW);
        assert!(p.client.stream_recv_window(id) <= 4 * WINDOW);
    }

    /// Sends one PING from `s` (its keepalive is due) and delivers the PONG `delay` later.
    fn delayed_pong(p: &mut Pair, client: bool, delay: Duration) {
        p.now += Duration::from_secs(10);
        let now = p.now;
        let (pinger, ponger) = if client {
            (&mut p.client, &mut p.server)
        } else {
            (&mut p.server, &mut p.client)
        };
        pinger.handle_timeout(now).unwrap();
        let mut out = Vec::new();
        pinger.poll_transmit(&mut out, 1 << 20);
        ponger
            .handle_input(now, &mut BytesMut::from(&out[..]))
            .unwrap();
        let mut back = Vec::new();
        ponger.poll_transmit(&mut back, 1 << 20);
        pinger
            .handle_input(now + delay, &mut BytesMut::from(&back[..]))
            .unwrap();
        p.now += delay;
    }

    #[test]
    fn the_minimum_rtt_ignores_a_ping_that_waited_behind_data() {
        let mut p = Pair::new();
        p.drive();
        // The start-up PINGs ran back to back: a PING and a PONG take one step each.
        let min = p.server.stats().min_rtt.expect("measured at start");
        assert_eq!(min, 2 * p.step);
        // A PONG queued behind 20 ms of bulk data moves the smoothed RTT, not the minimum.
        delayed_pong(&mut p, false, Duration::from_millis(20));
        let stats = p.server.stats();
        assert!(stats.rtt.expect("measured") > Duration::from_millis(2));
        assert_eq!(stats.min_rtt, Some(min));
        // Keepalives every 10 s: the minimum stands for its lifetime (300 s), then a newer
        // sample replaces it even though it is larger.
        for _ in 0..28 {
            delayed_pong(&mut p, false, Duration::from_millis(20));
            assert_eq!(p.server.stats().min_rtt, Some(min));
        }
        delayed_pong(&mut p, false, Duration::from_millis(3));
        assert_eq!(p.server.stats().min_rtt, Some(Duration::from_millis(3)));
    }

    /// The client's stream window after 4 MiB sent by the server, read by a consumer that keeps
    /// up but takes 1 ms per round: slower than the minimum RTT (100 us), faster than a smoothed
    /// RTT that PINGs delayed behind data (by 100 ms) inflated to ~40 ms.
    fn window_after_paced_transfer(smoothed_rtt_window: u32) -> u32 {
        let mut p = Pair::with_client_limit(smoothed_rtt_window);
        p.drive();
        for _ in 0..4 {
            delayed_pong(&mut p, true, Duration::from_millis(100));
        }
        let stats = p.client.stats();
        assert!(stats.rtt.expect("measured") > Duration::from_millis(20));
        assert_eq!(stats.min_rtt, Some(2 * p.step));
        let id = p.server.open_stream("x", None).unwrap();
        p.transfer_to_client(id, 4 * 1024 * 1024, Duration::from_millis(1));
        p.client.stream_recv_window(id)
    }

    #[test]
    fn past_the_smoothed_rtt_limit_windows_grow_on_the_minimum_rtt_only() {
        // Below the limit the inflated smoothed RTT lets the window grow to the ceiling...
        assert_eq!(window_after_paced_transfer(4 * WINDOW), 4 * WINDOW);
        // ...past it (here: from the start) only the path's own delay counts, and a consumer
        // taking 1 ms per round does not need more than the initial window.
        assert_eq!(window_after_paced_transfer(WINDOW), WINDOW);
        assert_eq!(window_after_paced_transfer(2 * WINDOW), 2 * WINDOW);
    }

    #[test]
    fn two_bursts_right_after_a_stall_do_not_grow_the_window() {
        let mut p = Pair::new();
        let id = p.server.open_stream("bulk", None).unwrap();
        p.drive();
        let rtt = p.client.stats().rtt.expect("measured at start");
        let mut held = 0;
        for (gap, consume) in [(0, WINDOW / 2), (10, WINDOW / 2), (0, WINDOW / 2)] {
            p.send_external(id, WINDOW - held);
            // The local consumer stalls for `gap` RTTs, then takes half a window at once.
            p.now += rtt * gap + Duration::from_micros(1);
            p.client.stream_consumed_external(p.now, id, consume, 0);
            held = WINDOW - consume;
            p.deliver_grants();
        }
        // Half a window over ten RTTs, then half a window 1 us later: not window-limited.
        assert_eq!(p.client.stream_recv_window(id), WINDOW);
    }

    /// The client's window after a grant that follows the one before by exactly one RTT, with
    /// a little over half a window consumed in between (just fast enough to grow) and
    /// `backlog` bytes of the stream still waiting in the driver.
    fn window_after_fast_grant(backlog: u32) -> u32 {
        let mut p = Pair::new();
        let id = p.server.open_stream("bulk", None).unwrap();
        p.drive();
        let rtt = p.client.stats().rtt.expect("measured at start");
        p.send_external(id, WINDOW);
        // The first grant starts the measurement.
        p.client.stream_consumed_external(p.now, id, WINDOW / 2, 0);
        p.deliver_grants();
        p.send_external(id, WINDOW / 2);
        p.now += rtt;
        p.client
            .stream_consumed_external(p.now, id, WINDOW / 2 + 1, backlog);
        p.client.stream_recv_window(id)
    }

    #[test]
    fn a_consumer_with_a_backlog_does_not_grow_the_window() {
        // Over half a window in one RTT: the window limits the stream...
        assert_eq!(window_after_fast_grant(0), 2 * WINDOW);
        assert_eq!(window_after_fast_grant(WINDOW / 4 - 1), 2 * WINDOW);
        // ...unless a quarter of it has arrived and still waits for the local socket: then
        // the consumer does, however fast its last burst was.
        assert_eq!(window_after_fast_grant(WINDOW / 4), WINDOW);
        assert_eq!(window_after_fast_grant(WINDOW / 2 - 1), WINDOW);
    }

    /// The client's window after two grants of a whole window each, consumed in one burst
    /// `gap` apart (a driver splicing a full pipe at once, one window per round trip).
    fn window_after_burst_grants(gap: Duration) -> u32 {
        let mut p = Pair::new();
        p.drive();
        assert_eq!(p.client.stats().min_rtt, Some(2 * p.step));
        let id = p.server.open_stream("bulk", None).unwrap();
        p.drive();
        for _ in 0..2 {
            p.send_external(id, WINDOW);
            p.now += gap;
            p.client.stream_consumed_external(p.now, id, WINDOW, 0);
            p.deliver_grants();
        }
        p.client.stream_recv_window(id)
    }

    /// The client's window after whole windows consumed in one burst each, `gap` apart, for
    /// `total` of virtual time, with the window already at `smoothed_rtt_window` (past the
    /// limit: the minimum RTT and at least `PAST_LIMIT_RATE_INTERVAL` judge the rate).
    fn window_past_the_limit_after_bursts(gap: Duration, total: Duration) -> u32 {
        let mut p = Pair::with_client_limit(WINDOW);
        p.drive();
        let id = p.open_to_client();
        let end = p.now + total;
        while p.now < end && p.client.stream_recv_window(id) == WINDOW {
            p.send_external(id, WINDOW);
            p.now += gap;
            p.client.stream_consumed_external(p.now, id, WINDOW, 0);
            p.deliver_grants();
        }
        p.client.stream_recv_window(id)
    }

    #[test]
    fn past_the_limit_a_burst_after_a_stall_is_not_a_rate() {
        // A whole window per 1.5 minimum RTTs, sustained: window-limited, grows once the
        // rate has held for the interval.
        let fast = 3 * p_step();
        assert_eq!(
            window_past_the_limit_after_bursts(fast, 2 * PAST_LIMIT_RATE_INTERVAL),
            2 * WINDOW
        );
        // Two such bursts (as after a stall on loopback) are not enough.
        assert_eq!(window_past_the_limit_after_bursts(fast, 2 * fast), WINDOW);
        // Nor is a consumer that takes a window per 2.5 RTTs, however long.
        assert_eq!(
            window_past_the_limit_after_bursts(5 * p_step(), 4 * PAST_LIMIT_RATE_INTERVAL),
            WINDOW
        );
    }

    #[test]
    fn a_window_consumed_in_one_burst_per_round_trip_still_grows() {
        // A whole window per 1.5 RTT is faster than half a window per RTT: the window limits.
        assert_eq!(window_after_burst_grants(3 * p_step()), 2 * WINDOW);
        // A whole window per 2.5 RTT is slower: the consumer (or the sender) limits.
        assert_eq!(window_after_burst_grants(5 * p_step()), WINDOW);
    }

    #[test]
    fn round_robin_shares_the_session_fairly() {
        let mut p = Pair::new();
        let ids: Vec<_> = (0..3)
            .map(|_| p.server.open_stream("x", None).unwrap())
            .collect();
        p.drive();
        for id in &ids {
            p.server
                .stream_write(*id, Bytes::from(vec![0u8; 24 * 1024]))
                .unwrap();
        }
        let mut out = Vec::new();
        // Room for about one quantum per stream.
        p.server.poll_transmit(&mut out, 3 * 8 * 1024);
        let mut buf = BytesMut::from(&out[..]);
        p.client.handle_input(p.now, &mut buf).unwrap();
        for id in &ids {
            assert_eq!(p.client.stream_recv_buffered(*id), 8 * 1024, "stream {id}");
        }
    }

    #[test]
    fn control_frames_go_before_data() {
        let mut p = Pair::new();
        let id = p.server.open_stream("x", None).unwrap();
        p.drive();
        p.server
            .stream_write(id, Bytes::from(vec![0u8; 1000]))
            .unwrap();
        p.server.go_away(GoAwayCode::NoError, "bye");
        let mut out = Vec::new();
        p.server.poll_transmit(&mut out, 1 << 20);
        assert_eq!(out[0], crate::frame::FrameType::GoAway as u8);
    }

    #[test]
    fn reset_reaches_the_peer_and_frees_both_sides() {
        let mut p = Pair::new();
        let id = p.server.open_stream("x", None).unwrap();
        p.server
            .stream_write(id, Bytes::from_static(b"abc"))
            .unwrap();
        p.drive();
        p.client.stream_reset(id, ResetCode::ServiceUnavailable);
        p.drive();
        assert!(Pair::events(&mut p.server).contains(&Event::StreamReset {
            id,
            code: ResetCode::ServiceUnavailable
        }));
        assert_eq!(p.server.stream_count(), 0);
        assert_eq!(p.client.stream_count(), 0);
        assert_eq!(p.server.stream_send_capacity(id), 0);
        assert_eq!(
            p.server.stream_write(id, Bytes::from_static(b"x")),
            Err(StreamError::Gone(id))
        );
    }

    #[test]
    fn data_for_a_reset_stream_returns_session_credit() {
        let mut p = Pair::new();
        let id = p.server.open_stream("x", None).unwrap();
        p.drive();
        p.client.stream_reset(id, ResetCode::Cancelled);
        // The server keeps sending before it sees the RST.
        let mut total = 0;
        for _ in 0..40 {
            let cap = p.server.stream_send_capacity(id);
            if cap == 0 {
                break;
            }
            p.server
                .stream_write(id, Bytes::from(vec![0u8; cap]))
                .unwrap();
            total += cap;
            let mut out = Vec::new();
            p.server.poll_transmit(&mut out, 1 << 20);
            let mut buf = BytesMut::from(&out[..]);
            p.client.handle_input(p.now, &mut buf).unwrap();
        }
        assert!(total > 0);
        p.drive();
        // A new stream can still use the whole session budget.
        let id2 = p.server.open_stream("x", None).unwrap();
        assert!(p.server.stream_send_capacity(id2) > 0);
    }

    #[test]
    fn sending_beyond_credit_is_a_flow_control_error() {
        let mut p = Pair::new();
        let id = p.server.open_stream("x", None).unwrap();
        p.drive();
        let mut wire = Vec::new();
        for _ in 0..(WINDOW / 1024 + 1) {
            Frame::Data {
                stream: id,
                payload: Bytes::from(vec![0u8; 1024]),
            }
            .encode(&mut wire);
        }
        let mut buf = BytesMut::from(&wire[..]);
        let err = p.client.handle_input(p.now, &mut buf).unwrap_err();
        assert!(matches!(err, SessionError::FlowControl { .. }), "{err}");
        let mut out = Vec::new();
        p.client.poll_transmit(&mut out, 1 << 20);
        let mut buf = BytesMut::from(&out[..]);
        let f = Frame::decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(
            matches!(
                f,
                Frame::GoAway {
                    code: GoAwayCode::FlowControlError,
                    ..
                }
            ),
            "{f:?}"
        );
        assert!(Pair::events(&mut p.client).contains(&Event::StreamReset {
            id,
            code: ResetCode::SessionLost
        }));
    }

    #[test]
    fn frames_for_never_opened_streams_are_protocol_errors() {
        let mut p = Pair::new();
        let mut wire = Vec::new();
        Frame::Data {
            stream: StreamId(99),
            payload: Bytes::from_static(b"x"),
        }
        .encode(&mut wire);
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            p.client.handle_input(p.now, &mut buf),
            Err(SessionError::Protocol(_))
        ));
        assert!(p.client.is_closed());
    }

    #[test]
    fn opens_beyond_the_stream_limit_are_refused_not_fatal() {
        let mut p = Pair::new();
        let mut cfg = config(Role::Server);
        cfg.peer.max_streams = 1000; // the server believes it may open more than the client takes
        p.server = Session::new(cfg, p.now);
        for _ in 0..101 {
            p.server.open_stream("x", None).unwrap();
        }
        p.drive();
        assert_eq!(p.client.stream_count(), 100);
        assert_eq!(p.server.stream_count(), 100);
        assert!(!p.client.is_closed());
    }

    #[test]
    fn keepalive_pings_and_idle_timeout_are_deadlines() {
        let mut p = Pair::new();
        p.drive();
        let rtt = p.client.stats().rtt.expect("rtt measured at start");
        assert!(rtt >= p.step);
        let deadline = p.client.poll_timeout().unwrap();
        assert_eq!(deadline, p.now - p.step * 2 + Duration::from_secs(10));
        p.now = deadline;
        p.client.handle_timeout(p.now).unwrap();
        assert!(p.client.has_transmit(), "a keepalive PING is queued");
        // The server never answers again: the idle timeout ends the session.
        let later = p.now + Duration::from_secs(31);
        let err = p.client.handle_timeout(later).unwrap_err();
        assert!(matches!(err, SessionError::IdleTimeout { idle_ms: 30_000 }));
    }

    #[test]
    fn graceful_goaway_refuses_new_streams_and_drains() {
        let mut p = Pair::new();
        let id = p.server.open_stream("x", None).unwrap();
        p.drive();
        p.client.go_away(GoAwayCode::NoError, "shutting down");
        p.drive();
        assert!(Pair::events(&mut p.server)
            .iter()
            .any(|e| matches!(e, Event::GoAway { .. })));
        assert_eq!(p.server.open_stream("x", None), Err(OpenError::GoingAway));
        assert!(!p.server.is_drained());
        p.server.stream_finish(id).unwrap();
        p.client.stream_finish(id).unwrap();
        p.drive();
        p.read_all(true, id);
        p.read_all(false, id);
        assert!(p.server.is_drained() && p.client.is_drained());
    }

    #[test]
    fn a_thousand_streams_on_one_session() {
        let mut p = Pair::new();
        let mut cfg_s = config(Role::Server);
        let mut cfg_c = config(Role::Client);
        for c in [&mut cfg_s, &mut cfg_c] {
            c.local.max_streams = 2000;
            c.peer.max_streams = 2000;
        }
        p.server = Session::new(cfg_s, p.now);
        p.client = Session::new(cfg_c, p.now);
        let ids: Vec<_> = (0..1000)
            .map(|_| p.server.open_stream("x", None).unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            p.server
                .stream_write(*id, Bytes::from(format!("stream {i}")))
                .unwrap();
            p.server.stream_finish(*id).unwrap();
        }
        p.drive();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                p.read_all(true, *id),
                (format!("stream {i}").into_bytes(), true)
            );
        }
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn an_idle_stream_holds_no_buffers_and_its_state_is_small() {
        // What a stream costs when nothing is in flight: the struct, no heap.
        let s = Stream::new(256 * 1024, 256 * 1024);
        assert_eq!(s.recv.capacity(), 0);
        assert_eq!(s.send.capacity(), 0);
        assert!(
            std::mem::size_of::<Stream>() <= 192,
            "Stream grew to {} bytes",
            std::mem::size_of::<Stream>()
        );
    }
}
