//! Writes the seed corpora in `fuzz/seeds/<target>/` from the real encoders, so seeds stay valid
//! when the wire format changes. Run from the repository root:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//! ```
//!
//! Each seed starts with the byte the targets read first (the chunk size for `frame` and
//! `handshake`; the configuration for `session`; the first op for `records`). The session seeds follow the op encoding of
//! `fuzz_targets/session.rs` (`Harness::step`); keep the two in step.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use warren_proto::frame::{Frame, GoAwayCode, ResetCode, StreamId};
use warren_proto::handshake::{
    Accept, ClientHandshake, ClientHandshakeConfig, PeerParams, ServerHandshake, ServiceVerdict,
    Token,
};

/// Must match `NONCE` in `fuzz_targets/handshake.rs`, or the client's MAC will not verify.
const NONCE: [u8; 32] = [0x11; 32];

fn main() -> io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    frame_seeds(&root.join("frame"))?;
    handshake_seeds(&root.join("handshake"))?;
    session_seeds(&root.join("session"))?;
    records_seeds(&root.join("records"))?;
    Ok(())
}

/// Scripts in the op encoding of `fuzz_targets/records.rs` (op % 5: 0/1 application data of
/// `op / 5 * 97 % 4097` bytes from an 8-byte pattern, x5 when op >= 0x80; 2 a record of any
/// inner type: type, padding / 67, content length, content; 3 raw bytes; 4 a bit flip), each
/// ending with the byte that picks the chunking.
fn records_seeds(dir: &Path) -> io::Result<()> {
    let pattern = *b"warren!!";
    let app = |op: u8| [&[op][..], &pattern[..]].concat();
    // Application data only: 12 x 97 bytes, then 42 x 97 x 5 (several whole records).
    let only_app = [app(60), app(0x80 | 210), app(5), vec![3]].concat();
    write(dir, "app-data-only", &only_app)?;
    // Data, a session ticket (ignored), data, close_notify, then data after it (refused).
    let ticket = [&[2u8, 22, 0, 8][..], &[4, 0, 0, 4, 1, 2, 3, 4][..]].concat();
    let close = [2u8, 21, 0, 2, 1, 0];
    let script = [app(60), ticket, app(65), close.to_vec(), app(10), vec![1]].concat();
    write(dir, "ticket-close-notify-then-data", &script)?;
    // A key update (refused by name), padding on data, an unprotected header, a bit flip.
    let padded = [2u8, 23, 200, 5, b'h', b'e', b'l', b'l', b'o'];
    let key_update = [2u8, 22, 0, 5, 24, 0, 0, 1, 0];
    let raw = [3u8 + 5 * 5, 22, 3, 3, 0, 40];
    let flip = [4u8, 0, 9];
    let script = [
        app(25),
        padded.to_vec(),
        app(30),
        key_update.to_vec(),
        vec![7],
    ]
    .concat();
    write(dir, "padding-then-key-update", &script)?;
    write(
        dir,
        "unprotected-header",
        &[app(25), raw.to_vec(), app(25), vec![2]].concat(),
    )?;
    write(
        dir,
        "bit-flip",
        &[app(40), app(40), flip.to_vec(), vec![0]].concat(),
    )?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out);
    }
    out
}

