//! Fuzzes one `Session` the way a driver uses it, with the peer played by the fuzz input: raw
//! bytes and well-formed frames into `handle_input`, a virtual clock into `handle_timeout`, and
//! `poll_transmit` / `poll_event` / `stream_read` / `stream_write` / `stream_finish` /
//! `stream_reset` / `open_stream` / `go_away` calls, in an order the input picks. Also the
//! splice driver's receive path: DATA frames taken externally (`take_external_data`, after
//! `stream_take_buffered` when the core still holds earlier bytes) and reported consumed later
//! (`stream_consumed_external`).
//!
//! Invariants, checked after every call:
//! - nothing panics; calls the driver may make never fail except as documented;
//! - received bytes are bounded: `stats().recv_buffered` never exceeds the local
//!   `session_window`, and no stream holds more than its receive window;
//! - what the session transmits is valid for the peer: it decodes with the peer's payload limit,
//!   contains whole frames only, never sends DATA beyond the credit the peer granted (per stream
//!   and per session), never sends DATA on a stream before its OPEN or after its FIN, and sends
//!   at most one FIN per stream.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use warren_proto::frame::{Frame, GoAwayCode, ResetCode, StreamId};
use warren_proto::handshake::PeerParams;
use warren_proto::session::{Event, Readable, Role, Session, SessionConfig, StreamError};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut h = Harness::new(&mut input);
    // A bound on calls keeps every run short, whatever the input length.
    for _ in 0..4096 {
        if input.0.is_empty() {
            break;
        }
        h.step(&mut input);
        h.check();
    }
    // Whatever state it is in, the session must flush cleanly.
    h.transmit(usize::MAX);
    while h.session.poll_event().is_some() {}
    h.check();
});

