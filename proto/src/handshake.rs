//! The session handshake, sans-IO.
//!
//! Every session (one TCP or TLS connection from client to server) opens with this exchange
//! before any frame flows:
//!
//! ```text
//! client                                                     server
//!   ClientHello { magic, version, capabilities }          ->
//!                <- ServerChallenge { magic, version, capabilities, nonce }
//!   ClientAuth { name, instance_id, session_index,
//!                mac, params, services }                   ->
//!                <- Accept { session_id, shard_count, params, timers, verdicts }
//!                   or Reject { code, reason }
//! ```
//!
//! The token never travels: the client proves it knows it with an HMAC-SHA256 over the server's
//! fresh nonce (see [`compute_mac`]), so a recorded handshake cannot be replayed.
//!
//! Every message is `kind: u8, len: u16 BE, body: [u8; len]` with `len <=`
//! [`MAX_HANDSHAKE_MESSAGE`]. Bytes after a side's last handshake message belong to the frame
//! stream (a client may pipeline frames right after `ClientAuth`), so both state machines consume
//! exactly their own messages and leave anything after them in the caller's buffer.
//!
//! Nothing here touches a socket, a clock or a random number generator: the driver supplies the
//! nonce, moves the bytes from [`ServerHandshake::poll_transmit`] /
//! [`ClientHandshake::poll_transmit`] to the wire, and feeds what it reads to `handle_input`.

use std::fmt;

use bytes::{Buf, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The protocol version this build speaks. A peer speaking another version is refused with
/// [`RejectCode::UnsupportedVersion`]; there is only one version so far, hence no negotiation.
pub const PROTOCOL_VERSION: u16 = 1;

/// First four bytes of the client's first and the server's first message. Lets either side tell
/// a warren peer from anything else (an HTTP client, a port scanner) before trusting any field.
pub const MAGIC: [u8; 4] = *b"WRRN";

/// Upper bound on the body of one handshake message, in bytes. A declared length above it fails
/// with [`HandshakeError::MessageTooLarge`] before any byte of the body is awaited, so a hostile
/// peer cannot make us buffer more than this.
pub const MAX_HANDSHAKE_MESSAGE: usize = 4096;

/// Longest client or service name, in bytes (names are ASCII, so also in characters).
pub const MAX_NAME_LEN: usize = 64;

/// Most services one client may offer in one `ClientAuth`.
pub const MAX_SERVICES: usize = 256;

/// Longest reason string carried in a `Reject` or a service refusal, in bytes. Longer reasons are
/// cut on a character boundary when encoded, because the length travels as one byte.
pub const MAX_REASON_LEN: usize = 255;

/// Bytes of the `kind` + `len` header in front of every handshake message.
const HEADER_LEN: usize = 3;

/// Domain separation for the MAC, so it can never be confused with an HMAC computed with the
/// same token for another purpose (or another version of this handshake).
const MAC_CONTEXT: &[u8] = b"warren-auth-v1";

/// Key used when the claimed client is unknown: the server still computes and compares a MAC, so
/// an unknown name costs the same time and takes the same path as a wrong token.
const DUMMY_KEY: [u8; 32] = [0x5a; 32];

/// Reason sent for every authentication failure. Deliberately says nothing about whether the
/// name or the token was wrong.
const AUTH_FAILED_REASON: &str = "authentication failed";

/// Reason given to the client for an offered service the server's verdict list left out.
const NO_VERDICT_REASON: &str = "the server gave no verdict for this service";

const NAME_RULE: &str = "must be 1 to 64 characters of A-Z a-z 0-9 _ . -";

const KIND_CLIENT_HELLO: u8 = 1;
const KIND_SERVER_CHALLENGE: u8 = 2;
const KIND_CLIENT_AUTH: u8 = 3;
const KIND_ACCEPT: u8 = 4;
const KIND_REJECT: u8 = 5;

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CLIENT_HELLO => "ClientHello",
        KIND_SERVER_CHALLENGE => "ServerChallenge",
        KIND_CLIENT_AUTH => "ClientAuth",
        KIND_ACCEPT => "Accept",
        KIND_REJECT => "Reject",
        _ => "an unknown message",
    }
}

/// Optional protocol features, as a bitset. Each side announces what it supports; a feature is
/// used only if both announce it. Bits this build does not know are dropped on decode, so a newer
/// peer can announce features without breaking an older one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(u32);

impl Capabilities {
    /// Reserved for UDP services carried as datagrams. Nobody sets it yet.
    pub const DATAGRAM: Self = Self(1 << 0);

    /// Every bit this build knows about.
    const KNOWN: u32 = Self::DATAGRAM.0;

    /// No optional features.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Keeps the bits this build knows and drops the others (they are a newer peer's business).
    pub const fn from_bits_truncate(bits: u32) -> Self {
        Self(bits & Self::KNOWN)
    }

    /// The raw bitset, as it goes on the wire.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every feature in `other` is also in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The features both sides support: what a session may actually use.
    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
}

/// Limits the sender of a message is willing to *receive*. Each side sends its own in the
/// handshake and must respect the other's from the first frame on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerParams {
    /// Largest frame payload the sender accepts, in bytes; bounds per-frame buffers.
    pub max_frame_payload: u32,
    /// Credit each new stream starts with, in bytes; lets optimistic OPEN carry data at once.
    pub initial_stream_window: u32,
    /// Credit shared by all streams of the session, in bytes; bounds per-session memory.
    pub session_window: u32,
    /// Most streams the sender keeps open at once in this session.
    pub max_streams: u32,
}

/// Names the four [`PeerParams`] fields in errors, prefixed by where they were found.
struct ParamsFields {
    max_frame_payload: &'static str,
    initial_stream_window: &'static str,
    session_window: &'static str,
    max_streams: &'static str,
}

const CLIENT_AUTH_PARAMS: ParamsFields = ParamsFields {
    max_frame_payload: "ClientAuth.params.max_frame_payload",
    initial_stream_window: "ClientAuth.params.initial_stream_window",
    session_window: "ClientAuth.params.session_window",
    max_streams: "ClientAuth.params.max_streams",
};

const ACCEPT_PARAMS: ParamsFields = ParamsFields {
    max_frame_payload: "Accept.params.max_frame_payload",
    initial_stream_window: "Accept.params.initial_stream_window",
    session_window: "Accept.params.session_window",
    max_streams: "Accept.params.max_streams",
};

const LOCAL_PARAMS: ParamsFields = ParamsFields {
    max_frame_payload: "params.max_frame_payload",
    initial_stream_window: "params.initial_stream_window",
    session_window: "params.session_window",
    max_streams: "params.max_streams",
};

impl PeerParams {
    /// Smallest allowed `max_frame_payload`: below it, headers would dominate the bytes moved.
    pub const MAX_FRAME_PAYLOAD_MIN: u32 = 1024;
    /// Largest allowed `max_frame_payload` (16 MiB): bounds the buffer one frame can demand.
    pub const MAX_FRAME_PAYLOAD_MAX: u32 = 16 * 1024 * 1024;
    /// Smallest allowed `initial_stream_window`: a stream must be able to make progress.
    pub const INITIAL_STREAM_WINDOW_MIN: u32 = 1024;

    /// Checks the ranges the handshake enforces on the wire, so a local configuration fails at
    /// load time instead of being refused by the peer. Errors name the field.
    pub fn validate(&self) -> Result<(), HandshakeError> {
        match self.problem(&LOCAL_PARAMS) {
            None => Ok(()),
            Some((field, problem)) => Err(HandshakeError::InvalidConfig { field, problem }),
        }
    }

    fn problem(&self, fields: &ParamsFields) -> Option<(&'static str, &'static str)> {
        if !(Self::MAX_FRAME_PAYLOAD_MIN..=Self::MAX_FRAME_PAYLOAD_MAX)
            .contains(&self.max_frame_payload)
        {
            return Some((
                fields.max_frame_payload,
                "must be between 1024 and 16777216 (16 MiB) bytes",
            ));
        }
        if self.initial_stream_window < Self::INITIAL_STREAM_WINDOW_MIN {
            return Some((fields.initial_stream_window, "must be at least 1024 bytes"));
        }
        if self.session_window < self.initial_stream_window {
            return Some((
                fields.session_window,
                "must be at least initial_stream_window",
            ));
        }
        if self.max_streams == 0 {
            return Some((fields.max_streams, "must be at least 1"));
        }
        None
    }

    fn read(r: &mut Reader<'_>, fields: &ParamsFields) -> Result<Self, HandshakeError> {
        let params = Self {
            max_frame_payload: r.u32(fields.max_frame_payload)?,
            initial_stream_window: r.u32(fields.initial_stream_window)?,
            session_window: r.u32(fields.session_window)?,
            max_streams: r.u32(fields.max_streams)?,
        };
        match params.problem(fields) {
            None => Ok(params),
            Some((field, problem)) => Err(HandshakeError::Malformed { field, problem }),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.max_frame_payload.to_be_bytes());
        out.extend_from_slice(&self.initial_stream_window.to_be_bytes());
        out.extend_from_slice(&self.session_window.to_be_bytes());
        out.extend_from_slice(&self.max_streams.to_be_bytes());
    }
}

/// Encoded size of [`PeerParams`].
const PARAMS_LEN: usize = 16;

/// A client's shared secret. It never goes on the wire and never appears in `Debug` output.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// Wraps the secret bytes (typically read from the config or a credentials file).
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self(secret.into())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Why the server refused a session. Carried as a `u16`; values this build does not know decode
/// to [`RejectCode::Other`] so a newer server's reasons still reach the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The client speaks a protocol version the server does not.
    UnsupportedVersion,
    /// Unknown client name or wrong token (deliberately not told apart).
    AuthFailed,
    /// The client authenticated but is not allowed to open this session.
    NotAllowed,
    /// The server has no room for another session right now; retry later.
    ServerBusy,
    /// The server is going down; retry later, maybe elsewhere.
    ShuttingDown,
    /// A code this build does not know. `Other(1..=5)` encodes like the named codes.
    Other(u16),
}

