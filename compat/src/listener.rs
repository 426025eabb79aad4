//! Public listeners, one per shard where the OS load-balances `SO_REUSEPORT` (Linux).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Accept backlog for public and session listeners.
pub const BACKLOG: i32 = 4096;

/// Binds `count` listeners on `addr` that share the port, so each shard accepts its own
/// visitors without a handoff. When `addr` has port 0 the first bind picks the port and the
/// others reuse it. Off Linux the kernel does not balance `SO_REUSEPORT` accepts, so a single
/// listener is returned and the caller places it on one shard.
pub fn reuseport_listeners(
    addr: SocketAddr,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let count = if cfg!(target_os = "linux") {
        count.max(1)
    } else {
        1
    };
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
        sock.set_reuse_port(true)?;
        sock.set_nonblocking(true)?;
        // Accepted connections inherit TCP_NODELAY from the listener on Linux (the io_uring
        // data plane relies on that to skip a setsockopt per visitor).
        sock.set_nodelay(true)?;
        sock.bind(&bound.into())
            .map_err(|e| io::Error::new(e.kind(), format!("binding {bound}: {e}")))?;
        sock.listen(BACKLOG)?;
        if bound.port() == 0 {
            bound = sock
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listener has no IP address"))?;
        }
        out.push(sock.into());
    }
    Ok(out)
}
