//! The start-up probe: setup flags, opcodes, buffer rings, a socketpair smoke test.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{opcode, types, IoUring, Probe as OpProbe};

use super::bufring::BufRing;
use super::build_ring;
use super::sys;
use crate::probe::{Probe, SetupFlags, Unavailable};

pub(crate) fn run() -> Result<Probe, Unavailable> {
    let kernel = sys::kernel_release();
    let memlock = sys::memlock_limit();
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    let mut last = None;
    let mut chosen = None;
    for flags in [
        SetupFlags::DeferTaskrun,
        SetupFlags::CoopTaskrun,
        SetupFlags::Plain,
    ] {
        match build_ring(flags, 64) {
            Ok(r) => {
                chosen = Some((flags, r));
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    let (setup, mut ring) = match chosen {
        Some(x) => x,
        None => {
            let e = last.unwrap_or_else(|| io::Error::other("no setup attempted"));
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => match disabled {
                    Some(v) if v > 0 => Unavailable::DisabledBySysctl(v),
                    _ => Unavailable::Seccomp,
                },
                Some(libc::ENOSYS) => Unavailable::NotBuiltIn,
                Some(libc::ENOMEM) => Unavailable::Memlock(memlock),
                Some(libc::EINVAL) => Unavailable::KernelTooOld(
                    "io_uring_setup rejects every flag set".into(),
                    kernel.clone(),
                ),
                _ => Unavailable::Setup(e.to_string()),
            });
        }
    };
    let mut ops = OpProbe::new();
    if let Err(e) = ring.submitter().register_probe(&mut ops) {
        return Err(Unavailable::KernelTooOld(
            format!("IORING_REGISTER_PROBE failed ({e})"),
            kernel,
        ));
    }
    let needed: [(&str, u8); 11] = [
        ("RECV", opcode::Recv::CODE),
        ("SEND", opcode::Send::CODE),
        ("POLL_ADD", opcode::PollAdd::CODE),
        ("ACCEPT", opcode::Accept::CODE),
        ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
        ("CONNECT", opcode::Connect::CODE),
        ("LINK_TIMEOUT", opcode::LinkTimeout::CODE),
        ("READ", opcode::Read::CODE),
        ("SENDMSG", opcode::SendMsg::CODE),
        ("MSG_RING", opcode::MsgRingData::CODE),
        ("CLOSE", opcode::Close::CODE),
    ];
    for (name, code) in needed {
        if !ops.is_supported(code) {
            return Err(Unavailable::KernelTooOld(
                format!("opcode {name} is not supported"),
                kernel,
            ));
        }
    }
    if !ring.params().is_feature_fast_poll() {
        return Err(Unavailable::KernelTooOld(
            "IORING_FEAT_FAST_POLL is missing".into(),
            kernel,
        ));
    }
    let send_zc = ops.is_supported(opcode::SendZc::CODE);
    // Provided-buffer rings (5.19+); multishot receive needs them.
    let bufs = match BufRing::new(&ring.submitter(), 0, 8, 4096) {
        Ok(b) => b,
        Err(e) => {
            return Err(Unavailable::KernelTooOld(
                format!("provided-buffer rings are refused ({e})"),
                kernel,
            ))
        }
    };
    smoke(&mut ring).map_err(|e| Unavailable::SmokeTest(e.to_string()))?;
    bufs.unregister(&ring.submitter());
    Ok(Probe {
        kernel,
        setup,
        memlock_bytes: memlock,
        send_zc,
        ktls: ktls_probe(),
    })
}

/// A send on one end of a socketpair and a multishot receive on the other, through the ring,
/// within a second.
fn smoke(ring: &mut IoUring) -> io::Result<()> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    let msg = b"warren-probe";
    let send = opcode::Send::new(types::Fd(a.as_raw_fd()), msg.as_ptr(), msg.len() as u32)
        .build()
        .user_data(1);
    let recv = opcode::RecvMulti::new(types::Fd(b.as_raw_fd()), 0)
        .build()
        .user_data(2);
    // SAFETY: `msg` is a static byte string and the fds outlive the ring operations: we wait
    // for both completions below, and the cancel path drains before returning.
    unsafe {
        ring.submission()
            .push(&send)
            .map_err(|_| io::Error::other("submission queue full"))?;
        ring.submission()
            .push(&recv)
            .map_err(|_| io::Error::other("submission queue full"))?;
    }
    let (mut sent, mut got) = (false, false);
    let deadline = super::clock::now() + Duration::from_secs(1);
    while !(sent && got) {
        if super::clock::now() >= deadline {
            return Err(io::Error::other(
                "no completion within 1 s (io_uring_enter may be filtered)",
            ));
        }
        let ts = types::Timespec::from(Duration::from_millis(100));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            match cqe.user_data() {
                1 if cqe.result() == msg.len() as i32 => sent = true,
                1 => return Err(io::Error::other(format!("send returned {}", cqe.result()))),
                2 if cqe.result() == msg.len() as i32 => got = true,
                2 => {
                    return Err(io::Error::other(format!(
                        "multishot receive returned {}",
                        cqe.result()
                    )))
                }
                _ => {}
            }
        }
    }
    // Stop the multishot receive before the socket and the buffer ring go away, and wait for
    // its last completion: the kernel may not touch either after we return.
    let cancel = opcode::AsyncCancel::new(2).build().user_data(3);
    // SAFETY: a cancel references no memory.
    unsafe {
        ring.submission()
            .push(&cancel)
            .map_err(|_| io::Error::other("submission queue full"))?;
    }
    let deadline = super::clock::now() + Duration::from_secs(1);
    loop {
        if super::clock::now() >= deadline {
            return Err(io::Error::other(
                "the probe's multishot receive did not end after a cancel",
            ));
        }
        let ts = types::Timespec::from(Duration::from_millis(100));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        let ended = ring
            .completion()
            .any(|c| c.user_data() == 2 && !io_uring::cqueue::more(c.flags()));
        if ended {
            break;
        }
    }
    Ok(())
}

/// Whether the kernel offers TLS offload (`setsockopt(TCP_ULP, "tls")` on a connected loopback
/// socket). `Err` names why not (ENOENT: the kernel has no `CONFIG_TLS`).
fn ktls_probe() -> Result<(), String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let c = std::net::TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let _accepted = l.accept().map_err(|e| e.to_string())?;
    let name = b"tls\0";
    // SAFETY: setsockopt with a valid fd, level, option and a NUL-terminated name.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            (name.len() - 1) as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!("TCP_ULP \"tls\": {}", io::Error::last_os_error()))
    }
}