impl From<u16> for RejectCode {
    fn from(code: u16) -> Self {
        match code {
            1 => Self::UnsupportedVersion,
            2 => Self::AuthFailed,
            3 => Self::NotAllowed,
            4 => Self::ServerBusy,
            5 => Self::ShuttingDown,
            other => Self::Other(other),
        }
    }
}

impl From<RejectCode> for u16 {
    fn from(code: RejectCode) -> Self {
        match code {
            RejectCode::UnsupportedVersion => 1,
            RejectCode::AuthFailed => 2,
            RejectCode::NotAllowed => 3,
            RejectCode::ServerBusy => 4,
            RejectCode::ShuttingDown => 5,
            RejectCode::Other(other) => other,
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedVersion => f.write_str("unsupported version"),
            Self::AuthFailed => f.write_str("authentication failed"),
            Self::NotAllowed => f.write_str("not allowed"),
            Self::ServerBusy => f.write_str("server busy"),
            Self::ShuttingDown => f.write_str("server shutting down"),
            Self::Other(code) => write!(f, "code {code}"),
        }
    }
}

/// Everything that can end a handshake. Each message says who did what, for the log.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's first message is not a warren handshake message: it is not a warren peer.
    #[error(
        "peer is not a warren peer: its first handshake message does not carry the warren magic"
    )]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error("peer speaks warren protocol version {theirs}, this side speaks version {ours}")]
    UnsupportedVersion {
        /// [`PROTOCOL_VERSION`].
        ours: u16,
        /// The version the peer announced.
        theirs: u16,
    },
    /// The peer declared a message body longer than [`MAX_HANDSHAKE_MESSAGE`].
    #[error("peer sent a handshake message of {len} bytes; the limit is {max}")]
    MessageTooLarge {
        /// Declared body length.
        len: usize,
        /// [`MAX_HANDSHAKE_MESSAGE`].
        max: usize,
    },
    /// A message is cut short, has extra bytes, or a field is out of range.
    #[error("peer sent a malformed handshake message: {field} {problem}")]
    Malformed {
        /// The offending field, as `Message.field`.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A well-formed message arrived at the wrong point of the handshake.
    #[error("peer sent {} (kind {got}) where {expected} was expected", kind_name(*.got))]
    UnexpectedMessage {
        /// The message(s) valid at this point.
        expected: &'static str,
        /// The kind byte received.
        got: u8,
    },
    /// Server side: the client's MAC did not verify (unknown name or wrong token).
    #[error("client failed authentication: unknown client name or wrong token")]
    AuthFailed,
    /// Client side: the server refused the session.
    #[error("server rejected the session ({code}): {reason}")]
    Rejected {
        /// Machine-readable cause.
        code: RejectCode,
        /// The server's explanation.
        reason: String,
    },
    /// Our own side's configuration cannot be put on the wire (bad name, too many services,
    /// out-of-range limits). Fix the config; the peer did nothing wrong.
    #[error("invalid handshake configuration: {field} {problem}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The driver called the state machine out of order: a bug in this program.
    #[error("handshake driven out of order (a bug in this program): {0}")]
    InvalidState(&'static str),
}

impl HandshakeError {
    /// Whether the peer caused this error (as opposed to our own config or driver), so logs and
    /// metrics can tell hostile or broken peers from local bugs.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, Self::InvalidState(_) | Self::InvalidConfig { .. })
    }
}

/// The server's verdict on one service the client offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceVerdict {
    /// The service name, as the client offered it.
    pub name: String,
    /// `None`: accepted. `Some(reason)`: refused, with a reason meant for the client's log.
    pub refusal: Option<String>,
}

impl ServiceVerdict {
    /// Whether the server will route visitors to this service.
    pub fn is_accepted(&self) -> bool {
        self.refusal.is_none()
    }
}

/// The server's terms for an accepted session: what the server passes to
/// [`ServerHandshake::accept`], and (as [`Accepted`]) what the client gets back.
///
/// On the client side `services` lists every offered service in offered order; the server may
/// list them in any order, and an offered service it leaves out is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// Identifies this session in both sides' logs and in admin output.
    pub session_id: u64,
    /// Server shards: the client opens this many sessions so each shard has its own.
    pub shard_count: u16,
    /// The server's receive limits, which the client must respect.
    pub params: PeerParams,
    /// How often to PING an otherwise idle session, in milliseconds.
    pub keepalive_interval_ms: u32,
    /// Silence after which a session counts as dead, in milliseconds.
    pub idle_timeout_ms: u32,
    /// One verdict per offered service.
    pub services: Vec<ServiceVerdict>,
}

/// What a client gets when the server accepts: the same fields the server sent.
pub type Accepted = Accept;

/// What a client claims in its `ClientAuth`, before the server has checked the MAC. The driver
/// looks up the token for `name` and passes both to [`ServerHandshake::verify`]; nothing in here
/// is trustworthy until that succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientClaim {
    /// Claimed client identity.
    pub name: String,
    /// Random per client process: lets the server retire sessions of a dead previous instance.
    pub instance_id: u64,
    /// Which of this instance's sessions this is (`0..shard_count`).
    pub session_index: u16,
    /// Services the client offers, unique, in the client's order.
    pub services: Vec<String>,
    /// The client's receive limits.
    pub params: PeerParams,
    /// Proof of the token over the server's nonce; checked by `verify`, useless to anyone else.
    mac: [u8; 32],
}

/// HMAC-SHA256 proving knowledge of `token` for this exact nonce, name and session slot:
/// `HMAC(token, "warren-auth-v1" || nonce || u8 len(name) || name || instance_id || session_index)`.
///
/// Binding name, instance and session index means a MAC cannot be reused for another identity
/// or slot; binding the nonce means it cannot be replayed to another handshake. Names are at most
/// 64 bytes; a longer name (never valid on the wire) has its length byte saturated.
pub fn compute_mac(
    token: &Token,
    nonce: &[u8; 32],
    name: &str,
    instance_id: u64,
    session_index: u16,
) -> [u8; 32] {
    mac_state(&token.0, nonce, name, instance_id, session_index)
        .finalize()
        .into_bytes()
        .into()
}

fn mac_state(
    key: &[u8],
    nonce: &[u8; 32],
    name: &str,
    instance_id: u64,
    session_index: u16,
) -> Hmac<Sha256> {
    // HMAC is defined for keys of any length (long keys are hashed first), so this cannot fail.
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC-SHA256 accepts keys of any length");
    mac.update(MAC_CONTEXT);
    mac.update(nonce);
    mac.update(&[u8::try_from(name.len()).unwrap_or(u8::MAX)]);
    mac.update(name.as_bytes());
    mac.update(&instance_id.to_be_bytes());
    mac.update(&session_index.to_be_bytes());
    mac
}

/// What a client needs to open one session.
#[derive(Debug, Clone)]
pub struct ClientHandshakeConfig {
    /// Client identity: 1..=64 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The secret shared with the server for `name`.
    pub token: Token,
    /// Random per client process (the driver draws it once at start-up).
    pub instance_id: u64,
    /// Which of this instance's sessions this is.
    pub session_index: u16,
    /// Services offered, unique names of 1..=64 characters of `[A-Za-z0-9_.-]`, at most 256,
    /// and together small enough that `ClientAuth` fits in [`MAX_HANDSHAKE_MESSAGE`].
    pub services: Vec<String>,
    /// The client's receive limits.
    pub params: PeerParams,
}

impl ClientHandshakeConfig {
    /// Checks everything the handshake would otherwise refuse, so a bad config fails when it is
    /// loaded rather than one round trip into every session. Errors name the field.
    pub fn validate(&self) -> Result<(), HandshakeError> {
        match self.problem() {
            None => Ok(()),
            Some((field, problem)) => Err(HandshakeError::InvalidConfig { field, problem }),
        }
    }

    fn problem(&self) -> Option<(&'static str, &'static str)> {
        if !is_valid_name(self.name.as_bytes()) {
            return Some(("name", NAME_RULE));
        }
        if self.services.len() > MAX_SERVICES {
            return Some(("services", "lists more than 256 services"));
        }
        for (i, service) in self.services.iter().enumerate() {
            if !is_valid_name(service.as_bytes()) {
                return Some((
                    "services",
                    "has a name that is not 1 to 64 characters of A-Z a-z 0-9 _ . -",
                ));
            }
            if self.services[..i].contains(service) {
                return Some(("services", "lists the same service twice"));
            }
        }
        if let Some(problem) = self.params.problem(&LOCAL_PARAMS) {
            return Some(problem);
        }
        if client_auth_len(&self.name, &self.services) > MAX_HANDSHAKE_MESSAGE {
            return Some((
                "services",
                "are too many or too long: ClientAuth would exceed 4096 bytes",
            ));
        }
        None
    }
}

/// Body length of a `ClientAuth` for this name and service list.
fn client_auth_len(name: &str, services: &[String]) -> usize {
    let fixed = 1 + name.len() + 8 + 2 + 32 + PARAMS_LEN + 2;
    fixed + services.iter().map(|s| 1 + s.len()).sum::<usize>()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    AwaitChallenge,
    AwaitVerdict,
    Done,
    Failed,
}

/// The client side of the handshake for one session.
///
/// Drive it with [`poll_transmit`](Self::poll_transmit) after creation and after every
/// [`handle_input`](Self::handle_input) until `handle_input` returns the server's [`Accepted`].
#[derive(Debug)]
pub struct ClientHandshake {
    config: ClientHandshakeConfig,
    /// Found by `new`, reported by the first `handle_input`: `new` cannot fail, and the hello
    /// goes out regardless, so the error surfaces one round trip in instead of never.
    config_problem: Option<(&'static str, &'static str)>,
    state: ClientState,
    outgoing: Vec<u8>,
    peer_capabilities: Capabilities,
}