fn sample_frames() -> Vec<(&'static str, Frame)> {
    let v4: SocketAddr = "203.0.113.9:51000".parse().expect("literal");
    let v6: SocketAddr = "[2001:db8::1]:443".parse().expect("literal");
    vec![
        (
            "data",
            Frame::Data {
                stream: StreamId(1),
                payload: Bytes::from_static(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"),
            },
        ),
        (
            "open-none",
            Frame::Open {
                stream: StreamId(1),
                service: "web".into(),
                visitor: None,
            },
        ),
        (
            "open-v4",
            Frame::Open {
                stream: StreamId(3),
                service: "ssh".into(),
                visitor: Some(v4),
            },
        ),
        (
            "open-v6",
            Frame::Open {
                stream: StreamId(5),
                service: "db.main".into(),
                visitor: Some(v6),
            },
        ),
        (
            "fin",
            Frame::Fin {
                stream: StreamId(1),
            },
        ),
        (
            "rst",
            Frame::Rst {
                stream: StreamId(1),
                code: ResetCode::ServiceUnavailable,
            },
        ),
        (
            "window-update-stream",
            Frame::WindowUpdate {
                stream: StreamId(1),
                increment: 65_536,
            },
        ),
        (
            "window-update-session",
            Frame::WindowUpdate {
                stream: StreamId::SESSION,
                increment: 1 << 20,
            },
        ),
        ("ping", Frame::Ping { opaque: 1 }),
        ("pong", Frame::Pong { opaque: 1 }),
        (
            "goaway",
            Frame::GoAway {
                last_stream: StreamId(7),
                code: GoAwayCode::NoError,
                reason: "server shutting down".into(),
            },
        ),
    ]
}

fn frame_seeds(dir: &Path) -> io::Result<()> {
    let frames = sample_frames();
    for (name, frame) in &frames {
        // Chunk byte 0: fed whole.
        let mut seed = vec![0];
        frame.encode(&mut seed);
        write(dir, name, &seed)?;
    }
    // A whole conversation, fed 5 bytes at a time.
    let mut seed = vec![5];
    seed.extend(encode(
        &frames.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>(),
    ));
    write(dir, "conversation-chunked", &seed)
}

fn params() -> PeerParams {
    PeerParams {
        max_frame_payload: 16 * 1024,
        initial_stream_window: 64 * 1024,
        session_window: 1024 * 1024,
        max_streams: 128,
    }
}

/// Runs a real handshake and returns (what the client sent, what the server sent).
fn transcript() -> (Vec<u8>, Vec<u8>) {
    let services = vec!["web".to_owned(), "ssh".to_owned()];
    let mut client = ClientHandshake::new(ClientHandshakeConfig {
        name: "fuzz-client".into(),
        token: Token::new(b"fuzz-token".to_vec()),
        instance_id: 7,
        session_index: 0,
        services: services.clone(),
        params: params(),
    });
    let mut server = ServerHandshake::new(NONCE);
    let (mut client_sent, mut server_sent) = (Vec::new(), Vec::new());

    client.poll_transmit(&mut client_sent);
    let mut server_in = BytesMut::from(&client_sent[..]);
    assert!(matches!(server.handle_input(&mut server_in), Ok(None)));
    server.poll_transmit(&mut server_sent);
    let mut client_in = BytesMut::from(&server_sent[..]);
    assert!(matches!(client.handle_input(&mut client_in), Ok(None)));

    let before = client_sent.len();
    client.poll_transmit(&mut client_sent);
    server_in.extend_from_slice(&client_sent[before..]);
    let claim = match server.handle_input(&mut server_in) {
        Ok(Some(claim)) => claim,
        other => panic!("a real ClientAuth must yield a claim, got {other:?}"),
    };
    server
        .verify(&claim, Some(&Token::new(b"fuzz-token".to_vec())))
        .expect("the right token verifies");
    server
        .accept(Accept {
            session_id: 1,
            shard_count: 2,
            params: params(),
            keepalive_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
            services: services
                .iter()
                .map(|name| ServiceVerdict {
                    name: name.clone(),
                    refusal: (name == "ssh").then(|| "not allowed for this client".to_owned()),
                })
                .collect(),
        })
        .expect("valid terms");
    let before = server_sent.len();
    server.poll_transmit(&mut server_sent);
    client_in.extend_from_slice(&server_sent[before..]);
    assert!(matches!(client.handle_input(&mut client_in), Ok(Some(_))));
    (client_sent, server_sent)
}

fn handshake_seeds(dir: &Path) -> io::Result<()> {
    let (client_sent, server_sent) = transcript();
    // The target feeds the same bytes to a server (as client bytes) and to a client (as server
    // bytes); each transcript drives one of them all the way through.
    for (name, bytes) in [
        ("client-transcript", &client_sent),
        ("server-transcript", &server_sent),
    ] {
        for (suffix, chunk) in [("whole", 0u8), ("by-7", 7)] {
            let mut seed = vec![chunk];
            seed.extend_from_slice(bytes);
            write(dir, &format!("{name}-{suffix}"), &seed)?;
        }
    }
    Ok(())
}

// Op bytes of `Harness::step` in fuzz_targets/session.rs.
const OP_RAW: u8 = 0;
const OP_FRAME: u8 = 1;
const OP_TIME: u8 = 3;
const OP_TRANSMIT: u8 = 4;
const OP_EVENTS: u8 = 5;
const OP_READ: u8 = 6;
const OP_WRITE: u8 = 7;
const OP_FINISH: u8 = 8;
const OP_OPEN: u8 = 10;
const OP_GOAWAY: u8 = 11;
/// Followed by a byte: below 0x60 an externally taken DATA frame, below 0xc0 an external
/// consumption report.
const OP_DRIVER: u8 = 12;

/// Harness configuration bytes: role, local params (4), peer params (4), keepalive,
/// max_stream_window, quantum, stream_send_buffer.
fn session_config(role: u8) -> Vec<u8> {
    vec![role, 0, 3, 1, 3, 0, 3, 1, 3, 9, 1, 3, 7]
}

/// Raw peer bytes, at most 255 per op.
fn raw(ops: &mut Vec<u8>, bytes: &[u8]) {
    for chunk in bytes.chunks(255) {
        ops.push(OP_RAW);
        ops.push(chunk.len() as u8);
        ops.extend_from_slice(chunk);
    }
}

/// The peer (a client) opens stream 2 for "web" and sends 600 bytes on it.
fn peer_opens_and_sends_600() -> Vec<Frame> {
    vec![
        Frame::Open {
            stream: StreamId(2),
            service: "web".into(),
            visitor: None,
        },
        Frame::Data {
            stream: StreamId(2),
            payload: Bytes::from(vec![b'x'; 600]),
        },
    ]
}

fn session_seeds(dir: &Path) -> io::Result<()> {
    // Server role: the peer (a client) opens stream 2, sends data and FIN; we read it all, answer,
    // finish, and flush.
    let mut ops = session_config(0);
    let mut frames = peer_opens_and_sends_600();
    frames.push(Frame::Fin {
        stream: StreamId(2),
    });
    raw(&mut ops, &encode(&frames));
    ops.extend([OP_EVENTS]);
    // Read from known stream index 0 (pick byte 0), up to 0x0400 bytes, three times.
    for _ in 0..3 {
        ops.extend([OP_READ, 0, 0x04, 0x00]);
    }
    // Write all the capacity it has (length word 1), finish it, transmit everything.
    ops.extend([
        OP_WRITE,
        0,
        0x00,
        0x01,
        OP_FINISH,
        0,
        OP_TRANSMIT,
        0xff,
        0xff,
    ]);
    write(dir, "server-serves-one-stream", &ops)?;

    // Client role: we open a stream, write past the peer's window, get credit, go away.
    let mut ops = session_config(1);
    ops.extend([
        OP_OPEN,
        0,
        0,
        OP_WRITE,
        0,
        0x00,
        0x01,
        OP_TRANSMIT,
        0xff,
        0xff,
    ]);
    ops.extend([OP_FRAME, 5, 1, 0, 1, 0x40, 0x00]); // WINDOW_UPDATE on known stream 0
    ops.extend([OP_FRAME, 5, 0, 1, 0x40, 0x00]); // WINDOW_UPDATE for the session
    ops.extend([OP_FRAME, 7, 1]); // PONG for our PING
    ops.extend([OP_WRITE, 0, 0x00, 0x01, OP_TRANSMIT, 0xff, 0xff]);
    ops.extend([OP_GOAWAY, 0, OP_TRANSMIT, 0xff, 0xff, OP_TIME, 0x10, 0x00]);
    write(dir, "client-opens-and-sends", &ops)?;

    // Server role, the splice driver's receive path: a small DATA frame is copied into the core,
    // then a larger one is taken externally behind it (the core's 600 bytes first), the driver
    // reports delivery in two parts, a third frame is taken directly, and everything is read.
    let mut ops = session_config(0);
    raw(&mut ops, &encode(&peer_opens_and_sends_600()));
    ops.extend([OP_EVENTS]);
    // External DATA on known stream 0, 1 + 0x0100 bytes: 857 held by the driver.
    ops.extend([OP_DRIVER, 0x10, 0, 0x01, 0x00]);
    // 100 delivered (1 + 99 % 857), no backlog; then the other 757 (1 + 756 % 757).
    ops.extend([OP_DRIVER, 0x80, 0, 0, 0, 0, 99, 0, 0, 0, 0]);
    ops.extend([OP_DRIVER, 0x80, 0, 0, 0, 0x02, 0xf4, 0, 0, 0, 0]);
    // Nothing left in the core: the next frame goes external directly, and is delivered.
    ops.extend([OP_DRIVER, 0x10, 0, 0x00, 0x80]);
    ops.extend([OP_DRIVER, 0x80, 0, 0, 0, 0, 0x80, 0, 0, 0, 0]); // 1 + 128 % 129
    ops.extend([OP_READ, 0, 0x04, 0x00, OP_TRANSMIT, 0xff, 0xff]);
    write(dir, "driver-takes-core-bytes-then-splices", &ops)?;

    // Idle: time runs out with nothing received.
    let mut ops = session_config(0);
    for _ in 0..8 {
        ops.extend([OP_TIME, 0x0f, 0xff, OP_TRANSMIT, 0xff, 0xff]);
    }
    write(dir, "idle-timeout", &ops)
}
