//! Fuzzes the frame decoder with arbitrary bytes, fed whole and in chunks, under a small and a
//! large advertised payload limit.
//!
//! Invariants:
//! - nothing panics, and a header alone never makes the decoder reserve its declared length
//!   (the CI run sets libFuzzer's -malloc_limit_mb to catch that);
//! - "need more bytes" (`Ok(None)`) consumes nothing;
//! - a decoded DATA payload is 1..=min(limit, MAX_PAYLOAD_CEILING) bytes;
//! - every decoded frame re-encodes to bytes that decode to the same frame (a GOAWAY reason is
//!   first cut to MAX_GOAWAY_REASON bytes, as the encoder does), consuming exactly those bytes,
//!   and encoding is stable from then on;
//! - splitting the input at any points yields the same frames and the same final error;
//! - the small limit only ever cuts the frame sequence short: its frames are a prefix of the
//!   large limit's, and equal to them when it ends without an error.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_proto::frame::{
    truncate_utf8, Frame, FrameError, Header, HEADER_LEN, MAX_GOAWAY_REASON, MAX_PAYLOAD_CEILING,
};

/// The smallest payload limit a session may advertise (`PeerParams::MAX_FRAME_PAYLOAD_MIN`).
const SMALL: u32 = 1024;
/// Larger than any real limit: the decoder must clamp it to `MAX_PAYLOAD_CEILING` itself.
const LARGE: u32 = u32::MAX;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so split points get fuzzed too.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = match split % 32 {
        0 => data.len().max(1),
        n => usize::from(n),
    };

    let small = decode_all(data, SMALL);
    let large = decode_all(data, LARGE);
    assert_eq!(decode_chunked(data, SMALL, step), small);
    assert_eq!(decode_chunked(data, LARGE, step), large);

    assert!(
        large.frames.starts_with(&small.frames),
        "a smaller payload limit changed frames instead of stopping early"
    );
    if small.error.is_none() {
        assert_eq!(small, large, "without an error the limit must not matter");
    }
    if let Some(e) = &small.error {
        if !matches!(e, FrameError::PayloadTooLarge { .. }) {
            assert_eq!(small, large, "only PayloadTooLarge may depend on the limit");
        }
    }
});

/// What decoding one byte stream produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    error: Option<FrameError>,
    /// Bytes left undecoded (a partial frame, or everything from the bad frame on).
    rest: usize,
}

fn decode_all(data: &[u8], max_payload: u32) -> Outcome {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    let error = drain(&mut buf, max_payload, &mut frames);
    Outcome {
        frames,
        error,
        rest: buf.len(),
    }
}

fn decode_chunked(data: &[u8], max_payload: u32, step: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut error = None;
    for (i, chunk) in data.chunks(step).enumerate() {
        buf.extend_from_slice(chunk);
        error = drain(&mut buf, max_payload, &mut frames);
        if error.is_some() {
            // A session would end here; the rest of the input is never looked at.
            let remaining = data.len() - (i * step + chunk.len());
            return Outcome {
                frames,
                error,
                rest: buf.len() + remaining,
            };
        }
    }
    Outcome {
        frames,
        error,
        rest: buf.len(),
    }
}

/// Decodes frames off the front of `buf` until it needs more bytes or hits an error.
fn drain(buf: &mut BytesMut, max_payload: u32, frames: &mut Vec<Frame>) -> Option<FrameError> {
    loop {
        let before = buf.len();
        // Only the header is needed to check what an error consumed.
        let buf_before: Vec<u8> = buf.iter().take(HEADER_LEN).copied().collect();
        match Frame::decode(buf, max_payload) {
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return None;
            }
            Err(e) => {
                // An error may consume the bad frame (payload checks run after the split) but
                // nothing past it; the session ends there anyway.
                let consumed = before - buf.len();
                if consumed != 0 {
                    let mut head = [0; HEADER_LEN];
                    head.copy_from_slice(&buf_before[..HEADER_LEN]);
                    let frame_len = HEADER_LEN + Header::parse(&head).len as usize;
                    assert_eq!(consumed, frame_len, "an error consumed more than its frame");
                }
                return Some(e);
            }
            Ok(Some(frame)) => {
                let consumed = before - buf.len();
                check_frame(&frame, consumed, max_payload);
                frames.push(frame);
            }
        }
    }
}

fn check_frame(frame: &Frame, consumed: usize, max_payload: u32) {
    if let Frame::Data { payload, .. } = frame {
        let limit = max_payload.min(MAX_PAYLOAD_CEILING) as usize;
        assert!(!payload.is_empty(), "empty DATA decoded");
        assert!(
            payload.len() <= limit,
            "DATA over the payload limit decoded"
        );
    }

    // What the encoder will make of it: only a GOAWAY reason changes (lossy UTF-8 can grow past
    // the limit, and the encoder cuts it on a character boundary).
    let expected = match frame {
        Frame::GoAway {
            last_stream,
            code,
            reason,
        } => Frame::GoAway {
            last_stream: *last_stream,
            code: *code,
            reason: truncate_utf8(reason, MAX_GOAWAY_REASON).to_owned(),
        },
        other => other.clone(),
    };
    let mut wire = Vec::new();
    frame.encode(&mut wire);
    if !matches!(frame, Frame::GoAway { .. }) {
        // (A GOAWAY reason may change size: invalid UTF-8 became U+FFFD.)
        assert_eq!(wire.len(), consumed, "re-encoding changed the frame's size");
    }
    let mut again = BytesMut::from(&wire[..]);
    let decoded = Frame::decode(&mut again, max_payload)
        .expect("a re-encoded frame must decode")
        .expect("a re-encoded frame must be complete");
    assert!(
        again.is_empty(),
        "re-encoded frame left {} bytes",
        again.len()
    );
    assert_eq!(decoded, expected, "re-encoded frame decoded differently");

    let mut wire2 = Vec::new();
    decoded.encode(&mut wire2);
    assert_eq!(wire2, wire, "encoding is not stable");
}
