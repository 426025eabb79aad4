//! Fuzzes warren's TLS 1.3 record layer (`warren_compat::records`) as a hostile or broken peer
//! would drive it: the input is a script of records sealed with the session's keys (application
//! data, alerts, handshake messages, unknown inner types, padding, oversized bodies), raw bytes
//! slipped between them, and byte flips, then the resulting stream is opened in chunks whose
//! sizes the input also picks.
//!
//! Invariants:
//! - nothing panics, and at most one record (header + 16,640 bytes) is ever buffered;
//! - nothing unauthenticated reaches the plaintext: what `open` appends is always a prefix of
//!   the application data sealed in order, and all of it when the script only sealed
//!   application data;
//! - after an error the session is over (the target stops feeding it).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren_compat::records::{Tls13Records, HEADER_LEN, MAX_PLAIN};

/// Largest record body the layer accepts (2^14 + 256).
const MAX_CIPHER: usize = MAX_PLAIN + 256;

fuzz_target!(|data: &[u8]| {
    let (mut peer, mut us) = Tls13Records::fuzz_pair();
    let mut wire = Vec::new();
    let mut sealed_app = Vec::new();
    let mut only_app = true;
    let mut it = data;
    // The script: op byte, then its arguments; the last byte picks the chunking of the feed.
    while it.len() > 1 {
        let (&op, rest) = it.split_first().unwrap_or((&0, &[]));
        it = rest;
        let take = |it: &mut &[u8], n: usize| -> Vec<u8> {
            let n = n.min(it.len());
            let (a, b) = it.split_at(n);
            *it = b;
            a.to_vec()
        };
        match op % 5 {
            // Application data, 0..=4 KiB (repeated from the input to reach record sizes).
            0 | 1 => {
                let len = usize::from(op / 5) * 97 % 4097;
                let seed = take(&mut it, 8);
                let content: Vec<u8> = (0..len)
                    .map(|i| seed.get(i % 8).copied().unwrap_or(7))
                    .collect();
                let big = op & 0x80 != 0;
                let content = if big { content.repeat(5) } else { content };
                if peer.seal(&content, &mut wire).is_ok() {
                    sealed_app.extend_from_slice(&content);
                }
            }
            // Any inner content type, short content, up to 16,640 bytes of padding.
            2 => {
                only_app = false;
                let args = take(&mut it, 3);
                // Never 0: the inner type is the last non-zero byte, so 0 would make the
                // content's own last byte the type, which the bookkeeping here does not model.
                let ct = args.first().copied().unwrap_or(1).max(1);
                let padding = usize::from(args.get(1).copied().unwrap_or(0)) * 67;
                let content_len = usize::from(args.get(2).copied().unwrap_or(0)) % 24;
                let content = take(&mut it, content_len);
                if peer.fuzz_seal(ct, &content, padding, &mut wire).is_ok() && ct == 23 {
                    sealed_app.extend_from_slice(&content);
                }
            }
            // Raw bytes from the input, e.g. an unprotected or oversized header.
            3 => {
                only_app = false;
                let n = usize::from(op / 5) % 40;
                let raw = take(&mut it, n);
                wire.extend_from_slice(&raw);
            }
            // Flip a byte somewhere in what was written so far.
            _ => {
                only_app = false;
                let at = take(&mut it, 2);
                if !wire.is_empty() {
                    let i = (usize::from(at.first().copied().unwrap_or(0)) << 8
                        | usize::from(at.get(1).copied().unwrap_or(0)))
                        % wire.len();
                    wire[i] ^= 1 << (op % 8);
                }
            }
        }
    }
    let chunk_pick = it.first().copied().unwrap_or(0);
    let sizes = [1usize, 5, 6, 17, 4096, 16_405, 65_536];
    let mut plain = BytesMut::new();
    let mut at = 0;
    let mut step = usize::from(chunk_pick);
    let mut failed = false;
    while at < wire.len() {
        step = step.wrapping_mul(31).wrapping_add(7);
        let n = sizes[step % sizes.len()].min(wire.len() - at);
        let r = us.open(&wire[at..at + n], &mut plain);
        assert!(
            us.fuzz_partial_len() <= HEADER_LEN + MAX_CIPHER,
            "{} bytes buffered",
            us.fuzz_partial_len()
        );
        at += n;
        if r.is_err() {
            failed = true;
            break;
        }
    }
    assert!(
        sealed_app.starts_with(&plain),
        "plaintext that was not sealed as application data ({} bytes out, {} sealed)",
        plain.len(),
        sealed_app.len()
    );
    if only_app {
        assert!(!failed, "a valid stream of application data failed to open");
        assert_eq!(&plain[..], &sealed_app[..], "application data lost");
    }
});
