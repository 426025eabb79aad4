//! Fuzzes both sides of the session handshake with hostile bytes, split at arbitrary points, and
//! the server's `accept` with arbitrary terms.
//!
//! Invariants: nothing panics; no call sequence the driver is allowed to make ends in anything
//! but `Ok` or a `HandshakeError`; and terms the server accepts always reach the client intact
//! (an Accept we can encode, our own client can decode).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_proto::handshake::{
    Accept, ClientHandshake, ClientHandshakeConfig, HandshakeError, PeerParams, RejectCode,
    ServerHandshake, ServiceVerdict, Token,
};

const NONCE: [u8; 32] = [0x11; 32];

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the rest is chopped up, so split points get fuzzed too.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = match split % 18 {
        0 => data.len().max(1),
        n => usize::from(n),
    };
    server_reads(data, step);
    client_reads(data, step);
    server_accepts(data);
});

fn token() -> Token {
    Token::new(b"fuzz-token".to_vec())
}

fn params() -> PeerParams {
    PeerParams {
        max_frame_payload: 16 * 1024,
        initial_stream_window: 64 * 1024,
        session_window: 1024 * 1024,
        max_streams: 128,
    }
}

fn config() -> ClientHandshakeConfig {
    ClientHandshakeConfig {
        name: "fuzz-client".into(),
        token: token(),
        instance_id: 7,
        session_index: 0,
        services: vec!["web".into(), "ssh".into(), "db.main".into()],
        params: params(),
    }
}

fn terms(services: &[String]) -> Accept {
    Accept {
        session_id: 1,
        shard_count: 4,
        params: params(),
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

/// Hostile client bytes into a server, driven the way a real driver would.
fn server_reads(data: &[u8], step: usize) {
    let mut server = ServerHandshake::new(NONCE);
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    for chunk in data.chunks(step) {
        input.extend_from_slice(chunk);
        match server.handle_input(&mut input) {
            Ok(None) => {}
            Ok(Some(claim)) => {
                // Alternate between a known and an unknown client: both paths must hold up.
                let token = token();
                let token = (claim.name.len() % 2 == 0).then_some(&token);
                if server.verify(&claim, token).is_ok() {
                    let _ = server.accept(terms(&claim.services));
                }
                break;
            }
            Err(_) => {
                server.reject(RejectCode::NotAllowed, "fuzz");
                break;
            }
        }
        server.poll_transmit(&mut out);
    }
    server.poll_transmit(&mut out);
    // Being fed after the end is a driver bug, reported, not a panic.
    let _ = server.handle_input(&mut input);
}

/// Hostile server bytes into a client that has sent its hello.
fn client_reads(data: &[u8], step: usize) {
    let mut client = ClientHandshake::new(config());
    let mut out = Vec::new();
    client.poll_transmit(&mut out);
    let mut input = BytesMut::new();
    for chunk in data.chunks(step) {
        input.extend_from_slice(chunk);
        match client.handle_input(&mut input) {
            Ok(None) => client.poll_transmit(&mut out),
            Ok(Some(_)) | Err(_) => break,
        }
    }
    let _ = client.handle_input(&mut input);
}

/// Takes bytes off the front of the fuzz input, zeros once it runs dry.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
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

    fn text(&mut self) -> String {
        let len = usize::from(self.u16() % 400).min(self.0.len());
        let (text, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8_lossy(text).into_owned()
    }
}

/// A real handshake up to a verified claim, then `accept` with terms made from the fuzz input.
fn server_accepts(data: &[u8]) {
    let mut fuzz = Bytes(data);
    let services: Vec<String> = (0..usize::from(fuzz.u8() % 40))
        .map(|i| format!("svc-{i}"))
        .collect();
    let mut client = ClientHandshake::new(ClientHandshakeConfig {
        services: services.clone(),
        ..config()
    });
    let mut server = ServerHandshake::new(NONCE);
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());

    client.poll_transmit(&mut to_server);
    let mut server_in = BytesMut::from(&to_server[..]);
    assert!(matches!(server.handle_input(&mut server_in), Ok(None)));
    server.poll_transmit(&mut to_client);
    let mut client_in = BytesMut::from(&to_client[..]);
    assert!(matches!(client.handle_input(&mut client_in), Ok(None)));
    to_server.clear();
    client.poll_transmit(&mut to_server);
    server_in.extend_from_slice(&to_server);
    let claim = match server.handle_input(&mut server_in) {
        Ok(Some(claim)) => claim,
        other => panic!("a valid ClientAuth must yield a claim, got {other:?}"),
    };
    server
        .verify(&claim, Some(&token()))
        .expect("the right token verifies");

    let mut verdicts = Vec::new();
    for _ in 0..usize::from(fuzz.u8() % 48) {
        // Mostly offered names, sometimes strangers; refusals of any length and content.
        let index = usize::from(fuzz.u8());
        let name = services
            .get(index)
            .cloned()
            .unwrap_or_else(|| format!("stranger-{index}"));
        let refusal = (fuzz.u8() % 2 == 1).then(|| fuzz.text());
        verdicts.push(ServiceVerdict { name, refusal });
    }
    let accept = Accept {
        session_id: fuzz.u64(),
        shard_count: fuzz.u16(),
        params: PeerParams {
            max_frame_payload: fuzz.u32(),
            initial_stream_window: fuzz.u32(),
            session_window: fuzz.u32(),
            max_streams: fuzz.u32(),
        },
        keepalive_interval_ms: fuzz.u32(),
        idle_timeout_ms: fuzz.u32(),
        services: verdicts,
    };
    match server.accept(accept.clone()) {
        Ok(()) => {
            to_client.clear();
            server.poll_transmit(&mut to_client);
            client_in.extend_from_slice(&to_client);
            let accepted = match client.handle_input(&mut client_in) {
                Ok(Some(accepted)) => accepted,
                other => panic!("an Accept the server encoded must decode, got {other:?}"),
            };
            assert!(client_in.is_empty());
            assert_eq!(accepted.session_id, accept.session_id);
            assert_eq!(accepted.shard_count, accept.shard_count);
            assert_eq!(accepted.params, accept.params);
            let names: Vec<&str> = accepted.services.iter().map(|v| v.name.as_str()).collect();
            assert_eq!(
                names,
                services.iter().map(String::as_str).collect::<Vec<_>>()
            );
            for verdict in &accepted.services {
                let sent = accept.services.iter().find(|v| v.name == verdict.name);
                match (
                    sent.map(|v| v.refusal.as_deref()),
                    verdict.refusal.as_deref(),
                ) {
                    (Some(None), received) => assert_eq!(received, None),
                    (Some(Some(reason)), Some(received)) => assert!(reason.starts_with(received)),
                    (Some(Some(_)), None) => panic!("a refusal arrived as an acceptance"),
                    (None, received) => {
                        assert!(received.is_some(), "a service without verdict was accepted")
                    }
                }
            }
        }
        Err(HandshakeError::InvalidConfig { .. }) => {}
        Err(other) => panic!("accept after a successful verify failed with {other:?}"),
    }
}
