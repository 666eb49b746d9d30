//! A quiet steady state: a probe lists the peers its sender holds sessions
//! with, and those do not answer it (mDNS's known-answer suppression), so
//! once every node has its sessions, a probe costs one datagram however
//! many nodes there are.

use super::{Discovery, SessionState};
use crate::wire::discovery::{Datagram, MAX_KNOWN, Probe};

impl Discovery {
    /// Our probe, listing (up to [`MAX_KNOWN`] of) the peers we hold a
    /// session with.
    pub(super) fn probe(&self) -> Vec<u8> {
        let mut known: Vec<_> = self
            .peers
            .values()
            .filter(|e| e.session == SessionState::Connected)
            .map(|e| e.info.id)
            .collect();
        known.sort();
        known.truncate(MAX_KNOWN);
        Datagram::Probe(Probe {
            service: self.cfg.service.clone(),
            id: self.cfg.id,
            instance: self.cfg.instance,
            role: self.cfg.role,
            known,
        })
        .encode_as(self.cfg.limits.protocol)
    }

    /// Whether the prober lists us and we hold a session with that very
    /// instance of it: it knows us, no answer is needed.
    pub(super) fn known_to(&self, p: &Probe) -> bool {
        p.known.contains(&self.cfg.id)
            && self.peers.get(&p.id).is_some_and(|e| {
                e.session == SessionState::Connected && e.info.instance == p.instance
            })
    }
}
