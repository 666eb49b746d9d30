//! Peers by address: the static peers of the configuration get every
//! probe (and the first announce) by unicast, so they are found with no
//! broadcast at all and across routers; datagrams from them are taken
//! whatever subnet they come from.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Discovery, Transmit};

/// The interface name given to peers heard off every selected subnet.
pub(super) const ROUTED: &str = "routed";

impl Discovery {
    /// Where datagrams from `src` are taken as coming from: the selected
    /// interface whose subnet holds it, else [`ROUTED`] for a static peer,
    /// or for a probe when the node is not confined to its interfaces (so
    /// that one side naming the other is enough).
    pub(super) fn source_interface(&self, src: SocketAddr, is_probe: bool) -> Option<String> {
        if let Some(t) = self.targets.iter().find(|t| t.contains(src)) {
            return Some(t.interface.clone());
        }
        let named = self.cfg.static_peers.iter().any(|p| p.ip() == src.ip());
        (named || (is_probe && self.cfg.accept_routed_probes)).then(|| ROUTED.to_owned())
    }

    /// Whether `addr` (a peer's session address) is a static peer's.
    pub(super) fn is_static(&self, addr: std::net::SocketAddr) -> bool {
        self.cfg.static_peers.iter().any(|p| p.ip() == addr.ip())
    }

    /// Our announce (with `announce`, if we accept sessions) and probe (if
    /// we dial) to `dst`.
    pub(super) fn introduce(&mut self, dst: SocketAddr, announce: bool) {
        if announce && self.cfg.role.accepts() {
            self.transmits.push_back(Transmit {
                dst,
                payload: self.announce_bytes.clone(),
            });
        }
        if self.cfg.role.dials() {
            self.transmits.push_back(Transmit {
                dst,
                payload: self.probe(),
            });
        }
    }

    /// Probes (and, the first time, announces) to every static peer.
    pub(super) fn send_to_static_peers(&mut self, announce: bool) {
        for dst in self.cfg.static_peers.clone() {
            self.introduce(dst, announce);
        }
    }

    /// At the first interface list: the static peers hear from us at once,
    /// and probing starts even if no interface can broadcast.
    pub(super) fn start_static_peers(&mut self, now: Instant) {
        if self.statics_started || self.cfg.static_peers.is_empty() {
            return;
        }
        self.statics_started = true;
        self.send_to_static_peers(true);
        if self.cfg.role.dials() && self.next_probe.is_none() {
            self.next_probe = Some(now + self.jitter(self.cfg.probe_initial));
            self.probe_interval = (self.cfg.probe_initial * 2).min(self.cfg.probe_max_missing);
        }
    }
}