impl ClientHandshake {
    /// Starts a handshake and queues the `ClientHello`.
    ///
    /// An invalid config (see [`ClientHandshakeConfig::validate`]) is reported as
    /// [`HandshakeError::InvalidConfig`] by the first `handle_input`.
    pub fn new(config: ClientHandshakeConfig) -> Self {
        let mut outgoing = Vec::new();
        encode_hello(&mut outgoing, PROTOCOL_VERSION, Capabilities::empty());
        Self {
            config_problem: config.problem(),
            config,
            state: ClientState::AwaitChallenge,
            outgoing,
            peer_capabilities: Capabilities::empty(),
        }
    }

    /// Appends the bytes to send to the server, if any, to `out`.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.outgoing);
    }

    /// Consumes complete handshake messages from the front of `input` and leaves later bytes
    /// there (they belong to the frame stream). `Ok(None)`: need more bytes. `Ok(Some(_))`: the
    /// server accepted; the handshake is over.
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
    ) -> Result<Option<Accepted>, HandshakeError> {
        let result = self.step(input);
        if let Err(error) = &result {
            if !matches!(error, HandshakeError::InvalidState(_)) {
                self.state = ClientState::Failed;
            }
        }
        result
    }

    /// Capabilities the server announced (empty until its challenge arrives).
    pub fn peer_capabilities(&self) -> Capabilities {
        self.peer_capabilities
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Option<Accepted>, HandshakeError> {
        if let Some((field, problem)) = self.config_problem {
            return Err(HandshakeError::InvalidConfig { field, problem });
        }
        loop {
            match self.state {
                ClientState::AwaitChallenge => {
                    // Anything but a challenge or a reject as the server's first message means
                    // we did not reach a warren server (an HTTP server, a wrong port).
                    let Some((kind, len)) = peek_message(input, |kind| match kind {
                        KIND_SERVER_CHALLENGE | KIND_REJECT => Ok(()),
                        _ => Err(HandshakeError::BadMagic),
                    })?
                    else {
                        return Ok(None);
                    };
                    let body = &input[HEADER_LEN..HEADER_LEN + len];
                    if kind == KIND_REJECT {
                        let (code, reason) = decode_reject(body)?;
                        input.advance(HEADER_LEN + len);
                        return Err(HandshakeError::Rejected { code, reason });
                    }
                    let (capabilities, nonce) = decode_challenge(body)?;
                    input.advance(HEADER_LEN + len);
                    self.peer_capabilities = capabilities;
                    let config = &self.config;
                    let mac = compute_mac(
                        &config.token,
                        &nonce,
                        &config.name,
                        config.instance_id,
                        config.session_index,
                    );
                    encode_client_auth(
                        &mut self.outgoing,
                        &config.name,
                        config.instance_id,
                        config.session_index,
                        &mac,
                        &config.params,
                        &config.services,
                    );
                    self.state = ClientState::AwaitVerdict;
                }
                ClientState::AwaitVerdict => {
                    let Some((kind, len)) = peek_message(input, |kind| match kind {
                        KIND_ACCEPT | KIND_REJECT => Ok(()),
                        got => Err(HandshakeError::UnexpectedMessage {
                            expected: "Accept or Reject",
                            got,
                        }),
                    })?
                    else {
                        return Ok(None);
                    };
                    let body = &input[HEADER_LEN..HEADER_LEN + len];
                    if kind == KIND_REJECT {
                        let (code, reason) = decode_reject(body)?;
                        input.advance(HEADER_LEN + len);
                        return Err(HandshakeError::Rejected { code, reason });
                    }
                    let accepted = decode_accept(body, &self.config.services)?;
                    input.advance(HEADER_LEN + len);
                    self.state = ClientState::Done;
                    return Ok(Some(accepted));
                }
                ClientState::Done => return Err(HandshakeError::InvalidState(
                    "the client handshake already finished; later bytes belong to the frame stream",
                )),
                ClientState::Failed => {
                    return Err(HandshakeError::InvalidState(
                        "the client handshake already ended in an error",
                    ))
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    AwaitHello,
    AwaitAuth,
    /// `handle_input` returned the claim; waiting for the driver's `verify`.
    AwaitVerify,
    /// MAC checked; waiting for the driver's `accept` or `reject`.
    Verified,
    /// Accept queued: done.
    Accepted,
    /// Reject queued: done, and no second verdict may follow.
    Rejected,
    /// Failed without a verdict on the wire; the driver may still `reject`.
    Failed,
}

/// The server side of the handshake for one session.
///
/// Drive it with [`handle_input`](Self::handle_input) until it returns a [`ClientClaim`], then
/// [`verify`](Self::verify) the claim against the token on record, then
/// [`accept`](Self::accept) or [`reject`](Self::reject); send whatever
/// [`poll_transmit`](Self::poll_transmit) yields after each call.
#[derive(Debug)]
pub struct ServerHandshake {
    /// Fresh from the OS RNG per session; makes every MAC single-use. Not secret.
    nonce: [u8; 32],
    state: ServerState,
    outgoing: Vec<u8>,
    /// The claim handed to the driver, kept so `verify` checks exactly what was received.
    claim: Option<ClientClaim>,
    peer_capabilities: Capabilities,
}

impl ServerHandshake {
    /// Starts a handshake that will challenge the client with `nonce`, which must come from a
    /// cryptographically secure RNG and never be reused.
    pub fn new(nonce: [u8; 32]) -> Self {
        Self {
            nonce,
            state: ServerState::AwaitHello,
            outgoing: Vec::new(),
            claim: None,
            peer_capabilities: Capabilities::empty(),
        }
    }

    /// Appends the bytes to send to the client, if any, to `out`.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.outgoing);
    }

    /// Capabilities the client announced (empty until its hello arrives).
    pub fn peer_capabilities(&self) -> Capabilities {
        self.peer_capabilities
    }

    /// Consumes complete handshake messages from the front of `input` and leaves later bytes
    /// there (a client may pipeline frames after `ClientAuth`). `Ok(None)`: need more bytes.
    /// `Ok(Some(claim))`: `ClientAuth` arrived; call [`verify`](Self::verify) next.
    ///
    /// On an unsupported version it queues a `Reject` explaining both versions before failing.
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
    ) -> Result<Option<ClientClaim>, HandshakeError> {
        let result = self.step(input);
        if let Err(error) = &result {
            if !matches!(error, HandshakeError::InvalidState(_))
                && self.state != ServerState::Rejected
            {
                self.state = ServerState::Failed;
            }
        }
        result
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Option<ClientClaim>, HandshakeError> {
        loop {
            match self.state {
                ServerState::AwaitHello => {
                    // The kind byte is the first thing a stranger sends; judge it at once.
                    let Some((_, len)) = peek_message(input, |kind| match kind {
                        KIND_CLIENT_HELLO => Ok(()),
                        _ => Err(HandshakeError::BadMagic),
                    })?
                    else {
                        return Ok(None);
                    };
                    let hello = decode_hello(&input[HEADER_LEN..HEADER_LEN + len]);
                    if let Err(HandshakeError::UnsupportedVersion { theirs, .. }) = hello {
                        let reason = format!(
                            "server speaks protocol version {PROTOCOL_VERSION}, client sent {theirs}"
                        );
                        encode_reject(&mut self.outgoing, RejectCode::UnsupportedVersion, &reason);
                        self.state = ServerState::Rejected;
                    }
                    let capabilities = hello?;
                    input.advance(HEADER_LEN + len);
                    self.peer_capabilities = capabilities;
                    encode_challenge(
                        &mut self.outgoing,
                        PROTOCOL_VERSION,
                        Capabilities::empty(),
                        &self.nonce,
                    );
                    self.state = ServerState::AwaitAuth;
                }
                ServerState::AwaitAuth => {
                    let Some((_, len)) = peek_message(input, |kind| match kind {
                        KIND_CLIENT_AUTH => Ok(()),
                        got => Err(HandshakeError::UnexpectedMessage {
                            expected: "ClientAuth",
                            got,
                        }),
                    })?
                    else {
                        return Ok(None);
                    };
                    let claim = decode_client_auth(&input[HEADER_LEN..HEADER_LEN + len])?;
                    input.advance(HEADER_LEN + len);
                    self.claim = Some(claim.clone());
                    self.state = ServerState::AwaitVerify;
                    return Ok(Some(claim));
                }
                ServerState::AwaitVerify | ServerState::Verified | ServerState::Accepted => {
                    return Err(HandshakeError::InvalidState(
                        "the server handshake already returned its ClientClaim; later bytes belong to the frame stream",
                    ))
                }
                ServerState::Rejected | ServerState::Failed => {
                    return Err(HandshakeError::InvalidState(
                        "the server handshake already ended in a rejection or an error",
                    ))
                }
            }
        }
    }

    /// Checks the claim's MAC against `token`, the token on record for `claim.name` (`None`
    /// if the name is unknown), in constant time.
    ///
    /// An unknown name fails exactly like a wrong token, after computing a MAC with a dummy key,
    /// so neither the reply nor its timing tells which client names exist. On failure it queues
    /// `Reject { AuthFailed, "authentication failed" }`.
    pub fn verify(
        &mut self,
        claim: &ClientClaim,
        token: Option<&Token>,
    ) -> Result<(), HandshakeError> {
        if self.state != ServerState::AwaitVerify {
            return Err(HandshakeError::InvalidState(
                "verify is valid once, right after handle_input returned a ClientClaim",
            ));
        }
        if self.claim.as_ref() != Some(claim) {
            return Err(HandshakeError::InvalidState(
                "verify was given a claim this handshake did not receive",
            ));
        }
        let key = token.map_or(&DUMMY_KEY[..], |token| &token.0[..]);
        let mac = mac_state(
            key,
            &self.nonce,
            &claim.name,
            claim.instance_id,
            claim.session_index,
        );
        // verify_slice compares in constant time; only then is the known/unknown bit looked at.
        let mac_matches = mac.verify_slice(&claim.mac).is_ok();
        if mac_matches & token.is_some() {
            self.state = ServerState::Verified;
            Ok(())
        } else {
            encode_reject(
                &mut self.outgoing,
                RejectCode::AuthFailed,
                AUTH_FAILED_REASON,
            );
            self.state = ServerState::Rejected;
            Err(HandshakeError::AuthFailed)
        }
    }

    /// Queues the `Accept`. Valid only after a successful [`verify`](Self::verify).
    ///
    /// `accept.services` gives verdicts by name; each must name a service the client offered, at
    /// most once. An offered service without a verdict is refused with a reason saying so.
    /// Refusal reasons are cut to 255 bytes, and shorter still if needed so the message fits in
    /// [`MAX_HANDSHAKE_MESSAGE`] (the longest reasons lose the most).
    pub fn accept(&mut self, accept: Accept) -> Result<(), HandshakeError> {
        let (ServerState::Verified, Some(claim)) = (self.state, &self.claim) else {
            return Err(HandshakeError::InvalidState(
                "accept is valid only after a successful verify",
            ));
        };
        if accept.shard_count == 0 {
            return Err(HandshakeError::InvalidConfig {
                field: "Accept.shard_count",
                problem: "must be at least 1",
            });
        }
        if let Some((field, problem)) = accept.params.problem(&ACCEPT_PARAMS) {
            return Err(HandshakeError::InvalidConfig { field, problem });
        }
        let mut reasons: Vec<Option<Option<&str>>> = vec![None; claim.services.len()];
        for verdict in &accept.services {
            let Some(index) = claim.services.iter().position(|s| *s == verdict.name) else {
                return Err(HandshakeError::InvalidConfig {
                    field: "Accept.services",
                    problem: "names a service the client did not offer",
                });
            };
            if reasons[index].is_some() {
                return Err(HandshakeError::InvalidConfig {
                    field: "Accept.services",
                    problem: "names the same service twice",
                });
            }
            reasons[index] = Some(verdict.refusal.as_deref());
        }
        // The client validated its list to at most MAX_SERVICES, so indexes fit in a u16.
        let refusals: Vec<(u16, &str)> = reasons
            .iter()
            .enumerate()
            .filter_map(|(index, verdict)| match verdict {
                Some(None) => None,
                Some(Some(reason)) => Some((index as u16, *reason)),
                None => Some((index as u16, NO_VERDICT_REASON)),
            })
            .collect();
        encode_accept(&mut self.outgoing, &accept, &refusals);
        self.state = ServerState::Accepted;
        Ok(())
    }

    /// Queues a `Reject` (not allowed, busy, shutting down...). It may come at any point, even
    /// before the hello, and ends the handshake. Does nothing if a verdict (Accept or Reject) is
    /// already queued, because the client only ever reads one.
    pub fn reject(&mut self, code: RejectCode, reason: &str) {
        if matches!(self.state, ServerState::Accepted | ServerState::Rejected) {
            return;
        }
        encode_reject(&mut self.outgoing, code, reason);
        self.state = ServerState::Rejected;
    }
}

// ---- wire ---------------------------------------------------------------------------------

/// Locates the next message at the front of `input`: `Ok(Some((kind, body_len)))` once it is
/// complete, `Ok(None)` while bytes are missing. The kind is checked as soon as one byte is
/// there and the length as soon as three are, so junk fails before we wait for its "body".
fn peek_message(
    input: &[u8],
    check_kind: impl FnOnce(u8) -> Result<(), HandshakeError>,
) -> Result<Option<(u8, usize)>, HandshakeError> {
    let Some(&kind) = input.first() else {
        return Ok(None);
    };
    check_kind(kind)?;
    let Some(&[_, hi, lo]) = input.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(HandshakeError::MessageTooLarge {
            len,
            max: MAX_HANDSHAKE_MESSAGE,
        });
    }
    if input.len() < HEADER_LEN + len {
        return Ok(None);
    }
    Ok(Some((kind, len)))
}

/// Bounds-checked cursor over one message body. Every read names its field for the error.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], HandshakeError> {
        let Some((head, tail)) = self.rest.split_first_chunk::<N>() else {
            return Err(cut_short(field));
        };
        self.rest = tail;
        Ok(*head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, HandshakeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, HandshakeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, HandshakeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, HandshakeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn bytes(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], HandshakeError> {
        if self.rest.len() < len {
            return Err(cut_short(field));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// A name: `u8 len` + ASCII from the name alphabet.
    fn name(&mut self, field: &'static str) -> Result<String, HandshakeError> {
        let len = self.u8(field)?;
        let bytes = self.bytes(usize::from(len), field)?;
        if !is_valid_name(bytes) {
            return Err(HandshakeError::Malformed {
                field,
                problem: NAME_RULE,
            });
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| HandshakeError::Malformed {
            field,
            problem: NAME_RULE,
        })
    }

    /// Free text (a reason): `u8 len` + UTF-8.
    fn text(&mut self, field: &'static str) -> Result<String, HandshakeError> {
        let len = self.u8(field)?;
        let bytes = self.bytes(usize::from(len), field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| HandshakeError::Malformed {
                field,
                problem: "is not valid UTF-8",
            })
    }

    /// Ends a message: leftover bytes mean the peer and we disagree about the format.
    fn finish(self, message: &'static str) -> Result<(), HandshakeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(HandshakeError::Malformed {
                field: message,
                problem: "has bytes after its last field",
            })
        }
    }
}

fn cut_short(field: &'static str) -> HandshakeError {
    HandshakeError::Malformed {
        field,
        problem: "is cut short: the message ends inside or before it",
    }
}

fn is_valid_name(name: &[u8]) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes the header with a placeholder length; [`end_message`] patches it.
fn begin_message(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[kind, 0, 0]);
    start
}

