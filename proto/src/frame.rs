//! The frame codec: a fixed 12-byte header followed by a bounded payload.
//!
//! ```text
//!  0        1        2        4                8               12
//!  +--------+--------+--------+----------------+----------------+---------
//!  | type   | flags  | rsvd=0 | stream id (BE) | length (BE)    | payload
//!  +--------+--------+--------+----------------+----------------+---------
//! ```
//!
//! The header is parsed from a fixed array without allocation. DATA payloads are split off the
//! input buffer as [`Bytes`] (no copy). Every other frame type has a small, exactly checked
//! payload. "Need more bytes" is `Ok(None)`, never an error.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, Bytes, BytesMut};

/// Size of every frame header on the wire.
pub const HEADER_LEN: usize = 12;

/// Hard ceiling on any negotiated DATA payload, whatever the peer advertises: bounds the memory
/// one frame can make us hold before the codec has seen all of it.
pub const MAX_PAYLOAD_CEILING: u32 = 16 * 1024 * 1024;

/// Longest service name carried in OPEN (same rule as the handshake).
pub const MAX_SERVICE_NAME: usize = 64;

/// Longest GOAWAY reason text; longer reasons are truncated by the sender.
pub const MAX_GOAWAY_REASON: usize = 256;

/// Identifies one stream inside a session. 0 is the session itself (WINDOW_UPDATE, PING, GOAWAY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl StreamId {
    /// The session-level id used by connection-wide frames.
    pub const SESSION: StreamId = StreamId(0);
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Frame type byte. Values are part of the wire format; never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Stream payload.
    Data = 0,
    /// Opens a stream: service name and visitor address. Sent pipelined with the first DATA.
    Open = 1,
    /// Half-close: the sender will send no more DATA on this stream.
    Fin = 2,
    /// Aborts a stream in both directions with an error code.
    Rst = 3,
    /// Grants send credit on a stream (or the session, id 0).
    WindowUpdate = 4,
    /// Liveness probe and RTT sample; answered by PONG with the same opaque value.
    Ping = 5,
    /// Answer to PING.
    Pong = 6,
    /// The sender will accept no new streams; existing ones finish.
    GoAway = 7,
    /// Reserved for UDP datagrams; not negotiated by protocol version 1.
    Datagram = 8,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            0 => FrameType::Data,
            1 => FrameType::Open,
            2 => FrameType::Fin,
            3 => FrameType::Rst,
            4 => FrameType::WindowUpdate,
            5 => FrameType::Ping,
            6 => FrameType::Pong,
            7 => FrameType::GoAway,
            8 => FrameType::Datagram,
            _ => return None,
        })
    }
}

/// Why a stream was reset. Carried in RST; tells the other side whose fault it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCode {
    /// The local end (visitor or service) closed abnormally or the driver gave up on it.
    Cancelled,
    /// The receiver refused the stream (stream limit reached, or it is going away).
    Refused,
    /// The client offers no service by that name.
    UnknownService,
    /// The client could not connect to the service (refused, unreachable, timed out).
    ServiceUnavailable,
    /// The connection to the service failed mid-stream.
    ServiceError,
    /// The visitor's connection failed mid-stream.
    VisitorError,
    /// The session carrying the stream ended (never sent on the wire; reported locally).
    SessionLost,
    /// A bug or resource exhaustion on the sender's side.
    Internal,
    /// A code this version does not know.
    Other(u32),
}

impl ResetCode {
    /// Wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            ResetCode::Cancelled => 1,
            ResetCode::Refused => 2,
            ResetCode::UnknownService => 3,
            ResetCode::ServiceUnavailable => 4,
            ResetCode::ServiceError => 5,
            ResetCode::VisitorError => 6,
            ResetCode::SessionLost => 7,
            ResetCode::Internal => 8,
            ResetCode::Other(v) => v,
        }
    }

    /// Parses a wire value; unknown values are kept, not rejected.
    pub fn from_u32(v: u32) -> ResetCode {
        match v {
            1 => ResetCode::Cancelled,
            2 => ResetCode::Refused,
            3 => ResetCode::UnknownService,
            4 => ResetCode::ServiceUnavailable,
            5 => ResetCode::ServiceError,
            6 => ResetCode::VisitorError,
            7 => ResetCode::SessionLost,
            8 => ResetCode::Internal,
            v => ResetCode::Other(v),
        }
    }
}