/// Takes bytes off the front of the fuzz input, zeros once it runs dry.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }

    fn bytes(&mut self, len: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// The virtual clock's origin. Only offsets from it matter; the session never reads a clock.
/// This is the harness's one real clock read, never compared with real time again.
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Parameters in the ranges the handshake accepts (`PeerParams::validate`), kept small so that
/// windows and limits are actually reached.
fn params(input: &mut Input<'_>) -> PeerParams {
    let max_frame_payload = PeerParams::MAX_FRAME_PAYLOAD_MIN << (input.u8() % 4);
    let initial_stream_window =
        PeerParams::INITIAL_STREAM_WINDOW_MIN * (1 + u32::from(input.u8() % 16));
    let session_window = initial_stream_window * (1 + u32::from(input.u8() % 8));
    let max_streams = 1 + u32::from(input.u8() % 8);
    let p = PeerParams {
        max_frame_payload,
        initial_stream_window,
        session_window,
        max_streams,
    };
    p.validate().expect("the harness builds valid parameters");
    p
}

const SERVICES: [&str; 4] = ["web", "ssh", "db.main", "not a valid name"];

struct Harness {
    session: Session,
    /// Virtual time since `origin()`.
    now: Duration,
    /// Bytes "read from the socket" that the session has not consumed yet (a partial frame).
    inbound: BytesMut,
    /// The same bytes, decoded on the side to learn which credit the peer granted.
    shadow: BytesMut,
    /// Once the shadow decoder fails the session has failed too; credit stops counting.
    shadow_dead: bool,
    /// Transmitted bytes not yet decoded (must always be empty between calls).
    outbound: Vec<u8>,
    /// Streams the driver knows about, in the order it learnt them.
    streams: Vec<StreamId>,
    /// The next stream id the peer would open.
    next_peer_id: u32,
    /// Credit the peer granted per stream (beyond its initial window), and for the session (id 0).
    granted: HashMap<StreamId, u64>,
    /// DATA bytes sent per stream, and in total.
    sent: HashMap<StreamId, u64>,
    sent_total: u64,
    /// Local streams whose OPEN went out, and streams whose FIN went out.
    opened: HashSet<StreamId>,
    fin_sent: HashSet<StreamId>,
    /// Pings the session sent, so the peer can answer some with the right value.
    last_ping: u64,
    /// Bytes the "driver" holds per stream, taken externally and not yet reported consumed.
    held: HashMap<StreamId, u32>,
}

impl Harness {
    fn new(input: &mut Input<'_>) -> Harness {
        let role = if input.u8().is_multiple_of(2) {
            Role::Server
        } else {
            Role::Client
        };
        let local = params(input);
        let peer = params(input);
        let keepalive = Duration::from_millis(100 * (1 + u64::from(input.u8() % 100)));
        let cfg = SessionConfig {
            role,
            local,
            peer,
            max_stream_window: local.initial_stream_window * (1 + u32::from(input.u8() % 4)),
            // Both tuning rules run: windows grow on the smoothed RTT to twice the initial
            // window, on the minimum RTT beyond (no input byte, so old seeds keep meaning).
            smoothed_rtt_window: local.initial_stream_window.saturating_mul(2),
            quantum: 1024 * (1 + u32::from(input.u8() % 8)),
            stream_send_buffer: 1024 * (1 + u32::from(input.u8() % 16)),
            keepalive_interval: keepalive,
            idle_timeout: keepalive * 3,
        };
        let next_peer_id = match role {
            Role::Server => 2,
            Role::Client => 1,
        };
        Harness {
            session: Session::new(cfg, origin()),
            now: Duration::ZERO,
            inbound: BytesMut::new(),
            shadow: BytesMut::new(),
            shadow_dead: false,
            outbound: Vec::new(),
            streams: Vec::new(),
            next_peer_id,
            granted: HashMap::new(),
            sent: HashMap::new(),
            sent_total: 0,
            opened: HashSet::new(),
            fin_sent: HashSet::new(),
            last_ping: 0,
            held: HashMap::new(),
        }
    }

    fn now(&self) -> Instant {
        origin() + self.now
    }

    fn cfg(&self) -> &SessionConfig {
        self.session.config()
    }

    /// A stream id: mostly one the driver knows, sometimes any small or large id.
    fn pick_stream(&self, input: &mut Input<'_>) -> StreamId {
        let b = input.u8();
        match (b % 4, self.streams.is_empty()) {
            (0 | 1, false) => self.streams[usize::from(b / 4) % self.streams.len()],
            (2, _) => StreamId(u32::from(b / 4)),
            _ => StreamId(input.u32()),
        }
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 13 {
            // Raw bytes from the peer: anything at all, including partial and hostile frames.
            0 => {
                let len = usize::from(input.u8());
                let raw = input.bytes(len).to_vec();
                self.feed(&raw);
            }
            // A well-formed frame from the peer, so deep states are reached quickly.
            1 | 2 => {
                let frame = self.peer_frame(input);
                let mut wire = Vec::new();
                frame.encode(&mut wire);
                self.feed(&wire);
            }
            3 => {
                // Time passes; sometimes exactly to the next deadline.
                let ms = u64::from(input.u16() % 4096);
                match (ms % 3, self.session.poll_timeout()) {
                    (0, Some(at)) => {
                        self.now = self.now.max(at.saturating_duration_since(origin()))
                    }
                    _ => self.now += Duration::from_millis(ms),
                }
                let now = self.now();
                let _ = self.session.handle_timeout(now);
            }
            4 => {
                let limit = usize::from(input.u16());
                self.transmit(limit);
            }
            5 => self.events(),
            6 => {
                let id = self.pick_stream(input);
                let max = 1 + usize::from(input.u16());
                let now = self.now();
                match self.session.stream_read(now, id, max) {
                    Readable::Data(bytes) => {
                        assert!(!bytes.is_empty() && bytes.len() <= max, "bad read size");
                    }
                    Readable::Gone => assert!(!self.session.stream_exists(id)),
                    Readable::Fin | Readable::Pending => {}
                }
            }
            7 => self.write(input),
            8 => {
                let id = self.pick_stream(input);
                let existed = self.session.stream_exists(id);
                match self.session.stream_finish(id) {
                    Ok(()) => assert!(existed),
                    Err(StreamError::Gone(_)) => assert!(!existed),
                    Err(e) => panic!("stream_finish failed with {e:?}"),
                }
            }
            9 => {
                let id = self.pick_stream(input);
                let code = ResetCode::from_u32(u32::from(input.u8() % 10));
                self.session.stream_reset(id, code);
                assert!(!self.session.stream_exists(id));
            }
            10 => {
                let service = SERVICES[usize::from(input.u8()) % SERVICES.len()];
                let visitor = visitor(input);
                if let Ok(id) = self.session.open_stream(service, visitor) {
                    self.streams.push(id);
                }
            }
            11 => {
                let code = GoAwayCode::from_u32(u32::from(input.u8() % 7));
                self.session.go_away(code, "fuzz");
            }
            _ => match input.u8() {
                // Rarely, the connection breaks.
                0xff => self.session.handle_connection_lost("fuzz"),
                // The splice driver's receive path (old seeds had no-ops here).
                b if b < 0x60 => self.external_data(input),
                b if b < 0xc0 => self.consume_external(input),
                _ => {}
            },
        }
    }

    /// A whole DATA frame from the peer arrives at the front of the input and the driver takes
    /// it externally when the session lets it: directly, or after taking the bytes the core
    /// still holds for the stream. Otherwise `handle_input` judges it as usual.
    fn external_data(&mut self, input: &mut Input<'_>) {
        let stream = self.pick_stream(input);
        let max = self.cfg().local.max_frame_payload as usize + 16;
        let len = 1 + usize::from(input.u16()) % max;
        let mut wire = Vec::new();
        Frame::Data {
            stream,
            payload: Bytes::from(vec![0xd7; len]),
        }
        .encode(&mut wire);
        // Bytes of streams that ended were dropped with them.
        self.held.retain(|id, _| self.session.stream_exists(*id));
        if !self.inbound.is_empty() || self.session.is_closed() {
            // A partial frame is pending: this one comes after it, the ordinary way.
            self.feed(&wire);
            return;
        }
        self.inbound.extend_from_slice(&wire);
        let now = self.now();
        if let Some((id, n)) = self.session.peek_data(&self.inbound) {
            assert_eq!(
                (id, n as usize),
                (stream, len),
                "peek_data misread the header"
            );
            let before = self.session.stream_buffered_before_external(id, n);
            if let Some(queued) = before {
                assert!(!self.session.stream_can_take_external(id, n));
                let taken: usize = self
                    .session
                    .stream_take_buffered(id)
                    .iter()
                    .map(|b| b.len())
                    .sum();
                assert_eq!(taken, queued as usize, "took other than the core held");
                *self.held.entry(id).or_default() += queued;
                assert!(self.session.stream_can_take_external(id, n));
                assert_eq!(self.session.stream_buffered_before_external(id, n), None);
            }
            if self.session.stream_can_take_external(id, n) {
                let (got, got_len, head) = self
                    .session
                    .take_external_data(now, &mut self.inbound)
                    .expect("a frame the session allowed was taken");
                assert_eq!((got, got_len, head.len()), (id, n, len));
                *self.held.entry(id).or_default() += n;
            }
        }
        let _ = self.session.handle_input(now, &mut self.inbound);
        if self.session.is_closed() {
            self.inbound.clear();
        }
        // After the session judged it: a frame over the payload limit must have ended it.
        self.shadow_feed(&wire);
    }

    /// The driver delivered some of the bytes it holds for one stream.
    fn consume_external(&mut self, input: &mut Input<'_>) {
        let held: Vec<StreamId> = self.held.keys().copied().collect();
        if held.is_empty() {
            return;
        }
        let id = held[usize::from(input.u8()) % held.len()];
        let have = self.held[&id];
        let n = 1 + input.u32() % have;
        let backlog = input.u32() % (have - n + 1);
        let now = self.now();
        self.session.stream_consumed_external(now, id, n, backlog);
        if have == n || !self.session.stream_exists(id) {
            // All delivered, or the stream is gone and the driver drops what it held.
            self.held.remove(&id);
        } else {
            self.held.insert(id, have - n);
        }
    }

    fn peer_frame(&mut self, input: &mut Input<'_>) -> Frame {
        match input.u8() % 9 {
            0 | 1 => {
                let stream = self.pick_stream(input);
                // Up to a little over the local limit, to cross it now and then.
                let max = self.cfg().local.max_frame_payload as usize + 16;
                let len = 1 + usize::from(input.u16()) % max;
                let fill = input.u8();
                Frame::Data {
                    stream,
                    payload: Bytes::from(vec![fill; len]),
                }
            }
            2 => {
                // Mostly the next valid peer id; sometimes whatever the input says.
                let stream = if !input.u8().is_multiple_of(4) {
                    let id = StreamId(self.next_peer_id);
                    self.next_peer_id = self.next_peer_id.wrapping_add(2);
                    id
                } else {
                    self.pick_stream(input)
                };
                Frame::Open {
                    stream,
                    service: SERVICES[usize::from(input.u8()) % 3].to_owned(),
                    visitor: visitor(input),
                }
            }
            3 => Frame::Fin {
                stream: self.pick_stream(input),
            },
            4 => Frame::Rst {
                stream: self.pick_stream(input),
                code: ResetCode::from_u32(u32::from(input.u8() % 10)),
            },
            5 => {
                let stream = if input.u8().is_multiple_of(3) {
                    StreamId::SESSION
                } else {
                    self.pick_stream(input)
                };
                let increment = match input.u8() % 4 {
                    0 => input.u32().max(1),
                    _ => 1 + u32::from(input.u16()),
                };
                Frame::WindowUpdate { stream, increment }
            }
            6 => Frame::Ping {
                opaque: input.u64(),
            },
            7 => Frame::Pong {
                opaque: if !input.u8().is_multiple_of(4) {
                    self.last_ping
                } else {
                    input.u64()
                },
            },
            _ => Frame::GoAway {
                last_stream: StreamId(input.u32()),
                code: GoAwayCode::from_u32(u32::from(input.u8() % 4 / 3)),
                reason: "peer says bye".to_owned(),
            },
        }
    }

    /// Hands bytes "read from the socket" to the session, and notes the credit they grant.
    fn feed(&mut self, bytes: &[u8]) {
        self.inbound.extend_from_slice(bytes);
        let now = self.now();
        let _ = self.session.handle_input(now, &mut self.inbound);
        if self.session.is_closed() {
            // A closed session ignores input; the driver would drop the connection.
            self.inbound.clear();
        }
        self.shadow_feed(bytes);
    }

    /// Decodes the peer's bytes on the side, to learn which credit they grant.
    fn shadow_feed(&mut self, bytes: &[u8]) {
        if self.shadow_dead {
            return;
        }
        self.shadow.extend_from_slice(bytes);
        let max = self.cfg().local.max_frame_payload;
        loop {
            match Frame::decode(&mut self.shadow, max) {
                Ok(Some(Frame::WindowUpdate { stream, increment })) => {
                    *self.granted.entry(stream).or_default() += u64::from(increment);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    self.shadow_dead = true;
                    assert!(
                        self.session.is_closed(),
                        "a bad frame did not end the session"
                    );
                    break;
                }
            }
        }
    }

    fn write(&mut self, input: &mut Input<'_>) {
        let id = self.pick_stream(input);
        let capacity = self.session.stream_send_capacity(id);
        let exists = self.session.stream_exists(id);
        // Mostly within capacity; sometimes all of it, sometimes one byte too many.
        let b = input.u16();
        let len = match b % 8 {
            0 => capacity + 1,
            1 => capacity,
            _ => usize::from(b) % (capacity + 1),
        };
        match self.session.stream_write(id, Bytes::from(vec![0x5a; len])) {
            Ok(()) => assert!(exists && len <= capacity, "a write over capacity was taken"),
            Err(StreamError::Gone(_)) => assert!(!exists),
            Err(StreamError::OverCapacity { .. }) => assert!(len > capacity),
            Err(StreamError::Finished(_)) => assert_eq!(capacity, 0),
        }
    }

    fn events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                // The stream may be gone already (reset by the peer in the same read).
                Event::StreamOpened { id, .. } => self.streams.push(id),
                Event::StreamReset { id, .. } => assert!(!self.session.stream_exists(id)),
                Event::StreamReadable(_) | Event::StreamWritable(_) | Event::GoAway { .. } => {}
            }
        }
        // Keep the list of known ids bounded.
        if self.streams.len() > 64 {
            self.streams.drain(..32);
        }
    }

    /// Takes what the session wants to send and checks it the way the peer would.
    fn transmit(&mut self, limit: usize) {
        self.session.poll_transmit(&mut self.outbound, limit);
        let mut wire = BytesMut::from(&self.outbound[..]);
        self.outbound.clear();
        let peer = self.cfg().peer;
        let role = self.cfg().role;
        while !wire.is_empty() {
            let frame = match Frame::decode(&mut wire, peer.max_frame_payload) {
                Ok(Some(frame)) => frame,
                Ok(None) => panic!("poll_transmit produced a partial frame"),
                Err(e) => panic!("poll_transmit produced a frame the peer must reject: {e}"),
            };
            match frame {
                Frame::Data { stream, payload } => {
                    let len = payload.len() as u64;
                    assert!(
                        !self.fin_sent.contains(&stream),
                        "DATA after FIN on {stream}"
                    );
                    if is_local(role, stream) {
                        assert!(
                            self.opened.contains(&stream),
                            "DATA before OPEN on {stream}"
                        );
                    }
                    let sent = self.sent.entry(stream).or_default();
                    *sent += len;
                    let credit = u64::from(peer.initial_stream_window)
                        + self.granted.get(&stream).copied().unwrap_or(0);
                    assert!(
                        *sent <= credit,
                        "stream {stream}: sent {sent} with {credit} of credit"
                    );
                    self.sent_total += len;
                    let credit = u64::from(peer.session_window)
                        + self.granted.get(&StreamId::SESSION).copied().unwrap_or(0);
                    assert!(
                        self.sent_total <= credit,
                        "session: sent {} with {credit} of credit",
                        self.sent_total
                    );
                }
                Frame::Open { stream, .. } => {
                    assert!(is_local(role, stream), "OPEN with the peer's parity");
                    assert!(self.opened.insert(stream), "second OPEN for {stream}");
                }
                Frame::Fin { stream } => {
                    assert!(self.fin_sent.insert(stream), "second FIN on {stream}");
                }
                Frame::Ping { opaque } => self.last_ping = opaque,
                Frame::Rst { .. }
                | Frame::WindowUpdate { .. }
                | Frame::Pong { .. }
                | Frame::GoAway { .. } => {}
            }
        }
    }

    fn check(&self) {
        let stats = self.session.stats();
        let window = u64::from(self.cfg().local.session_window);
        assert!(
            stats.recv_buffered <= window,
            "{} bytes buffered with a session window of {window}",
            stats.recv_buffered
        );
        assert_eq!(stats.streams, self.session.stream_count());
        if self.session.is_closed() {
            assert_eq!(
                stats.recv_buffered, 0,
                "a closed session holds received bytes"
            );
            assert_eq!(
                self.session.stream_count(),
                0,
                "a closed session holds streams"
            );
        }
        let mut total = 0u64;
        for id in &self.streams {
            let buffered = self.session.stream_recv_buffered(*id);
            let window = self.session.stream_recv_window(*id);
            assert!(
                buffered <= window,
                "stream {id}: {buffered} buffered, window {window}"
            );
            assert!(
                window
                    <= self
                        .cfg()
                        .max_stream_window
                        .max(self.cfg().local.initial_stream_window)
            );
            total += u64::from(buffered);
        }
        assert!(
            total <= stats.recv_buffered,
            "streams hold {total} bytes, the session counts {}",
            stats.recv_buffered
        );
        // What the driver holds for live streams is counted as received and not consumed.
        let held: u64 = self
            .held
            .iter()
            .filter(|(id, _)| self.session.stream_exists(**id))
            .map(|(_, n)| u64::from(*n))
            .sum();
        assert!(
            held <= stats.recv_buffered,
            "the driver holds {held} bytes, the session counts {}",
            stats.recv_buffered
        );
    }
}

fn is_local(role: Role, id: StreamId) -> bool {
    (id.0 % 2 == 1) == (role == Role::Server)
}

fn visitor(input: &mut Input<'_>) -> Option<SocketAddr> {
    match input.u8() % 3 {
        0 => None,
        1 => Some(SocketAddr::from((input.take::<4>(), input.u16()))),
        _ => Some(SocketAddr::from((input.take::<16>(), input.u16()))),
    }
}