fn end_message(out: &mut [u8], start: usize) {
    let body_len = out.len() - start - HEADER_LEN;
    // Encoders keep bodies within the limit by construction (validated configs, capped texts).
    debug_assert!(
        body_len <= MAX_HANDSHAKE_MESSAGE,
        "handshake body of {body_len} bytes"
    );
    let len = u16::try_from(body_len).unwrap_or(u16::MAX);
    out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// `u8 len` + bytes, cut to `max` bytes (at most 255) on a character boundary.
fn put_text(out: &mut Vec<u8>, text: &str, max: usize) {
    let text = truncate_utf8(text, max.min(MAX_REASON_LEN));
    out.push(text.len() as u8);
    out.extend_from_slice(text.as_bytes());
}

fn encode_hello(out: &mut Vec<u8>, version: u16, capabilities: Capabilities) {
    let start = begin_message(out, KIND_CLIENT_HELLO);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&capabilities.bits().to_be_bytes());
    end_message(out, start);
}

/// Returns the client's capabilities. Magic and version are read first and judged before
/// anything else, so a client of any other version (whose hello may be longer) is told which
/// version we speak instead of getting a parse error.
fn decode_hello(body: &[u8]) -> Result<Capabilities, HandshakeError> {
    let mut r = Reader::new(body);
    let Ok(magic) = r.array::<4>("ClientHello.magic") else {
        return Err(HandshakeError::BadMagic);
    };
    if magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = r.u16("ClientHello.version")?;
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::UnsupportedVersion {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let capabilities = Capabilities::from_bits_truncate(r.u32("ClientHello.capabilities")?);
    r.finish("ClientHello")?;
    Ok(capabilities)
}

fn encode_challenge(out: &mut Vec<u8>, version: u16, capabilities: Capabilities, nonce: &[u8; 32]) {
    let start = begin_message(out, KIND_SERVER_CHALLENGE);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&capabilities.bits().to_be_bytes());
    out.extend_from_slice(nonce);
    end_message(out, start);
}