impl fmt::Display for ResetCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetCode::Cancelled => f.write_str("cancelled"),
            ResetCode::Refused => f.write_str("refused by the peer"),
            ResetCode::UnknownService => f.write_str("unknown service"),
            ResetCode::ServiceUnavailable => f.write_str("service unavailable"),
            ResetCode::ServiceError => f.write_str("service connection failed"),
            ResetCode::VisitorError => f.write_str("visitor connection failed"),
            ResetCode::SessionLost => f.write_str("session lost"),
            ResetCode::Internal => f.write_str("internal error"),
            ResetCode::Other(v) => write!(f, "code {v}"),
        }
    }
}

/// Why a session is going away. Carried in GOAWAY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoAwayCode {
    /// Graceful: shutdown or reload; existing streams may finish.
    NoError,
    /// The peer broke the protocol (malformed frame, unknown type, bad stream id).
    ProtocolError,
    /// The peer sent more than the credit it was granted.
    FlowControlError,
    /// Nothing was received for longer than the idle timeout.
    IdleTimeout,
    /// A newer instance of the same client connected; this one is retired.
    Replaced,
    /// A bug or resource exhaustion on the sender's side.
    Internal,
    /// A code this version does not know.
    Other(u32),
}

impl GoAwayCode {
    /// Wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            GoAwayCode::NoError => 0,
            GoAwayCode::ProtocolError => 1,
            GoAwayCode::FlowControlError => 2,
            GoAwayCode::IdleTimeout => 3,
            GoAwayCode::Replaced => 4,
            GoAwayCode::Internal => 5,
            GoAwayCode::Other(v) => v,
        }
    }

    /// Parses a wire value; unknown values are kept.
    pub fn from_u32(v: u32) -> GoAwayCode {
        match v {
            0 => GoAwayCode::NoError,
            1 => GoAwayCode::ProtocolError,
            2 => GoAwayCode::FlowControlError,
            3 => GoAwayCode::IdleTimeout,
            4 => GoAwayCode::Replaced,
            5 => GoAwayCode::Internal,
            v => GoAwayCode::Other(v),
        }
    }
}

impl fmt::Display for GoAwayCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GoAwayCode::NoError => f.write_str("graceful shutdown"),
            GoAwayCode::ProtocolError => f.write_str("protocol error"),
            GoAwayCode::FlowControlError => f.write_str("flow control error"),
            GoAwayCode::IdleTimeout => f.write_str("idle timeout"),
            GoAwayCode::Replaced => f.write_str("replaced by a newer client instance"),
            GoAwayCode::Internal => f.write_str("internal error"),
            GoAwayCode::Other(v) => write!(f, "code {v}"),
        }
    }
}

