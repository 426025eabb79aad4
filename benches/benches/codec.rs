//! The frame codec: encoding and decoding DATA at three payload sizes (throughput in payload
//! bytes) and the two control frames of every stream's life, WINDOW_UPDATE and OPEN.
//!
//! Decoding DATA splits the payload off the input buffer without copying, so its cost should not
//! grow with the payload; encoding copies the payload into the output buffer, so it should.

use std::hint::black_box;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use warren_proto::frame::{data_header, Frame, StreamId, MAX_PAYLOAD_CEILING};

const DATA_SIZES: [(usize, &str); 3] = [(64, "64B"), (16 * 1024, "16KiB"), (64 * 1024, "64KiB")];

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut v = Vec::new();
    frame.encode(&mut v);
    v
}

fn data(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec/data");
    for (size, label) in DATA_SIZES {
        let frame = Frame::Data {
            stream: StreamId(7),
            payload: Bytes::from(vec![0xa5u8; size]),
        };
        g.throughput(Throughput::Bytes(size as u64));
        let mut out = Vec::with_capacity(size + 64);
        g.bench_function(format!("encode/{label}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&frame).encode(&mut out);
                black_box(out.len())
            })
        });
        // What the session's scheduler does instead of `encode`: header array, then the bytes.
        let Frame::Data { payload, .. } = &frame else {
            unreachable!("built as DATA above")
        };
        g.bench_function(format!("data_header/{label}"), |b| {
            b.iter(|| {
                out.clear();
                out.extend_from_slice(&data_header(StreamId(7), payload.len() as u32));
                out.extend_from_slice(black_box(payload));
                black_box(out.len())
            })
        });
        let wire = encoded(&frame);
        g.bench_function(format!("decode/{label}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| Frame::decode(buf, MAX_PAYLOAD_CEILING),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn control(c: &mut Criterion) {
    let visitor: SocketAddr = "203.0.113.7:55555".parse().expect("a valid address");
    let frames = [
        (
            "window_update",
            Frame::WindowUpdate {
                stream: StreamId(7),
                increment: 128 * 1024,
            },
        ),
        (
            "open",
            Frame::Open {
                stream: StreamId(7),
                service: "web-frontend".into(),
                visitor: Some(visitor),
            },
        ),
    ];
    let mut g = c.benchmark_group("codec/control");
    g.throughput(Throughput::Elements(1));
    for (name, frame) in &frames {
        let mut out = Vec::with_capacity(128);
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(frame).encode(&mut out);
                black_box(out.len())
            })
        });
        let wire = encoded(frame);
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| Frame::decode(buf, MAX_PAYLOAD_CEILING),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, data, control);
criterion_main!(benches);