/// Returns the server's capabilities and nonce; magic and version are judged first, as in
/// [`decode_hello`].
fn decode_challenge(body: &[u8]) -> Result<(Capabilities, [u8; 32]), HandshakeError> {
    let mut r = Reader::new(body);
    let Ok(magic) = r.array::<4>("ServerChallenge.magic") else {
        return Err(HandshakeError::BadMagic);
    };
    if magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = r.u16("ServerChallenge.version")?;
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::UnsupportedVersion {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let capabilities = Capabilities::from_bits_truncate(r.u32("ServerChallenge.capabilities")?);
    let nonce = r.array::<32>("ServerChallenge.nonce")?;
    r.finish("ServerChallenge")?;
    Ok((capabilities, nonce))
}

fn encode_client_auth(
    out: &mut Vec<u8>,
    name: &str,
    instance_id: u64,
    session_index: u16,
    mac: &[u8; 32],
    params: &PeerParams,
    services: &[String],
) {
    let start = begin_message(out, KIND_CLIENT_AUTH);
    // Names are validated before they get here; the cap only keeps the length byte honest.
    put_text(out, name, usize::from(u8::MAX));
    out.extend_from_slice(&instance_id.to_be_bytes());
    out.extend_from_slice(&session_index.to_be_bytes());
    out.extend_from_slice(mac);
    params.write(out);
    out.extend_from_slice(
        &u16::try_from(services.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for service in services {
        put_text(out, service, usize::from(u8::MAX));
    }
    end_message(out, start);
}

fn decode_client_auth(body: &[u8]) -> Result<ClientClaim, HandshakeError> {
    let mut r = Reader::new(body);
    let name = r.name("ClientAuth.name")?;
    let instance_id = r.u64("ClientAuth.instance_id")?;
    let session_index = r.u16("ClientAuth.session_index")?;
    let mac = r.array::<32>("ClientAuth.mac")?;
    let params = PeerParams::read(&mut r, &CLIENT_AUTH_PARAMS)?;
    let count = usize::from(r.u16("ClientAuth.services")?);
    if count > MAX_SERVICES {
        return Err(HandshakeError::Malformed {
            field: "ClientAuth.services",
            problem: "lists more than 256 services",
        });
    }
    // Each entry takes at least 2 bytes: size by what is present, not by what is declared.
    let mut services: Vec<String> = Vec::with_capacity(count.min(r.remaining() / 2));
    for _ in 0..count {
        let service = r.name("ClientAuth.services")?;
        if services.contains(&service) {
            return Err(HandshakeError::Malformed {
                field: "ClientAuth.services",
                problem: "lists the same service twice",
            });
        }
        services.push(service);
    }
    r.finish("ClientAuth")?;
    Ok(ClientClaim {
        name,
        instance_id,
        session_index,
        services,
        params,
        mac,
    })
}

/// Accept body bytes besides the refusals: session_id, shard_count, params, the two timers and
/// the refusal count.
const ACCEPT_FIXED_LEN: usize = 8 + 2 + PARAMS_LEN + 4 + 4 + 2;

/// Refusals travel as `(u16 index into the client's list, reason)`: accepted services cost no
/// bytes and names are not echoed, so the verdicts on any list the client could send fit.
fn encode_accept(out: &mut Vec<u8>, accept: &Accept, refusals: &[(u16, &str)]) {
    let cap = reason_cap(refusals);
    let start = begin_message(out, KIND_ACCEPT);
    out.extend_from_slice(&accept.session_id.to_be_bytes());
    out.extend_from_slice(&accept.shard_count.to_be_bytes());
    accept.params.write(out);
    out.extend_from_slice(&accept.keepalive_interval_ms.to_be_bytes());
    out.extend_from_slice(&accept.idle_timeout_ms.to_be_bytes());
    out.extend_from_slice(
        &u16::try_from(refusals.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for &(index, reason) in refusals {
        out.extend_from_slice(&index.to_be_bytes());
        put_text(out, reason, cap);
    }
    end_message(out, start);
}

/// The largest per-reason length (at most 255) at which all refusals fit in one message, so
/// short reasons stay whole and only the longest are cut.
fn reason_cap(refusals: &[(u16, &str)]) -> usize {
    let budget = MAX_HANDSHAKE_MESSAGE.saturating_sub(ACCEPT_FIXED_LEN + 3 * refusals.len());
    let total = |cap: usize| -> usize {
        refusals
            .iter()
            .map(|(_, reason)| reason.len().min(cap))
            .sum()
    };
    let mut cap = MAX_REASON_LEN;
    while cap > 0 && total(cap) > budget {
        cap -= 1;
    }
    cap
}

fn decode_accept(body: &[u8], offered: &[String]) -> Result<Accepted, HandshakeError> {
    let mut r = Reader::new(body);
    let session_id = r.u64("Accept.session_id")?;
    let shard_count = r.u16("Accept.shard_count")?;
    if shard_count == 0 {
        return Err(HandshakeError::Malformed {
            field: "Accept.shard_count",
            problem: "must be at least 1",
        });
    }
    let params = PeerParams::read(&mut r, &ACCEPT_PARAMS)?;
    let keepalive_interval_ms = r.u32("Accept.keepalive_interval_ms")?;
    let idle_timeout_ms = r.u32("Accept.idle_timeout_ms")?;
    let count = usize::from(r.u16("Accept.refusals")?);
    if count > offered.len() {
        return Err(HandshakeError::Malformed {
            field: "Accept.refusals",
            problem: "lists more refusals than the client offered services",
        });
    }
    // Sized by our own (validated) list, not by anything the server declared.
    let mut services: Vec<ServiceVerdict> = offered
        .iter()
        .map(|name| ServiceVerdict {
            name: name.clone(),
            refusal: None,
        })
        .collect();
    let mut next_allowed = 0;
    for _ in 0..count {
        let index = usize::from(r.u16("Accept.refusals.index")?);
        if index < next_allowed {
            return Err(HandshakeError::Malformed {
                field: "Accept.refusals.index",
                problem: "is out of order or repeated",
            });
        }
        let Some(verdict) = services.get_mut(index) else {
            return Err(HandshakeError::Malformed {
                field: "Accept.refusals.index",
                problem: "points past the services the client offered",
            });
        };
        verdict.refusal = Some(r.text("Accept.refusals.reason")?);
        next_allowed = index + 1;
    }
    r.finish("Accept")?;
    Ok(Accept {
        session_id,
        shard_count,
        params,
        keepalive_interval_ms,
        idle_timeout_ms,
        services,
    })
}

/// `Reject` keeps this layout in every protocol version, so a client of any version can read
/// why it was turned away.
fn encode_reject(out: &mut Vec<u8>, code: RejectCode, reason: &str) {
    let start = begin_message(out, KIND_REJECT);
    out.extend_from_slice(&u16::from(code).to_be_bytes());
    put_text(out, reason, MAX_REASON_LEN);
    end_message(out, start);
}

fn decode_reject(body: &[u8]) -> Result<(RejectCode, String), HandshakeError> {
    let mut r = Reader::new(body);
    let code = RejectCode::from(r.u16("Reject.code")?);
    let reason = r.text("Reject.reason")?;
    r.finish("Reject")?;
    Ok((code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NONCE: [u8; 32] = [7; 32];

    fn params() -> PeerParams {
        PeerParams {
            max_frame_payload: 16 * 1024,
            initial_stream_window: 256 * 1024,
            session_window: 1024 * 1024,
            max_streams: 1024,
        }
    }

    fn token() -> Token {
        Token::new(b"correct horse battery staple".to_vec())
    }

    fn config() -> ClientHandshakeConfig {
        ClientHandshakeConfig {
            name: "edge-1".into(),
            token: token(),
            instance_id: 0xdead_beef_0bad_f00d,
            session_index: 3,
            services: vec!["web".into(), "ssh".into(), "db".into()],
            params: params(),
        }
    }

    fn accept_all(claim: &ClientClaim) -> Accept {
        terms(&claim.services)
    }

    /// Terms accepting every service in `services`.
    fn terms(services: &[String]) -> Accept {
        Accept {
            session_id: 42,
            shard_count: 8,
            params: PeerParams {
                max_frame_payload: 64 * 1024,
                ..params()
            },
            keepalive_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
            services: services
                .iter()
                .map(|name| ServiceVerdict {
                    name: name.clone(),
                    refusal: None,
                })
                .collect(),
        }
    }

    fn transmit_client(client: &mut ClientHandshake) -> Vec<u8> {
        let mut out = Vec::new();
        client.poll_transmit(&mut out);
        out
    }

    fn transmit_server(server: &mut ServerHandshake) -> Vec<u8> {
        let mut out = Vec::new();
        server.poll_transmit(&mut out);
        out
    }

    /// Feeds `bytes` to the server `step` bytes at a time until a claim or an error.
    fn feed_server(
        server: &mut ServerHandshake,
        input: &mut BytesMut,
        bytes: &[u8],
        step: usize,
    ) -> Result<Option<ClientClaim>, HandshakeError> {
        for chunk in bytes.chunks(step.max(1)) {
            input.extend_from_slice(chunk);
            if let Some(claim) = server.handle_input(input)? {
                return Ok(Some(claim));
            }
        }
        Ok(None)
    }

    fn feed_client(
        client: &mut ClientHandshake,
        input: &mut BytesMut,
        bytes: &[u8],
        step: usize,
    ) -> Result<Option<Accepted>, HandshakeError> {
        for chunk in bytes.chunks(step.max(1)) {
            input.extend_from_slice(chunk);
            if let Some(accepted) = client.handle_input(input)? {
                return Ok(Some(accepted));
            }
        }
        Ok(None)
    }

    /// Runs a whole handshake, `step` bytes at a time in each direction.
    fn run(step: usize) -> (Accepted, ClientClaim) {
        let mut client = ClientHandshake::new(config());
        let mut server = ServerHandshake::new(NONCE);
        let (mut client_in, mut server_in) = (BytesMut::new(), BytesMut::new());

        let hello = transmit_client(&mut client);
        assert_eq!(
            feed_server(&mut server, &mut server_in, &hello, step).unwrap(),
            None
        );
        let challenge = transmit_server(&mut server);
        assert_eq!(
            feed_client(&mut client, &mut client_in, &challenge, step).unwrap(),
            None
        );
        let auth = transmit_client(&mut client);
        let claim = feed_server(&mut server, &mut server_in, &auth, step)
            .unwrap()
            .expect("claim after ClientAuth");
        server.verify(&claim, Some(&token())).unwrap();
        server.accept(accept_all(&claim)).unwrap();
        let accept = transmit_server(&mut server);
        let accepted = feed_client(&mut client, &mut client_in, &accept, step)
            .unwrap()
            .expect("accepted after Accept");
        assert!(client_in.is_empty() && server_in.is_empty());
        (accepted, claim)
    }

    #[test]
    fn happy_path_delivers_claim_and_terms() {
        let (accepted, claim) = run(usize::MAX);
        assert_eq!(claim.name, "edge-1");
        assert_eq!(claim.instance_id, 0xdead_beef_0bad_f00d);
        assert_eq!(claim.session_index, 3);
        assert_eq!(claim.services, ["web", "ssh", "db"]);
        assert_eq!(claim.params, params());
        assert_eq!(accepted, accept_all(&claim));
    }

    #[test]
    fn every_message_survives_arriving_one_byte_at_a_time() {
        assert_eq!(run(1), run(usize::MAX));
    }

    #[test]
    fn bytes_after_the_last_handshake_message_stay_in_the_buffer() {
        let mut client = ClientHandshake::new(config());
        let mut server = ServerHandshake::new(NONCE);
        let mut server_in = BytesMut::from(&transmit_client(&mut client)[..]);
        assert!(server.handle_input(&mut server_in).unwrap().is_none());
        let mut client_in = BytesMut::from(&transmit_server(&mut server)[..]);
        assert!(client.handle_input(&mut client_in).unwrap().is_none());

        // The client pipelines frame bytes right behind ClientAuth.
        let mut auth = transmit_client(&mut client);
        auth.extend_from_slice(b"FRAMES-FROM-CLIENT");
        server_in.extend_from_slice(&auth);
        let claim = server.handle_input(&mut server_in).unwrap().unwrap();
        assert_eq!(&server_in[..], b"FRAMES-FROM-CLIENT");

        server.verify(&claim, Some(&token())).unwrap();
        server.accept(accept_all(&claim)).unwrap();
        client_in.extend_from_slice(&transmit_server(&mut server));
        client_in.extend_from_slice(b"FRAMES-FROM-SERVER");
        assert!(client.handle_input(&mut client_in).unwrap().is_some());
        assert_eq!(&client_in[..], b"FRAMES-FROM-SERVER");

        // The handshakes are over: being fed again is a driver bug, and touches nothing.
        let err = client.handle_input(&mut client_in).unwrap_err();
        assert!(matches!(err, HandshakeError::InvalidState(_)) && !err.is_peer_fault());
        assert!(matches!(
            server.handle_input(&mut server_in),
            Err(HandshakeError::InvalidState(_))
        ));
        assert_eq!(&server_in[..], b"FRAMES-FROM-CLIENT");
    }

    /// Runs up to the server's verdict on the MAC, returning the error and the client's view.
    fn auth_with(token: Option<&Token>) -> (HandshakeError, Vec<u8>, HandshakeError) {
        let mut client = ClientHandshake::new(config());
        let mut server = ServerHandshake::new(NONCE);
        let mut server_in = BytesMut::from(&transmit_client(&mut client)[..]);
        server.handle_input(&mut server_in).unwrap();
        let mut client_in = BytesMut::from(&transmit_server(&mut server)[..]);
        client.handle_input(&mut client_in).unwrap();
        server_in.extend_from_slice(&transmit_client(&mut client));
        let claim = server.handle_input(&mut server_in).unwrap().unwrap();
        let server_err = server.verify(&claim, token).unwrap_err();
        // No way to accept after a failed verify.
        assert!(matches!(
            server.accept(accept_all(&claim)),
            Err(HandshakeError::InvalidState(_))
        ));
        let reply = transmit_server(&mut server);
        client_in.extend_from_slice(&reply);
        let client_err = client.handle_input(&mut client_in).unwrap_err();
        (server_err, reply, client_err)
    }

    #[test]
    fn wrong_token_fails_auth_and_client_sees_reject() {
        let (server_err, _, client_err) = auth_with(Some(&Token::new("wrong")));
        assert!(matches!(server_err, HandshakeError::AuthFailed));
        match client_err {
            HandshakeError::Rejected { code, reason } => {
                assert_eq!(code, RejectCode::AuthFailed);
                assert_eq!(reason, "authentication failed");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    #[test]
    fn unknown_client_fails_exactly_like_a_wrong_token() {
        let (wrong_err, wrong_reply, wrong_client) = auth_with(Some(&Token::new("wrong")));
        let (unknown_err, unknown_reply, unknown_client) = auth_with(None);
        assert_eq!(format!("{wrong_err:?}"), format!("{unknown_err:?}"));
        assert_eq!(wrong_reply, unknown_reply);
        assert_eq!(format!("{wrong_client}"), format!("{unknown_client}"));
    }

    #[test]
    fn unknown_client_fails_even_with_a_mac_made_from_the_dummy_key() {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::new();
        input.extend_from_slice(&valid_hello());
        let dummy = Token::new(DUMMY_KEY.to_vec());
        let mac = compute_mac(&dummy, &NONCE, "ghost", 1, 0);
        let mut auth = Vec::new();
        encode_client_auth(&mut auth, "ghost", 1, 0, &mac, &params(), &[]);
        input.extend_from_slice(&auth);
        let claim = server.handle_input(&mut input).unwrap().unwrap();
        assert!(matches!(
            server.verify(&claim, None),
            Err(HandshakeError::AuthFailed)
        ));
    }

    /// One encoded message, for hand-built inputs.
    fn message(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out);
        out
    }

    #[test]
    fn a_mac_is_bound_to_the_nonce() {
        let mut client = ClientHandshake::new(config());
        let mut first = ServerHandshake::new(NONCE);
        let mut input = BytesMut::from(&transmit_client(&mut client)[..]);
        first.handle_input(&mut input).unwrap();
        let mut client_in = BytesMut::from(&transmit_server(&mut first)[..]);
        client.handle_input(&mut client_in).unwrap();
        let auth = transmit_client(&mut client);

        // Replay the recorded hello + auth to a server with a fresh nonce.
        let mut replayed = ServerHandshake::new([8; 32]);
        let mut input = BytesMut::new();
        input.extend_from_slice(&valid_hello());
        input.extend_from_slice(&auth);
        let claim = replayed.handle_input(&mut input).unwrap().unwrap();
        assert!(matches!(
            replayed.verify(&claim, Some(&token())),
            Err(HandshakeError::AuthFailed)
        ));
    }

    #[test]
    fn mac_covers_every_bound_field() {
        let base = compute_mac(&token(), &NONCE, "edge-1", 1, 0);
        assert_eq!(base, compute_mac(&token(), &NONCE, "edge-1", 1, 0));
        assert_ne!(base, compute_mac(&Token::new("x"), &NONCE, "edge-1", 1, 0));
        assert_ne!(base, compute_mac(&token(), &[0; 32], "edge-1", 1, 0));
        assert_ne!(base, compute_mac(&token(), &NONCE, "edge-2", 1, 0));
        assert_ne!(base, compute_mac(&token(), &NONCE, "edge-1", 2, 0));
        assert_ne!(base, compute_mac(&token(), &NONCE, "edge-1", 1, 1));
    }

    #[test]
    fn unsupported_version_is_rejected_naming_both_versions() {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::new();
        // A future client's hello may be longer; the server must still read its version.
        input.extend_from_slice(&message(|out| {
            let start = begin_message(out, KIND_CLIENT_HELLO);
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&7u16.to_be_bytes());
            out.extend_from_slice(&[0xff; 20]);
            end_message(out, start);
        }));
        let err = server.handle_input(&mut input).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::UnsupportedVersion { ours: 1, theirs: 7 }
        ));
        assert!(err.to_string().contains('7') && err.to_string().contains('1'));

        // The client (here: a v1 client fed the reply) learns both versions.
        let mut client = ClientHandshake::new(config());
        let mut client_in = BytesMut::from(&transmit_server(&mut server)[..]);
        match client.handle_input(&mut client_in).unwrap_err() {
            HandshakeError::Rejected { code, reason } => {
                assert_eq!(code, RejectCode::UnsupportedVersion);
                assert_eq!(reason, "server speaks protocol version 1, client sent 7");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        // A verdict is out; the driver cannot send a second one.
        server.reject(RejectCode::ServerBusy, "busy");
        assert!(transmit_server(&mut server).is_empty());
    }

    #[test]
    fn client_refuses_a_challenge_of_another_version_or_magic() {
        let mut client = ClientHandshake::new(config());
        let mut input = BytesMut::new();
        input.extend_from_slice(&message(|out| {
            encode_challenge(out, 2, Capabilities::empty(), &NONCE)
        }));
        assert!(matches!(
            client.handle_input(&mut input),
            Err(HandshakeError::UnsupportedVersion { ours: 1, theirs: 2 })
        ));
        // Only the hello went out: no ClientAuth for a server we cannot talk to.
        assert_eq!(transmit_client(&mut client), valid_hello());

        let mut client = ClientHandshake::new(config());
        let mut input = BytesMut::from(&b"HTTP/1.1 400 Bad Request\r\n\r\n"[..]);
        assert!(matches!(
            client.handle_input(&mut input),
            Err(HandshakeError::BadMagic)
        ));

        let mut client = ClientHandshake::new(config());
        let mut input = BytesMut::from(&[KIND_SERVER_CHALLENGE, 0, 4, b'N', b'O', b'P', b'E'][..]);
        assert!(matches!(
            client.handle_input(&mut input),
            Err(HandshakeError::BadMagic)
        ));
    }

    #[test]
    fn garbage_and_bad_magic_are_not_a_warren_peer() {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"[..]);
        let err = server.handle_input(&mut input).unwrap_err();
        assert!(matches!(err, HandshakeError::BadMagic) && err.is_peer_fault());
        // No reply to a stranger.
        assert!(transmit_server(&mut server).is_empty());

        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::from(
            &[
                KIND_CLIENT_HELLO,
                0,
                10,
                b'W',
                b'R',
                b'R',
                b'X',
                0,
                1,
                0,
                0,
                0,
                0,
            ][..],
        );
        assert!(matches!(
            server.handle_input(&mut input),
            Err(HandshakeError::BadMagic)
        ));

        // Judged on the first byte, without waiting for more.
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::from(&[0x16][..]);
        assert!(matches!(
            server.handle_input(&mut input),
            Err(HandshakeError::BadMagic)
        ));
    }

    #[test]
    fn oversized_declared_length_fails_before_the_body_arrives() {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::with_capacity(16);
        input.extend_from_slice(&[KIND_CLIENT_HELLO, 0x11, 0x70]);
        let capacity = input.capacity();
        let err = server.handle_input(&mut input).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::MessageTooLarge {
                len: 0x1170,
                max: 4096
            }
        ));
        assert_eq!(
            err.to_string(),
            "peer sent a handshake message of 4464 bytes; the limit is 4096"
        );
        assert_eq!(input.capacity(), capacity);

        let mut client = ClientHandshake::new(config());
        let mut input = BytesMut::from(&[KIND_SERVER_CHALLENGE, 0xff, 0xff][..]);
        assert!(matches!(
            client.handle_input(&mut input),
            Err(HandshakeError::MessageTooLarge { len: 65535, .. })
        ));

        // Exactly the limit is fine (and just waits for the body).
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::from(&[KIND_CLIENT_HELLO, 0x10, 0x00][..]);
        assert!(server.handle_input(&mut input).unwrap().is_none());
    }

    /// Feeds a hello and then `auth` to a fresh server.
    fn server_after_auth(auth: &[u8]) -> Result<Option<ClientClaim>, HandshakeError> {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::new();
        input.extend_from_slice(&valid_hello());
        input.extend_from_slice(auth);
        server.handle_input(&mut input)
    }

    fn malformed_field(result: Result<impl fmt::Debug, HandshakeError>) -> &'static str {
        match result {
            Err(HandshakeError::Malformed { field, .. }) => field,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn auth_bytes(name: &str, services: &[String], params: &PeerParams) -> Vec<u8> {
        let mut out = Vec::new();
        encode_client_auth(&mut out, name, 1, 0, &[0; 32], params, services);
        out
    }

    #[test]
    fn invalid_names_are_malformed_naming_the_field() {
        for name in ["", "has space", "ümlaut", "slash/", &"x".repeat(65)] {
            let result = server_after_auth(&auth_bytes(name, &[], &params()));
            assert_eq!(malformed_field(result), "ClientAuth.name", "name {name:?}");
        }
        for service in ["", "a:b", &"s".repeat(65)] {
            let result = server_after_auth(&auth_bytes("ok", &[service.to_owned()], &params()));
            assert_eq!(
                malformed_field(result),
                "ClientAuth.services",
                "service {service:?}"
            );
        }
        let dup = ["a".to_owned(), "a".to_owned()];
        assert_eq!(
            malformed_field(server_after_auth(&auth_bytes("ok", &dup, &params()))),
            "ClientAuth.services"
        );
        // The longest valid names pass.
        let long = "n".repeat(64);
        assert!(
            server_after_auth(&auth_bytes(&long, std::slice::from_ref(&long), &params()))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn too_many_services_are_malformed_without_trusting_the_count() {
        let services: Vec<String> = (0..257).map(|i| format!("s{i}")).collect();
        let result = server_after_auth(&auth_bytes("ok", &services, &params()));
        assert_eq!(malformed_field(result), "ClientAuth.services");

        // A count far above what the body holds fails as cut short, not as a huge allocation.
        let mut auth = auth_bytes("ok", &[], &params());
        let len = auth.len();
        auth[len - 2..].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(
            malformed_field(server_after_auth(&auth)),
            "ClientAuth.services"
        );
    }

    fn out_of_range_params() -> Vec<(PeerParams, &'static str)> {
        let p = params();
        vec![
            (
                PeerParams {
                    max_frame_payload: 1023,
                    ..p
                },
                "max_frame_payload",
            ),
            (
                PeerParams {
                    max_frame_payload: 16 * 1024 * 1024 + 1,
                    ..p
                },
                "max_frame_payload",
            ),
            (
                PeerParams {
                    initial_stream_window: 1023,
                    session_window: 1023,
                    ..p
                },
                "initial_stream_window",
            ),
            (
                PeerParams {
                    session_window: p.initial_stream_window - 1,
                    ..p
                },
                "session_window",
            ),
            (
                PeerParams {
                    max_streams: 0,
                    ..p
                },
                "max_streams",
            ),
        ]
    }

    #[test]
    fn params_out_of_range_are_malformed_naming_the_field() {
        for (bad, field) in out_of_range_params() {
            let result = server_after_auth(&auth_bytes("ok", &[], &bad));
            assert_eq!(
                malformed_field(result),
                format!("ClientAuth.params.{field}")
            );

            let mut client = ClientHandshake::new(config());
            let mut input = BytesMut::new();
            input.extend_from_slice(&message(|out| {
                encode_challenge(out, 1, Capabilities::empty(), &NONCE)
            }));
            let accept = Accept {
                params: bad,
                ..terms(&config().services)
            };
            input.extend_from_slice(&message(|out| encode_accept(out, &accept, &[])));
            let result = client.handle_input(&mut input);
            assert_eq!(malformed_field(result), format!("Accept.params.{field}"));

            assert!(matches!(
                bad.validate(),
                Err(HandshakeError::InvalidConfig { field: f, .. }) if f == format!("params.{field}")
            ));
        }
        // The boundaries themselves are fine.
        let edge = PeerParams {
            max_frame_payload: 16 * 1024 * 1024,
            initial_stream_window: 1024,
            session_window: 1024,
            max_streams: 1,
        };
        edge.validate().unwrap();
        PeerParams {
            max_frame_payload: 1024,
            ..edge
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn trailing_and_missing_bytes_are_malformed() {
        let mut auth = auth_bytes("ok", &[], &params());
        auth.push(0);
        let len = (auth.len() - HEADER_LEN) as u16;
        auth[1..3].copy_from_slice(&len.to_be_bytes());
        assert_eq!(malformed_field(server_after_auth(&auth)), "ClientAuth");

        let mut auth = auth_bytes("ok", &[], &params());
        auth.truncate(20);
        auth[1..3].copy_from_slice(&17u16.to_be_bytes());
        assert_eq!(malformed_field(server_after_auth(&auth)), "ClientAuth.mac");
    }

    #[test]
    fn out_of_order_messages_are_unexpected() {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::new();
        input.extend_from_slice(&valid_hello());
        input.extend_from_slice(&valid_hello());
        let err = server.handle_input(&mut input).unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::UnexpectedMessage {
                expected: "ClientAuth",
                got: KIND_CLIENT_HELLO
            }
        ));
        assert_eq!(
            err.to_string(),
            "peer sent ClientHello (kind 1) where ClientAuth was expected"
        );

        let mut client = ClientHandshake::new(config());
        let mut input = BytesMut::new();
        input.extend_from_slice(&message(|out| {
            encode_challenge(out, 1, Capabilities::empty(), &NONCE)
        }));
        input.extend_from_slice(&message(|out| {
            encode_challenge(out, 1, Capabilities::empty(), &NONCE)
        }));
        assert!(matches!(
            client.handle_input(&mut input),
            Err(HandshakeError::UnexpectedMessage {
                got: KIND_SERVER_CHALLENGE,
                ..
            })
        ));
    }

    #[test]
    fn refusals_reach_the_client_in_offered_order() {
        let mut client = ClientHandshake::new(config());
        let mut server = ServerHandshake::new(NONCE);
        let mut server_in = BytesMut::from(&transmit_client(&mut client)[..]);
        server.handle_input(&mut server_in).unwrap();
        let mut client_in = BytesMut::from(&transmit_server(&mut server)[..]);
        client.handle_input(&mut client_in).unwrap();
        server_in.extend_from_slice(&transmit_client(&mut client));
        let claim = server.handle_input(&mut server_in).unwrap().unwrap();
        server.verify(&claim, Some(&token())).unwrap();

        let long_reason = "é".repeat(200); // 400 bytes, 2 per char
        let accept = Accept {
            services: vec![
                ServiceVerdict {
                    name: "db".into(),
                    refusal: Some(long_reason.clone()),
                },
                ServiceVerdict {
                    name: "web".into(),
                    refusal: None,
                },
                // "ssh" is left out.
            ],
            ..accept_all(&claim)
        };
        server.accept(accept.clone()).unwrap();
        client_in.extend_from_slice(&transmit_server(&mut server));
        let accepted = client.handle_input(&mut client_in).unwrap().unwrap();
        let verdicts = &accepted.services;
        assert_eq!(verdicts.len(), 3);
        assert_eq!(
            verdicts[0],
            ServiceVerdict {
                name: "web".into(),
                refusal: None
            }
        );
        assert!(verdicts[0].is_accepted());
        assert_eq!(verdicts[1].name, "ssh");
        assert_eq!(verdicts[1].refusal.as_deref(), Some(NO_VERDICT_REASON));
        assert_eq!(verdicts[2].name, "db");
        let cut = verdicts[2].refusal.as_deref().unwrap();
        assert_eq!(cut.len(), 254, "255 bytes would split a character");
        assert!(long_reason.starts_with(cut));
        assert_eq!(accepted.session_id, accept.session_id);
    }

    #[test]
    fn many_long_refusals_still_fit_in_one_message() {
        let services: Vec<String> = (0..256).map(|i| format!("svc{i:03}")).collect();
        let cfg = ClientHandshakeConfig {
            services: services.clone(),
            ..config()
        };
        cfg.validate().unwrap();
        let mut client = ClientHandshake::new(cfg);
        let mut server = ServerHandshake::new(NONCE);
        let mut server_in = BytesMut::from(&transmit_client(&mut client)[..]);
        server.handle_input(&mut server_in).unwrap();
        let mut client_in = BytesMut::from(&transmit_server(&mut server)[..]);
        client.handle_input(&mut client_in).unwrap();
        server_in.extend_from_slice(&transmit_client(&mut client));
        let claim = server.handle_input(&mut server_in).unwrap().unwrap();
        server.verify(&claim, Some(&token())).unwrap();
        let mut accept = accept_all(&claim);
        for (i, verdict) in accept.services.iter_mut().enumerate() {
            let len = if i == 0 { 5 } else { 300 };
            verdict.refusal = Some("r".repeat(len));
        }
        server.accept(accept).unwrap();
        let bytes = transmit_server(&mut server);
        assert!(bytes.len() <= HEADER_LEN + MAX_HANDSHAKE_MESSAGE);
        client_in.extend_from_slice(&bytes);
        let accepted = client.handle_input(&mut client_in).unwrap().unwrap();
        assert_eq!(accepted.services[0].refusal.as_deref(), Some("rrrrr"));
        // 3292 bytes of text budget: 5 for the short reason, 12 for each of the 255 others.
        assert!(accepted.services[1..]
            .iter()
            .all(|v| v.refusal.as_deref() == Some("r".repeat(12).as_str())));
    }

    #[test]
    fn accept_rejects_bad_driver_input() {
        let mut client = ClientHandshake::new(config());
        let mut server = ServerHandshake::new(NONCE);
        let mut server_in = BytesMut::from(&transmit_client(&mut client)[..]);
        server.handle_input(&mut server_in).unwrap();
        let mut client_in = BytesMut::from(&transmit_server(&mut server)[..]);
        client.handle_input(&mut client_in).unwrap();
        server_in.extend_from_slice(&transmit_client(&mut client));
        let claim = server.handle_input(&mut server_in).unwrap().unwrap();

        assert!(matches!(
            server.accept(accept_all(&claim)),
            Err(HandshakeError::InvalidState(_))
        ));
        let mut forged = claim.clone();
        forged.name = "someone-else".into();
        assert!(matches!(
            server.verify(&forged, Some(&token())),
            Err(HandshakeError::InvalidState(_))
        ));
        server.verify(&claim, Some(&token())).unwrap();
        assert!(matches!(
            server.verify(&claim, Some(&token())),
            Err(HandshakeError::InvalidState(_))
        ));

        let stranger = Accept {
            services: vec![ServiceVerdict {
                name: "ftp".into(),
                refusal: None,
            }],
            ..accept_all(&claim)
        };
        assert!(matches!(
            server.accept(stranger),
            Err(HandshakeError::InvalidConfig {
                field: "Accept.services",
                ..
            })
        ));
        let no_shards = Accept {
            shard_count: 0,
            ..accept_all(&claim)
        };
        assert!(matches!(
            server.accept(no_shards),
            Err(HandshakeError::InvalidConfig {
                field: "Accept.shard_count",
                ..
            })
        ));
        assert!(transmit_server(&mut server).is_empty());
        server.accept(accept_all(&claim)).unwrap();
        assert!(!transmit_server(&mut server).is_empty());
        // After the Accept, a Reject would contradict it.
        server.reject(RejectCode::ShuttingDown, "bye");
        assert!(transmit_server(&mut server).is_empty());
    }

    #[test]
    fn server_may_reject_before_the_hello() {
        let mut server = ServerHandshake::new(NONCE);
        server.reject(RejectCode::ShuttingDown, &"x".repeat(300));
        let mut client = ClientHandshake::new(config());
        let mut input = BytesMut::from(&transmit_server(&mut server)[..]);
        match client.handle_input(&mut input).unwrap_err() {
            HandshakeError::Rejected { code, reason } => {
                assert_eq!(code, RejectCode::ShuttingDown);
                assert_eq!(reason.len(), MAX_REASON_LEN);
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(input.is_empty());
    }

    #[test]
    fn reject_codes_round_trip_and_unknown_codes_survive() {
        for code in 0..=u16::MAX {
            assert_eq!(u16::from(RejectCode::from(code)), code);
        }
        assert_eq!(RejectCode::from(2), RejectCode::AuthFailed);
        assert_eq!(RejectCode::from(99), RejectCode::Other(99));
        let (code, reason) = {
            let mut out = Vec::new();
            encode_reject(&mut out, RejectCode::Other(99), "why");
            decode_reject(&out[HEADER_LEN..]).unwrap()
        };
        assert_eq!((code, reason.as_str()), (RejectCode::Other(99), "why"));
    }

    #[test]
    fn invalid_client_config_is_reported_and_not_the_peers_fault() {
        let bad_name = ClientHandshakeConfig {
            name: "no spaces".into(),
            ..config()
        };
        let err = bad_name.validate().unwrap_err();
        assert!(matches!(
            err,
            HandshakeError::InvalidConfig { field: "name", .. }
        ));
        assert!(!err.is_peer_fault());

        let too_big = ClientHandshakeConfig {
            services: (0..100).map(|i| format!("{i:0>60}")).collect(),
            ..config()
        };
        assert!(matches!(
            too_big.validate(),
            Err(HandshakeError::InvalidConfig {
                field: "services",
                ..
            })
        ));
        let too_many = ClientHandshakeConfig {
            services: (0..257).map(|i| i.to_string()).collect(),
            ..config()
        };
        assert!(too_many.validate().is_err());

        // The hello still goes out; the error surfaces at the first input.
        let mut client = ClientHandshake::new(bad_name);
        assert!(!transmit_client(&mut client).is_empty());
        let mut input = BytesMut::new();
        assert!(matches!(
            client.handle_input(&mut input),
            Err(HandshakeError::InvalidConfig { field: "name", .. })
        ));
    }

    #[test]
    fn capabilities_drop_unknown_bits() {
        let caps = Capabilities::from_bits_truncate(u32::MAX);
        assert_eq!(caps, Capabilities::DATAGRAM);
        assert!(caps.contains(Capabilities::DATAGRAM));
        assert_eq!(
            caps.intersection(Capabilities::empty()),
            Capabilities::empty()
        );

        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::new();
        input.extend_from_slice(&message(|out| {
            let start = begin_message(out, KIND_CLIENT_HELLO);
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(&0xffff_fffeu32.to_be_bytes());
            end_message(out, start);
        }));
        assert!(server.handle_input(&mut input).unwrap().is_none());
        assert_eq!(server.peer_capabilities(), Capabilities::empty());
    }

    #[test]
    fn token_debug_hides_the_secret() {
        let token = Token::new("hunter2-super-secret");
        assert_eq!(format!("{token:?}"), "Token(***)");
        let printed = format!(
            "{:?}",
            ClientHandshake::new(ClientHandshakeConfig { token, ..config() })
        );
        assert!(!printed.contains("hunter2"));
    }

    #[test]
    fn only_driver_misuse_is_not_the_peers_fault() {
        assert!(HandshakeError::BadMagic.is_peer_fault());
        assert!(HandshakeError::AuthFailed.is_peer_fault());
        assert!(!HandshakeError::InvalidState("x").is_peer_fault());
    }

    /// Outcome of feeding `bytes` to a fresh server (after `prefix`), `step` bytes at a time:
    /// the last result, the bytes left unconsumed, and everything the server sent.
    fn server_outcome(prefix: &[u8], bytes: &[u8], step: usize) -> (String, usize, Vec<u8>) {
        let mut server = ServerHandshake::new(NONCE);
        let mut input = BytesMut::from(prefix);
        let mut result = format!("{:?}", server.handle_input(&mut input));
        let mut in_progress = result == "Ok(None)";
        for chunk in bytes.chunks(step) {
            // Keep feeding after the end so leftovers compare equal across split points.
            input.extend_from_slice(chunk);
            if !in_progress {
                continue;
            }
            let handled = server.handle_input(&mut input);
            result = format!("{handled:?}");
            in_progress = matches!(handled, Ok(None));
            if let Ok(Some(claim)) = handled {
                // Whatever arrived, the rest of the driver's calls must not panic either.
                let verified = server.verify(&claim, Some(&token()));
                result = format!("{result} {verified:?}");
                if verified.is_ok() {
                    server.accept(accept_all(&claim)).unwrap();
                }
            }
        }
        (result, input.len(), transmit_server(&mut server))
    }

    fn client_outcome(prefix: &[u8], bytes: &[u8], step: usize) -> (String, usize, Vec<u8>) {
        let mut client = ClientHandshake::new(config());
        transmit_client(&mut client);
        let mut input = BytesMut::from(prefix);
        let mut result = format!("{:?}", client.handle_input(&mut input));
        let mut in_progress = result == "Ok(None)";
        for chunk in bytes.chunks(step) {
            input.extend_from_slice(chunk);
            if !in_progress {
                continue;
            }
            let handled = client.handle_input(&mut input);
            result = format!("{handled:?}");
            in_progress = matches!(handled, Ok(None));
        }
        (result, input.len(), transmit_client(&mut client))
    }

    fn valid_hello() -> Vec<u8> {
        let mut out = Vec::new();
        encode_hello(&mut out, PROTOCOL_VERSION, Capabilities::empty());
        out
    }

    fn valid_challenge() -> Vec<u8> {
        let mut out = Vec::new();
        encode_challenge(&mut out, PROTOCOL_VERSION, Capabilities::empty(), &NONCE);
        out
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_split_points_do_not_matter(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            step in 1usize..40,
            after_first in any::<bool>(),
        ) {
            // Either from the very start, or after a valid first message to reach deeper states.
            let (server_prefix, client_prefix) = if after_first {
                (valid_hello(), valid_challenge())
            } else {
                (Vec::new(), Vec::new())
            };
            let whole = server_outcome(&server_prefix, &bytes, bytes.len().max(1));
            prop_assert_eq!(&whole, &server_outcome(&server_prefix, &bytes, step));
            let whole = client_outcome(&client_prefix, &bytes, bytes.len().max(1));
            prop_assert_eq!(&whole, &client_outcome(&client_prefix, &bytes, step));
        }

        #[test]
        fn structured_client_auth_never_panics(
            name in "[a-z\u{e9} ]{0,70}",
            services in proptest::collection::vec("[a-z.:]{0,66}", 0..8),
            max_frame_payload in any::<u32>(),
            initial_stream_window in any::<u32>(),
            session_window in any::<u32>(),
            max_streams in 0u32..3,
            cut in any::<prop::sample::Index>(),
        ) {
            let params = PeerParams { max_frame_payload, initial_stream_window, session_window, max_streams };
            let mut auth = auth_bytes(&name, &services, &params);
            let keep = cut.index(auth.len() + 1);
            auth.truncate(keep.max(HEADER_LEN));
            let len = u16::try_from(auth.len() - HEADER_LEN).unwrap();
            auth[1..3].copy_from_slice(&len.to_be_bytes());
            let _ = server_after_auth(&auth);
        }
    }
}
