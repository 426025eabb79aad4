//! Tells bulk traffic from light traffic, for the busy-poll policy of a shard.
//!
//! A busy poll buys wake-up latency with CPU. It pays for request/response traffic and only
//! costs during a bulk transfer: there the next completion comes without a poll, and a poll
//! picks every completion up the moment it lands, so each loop turn moves a little and the
//! shard makes more, shorter reads for the same bytes. Judging "bulk" by the bytes of one turn
//! fed that back: once polls had made the turns small, no turn was big enough to stop them (a
//! 1 GiB transfer started 150-300 polls). So the meter counts payload bytes over a window of
//! wall time, which a poll does not change. (A transfer that stalls for more than `QUIET`, as
//! single-stream bulk does in its slow state on the AMD host, still lets polls in between:
//! perf/results/2026-12-02-bulk-window/README.md.)

use std::time::{Duration, Instant};

/// Length of one counting window.
pub(crate) const WINDOW: Duration = Duration::from_millis(1);
/// Payload bytes in one window that make it bulk: 64 MB/s. A request/response stream of 64 B
/// messages moves under 1 KiB per ms; a transfer moves hundreds of KiB.
pub(crate) const WINDOW_BYTES: usize = 64 * 1024;
/// After the last bulk window, traffic is light again (busy polls allowed) this much later.
pub(crate) const QUIET: Duration = Duration::from_millis(2);

/// Payload bytes per window of wall time, and when a window last reached `WINDOW_BYTES`.
#[derive(Debug)]
pub(crate) struct BulkMeter {
    window_start: Instant,
    bytes: usize,
    last_bulk: Option<Instant>,
}

impl BulkMeter {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            bytes: 0,
            last_bulk: None,
        }
    }

    /// Counts `bytes` moved by a loop turn that ended at `now`.
    pub(crate) fn note(&mut self, now: Instant, bytes: usize) {
        if now.saturating_duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.bytes = 0;
        }
        self.bytes = self.bytes.saturating_add(bytes);
        if self.bytes >= WINDOW_BYTES {
            self.last_bulk = Some(now);
        }
    }

    /// No window reached `WINDOW_BYTES` during the last `QUIET`.
    pub(crate) fn is_quiet(&self, now: Instant) -> bool {
        self.last_bulk
            .is_none_or(|t| now.saturating_duration_since(t) >= QUIET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn many_small_turns_of_a_transfer_are_bulk() {
        let t0 = crate::uring::clock::now();
        let mut m = BulkMeter::new(t0);
        // 16 KiB every 100 µs (160 MB/s): no turn reaches WINDOW_BYTES, the window does.
        for i in 0..3 {
            m.note(t0 + i * 100 * US, 16 * 1024);
            assert!(m.is_quiet(t0 + i * 100 * US), "turn {i}: not yet 64 KiB");
        }
        m.note(t0 + 300 * US, 16 * 1024);
        assert!(!m.is_quiet(t0 + 300 * US));
        // Still bulk until QUIET has passed since that turn, then light again.
        assert!(!m.is_quiet(t0 + 300 * US + QUIET - US));
        assert!(m.is_quiet(t0 + 300 * US + QUIET));
    }

    #[test]
    fn request_response_traffic_stays_light() {
        let t0 = crate::uring::clock::now();
        let mut m = BulkMeter::new(t0);
        // 64 B each way every 20 µs, for 100 ms.
        for i in 0..5_000u32 {
            let now = t0 + i * 20 * US;
            m.note(now, 128);
            assert!(m.is_quiet(now), "turn {i}");
        }
    }

    #[test]
    fn bytes_do_not_carry_over_into_a_later_window() {
        let t0 = crate::uring::clock::now();
        let mut m = BulkMeter::new(t0);
        m.note(t0, WINDOW_BYTES - 1);
        // The next turn comes after the window closed: it starts a new one.
        m.note(t0 + WINDOW, 1);
        assert!(m.is_quiet(t0 + WINDOW));
        // One big turn alone is bulk.
        m.note(t0 + 2 * WINDOW, WINDOW_BYTES);
        assert!(!m.is_quiet(t0 + 2 * WINDOW));
    }
}
