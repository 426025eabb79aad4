//! The `warren` binary: `server`, `client`, `check`, `demo` and `bench`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::info;
use warren::backend::Backend;
use warren::config::{load_config, ConfigFile};

/// mimalloc, only with the `mimalloc` feature: measured worse than the system allocator on memory
/// per held connection (perf/results/2026-11-22-0fee8e6e79/NOTES.md), so it is opt-in.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// warren: a self-hosted multiplexed reverse tunnel.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the public relay (needs a [server] section).
    Server {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Data plane; overrides server.tuning.backend of the file. auto: io_uring when this
        /// host allows it, else compat (one warning says why).
        #[arg(long, value_enum, value_name = "BACKEND")]
        backend: Option<Backend>,
    },
    /// Run the agent behind NAT (needs a [client] section).
    Client {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Data plane; overrides client.tuning.backend of the file. auto: io_uring when this
        /// host allows it, else compat (one warning says why).
        #[arg(long, value_enum, value_name = "BACKEND")]
        backend: Option<Backend>,
    },
    /// Validate a config file; prints every error with its TOML path, exits non-zero on any.
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Server, client and a demo web service in one process on loopback; fetches one page
    /// through the tunnel and runs until Ctrl-C.
    Demo,
    /// Self-test: server, client, a sink and an echo service in one process on loopback;
    /// measures bulk throughput both ways, request-response latency and CPU per GB with the
    /// tuning of FILE (or the defaults).
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Config file whose [server.tuning] / [client.tuning] to use (one of them is used for
    /// both roles when the other is absent). Without it: the defaults.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Bytes per bulk stream, each direction (KiB/MiB/GiB or KB/MB/GB suffixes).
    #[arg(long, default_value = "1GiB", value_parser = warren_perf::bulk::parse_bytes)]
    bytes: u64,
    /// Concurrent bulk streams, each direction.
    #[arg(long, default_value_t = 1)]
    streams: u32,
    /// Measured length of the request-response phase (after a short warm-up).
    #[arg(long, default_value_t = 5.0)]
    rr_seconds: f64,
    /// Payload bytes per round trip, each way.
    #[arg(long, default_value_t = 64)]
    rr_size: usize,
    /// Request-response connections, one round trip outstanding on each.
    #[arg(long, default_value_t = 1)]
    rr_connections: u32,
    /// Session transport between the in-process client and server.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "tls"])]
    transport: String,
    /// Data plane of both roles; overrides tuning.backend of FILE (default: auto).
    #[arg(long, value_enum, value_name = "BACKEND")]
    backend: Option<Backend>,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The bench's own tunnel logs would tear its progress bar; only errors show by default.
    let default_filter = match cli.command {
        Command::Bench(_) => "error",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Check { config } => return check(&config),
        Command::Server { config, backend } => run(|rt| rt.block_on(server(config, backend))),
        Command::Client { config, backend } => run(|rt| rt.block_on(client(config, backend))),
        Command::Demo => run(|rt| rt.block_on(warren::demo::run())),
        Command::Bench(args) => bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The control plane runs on one tokio thread; the data plane has its own shard threads.
fn run(f: impl FnOnce(&tokio::runtime::Runtime) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("warren-control")
        .build()
        .context("starting the control runtime")?;
    f(&rt)
}

fn load(path: &Path) -> anyhow::Result<ConfigFile> {
    load_config(path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))
}

async fn server(path: PathBuf, backend: Option<Backend>) -> anyhow::Result<()> {
    let mut cfg = load(&path)?
        .server
        .with_context(|| format!("{}: no [server] section", path.display()))?;
    if let Some(b) = backend {
        info!("--backend {b} overrides server.tuning.backend");
        cfg.tuning.backend = b;
    }
    let server = warren::server::Server::start(cfg).await?;
    warren::signals::wait_for_shutdown().await;
    info!("draining");
    server.shutdown().await;
    Ok(())
}

async fn client(path: PathBuf, backend: Option<Backend>) -> anyhow::Result<()> {
    let mut cfg = load(&path)?
        .client
        .with_context(|| format!("{}: no [client] section", path.display()))?;
    if let Some(b) = backend {
        info!("--backend {b} overrides client.tuning.backend");
        cfg.tuning.backend = b;
    }
    let client = warren::client::Client::start(cfg).await?;
    warren::signals::wait_for_shutdown().await;
    info!("draining");
    client.shutdown().await;
    Ok(())
}

#[allow(clippy::print_stdout)]
fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if !(args.rr_seconds > 0.0 && args.rr_seconds <= 86_400.0) {
        anyhow::bail!("--rr-seconds must be above 0 and at most a day");
    }
    let options = warren::bench::BenchOptions {
        config: args.config,
        bytes: args.bytes,
        streams: args.streams,
        rr_duration: std::time::Duration::from_secs_f64(args.rr_seconds),
        rr_size: args.rr_size,
        rr_connections: args.rr_connections,
        transport: if args.transport == "tls" {
            warren::config::Transport::Tls
        } else {
            warren::config::Transport::Tcp
        },
        backend: args.backend,
        progress: true,
    };
    let result = warren::bench::run(&options)?;
    if args.json {
        println!("{}", result.to_json());
    } else {
        print!("{}", result.render());
    }
    match result.errors() {
        0 => Ok(()),
        n => anyhow::bail!("{n} bench operation(s) failed (see error_samples)"),
    }
}

#[allow(clippy::print_stdout)]
fn check(path: &Path) -> ExitCode {
    match load_config(path) {
        Ok(cfg) => {
            let mut parts = Vec::new();
            if let Some(s) = &cfg.server {
                parts.push(format!(
                    "server ({} client(s), {} service(s), transport {}, backend {})",
                    s.clients.len(),
                    s.services.len(),
                    s.transport.as_str(),
                    s.tuning.backend
                ));
            }
            if let Some(c) = &cfg.client {
                parts.push(format!(
                    "client {:?} ({} service(s), transport {}, backend {})",
                    c.name,
                    c.services.len(),
                    c.transport.as_str(),
                    c.tuning.backend
                ));
            }
            if parts.is_empty() {
                eprintln!(
                    "{}: neither [server] nor [client] is present",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            println!("{}: ok: {}", path.display(), parts.join(", "));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{}: {e}", path.display());
            }
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("warren").chain(args.iter().copied()))
    }

    #[test]
    fn backend_flag_is_optional_and_takes_the_three_backends() {
        for (role, flag, want) in [
            ("server", "uring", Some(Backend::Uring)),
            ("client", "compat", Some(Backend::Compat)),
            ("server", "auto", Some(Backend::Auto)),
        ] {
            let cli = parse(&[role, "-c", "x.toml", "--backend", flag]).unwrap();
            let got = match cli.command {
                Command::Server { backend, .. } | Command::Client { backend, .. } => backend,
                other => panic!("parsed {other:?}"),
            };
            assert_eq!(got, want, "{role} --backend {flag}");
        }
        match parse(&["client", "-c", "x.toml"]).unwrap().command {
            Command::Client { backend, .. } => assert_eq!(backend, None),
            other => panic!("parsed {other:?}"),
        }
        match parse(&["bench", "--backend", "compat"]).unwrap().command {
            Command::Bench(args) => assert_eq!(args.backend, Some(Backend::Compat)),
            other => panic!("parsed {other:?}"),
        }
        let err = parse(&["server", "-c", "x.toml", "--backend", "io_uring"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("possible values: auto, uring, compat"),
            "{err}"
        );
    }
}
