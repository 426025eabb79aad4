//! In-process loopback through a whole tunnel: `warren`'s server and client started as a
//! library (one shard each, a plain TCP session), a local service, and a blocking visitor on
//! the bench thread. One group per data-plane backend (`loopback/compat`, `loopback/uring`),
//! each with:
//!
//! - `download_64MiB`: a new visitor connection downloads 64 MiB from the service (stream open,
//!   bulk transfer, close). Throughput in bytes.
//! - `echo_64B`: one 64-byte round trip visitor -> service -> visitor on an open stream.
//!
//! The tunnel is started once, before the measurements; its threads share the machine with
//! the visitor and the service, as on any one-host benchmark.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warren_benches::tunnel::{download, Backend, Echo, Tunnel};

const DOWNLOAD: u64 = 64 * 1024 * 1024;
const ECHO: usize = 64;

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("building the control runtime");
    for &backend in Backend::ALL {
        let tunnel = rt
            .block_on(Tunnel::start(backend))
            .unwrap_or_else(|e| panic!("starting the {} tunnel: {e}", backend.name()));
        let mut g = c.benchmark_group(format!("loopback/{}", backend.name()));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(DOWNLOAD));
        g.bench_function("download_64MiB", |b| {
            b.iter(|| black_box(download(tunnel.public, DOWNLOAD).expect("the download completes")))
        });
        g.sample_size(100);
        g.throughput(Throughput::Elements(1));
        let mut echo = Echo::connect(tunnel.public, ECHO).expect("opening the echo stream");
        g.bench_function("echo_64B", |b| {
            b.iter(|| echo.round_trip().expect("the echo comes back"))
        });
        g.finish();
        drop(echo);
        rt.block_on(tunnel.shutdown());
    }
}

criterion_group!(benches, loopback);
criterion_main!(benches);
