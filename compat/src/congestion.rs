//! Congestion control for connections whose peer is on this host.
//!
//! Why: a loopback connection has no bottleneck link, so pacing its sends only costs CPU. BBR
//! (a common system default, `net.ipv4.tcp_congestion_control = bbr`) paces every send; with no
//! `fq` qdisc on `lo` (the default is `noqueue`) the kernel paces internally, one hrtimer per
//! socket, and each paced skb goes out later from a timer softirq. On the AMD perf host, with
//! the load generator not pacing, BBR on warren's own loopback sockets more than doubled its
//! CPU per GB on bulk traffic (`perf/results/2026-12-07-loopback-cc/`). So
//! warren gives the sockets it owns whose peer is a loopback address (a service on the client's
//! host, a session or visitor from the same host) the algorithm of
//! `tuning.loopback_congestion_control` (default `cubic`, which does not pace), and leaves every
//! other socket with the system default: sessions and visitors that cross a network keep BBR.
//!
//! Linux only (`TCP_CONGESTION`); elsewhere [`LoopbackCc::apply`] does nothing.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

/// Longest algorithm name the kernel takes (`TCP_CA_NAME_MAX` is 16 with the NUL).
pub const MAX_NAME: usize = 15;

/// The congestion control given to loopback connections, or none (keep the system default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopbackCc(Option<Arc<str>>);

impl LoopbackCc {
    /// Keep the system default on every socket.
    pub fn off() -> LoopbackCc {
        LoopbackCc(None)
    }

    /// Checks `name` (what the config says) against this kernel on a throwaway socket, so a
    /// missing or forbidden algorithm is named once at start instead of failing per socket.
    /// An empty name turns it off. Errors say what is wrong and how to see what is allowed.
    pub fn checked(name: &str) -> Result<LoopbackCc, String> {
        if name.is_empty() {
            return Ok(LoopbackCc(None));
        }
        if let Some(why) = invalid_name(name) {
            return Err(why);
        }
        #[cfg(target_os = "linux")]
        {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .map_err(|e| format!("cannot create a socket to check it: {e}"))?;
            probe.set_tcp_congestion(name.as_bytes()).map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        " (not in net.ipv4.tcp_available_congestion_control; \
                         a module may need loading)"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        " (not in net.ipv4.tcp_allowed_congestion_control, and the process \
                         lacks CAP_NET_ADMIN)"
                    }
                    _ => "",
                };
                format!("the kernel refuses {name:?}: {e}{hint}")
            })?;
        }
        Ok(LoopbackCc(Some(Arc::from(name))))
    }

    /// The algorithm name, if one is set.
    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Gives `sock` the configured algorithm when `peer` is a loopback address. Returns whether
    /// it did. A refusal (which [`LoopbackCc::checked`] makes unlikely) keeps the system
    /// default: the connection works either way.
    pub fn apply<S: AsFd>(&self, sock: &S, peer: SocketAddr) -> bool {
        let Some(name) = self.0.as_deref() else {
            return false;
        };
        // A dual-stack listener reports an IPv4 peer as `::ffff:127.0.0.1`.
        if !peer.ip().to_canonical().is_loopback() {
            return false;
        }
        set(sock, name)
    }
}

#[cfg(target_os = "linux")]
fn set<S: AsFd>(sock: &S, name: &str) -> bool {
    socket2::SockRef::from(sock)
        .set_tcp_congestion(name.as_bytes())
        .is_ok()
}

#[cfg(not(target_os = "linux"))]
fn set<S: AsFd>(_sock: &S, _name: &str) -> bool {
    false
}

/// Why `name` cannot be an algorithm name, if it cannot.
pub fn invalid_name(name: &str) -> Option<String> {
    if name.len() > MAX_NAME {
        return Some(format!(
            "{name:?} is {} bytes long (at most {MAX_NAME})",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Some(format!(
            "{name:?} is not an algorithm name (lowercase letters, digits, '_' and '-')"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(invalid_name("cubic").is_none());
        assert!(invalid_name("bbr").is_none());
        assert!(invalid_name("a_very_long_name_x")
            .unwrap()
            .contains("at most 15"));
        assert!(invalid_name("Cubic")
            .unwrap()
            .contains("not an algorithm name"));
        assert!(invalid_name("cu bic").is_some());
        assert_eq!(LoopbackCc::checked("").unwrap(), LoopbackCc::off());
        assert!(LoopbackCc::checked("no such thing").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_algorithm_the_kernel_lacks_is_named_with_where_to_look() {
        let e = LoopbackCc::checked("nosuchcc").unwrap_err();
        assert!(e.contains("\"nosuchcc\""), "{e}");
        assert!(e.contains("tcp_available_congestion_control"), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_sockets_get_the_algorithm_and_others_keep_the_default() {
        let default = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .unwrap()
            .trim()
            .to_string();
        // reno is built into every Linux kernel and always allowed; if it is the default, cubic
        // (so "kept the default" and "got the algorithm" differ).
        let want = if default == "reno" { "cubic" } else { "reno" };
        let cc = LoopbackCc::checked(want).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let algo = |s: &std::net::TcpStream| {
            String::from_utf8(socket2::SockRef::from(s).tcp_congestion().unwrap())
                .unwrap()
                .trim_end_matches('\0')
                .to_string()
        };
        assert!(cc.apply(&s, s.peer_addr().unwrap()));
        assert_eq!(algo(&s), want);
        // An IPv4 peer as a dual-stack listener reports it counts as loopback too.
        let m = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(cc.apply(&m, "[::ffff:127.0.0.1]:80".parse().unwrap()));
        assert_eq!(algo(&m), want);
        // A peer that is not a loopback address keeps the system default.
        let t = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(!cc.apply(&t, "192.0.2.1:80".parse().unwrap()));
        assert_eq!(algo(&t), default);
        // Off: nothing is set.
        assert!(!LoopbackCc::off().apply(&t, t.peer_addr().unwrap()));
        assert_eq!(algo(&t), default);
        // A loopback listener's setting is inherited by what it accepts.
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(cc.apply(&l2, l2.local_addr().unwrap()));
        let _c = std::net::TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (a, _) = l2.accept().unwrap();
        assert_eq!(algo(&a), want);
    }
}
