//! `warren demo`: a server, a client and a small HTTP service in one process, on loopback,
//! with embedded default config (TLS with a pinned self-signed certificate, the default). It
//! fetches one page through the tunnel to prove the path works, prints the public address, and
//! runs until Ctrl-C.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use crate::client::Client;
use crate::config::parse_config;
use crate::server::Server;
use crate::setup::random_bytes;

/// The embedded server half; `{...}` fields are filled in at start.
const SERVER_TOML: &str = r#"
[server]
bind_addr = "127.0.0.1:0"
state_dir = "{state_dir}"
[server.clients.demo]
token = "{token}"
[server.services.web]
bind_addr = "{public_addr}"
"#;

/// The embedded client half.
const CLIENT_TOML: &str = r#"
[client]
server_addr = "{server_addr}"
name = "demo"
token = "{token}"
server_fingerprint = "{fingerprint}"
server_name = "localhost"
[client.services.web]
local_addr = "{service_addr}"
"#;

/// What the demo started, for callers that want to drive it (tests).
#[derive(Debug)]
pub struct Demo {
    /// The tunnel server.
    pub server: Server,
    /// The tunnel client.
    pub client: Client,
    /// Where visitors reach the demo web service through the tunnel.
    pub public_addr: SocketAddr,
    /// The web service's own (direct) address.
    pub service_addr: SocketAddr,
}

/// Starts everything and proves the path with one request. `public_addr` is where the
/// tunnel's public port binds (port 0 picks a free one).
pub async fn start(public_addr: SocketAddr) -> anyhow::Result<Demo> {
    let service = TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service.local_addr()?;
    tokio::spawn(serve_http(service));

    let token: String = random_bytes::<16>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let state_dir = std::env::temp_dir().join(format!("warren-demo-{}", std::process::id()));
    let server_toml = SERVER_TOML
        .replace(
            "{state_dir}",
            &state_dir.display().to_string().replace('\\', "/"),
        )
        .replace("{token}", &token)
        .replace("{public_addr}", &public_addr.to_string());
    let server_cfg = parse_config(&server_toml)
        .map_err(|e| anyhow::anyhow!("embedded server config: {e}"))?
        .server
        .context("embedded server config has no [server]")?;
    let server = Server::start(server_cfg).await?;
    let fingerprint = server
        .fingerprint
        .context("demo server runs TLS and must have a fingerprint")?;

    let client_toml = CLIENT_TOML
        .replace("{server_addr}", &server.session_addr.to_string())
        .replace("{token}", &token)
        .replace("{fingerprint}", &fingerprint.to_string())
        .replace("{service_addr}", &service_addr.to_string());
    let client_cfg = parse_config(&client_toml)
        .map_err(|e| anyhow::anyhow!("embedded client config: {e}"))?
        .client
        .context("embedded client config has no [client]")?;
    let client = Client::start(client_cfg).await?;
    if !client.wait_connected(1, Duration::from_secs(10)).await {
        bail!("the demo client did not connect to the demo server within 10 s");
    }
    // The visitor may land on any server shard; a shard without a session hands it to one that
    // has one, so one registered session is enough to serve the first fetch.
    if !server
        .wait_service_sessions("web", 1, Duration::from_secs(5))
        .await
    {
        bail!("the demo server did not register the client's session within 5 s");
    }
    let public_addr = *server
        .service_addrs
        .get("web")
        .context("demo service has no public address")?;
    Ok(Demo {
        server,
        client,
        public_addr,
        service_addr,
    })
}

/// `warren demo`: start, fetch, print, wait for Ctrl-C, drain.
pub async fn run() -> anyhow::Result<()> {
    // Prefer a memorable port; fall back to any free one.
    let preferred: SocketAddr = "127.0.0.1:8080".parse()?;
    let demo = match start(preferred).await {
        Ok(d) => d,
        Err(e) if format!("{e:#}").contains("cannot listen") => {
            info!("127.0.0.1:8080 is taken; using a free port");
            start("127.0.0.1:0".parse()?).await?
        }
        Err(e) => return Err(e),
    };
    #[allow(clippy::disallowed_methods)] // wall time for the printout, not protocol logic
    let t0 = Instant::now();
    let page = fetch(demo.public_addr, "/").await?;
    let took = t0.elapsed();
    let status = page.lines().next().unwrap_or("").to_string();
    let body = page
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    let fingerprint = demo
        .server
        .fingerprint
        .as_ref()
        .map_or_else(String::new, |f| f.to_string());
    let out = format!(
        "warren demo is running ({backend} backend, TLS session, pinned certificate {fingerprint})\n\
         \n  fetched http://{public}/ through the tunnel in {ms:.1} ms: {status}\n  body: {body}\n\
         \n  try it:  curl http://{public}/\n\
         \n  visitor -> {public} (server public port) -> session {session} -> client -> {service} (demo web service)\n\
         \nPress Ctrl-C to stop.",
        public = demo.public_addr,
        session = demo.server.session_addr,
        service = demo.service_addr,
        backend = demo.server.backend(),
        ms = took.as_secs_f64() * 1000.0,
    );
    #[allow(clippy::print_stdout)]
    {
        println!("{out}");
    }
    crate::signals::wait_for_shutdown().await;
    info!("stopping: draining client and server");
    demo.client.shutdown().await;
    demo.server.shutdown().await;
    Ok(())
}

/// One HTTP/1.1 GET with `Connection: close`; returns the whole response as text.
pub async fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp))
        .await
        .context("no complete response within 10 s")??;
    let text = String::from_utf8_lossy(&resp).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        bail!("unexpected response through the tunnel: {text:?}");
    }
    Ok(text)
}

/// A tiny HTTP/1.1 service: answers every request with a short page and closes.
async fn serve_http(listener: TcpListener) {
    let mut served: u64 = 0;
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            continue;
        };
        served += 1;
        let n = served;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut got = 0;
            // Read until the end of the request head (bounded).
            while got < buf.len() {
                match s.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body =
                format!("Hello from the warren demo service! Request #{n}, arrived via {peer}.\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