/// One decoded frame. DATA payloads share the input buffer's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Stream payload.
    Data {
        /// Target stream.
        stream: StreamId,
        /// The bytes; never empty on the wire.
        payload: Bytes,
    },
    /// A new stream towards `service` on behalf of `visitor`.
    Open {
        /// The new stream's id (initiator parity, strictly increasing).
        stream: StreamId,
        /// Service name, 1..=64 bytes of `[A-Za-z0-9_.-]`.
        service: String,
        /// Address of the visitor that caused the stream, when known.
        visitor: Option<SocketAddr>,
    },
    /// Half-close of the sender's direction.
    Fin {
        /// Target stream.
        stream: StreamId,
    },
    /// Abort of the stream.
    Rst {
        /// Target stream.
        stream: StreamId,
        /// Why.
        code: ResetCode,
    },
    /// Credit grant; `stream` 0 means the session budget.
    WindowUpdate {
        /// Target stream, or [`StreamId::SESSION`].
        stream: StreamId,
        /// Additional bytes the receiver of this frame may send. Never 0.
        increment: u32,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in the PONG.
        opaque: u64,
    },
    /// Answer to a PING.
    Pong {
        /// The PING's value.
        opaque: u64,
    },
    /// The sender accepts no new streams.
    GoAway {
        /// Highest stream id the sender opened or accepted.
        last_stream: StreamId,
        /// Why.
        code: GoAwayCode,
        /// Human-readable detail for logs (<= 256 bytes, lossy UTF-8).
        reason: String,
    },
}

/// A frame the peer sent that cannot be accepted. Always the peer's fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The type byte is not one this version knows.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// DATAGRAM was sent but not negotiated.
    #[error("DATAGRAM frames were not negotiated on this session")]
    DatagramNotNegotiated,
    /// A DATA payload is larger than what we advertised.
    #[error("DATA frame of {len} bytes exceeds the advertised maximum of {max}")]
    PayloadTooLarge {
        /// Declared length.
        len: u32,
        /// Our limit.
        max: u32,
    },
    /// A control frame's payload does not have the size its type requires.
    #[error("{kind} frame has a {len}-byte payload; expected {expected}")]
    BadLength {
        /// Frame type name.
        kind: &'static str,
        /// Declared length.
        len: u32,
        /// What the type requires.
        expected: &'static str,
    },
    /// A frame carries a stream id its type does not allow.
    #[error("{kind} frame on stream {stream}: {why}")]
    BadStream {
        /// Frame type name.
        kind: &'static str,
        /// Offending id.
        stream: u32,
        /// Rule broken.
        why: &'static str,
    },
    /// Payload contents are invalid.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// Frame type name.
        kind: &'static str,
        /// Rule broken.
        why: &'static str,
    },
}

/// The fixed header, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Raw type byte (checked later, so unknown types report cleanly).
    pub kind: u8,
    /// Flag bits; none are defined in version 1 and they are ignored.
    pub flags: u8,
    /// Stream id.
    pub stream: StreamId,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            kind: b[0],
            flags: b[1],
            stream: StreamId(u32::from_be_bytes([b[4], b[5], b[6], b[7]])),
            len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    /// Serialises the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let s = self.stream.0.to_be_bytes();
        let l = self.len.to_be_bytes();
        [
            self.kind, self.flags, 0, 0, s[0], s[1], s[2], s[3], l[0], l[1], l[2], l[3],
        ]
    }
}

/// Writes a DATA header for `len` payload bytes; the payload follows it on the wire. Drivers that
/// move payload without copying (splice) write only this.
pub fn data_header(stream: StreamId, len: u32) -> [u8; HEADER_LEN] {
    Header {
        kind: FrameType::Data as u8,
        flags: 0,
        stream,
        len,
    }
    .encode()
}

fn valid_service_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-'
}

/// True when `name` is a valid service or client name: 1..=64 bytes of `[A-Za-z0-9_.-]`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_SERVICE_NAME && name.bytes().all(valid_service_byte)
}

