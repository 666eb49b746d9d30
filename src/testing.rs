//! Fixtures shared by the unit tests and the fuzz drivers: one handshake
//! and one session configuration, instead of a copy in every module.
//! Compiled only for tests and fuzz builds.

use std::time::Duration;

use crate::peer::{PeerId, Role};
use crate::session::machine::SessionConfig;
use crate::wire::frame::Hello;

/// The handshake of node `id` (instance `id * 100`, name `n{id}`, port
/// `1000 + id`, service `svc`) with the given heartbeat settings.
pub(crate) fn hello(id: u64, interval_ms: u64, timeout_ms: u64) -> Hello {
    Hello {
        protocol: crate::wire::PROTOCOL_VERSION,
        service: "svc".into(),
        id: PeerId::from_u64(id),
        instance: id * 100,
        name: format!("n{id}"),
        role: Role::Peer,
        port: 1000 + id as u16,
        heartbeat_interval_ms: interval_ms,
        heartbeat_timeout_ms: timeout_ms,
        max_frame_size: 1 << 20,
        datagram_port: 0,
        grace_ms: 0,
        resume: 0,
        received: 0,
    }
}

/// Session settings of node `id` with the given heartbeat (a handshake of
/// 500 ms, four messages in flight, the write timeout ten heartbeat
/// timeouts).
pub(crate) fn session_config_of(id: u64, interval_ms: u64, timeout_ms: u64) -> SessionConfig {
    SessionConfig {
        hello: hello(id, interval_ms, timeout_ms),
        heartbeat_interval: Duration::from_millis(interval_ms),
        heartbeat_timeout: Duration::from_millis(timeout_ms),
        handshake_timeout: Duration::from_millis(500),
        max_unacked: 4,
        max_unacked_bytes: 1 << 20,
        write_timeout: Duration::from_millis(timeout_ms * 10),
        stall_timeout: Duration::from_millis(timeout_ms * 10),
        resume_grace: Duration::ZERO,
    }
}

/// Session settings of node 1 with the default heartbeat (1 s / 3 s).
#[cfg(test)]
pub(crate) fn session_config() -> SessionConfig {
    session_config_of(1, 1000, 3000)
}
