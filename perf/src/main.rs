//! `warren-load`: the backends and clients of `warren_perf` on the command line. Reports go to
//! stdout as one JSON object per run; progress and diagnostics go to stderr.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use warren_perf::bulk::{run_bulk, BulkParams};
use warren_perf::connrate::{run_connrate, ConnrateParams};
use warren_perf::hold::{run_hold, HoldParams};
use warren_perf::rr::{run_rr, RrParams};
use warren_perf::{Backend, BackendKind, Live, Report, RunError};

/// Load generator and test backends for measuring tunnels.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Runtime worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// No progress lines on stderr.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Backend: the bulk protocol (download N bytes / upload N bytes, count acknowledged).
    #[command(alias = "bulk-server")]
    Sink {
        /// Address to listen on; port 0 picks one (the bound address is printed on stderr).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Backend: echoes every byte; closes after the client's EOF.
    Echo {
        /// Address to listen on; port 0 picks one (the bound address is printed on stderr).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Backend: HTTP/1.1 keep-alive with /small (2 B), /large (256 KiB), /health.
    Http {
        /// Address to listen on; port 0 picks one (the bound address is printed on stderr).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Client: N streams x M bytes up or down through the target (a sink behind it).
    Bulk(BulkParams),
    /// Client: fixed-size echo round trips, one outstanding per connection (an echo behind it).
    Rr(RrParams),
    /// Client: connect + small echo + close at a concurrency (an echo behind it).
    Connrate(ConnrateParams),
    /// Client: open and hold N live connections (an echo behind it).
    Hold(HoldParams),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cli.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warren-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let live = Arc::new(Live::default());
    let quiet = cli.quiet;
    match cli.command {
        Command::Sink { listen } => serve(BackendKind::Sink, listen).await,
        Command::Echo { listen } => serve(BackendKind::Echo, listen).await,
        Command::Http { listen } => serve(BackendKind::Http, listen).await,
        Command::Bulk(p) => client(run_bulk(p, live.clone()), &live, quiet).await,
        Command::Rr(p) => client(run_rr(p, live.clone()), &live, quiet).await,
        Command::Connrate(p) => client(run_connrate(p, live.clone()), &live, quiet).await,
        Command::Hold(p) => client(run_hold(p, live.clone()), &live, quiet).await,
    }
}

async fn serve(kind: BackendKind, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let backend = Backend::bind(kind, listen).await?;
    eprintln!(
        "warren-load: {} listening on {}",
        kind.name(),
        backend.local_addr()
    );
    let stats = backend.stats();
    tokio::select! {
        () = backend.run() => {}
        signal = tokio::signal::ctrl_c() => signal.context("waiting for Ctrl-C")?,
    }
    eprintln!(
        "warren-load: {} stopped after {} connections ({} failed)",
        kind.name(),
        stats.accepted.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs a client workload with a progress line per second, prints its report; exit status 1 when
/// any operation failed.
async fn client(
    workload: impl Future<Output = Result<Report, RunError>>,
    live: &Live,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    tokio::pin!(workload);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut last_bytes, mut last_ops) = (0u64, 0u64);
    let report = loop {
        tokio::select! {
            report = &mut workload => break report?,
            _ = tick.tick() => {
                let bytes = live.bytes.load(Ordering::Relaxed);
                let ops = live.ops.load(Ordering::Relaxed);
                if !quiet {
                    eprintln!(
                        "warren-load: {:>9.1} MB/s {:>9} ops/s  total {} B, {} ops, {} errors",
                        (bytes - last_bytes) as f64 / 1e6,
                        ops - last_ops,
                        bytes,
                        ops,
                        live.errors.load(Ordering::Relaxed)
                    );
                }
                (last_bytes, last_ops) = (bytes, ops);
            }
        }
    };
    print_report(&report);
    if !quiet {
        for msg in &report.error_samples {
            eprintln!("warren-load: error: {msg}");
        }
    }
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Stdout carries the report and nothing else, so scripts can parse it.
#[allow(clippy::print_stdout)]
fn print_report(report: &Report) {
    println!("{}", report.to_json());
}
