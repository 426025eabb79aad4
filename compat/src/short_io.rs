//! Short-read and short-write injection for tests (STYLE.md rule 6), behind the cargo feature
//! `test-short-io`.
//!
//! With the feature on, each read and write the data plane issues on a session socket (plain
//! or TLS) or a local socket moves at most 1, 7, 100, 1500 or 4096 bytes, taking these sizes in
//! turn from a per-socket counter. The frame decoder therefore sees frames split at odd
//! points, and every partial-write path runs. The sizes are fixed and there is no randomness,
//! so a failure can be reproduced.
//!
//! With the feature off, [`ShortIo`] is a zero-sized type and every helper hands back its
//! argument unchanged, so the normal build behaves exactly as it would without this module.

use bytes::{BufMut, BytesMut};

/// Per-socket state of the injection: which size comes next. Zero-sized without the feature.
#[derive(Debug, Default)]
pub(crate) struct ShortIo {
    /// Index into [`SIZES`] of the next cap.
    #[cfg(feature = "test-short-io")]
    turn: usize,
}

/// The caps, in turn: a single byte, less than a frame header (12), a few headers, about one
/// MTU, one page.
#[cfg(feature = "test-short-io")]
const SIZES: [usize; 5] = [1, 7, 100, 1500, 4096];

impl ShortIo {
    /// How many of `len` bytes the next read or write may move. Identity without the feature.
    #[inline(always)]
    pub(crate) fn cap(&mut self, len: usize) -> usize {
        #[cfg(feature = "test-short-io")]
        {
            let size = SIZES[self.turn % SIZES.len()];
            self.turn = self.turn.wrapping_add(1);
            len.min(size)
        }
        #[cfg(not(feature = "test-short-io"))]
        {
            len
        }
    }

    /// `buf` for one `try_read_buf`, limited to the next cap. Without the feature it is `buf`
    /// itself.
    #[cfg(feature = "test-short-io")]
    #[inline(always)]
    pub(crate) fn read_buf<'a>(&mut self, buf: &'a mut BytesMut) -> impl BufMut + 'a {
        let n = self.cap(buf.capacity() - buf.len());
        BufMut::limit(buf, n)
    }

    /// `buf` for one `try_read_buf`, limited to the next cap. Without the feature it is `buf`
    /// itself.
    #[cfg(not(feature = "test-short-io"))]
    #[inline(always)]
    pub(crate) fn read_buf<'a>(&mut self, buf: &'a mut BytesMut) -> impl BufMut + 'a {
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "test-short-io")]
    #[test]
    fn caps_cycle_through_the_fixed_sizes() {
        let mut s = ShortIo::default();
        let caps: Vec<usize> = (0..7).map(|_| s.cap(10_000)).collect();
        assert_eq!(caps, [1, 7, 100, 1500, 4096, 1, 7]);
        assert_eq!(s.cap(3), 3, "a cap never asks for more than is there");
        let mut buf = BytesMut::with_capacity(64 * 1024);
        assert_eq!(s.read_buf(&mut buf).remaining_mut(), 1500);
    }

    #[cfg(not(feature = "test-short-io"))]
    #[test]
    fn without_the_feature_nothing_is_capped() {
        let mut s = ShortIo::default();
        assert_eq!(std::mem::size_of::<ShortIo>(), 0);
        assert_eq!(s.cap(10_000), 10_000);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let spare = buf.capacity();
        assert_eq!(s.read_buf(&mut buf).chunk_mut().len(), spare);
    }
}
