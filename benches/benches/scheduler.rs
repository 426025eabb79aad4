//! The send scheduler: `Session::poll_transmit` serving 1, 100 and 10,000 streams round-robin,
//! each with queued data, within credit that never runs out (see `pair::scheduler_config`).
//!
//! - `scheduler/drain/N`: time to turn N x 16 KiB of queued data into frames, in calls of at
//!   most 64 KiB (one session write). Throughput in payload bytes.
//! - `scheduler/per_call/N`: the cost of one such call with N streams ready. Every call emits
//!   about 64 KiB (four 16 KiB frames), whatever N, so the figures compare the scheduler's
//!   bookkeeping per call as the stream count grows (hash lookups over 10,000 streams miss the
//!   cache where 1 stream does not). The single stream gets 1 MiB queued so it too fills calls.
//!
//! Building the loaded sessions is not timed: only the `poll_transmit` calls are.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_benches::pair::loaded_session;

const CHUNK: usize = 16 * 1024;
/// Bytes one call may produce: a 64 KiB session write.
const CALL_LIMIT: usize = 64 * 1024;
const STREAM_COUNTS: [usize; 3] = [1, 100, 10_000];

// A benchmark measures wall time; `iter_custom` leaves the clock reads to us so that building
// the sessions stays outside the measurement.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn drain(c: &mut Criterion) {
    let chunk = Bytes::from(vec![0x11u8; CHUNK]);
    let mut g = c.benchmark_group("scheduler/drain");
    for n in STREAM_COUNTS {
        g.throughput(Throughput::Bytes((n * CHUNK) as u64));
        if n >= 10_000 {
            g.sample_size(10);
        }
        let mut out = Vec::with_capacity(CALL_LIMIT + 2 * CHUNK);
        g.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut s = loaded_session(n, 1, &chunk);
                    let t0 = now();
                    while s.has_transmit() {
                        out.clear();
                        s.poll_transmit(&mut out, CALL_LIMIT);
                        black_box(&out);
                    }
                    total += t0.elapsed();
                    assert_eq!(s.stats().data_bytes_sent, (n * CHUNK) as u64);
                }
                total
            })
        });
    }
    g.finish();
}

fn per_call(c: &mut Criterion) {
    let chunk = Bytes::from(vec![0x22u8; CHUNK]);
    let mut g = c.benchmark_group("scheduler/per_call");
    g.throughput(Throughput::Elements(1));
    for n in STREAM_COUNTS {
        // Enough per stream that every call fills up: 1 MiB for a lone stream, 16 KiB otherwise.
        let chunks = (CALL_LIMIT * 16 / CHUNK).div_ceil(n).max(1);
        let mut out = Vec::with_capacity(CALL_LIMIT + 2 * CHUNK);
        g.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let mut s = loaded_session(n, chunks, &chunk);
                    let t0 = now();
                    while left > 0 && s.has_transmit() {
                        out.clear();
                        s.poll_transmit(&mut out, CALL_LIMIT);
                        black_box(&out);
                        left -= 1;
                    }
                    total += t0.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, drain, per_call);
criterion_main!(benches);