impl Frame {
    /// Decodes one frame from the front of `buf`, consuming it. `Ok(None)` means more bytes are
    /// needed and nothing was consumed. `max_payload` is the DATA size we advertised.
    pub fn decode(buf: &mut BytesMut, max_payload: u32) -> Result<Option<Frame>, FrameError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let h = Header::parse(head);
        let kind = FrameType::from_u8(h.kind).ok_or(FrameError::UnknownType(h.kind))?;
        check_len(kind, h.len, max_payload.min(MAX_PAYLOAD_CEILING))?;
        check_stream(kind, h.stream)?;
        let total = HEADER_LEN + h.len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let mut payload = buf.split_to(h.len as usize);
        let stream = h.stream;
        let frame = match kind {
            FrameType::Data => Frame::Data {
                stream,
                payload: payload.freeze(),
            },
            FrameType::Open => decode_open(stream, &payload)?,
            FrameType::Fin => Frame::Fin { stream },
            FrameType::Rst => Frame::Rst {
                stream,
                code: ResetCode::from_u32(payload.get_u32()),
            },
            FrameType::WindowUpdate => {
                let increment = payload.get_u32();
                if increment == 0 {
                    return Err(FrameError::Malformed {
                        kind: "WINDOW_UPDATE",
                        why: "increment is 0",
                    });
                }
                Frame::WindowUpdate { stream, increment }
            }
            FrameType::Ping => Frame::Ping {
                opaque: payload.get_u64(),
            },
            FrameType::Pong => Frame::Pong {
                opaque: payload.get_u64(),
            },
            FrameType::GoAway => {
                let last_stream = StreamId(payload.get_u32());
                let code = GoAwayCode::from_u32(payload.get_u32());
                let reason = String::from_utf8_lossy(&payload).into_owned();
                Frame::GoAway {
                    last_stream,
                    code,
                    reason,
                }
            }
            FrameType::Datagram => return Err(FrameError::DatagramNotNegotiated),
        };
        Ok(Some(frame))
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Data { stream, payload } => {
                out.extend_from_slice(&data_header(*stream, payload.len() as u32));
                out.extend_from_slice(payload);
            }
            Frame::Open {
                stream,
                service,
                visitor,
            } => {
                let name = &service.as_bytes()[..service.len().min(MAX_SERVICE_NAME)];
                let addr_len = match visitor {
                    None => 1,
                    Some(SocketAddr::V4(_)) => 1 + 4 + 2,
                    Some(SocketAddr::V6(_)) => 1 + 16 + 2,
                };
                let len = 1 + name.len() + addr_len;
                put_header(out, FrameType::Open, *stream, len as u32);
                out.push(name.len() as u8);
                out.extend_from_slice(name);
                match visitor {
                    None => out.push(0),
                    Some(SocketAddr::V4(a)) => {
                        out.push(4);
                        out.extend_from_slice(&a.ip().octets());
                        out.extend_from_slice(&a.port().to_be_bytes());
                    }
                    Some(SocketAddr::V6(a)) => {
                        out.push(6);
                        out.extend_from_slice(&a.ip().octets());
                        out.extend_from_slice(&a.port().to_be_bytes());
                    }
                }
            }
            Frame::Fin { stream } => put_header(out, FrameType::Fin, *stream, 0),
            Frame::Rst { stream, code } => {
                put_header(out, FrameType::Rst, *stream, 4);
                out.extend_from_slice(&code.to_u32().to_be_bytes());
            }
            Frame::WindowUpdate { stream, increment } => {
                put_header(out, FrameType::WindowUpdate, *stream, 4);
                out.extend_from_slice(&increment.to_be_bytes());
            }
            Frame::Ping { opaque } => {
                put_header(out, FrameType::Ping, StreamId::SESSION, 8);
                out.extend_from_slice(&opaque.to_be_bytes());
            }
            Frame::Pong { opaque } => {
                put_header(out, FrameType::Pong, StreamId::SESSION, 8);
                out.extend_from_slice(&opaque.to_be_bytes());
            }
            Frame::GoAway {
                last_stream,
                code,
                reason,
            } => {
                let reason = truncate_utf8(reason, MAX_GOAWAY_REASON);
                put_header(
                    out,
                    FrameType::GoAway,
                    StreamId::SESSION,
                    8 + reason.len() as u32,
                );
                out.extend_from_slice(&last_stream.0.to_be_bytes());
                out.extend_from_slice(&code.to_u32().to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
        }
    }
}

