//! What the process's own TCP sockets look like, for tests and diagnostics: the server and the
//! client of an in-process test run in one process, so a test can check what warren set on
//! its sockets (`tuning.loopback_congestion_control`) next to the test's own sockets.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

/// One TCP socket of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocketInfo {
    /// Its local address.
    pub local: SocketAddr,
    /// Its peer, when connected.
    pub peer: Option<SocketAddr>,
    /// Its congestion control (`TCP_CONGESTION`).
    pub congestion: String,
}

/// Every TCP socket open in this process (Linux: `/proc/self/fd`). A socket closed while the
/// list is built is left out.
pub fn tcp_sockets_of_this_process() -> Vec<TcpSocketInfo> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        // SAFETY: the borrow lives only for the getsockopt/getsockname calls below and closes
        // nothing. If another thread closes the fd meanwhile, the calls fail with EBADF and the
        // socket is skipped; if the number is reused at once, they read the new socket's
        // values, which is what a snapshot of the process's sockets may show.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let (Ok(local), Ok(cc)) = (sock.local_addr(), sock.tcp_congestion()) else {
            continue;
        };
        let Some(local) = local.as_socket() else {
            continue;
        };
        let peer = sock.peer_addr().ok().and_then(|p| p.as_socket());
        let congestion = String::from_utf8_lossy(&cc)
            .trim_end_matches('\0')
            .to_string();
        out.push(TcpSocketInfo {
            local,
            peer,
            congestion,
        });
    }
    out
}
