//! An in-process tunnel on loopback: the real [`Server`] and [`Client`] started as a library on
//! 127.0.0.1 port 0, for tests, benches and benchmark tools. One place knows how to build the
//! pair's configs and how to wait until a visitor would be served on both ends.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::backend::Backend;
use crate::client::Client;
use crate::config::parse_config;
use crate::server::Server;

/// What pair to start.
#[derive(Debug, Clone)]
pub struct PairSpec<'a> {
    /// Services as (name, local address the client forwards to).
    pub services: &'a [(&'a str, SocketAddr)],
    /// Services whose `local_addr` is given as text (a host name and port), after `services`.
    pub host_services: &'a [(&'a str, &'a str)],
    /// Encrypt the session (self-signed certificate, pinned by the client).
    pub tls: bool,
    /// Shards on each side.
    pub shards: usize,
    /// Sessions the client opens (default: one per server shard).
    pub sessions: Option<usize>,
    /// Extra lines for both `[server.tuning]` and `[client.tuning]` (`key = value` TOML).
    pub tuning: &'a str,
    /// Data plane of both ends (`tuning.backend`); `auto` by default.
    pub backend: Backend,
    /// Extra lines for every `[client.services.NAME]` table (e.g. `connect_timeout_ms = 300`).
    pub client_service_lines: &'a str,
}

impl Default for PairSpec<'_> {
    fn default() -> Self {
        PairSpec {
            services: &[],
            host_services: &[],
            tls: false,
            shards: 1,
            sessions: None,
            tuning: "",
            backend: Backend::Auto,
            client_service_lines: "",
        }
    }
}

/// A running server + client pair. Stop it with [`Pair::shutdown`].
#[derive(Debug)]
pub struct Pair {
    /// The relay.
    pub server: Server,
    /// The agent.
    pub client: Client,
}

impl Pair {
    /// Starts both ends and waits until every session is registered on the server, so the
    /// first visitor is tunnelled at once.
    pub async fn start(spec: PairSpec<'_>) -> anyhow::Result<Pair> {
        let transport = if spec.tls { "tls" } else { "tcp" };
        let state = std::env::temp_dir().join(format!(
            "warren-loopback-{}-{}",
            std::process::id(),
            crate::setup::random_u64()
        ));
        let mut server_toml = format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\ntransport = \"{transport}\"\nstate_dir = \"{}\"\n\
             [server.clients.loopback]\ntoken = \"loopback-token\"\n",
            state.display()
        );
        let names = spec.services.iter().map(|(n, _)| n);
        for name in names.chain(spec.host_services.iter().map(|(n, _)| n)) {
            server_toml += &format!("[server.services.{name}]\nbind_addr = \"127.0.0.1:0\"\n");
        }
        server_toml += &format!(
            "[server.tuning]\nshards = {}\nbackend = \"{}\"\n{}\n",
            spec.shards, spec.backend, spec.tuning
        );
        let cfg = parse_config(&server_toml)
            .map_err(|e| anyhow::anyhow!("loopback server config: {e}"))?
            .server
            .context("loopback server config has no [server]")?;
        let server = Server::start(cfg).await?;

        let pin = match server.fingerprint {
            Some(f) => format!("server_fingerprint = \"{f}\"\nserver_name = \"localhost\"\n"),
            None => String::new(),
        };
        let sessions = spec
            .sessions
            .map_or(String::new(), |n| format!("sessions = {n}\n"));
        let mut client_toml = format!(
            "[client]\nserver_addr = \"{}\"\nname = \"loopback\"\ntoken = \"loopback-token\"\n\
             transport = \"{transport}\"\n{pin}{sessions}",
            server.session_addr
        );
        let extra = spec.client_service_lines;
        for (name, addr) in spec.services {
            client_toml += &format!("[client.services.{name}]\nlocal_addr = \"{addr}\"\n{extra}\n");
        }
        for (name, addr) in spec.host_services {
            client_toml += &format!("[client.services.{name}]\nlocal_addr = \"{addr}\"\n{extra}\n");
        }
        client_toml += &format!(
            "[client.tuning]\nshards = {}\nbackend = \"{}\"\n{}\n",
            spec.shards, spec.backend, spec.tuning
        );
        let cfg = parse_config(&client_toml)
            .map_err(|e| anyhow::anyhow!("loopback client config: {e}"))?
            .client
            .context("loopback client config has no [client]")?;
        let client = Client::start(cfg).await?;

        let want = spec.sessions.unwrap_or(spec.shards);
        if !client.wait_connected(want, Duration::from_secs(10)).await {
            bail!("the loopback client did not connect {want} session(s) within 10 s");
        }
        // The client counts a session once handed to its shard; the server registers it a
        // moment later on its own shard.
        if let Some((first, _)) = spec.services.first() {
            if !server
                .wait_service_sessions(first, want, Duration::from_secs(5))
                .await
            {
                bail!("the loopback server did not register {want} session(s) within 5 s");
            }
        }
        Ok(Pair { server, client })
    }

    /// Public address of a service on the server.
    pub fn public(&self, service: &str) -> SocketAddr {
        self.server.service_addrs[service]
    }

    /// Graceful stop of both ends.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
        self.server.shutdown().await;
    }
}
