//! A minimal HTTP/1.1 server for `oha`/`wrk`: GET and HEAD of three fixed routes, Content-Length
//! bodies, keep-alive (HTTP/1.1 by default, HTTP/1.0 on request). Requests on one connection are
//! answered in order, so pipelining works too. Request bodies with Content-Length are read and
//! discarded; chunked request bodies are refused.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pattern;

/// Largest request head (request line + headers) accepted.
const HEAD_MAX_BYTES: usize = 16 * 1024;

/// Largest request body read and discarded.
const BODY_MAX_BYTES: u64 = 1 << 20;

/// Body of `/large`.
pub const LARGE_BODY_BYTES: usize = 256 * 1024;

/// Every response this server sends, built once: `[keep_alive as usize]`.
#[derive(Debug)]
pub(crate) struct Responses {
    small: [Vec<u8>; 2],
    large: [Vec<u8>; 2],
    health: [Vec<u8>; 2],
    not_found: [Vec<u8>; 2],
}

impl Responses {
    pub(crate) fn new() -> Self {
        let mut large = vec![0u8; LARGE_BODY_BYTES];
        pattern::fill(0, &mut large);
        let both = |status: &str, body: &[u8]| {
            [false, true].map(|keep_alive| response(status, body, keep_alive))
        };
        Responses {
            small: both("200 OK", b"hi"),
            large: both("200 OK", &large),
            health: both("200 OK", b"ok"),
            not_found: both("404 Not Found", b"not found"),
        }
    }
}

fn response(status: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Head<'a> {
    method: &'a str,
    path: &'a str,
    keep_alive: bool,
    body_bytes: u64,
    chunked: bool,
}

/// Parses a request head (without the final blank line); `None` when it is not HTTP/1.x.
fn parse_head(head: &[u8]) -> Option<Head<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return None,
    };
    let mut keep_alive = http11;
    let mut body_bytes = 0;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body_bytes = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(Head {
        method,
        path,
        keep_alive,
        body_bytes,
        chunked,
    })
}

/// Serves one HTTP connection until the client closes or asks to close.
pub(crate) async fn serve(mut stream: TcpStream, responses: &Responses) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Read until a complete head is buffered.
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            if buf.len() > HEAD_MAX_BYTES {
                let reply = response("431 Request Header Fields Too Large", b"", false);
                return stream.write_all(&reply).await;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let Some(head) = parse_head(&buf[..head_end]) else {
            let reply = response("400 Bad Request", b"", false);
            return stream.write_all(&reply).await;
        };
        if head.chunked || head.body_bytes > BODY_MAX_BYTES {
            let reply = response("413 Content Too Large", b"", false);
            return stream.write_all(&reply).await;
        }
        let get = head.method == "GET";
        if !get && head.method != "HEAD" {
            let reply = response("405 Method Not Allowed", b"", false);
            return stream.write_all(&reply).await;
        }
        let keep_alive = head.keep_alive;
        let table = match head.path {
            "/small" => &responses.small,
            "/large" => &responses.large,
            "/health" => &responses.health,
            _ => &responses.not_found,
        };
        let full = &table[usize::from(keep_alive)];
        // Consume the head and discard the body.
        let mut skip = (head_end + 4) as u64 + head.body_bytes;
        let take = skip.min(buf.len() as u64) as usize;
        buf.drain(..take);
        skip -= take as u64;
        while skip > 0 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            let used = (n as u64).min(skip) as usize;
            buf.extend_from_slice(&chunk[used..n]);
            skip -= used as u64;
        }
        if get {
            stream.write_all(full).await?;
        } else {
            let head_len = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
            stream.write_all(&full[..head_len]).await?;
        }
        if !keep_alive {
            return stream.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        let h = parse_head(b"GET /small HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!((h.method, h.path, h.keep_alive), ("GET", "/small", true));
        assert!(
            !parse_head(b"GET / HTTP/1.1\r\nConnection: close")
                .unwrap()
                .keep_alive
        );
        assert!(!parse_head(b"GET / HTTP/1.0").unwrap().keep_alive);
        assert!(
            parse_head(b"GET / HTTP/1.0\r\nconnection: Keep-Alive")
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn query_strings_are_ignored_and_bad_heads_rejected() {
        assert_eq!(
            parse_head(b"GET /large?x=1 HTTP/1.1").unwrap().path,
            "/large"
        );
        assert_eq!(
            parse_head(b"POST /small HTTP/1.1\r\nContent-Length: 5")
                .unwrap()
                .body_bytes,
            5
        );
        assert!(parse_head(b"GET /small HTTP/2").is_none());
        assert!(parse_head(b"GET /small HTTP/1.1\r\nno-colon").is_none());
        assert!(parse_head(b"\xff\xfe").is_none());
    }

    #[test]
    fn responses_carry_content_length() {
        let r = Responses::new();
        let text = String::from_utf8_lossy(&r.large[1][..200]).into_owned();
        assert!(text.contains("Content-Length: 262144\r\n"), "{text}");
        assert!(text.contains("Connection: keep-alive\r\n"), "{text}");
        assert!(r.small[0].ends_with(b"\r\n\r\nhi"));
    }
}