fn put_header(out: &mut Vec<u8>, kind: FrameType, stream: StreamId, len: u32) {
    out.extend_from_slice(
        &Header {
            kind: kind as u8,
            flags: 0,
            stream,
            len,
        }
        .encode(),
    );
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn check_len(kind: FrameType, len: u32, max_payload: u32) -> Result<(), FrameError> {
    let exact = |name: &'static str, want: u32, expected: &'static str| {
        if len == want {
            Ok(())
        } else {
            Err(FrameError::BadLength {
                kind: name,
                len,
                expected,
            })
        }
    };
    match kind {
        FrameType::Data => {
            if len > max_payload {
                Err(FrameError::PayloadTooLarge {
                    len,
                    max: max_payload,
                })
            } else if len == 0 {
                Err(FrameError::BadLength {
                    kind: "DATA",
                    len,
                    expected: "at least 1 byte",
                })
            } else {
                Ok(())
            }
        }
        FrameType::Open => {
            // 1 (name len) + 1..=64 (name) + 1 (family) + 0/6/18 (address)
            if (3..=1 + MAX_SERVICE_NAME as u32 + 1 + 18).contains(&len) {
                Ok(())
            } else {
                Err(FrameError::BadLength {
                    kind: "OPEN",
                    len,
                    expected: "3..=84 bytes",
                })
            }
        }
        FrameType::Fin => exact("FIN", 0, "0 bytes"),
        FrameType::Rst => exact("RST", 4, "4 bytes"),
        FrameType::WindowUpdate => exact("WINDOW_UPDATE", 4, "4 bytes"),
        FrameType::Ping => exact("PING", 8, "8 bytes"),
        FrameType::Pong => exact("PONG", 8, "8 bytes"),
        FrameType::GoAway => {
            if (8..=8 + MAX_GOAWAY_REASON as u32).contains(&len) {
                Ok(())
            } else {
                Err(FrameError::BadLength {
                    kind: "GOAWAY",
                    len,
                    expected: "8..=264 bytes",
                })
            }
        }
        FrameType::Datagram => Err(FrameError::DatagramNotNegotiated),
    }
}

fn check_stream(kind: FrameType, stream: StreamId) -> Result<(), FrameError> {
    let (name, session_only) = match kind {
        FrameType::Data => ("DATA", false),
        FrameType::Open => ("OPEN", false),
        FrameType::Fin => ("FIN", false),
        FrameType::Rst => ("RST", false),
        FrameType::WindowUpdate => return Ok(()),
        FrameType::Ping => ("PING", true),
        FrameType::Pong => ("PONG", true),
        FrameType::GoAway => ("GOAWAY", true),
        FrameType::Datagram => return Ok(()),
    };
    match (session_only, stream == StreamId::SESSION) {
        (true, false) => Err(FrameError::BadStream {
            kind: name,
            stream: stream.0,
            why: "must be sent on stream 0",
        }),
        (false, true) => Err(FrameError::BadStream {
            kind: name,
            stream: 0,
            why: "stream 0 is the session, not a stream",
        }),
        _ => Ok(()),
    }
}

fn decode_open(stream: StreamId, p: &[u8]) -> Result<Frame, FrameError> {
    let bad = |why| FrameError::Malformed { kind: "OPEN", why };
    let name_len = p[0] as usize;
    let rest = &p[1..];
    if name_len == 0 || name_len > MAX_SERVICE_NAME || rest.len() < name_len + 1 {
        return Err(bad("service name length out of range"));
    }
    let name = &rest[..name_len];
    if !name.iter().all(|b| valid_service_byte(*b)) {
        return Err(bad("service name has characters outside [A-Za-z0-9_.-]"));
    }
    let service = String::from_utf8_lossy(name).into_owned();
    let addr = &rest[name_len..];
    let visitor = match (addr[0], addr.len()) {
        (0, 1) => None,
        (4, 7) => {
            let ip = Ipv4Addr::new(addr[1], addr[2], addr[3], addr[4]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([addr[5], addr[6]]),
            ))
        }
        (6, 19) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&addr[1..17]);
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)),
                u16::from_be_bytes([addr[17], addr[18]]),
            ))
        }
        _ => return Err(bad("visitor address family/length mismatch")),
    };
    Ok(Frame::Open {
        stream,
        service,
        visitor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(f: &Frame) -> Frame {
        let mut out = Vec::new();
        f.encode(&mut out);
        let mut buf = BytesMut::from(&out[..]);
        let got = Frame::decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
        got
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = 1u32..=u32::MAX;
        let name = "[A-Za-z0-9_.-]{1,64}";
        let addr = prop_oneof![
            Just(None),
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| Some(SocketAddr::new(IpAddr::from(ip), p))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| Some(SocketAddr::new(IpAddr::from(ip), p))),
        ];
        prop_oneof![
            (id.clone(), proptest::collection::vec(any::<u8>(), 1..3000)).prop_map(|(s, p)| {
                Frame::Data {
                    stream: StreamId(s),
                    payload: Bytes::from(p),
                }
            }),
            (id.clone(), name, addr).prop_map(|(s, n, a)| Frame::Open {
                stream: StreamId(s),
                service: n,
                visitor: a
            }),
            id.clone().prop_map(|s| Frame::Fin {
                stream: StreamId(s)
            }),
            (id.clone(), any::<u32>()).prop_map(|(s, c)| Frame::Rst {
                stream: StreamId(s),
                code: ResetCode::from_u32(c)
            }),
            (any::<u32>(), 1u32..).prop_map(|(s, i)| Frame::WindowUpdate {
                stream: StreamId(s),
                increment: i
            }),
            any::<u64>().prop_map(|o| Frame::Ping { opaque: o }),
            any::<u64>().prop_map(|o| Frame::Pong { opaque: o }),
            (any::<u32>(), any::<u32>(), "[a-z ]{0,300}").prop_map(|(l, c, r)| {
                Frame::GoAway {
                    last_stream: StreamId(l),
                    code: GoAwayCode::from_u32(c),
                    reason: truncate_utf8(&r, MAX_GOAWAY_REASON).to_string(),
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(f in arb_frame()) {
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn a_byte_stream_split_anywhere_decodes_the_same(
            frames in proptest::collection::vec(arb_frame(), 1..20),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut wire = Vec::new();
            for f in &frames { f.encode(&mut wire); }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            for p in points {
                buf.extend_from_slice(&wire[at..p]);
                at = p;
                while let Some(f) = Frame::decode(&mut buf, 1 << 20).unwrap() { got.push(f); }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = Frame::decode(&mut buf, 4096) {}
        }
    }

    #[test]
    fn oversized_data_is_refused_from_the_header_alone() {
        let mut buf = BytesMut::from(&data_header(StreamId(1), 70_000)[..]);
        assert_eq!(
            Frame::decode(&mut buf, 65_536),
            Err(FrameError::PayloadTooLarge {
                len: 70_000,
                max: 65_536
            })
        );
    }

    #[test]
    fn unknown_type_and_bad_stream_ids_are_errors() {
        let mut buf = BytesMut::from(&[0x42u8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(
            Frame::decode(&mut buf, 1024),
            Err(FrameError::UnknownType(0x42))
        );
        let mut out = Vec::new();
        Frame::Fin {
            stream: StreamId(0),
        }
        .encode(&mut out);
        let mut buf = BytesMut::from(&out[..]);
        assert!(matches!(
            Frame::decode(&mut buf, 1024),
            Err(FrameError::BadStream { .. })
        ));
    }

    #[test]
    fn partial_header_needs_more_bytes() {
        let mut buf = BytesMut::from(&data_header(StreamId(1), 5)[..7]);
        assert_eq!(Frame::decode(&mut buf, 1024), Ok(None));
        assert_eq!(buf.len(), 7);
    }
}
