//! Protocol sessions without sockets: an in-memory server/client [`Pair`] with a virtual clock
//! (the bench twin of the test-only pair in `proto/src/session.rs`), and sessions loaded with
//! queued data for the scheduler benchmarks.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use warren::config::Tuning;
use warren::setup::{local_params, session_config};
use warren_proto::frame::StreamId;
use warren_proto::handshake::PeerParams;
use warren_proto::session::{Readable, Role, Session, SessionConfig};

/// Most bytes one `poll_transmit` call may produce: one session write, as a driver with a
/// 256 KiB write buffer does.
pub const TRANSMIT_LIMIT: usize = 256 * 1024;

/// Largest read a driver makes from a stream for its local socket.
pub const READ_MAX: usize = 64 * 1024;

/// Keepalive and idle timeout of the benchmark sessions: the `warren` defaults.
const KEEPALIVE_MS: u64 = 10_000;
const IDLE_TIMEOUT_MS: u64 = 30_000;

/// The session configuration `warren` uses with `tuning` on both ends.
pub fn session_config_for(role: Role, tuning: &Tuning) -> SessionConfig {
    session_config(
        role,
        tuning,
        local_params(tuning),
        KEEPALIVE_MS,
        IDLE_TIMEOUT_MS,
    )
}

/// The origin of every virtual clock. The only clock read of the session benchmarks: time then
/// moves by fixed steps, so runs are deterministic.
#[allow(clippy::disallowed_methods)]
pub fn clock_origin() -> Instant {
    Instant::now()
}

/// A server and a client session joined by two in-memory pipes and a virtual clock.
#[derive(Debug)]
pub struct Pair {
    /// The virtual clock.
    pub now: Instant,
    /// The relay's session.
    pub server: Session,
    /// The agent's session.
    pub client: Session,
    /// Bytes in flight from server to client (the client's read buffer).
    to_client: BytesMut,
    /// Bytes in flight from client to server (the server's read buffer).
    to_server: BytesMut,
    /// One transmit's worth of frames (the writer's buffer), reused.
    out: Vec<u8>,
    /// Virtual one-way delay per pump round.
    step: Duration,
}

impl Pair {
    /// A pair with `warren`'s default tuning on both ends, PINGs exchanged (so the RTT and
    /// with it window auto-tuning are known).
    pub fn new() -> Pair {
        let tuning = Tuning::default();
        let now = clock_origin();
        let mut p = Pair {
            now,
            server: Session::new(session_config_for(Role::Server, &tuning), now),
            client: Session::new(session_config_for(Role::Client, &tuning), now),
            to_client: BytesMut::with_capacity(2 * TRANSMIT_LIMIT),
            to_server: BytesMut::with_capacity(2 * TRANSMIT_LIMIT),
            out: Vec::with_capacity(2 * TRANSMIT_LIMIT),
            step: Duration::from_micros(50),
        };
        p.settle();
        p
    }

    /// Opens a stream from the server (a visitor arrived) and delivers the OPEN to the client.
    pub fn open_stream(&mut self) -> StreamId {
        let id = self
            .server
            .open_stream("bench", None)
            .expect("a fresh pair accepts a stream");
        self.settle();
        assert!(self.client.stream_exists(id), "the client saw the OPEN");
        id
    }

    /// Moves bytes both ways until neither side has anything to send.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            if !self.server.has_transmit() && !self.client.has_transmit() {
                return;
            }
            self.pump_to_client();
            self.pump_to_server();
        }
        panic!("the session pair did not settle");
    }

    /// Sends `data` on stream `id` from the client to the server (the download direction: the
    /// service's bytes) in writes of at most `write_max` bytes, as fast as flow control allows.
    /// The server consumes everything at once, so credit flows back through WINDOW_UPDATE.
    /// Returns the bytes the server read.
    pub fn transfer(&mut self, id: StreamId, data: &Bytes, write_max: usize) -> usize {
        let mut sent = 0;
        let mut received = 0;
        while received < data.len() {
            while sent < data.len() {
                let cap = self.client.stream_send_capacity(id);
                if cap == 0 {
                    break;
                }
                let n = cap.min(write_max).min(data.len() - sent);
                self.client
                    .stream_write(id, data.slice(sent..sent + n))
                    .expect("writes stay within capacity");
                sent += n;
            }
            self.pump_to_server();
            let now = self.now;
            while let Readable::Data(b) = self.server.stream_read(now, id, READ_MAX) {
                received += b.len();
            }
            // Window updates back to the sender.
            self.pump_to_client();
        }
        received
    }

    fn pump_to_client(&mut self) {
        self.now += self.step;
        let now = self.now;
        pump(&mut self.server, &mut self.out, &mut self.to_client);
        self.client
            .handle_input(now, &mut self.to_client)
            .expect("the client accepts the server's frames");
        service(&mut self.client, now);
    }

    fn pump_to_server(&mut self) {
        self.now += self.step;
        let now = self.now;
        pump(&mut self.client, &mut self.out, &mut self.to_server);
        self.server
            .handle_input(now, &mut self.to_server)
            .expect("the server accepts the client's frames");
        service(&mut self.server, now);
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}

/// One session write: frames from `from` into the peer's read buffer.
fn pump(from: &mut Session, out: &mut Vec<u8>, to: &mut BytesMut) {
    out.clear();
    from.poll_transmit(out, TRANSMIT_LIMIT);
    to.extend_from_slice(out);
}

/// What a driver does after input: drain events (it would wake streams) and run timers.
fn service(s: &mut Session, now: Instant) {
    while s.poll_event().is_some() {}
    if s.poll_timeout().is_some_and(|t| t <= now) {
        s.handle_timeout(now)
            .expect("a live pair does not time out");
    }
}

/// Limits that let one session hold 10,000 streams with 1 MiB queued each: the stream limit
/// (the default 16,384 covers 10,000), windows and send buffers raised so credit never stops
/// the scheduler mid-measurement.
pub fn scheduler_config() -> SessionConfig {
    let params = PeerParams {
        max_frame_payload: 16 * 1024,
        initial_stream_window: 1024 * 1024,
        session_window: 1 << 30,
        max_streams: 16_384,
    };
    SessionConfig {
        role: Role::Server,
        local: params,
        peer: params,
        max_stream_window: 1024 * 1024,
        smoothed_rtt_window: 1024 * 1024,
        quantum: 64 * 1024,
        stream_send_buffer: 1024 * 1024,
        keepalive_interval: Duration::from_millis(KEEPALIVE_MS),
        idle_timeout: Duration::from_millis(IDLE_TIMEOUT_MS),
    }
}

/// A server session with `streams` open streams, each with `chunks` writes of `chunk` queued
/// (slices of one buffer: no copies), and its control frames (PING, the OPENs) already taken,
/// so the next `poll_transmit` produces only DATA.
pub fn loaded_session(streams: usize, chunks: usize, chunk: &Bytes) -> Session {
    let mut s = Session::new(scheduler_config(), clock_origin());
    for _ in 0..streams {
        let id = s.open_stream("bench", None).expect("within max_streams");
        for _ in 0..chunks {
            s.stream_write(id, chunk.clone())
                .expect("within the send buffer");
        }
    }
    let mut control = Vec::new();
    s.poll_transmit(&mut control, 0);
    s
}
