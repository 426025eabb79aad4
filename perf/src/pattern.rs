//! The deterministic byte pattern every workload sends, so the receiver can check content.
//!
//! Byte `i` of a stream is `block()[i % PATTERN_LEN]`. The period is a prime (65,521), so a
//! chunk dropped, duplicated or reordered at any power-of-two buffer boundary shows up as a
//! mismatch.

use std::sync::OnceLock;

/// Period of the pattern in bytes (the largest prime below 64 KiB).
pub const PATTERN_LEN: usize = 65_521;

/// One period of the pattern, generated once (xorshift64, fixed seed).
pub fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..PATTERN_LEN)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    })
}

/// The longest run of pattern bytes starting at stream offset `offset`, at most `max` long.
/// Writers send this slice and advance by what the socket took.
pub fn slice_at(offset: u64, max: usize) -> &'static [u8] {
    let start = (offset % PATTERN_LEN as u64) as usize;
    let len = (PATTERN_LEN - start).min(max);
    &block()[start..start + len]
}

/// Fills `buf` with the pattern bytes at stream offset `offset`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let src = slice_at(offset + done as u64, buf.len() - done);
        buf[done..done + src.len()].copy_from_slice(src);
        done += src.len();
    }
}

/// Index in `buf` of the first byte that differs from the pattern at stream offset `offset`, or
/// `None` when all of `buf` matches.
pub fn first_mismatch(offset: u64, buf: &[u8]) -> Option<usize> {
    let mut done = 0;
    while done < buf.len() {
        let want = slice_at(offset + done as u64, buf.len() - done);
        let got = &buf[done..done + want.len()];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Some(done + at);
        }
        done += want.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_at_any_offset_across_the_period() {
        let mut buf = vec![0u8; 3 * PATTERN_LEN + 17];
        for offset in [0u64, 1, 65_520, 65_521, 1 << 40] {
            fill(offset, &mut buf);
            assert_eq!(first_mismatch(offset, &buf), None);
        }
    }

    #[test]
    fn a_shifted_or_flipped_byte_is_found() {
        let mut buf = vec![0u8; 200_000];
        fill(10, &mut buf);
        assert!(first_mismatch(11, &buf).is_some());
        buf[150_000] ^= 1;
        assert_eq!(first_mismatch(10, &buf), Some(150_000));
    }
}
