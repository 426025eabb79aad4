//! Pieces the server and the client share: turning tuning into protocol parameters, running a
//! handshake over a [`SessionIo`], randomness, shard counts.

use std::time::Duration;

use bytes::BytesMut;
use warren_compat::transport::{ReadOutcome, SessionIo};
use warren_proto::handshake::PeerParams;
use warren_proto::session::{Role, SessionConfig};

use crate::config::Tuning;

/// What this end advertises it will receive, from its tuning section.
pub fn local_params(t: &Tuning) -> PeerParams {
    PeerParams {
        max_frame_payload: t.max_frame_payload_bytes,
        initial_stream_window: t.initial_stream_window_bytes,
        session_window: t.session_window_bytes,
        max_streams: t.max_streams_per_session,
    }
}

/// The protocol core's configuration once both sides' parameters are known.
pub fn session_config(
    role: Role,
    t: &Tuning,
    peer: PeerParams,
    keepalive_interval_ms: u64,
    idle_timeout_ms: u64,
) -> SessionConfig {
    SessionConfig {
        role,
        local: local_params(t),
        peer,
        max_stream_window: t.max_stream_window_bytes,
        // The io_uring driver lowers it to its splice pipe's capacity on plain-TCP sessions.
        smoothed_rtt_window: t.max_stream_window_bytes,
        quantum: t.quantum_bytes,
        // Two reads' worth: one being framed while the next is read.
        stream_send_buffer: t.read_buffer_bytes.saturating_mul(2),
        keepalive_interval: Duration::from_millis(keepalive_interval_ms),
        idle_timeout: Duration::from_millis(idle_timeout_ms),
    }
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> usize {
    core_count()
}

fn core_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom only fails on exotic platforms without an entropy source; a tunnel cannot run
    // safely there, so stopping is right.
    getrandom::getrandom(&mut b).expect("the OS random number generator is unavailable");
    b
}

/// A random u64.
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

/// Sends whatever the handshake queued, then reads more input. Errors name the step.
pub async fn exchange(
    io: &mut SessionIo,
    out: &[u8],
    input: &mut BytesMut,
    need_more: bool,
) -> std::io::Result<()> {
    if !out.is_empty() {
        io.queue(out)?;
        io.flush_all().await?;
    }
    if need_more && io.read_some(input).await? == ReadOutcome::Eof {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the peer closed the connection during the warren handshake",
        ));
    }
    Ok(())
}
