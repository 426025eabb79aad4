//! Short-I/O injection for tests (cargo feature `test-short-io`): every length the shard asks
//! of a socket or pipe (sends, synchronous reads, splices) is cut to 1, 7, 100, 1500 or 4096
//! bytes in turn, so partial sends, split frame headers and partial splices are exercised. In
//! normal builds [`cap`] is the identity.

/// The length to ask for instead of `n` (never 0 when `n` is not).
#[cfg(feature = "test-short-io")]
pub(crate) fn cap(n: usize) -> usize {
    use std::cell::Cell;
    const STEPS: [usize; 5] = [1, 7, 100, 1500, 4096];
    thread_local! {
        static NEXT: Cell<usize> = const { Cell::new(0) };
    }
    if n == 0 {
        return 0;
    }
    let i = NEXT.with(|c| {
        let i = c.get();
        c.set((i + 1) % STEPS.len());
        i
    });
    n.min(STEPS[i])
}

/// The length to ask for instead of `n`: `n` itself outside tests.
#[cfg(not(feature = "test-short-io"))]
#[inline(always)]
pub(crate) fn cap(n: usize) -> usize {
    n
}
