//! Flow-control accounting without sockets: one stream of an in-memory session pair (warren's
//! default tuning on both ends) moving 4 MiB per iteration through `stream_write` ->
//! `poll_transmit` -> `handle_input` -> `stream_read`, with WINDOW_UPDATE frames carrying the
//! credit back. Throughput in payload bytes. The driver writes in chunks of 4 KiB (many small
//! reads from a slow local socket) or 64 KiB (bulk).
//!
//! The pair and its stream live across iterations, so the window has auto-tuned after warm-up:
//! this is the steady state of a long transfer.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_benches::pair::Pair;

const TRANSFER: usize = 4 * 1024 * 1024;

fn flow(c: &mut Criterion) {
    let data = Bytes::from(vec![0x3cu8; TRANSFER]);
    let mut g = c.benchmark_group("flow/one_stream");
    g.throughput(Throughput::Bytes(TRANSFER as u64));
    for (write, label) in [(4 * 1024, "write_4KiB"), (64 * 1024, "write_64KiB")] {
        let mut pair = Pair::new();
        let id = pair.open_stream();
        g.bench_function(label, |b| {
            b.iter(|| {
                let got = pair.transfer(id, &data, write);
                assert_eq!(got, TRANSFER, "every byte arrives");
                black_box(got)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, flow);
criterion_main!(benches);
