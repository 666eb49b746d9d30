//! Probes and their answers: who is answered, how fast, and a quiet steady
//! state (a probe lists the peers its sender holds sessions with, and those
//! do not answer it: mDNS's known-answer suppression), so once every node
//! has its sessions a probe costs one datagram however many nodes there are.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::{Discovery, Dropped, MAX_BUCKETS, SessionState, Transmit};
use crate::wire::discovery::{Datagram, MAX_KNOWN, Probe};

impl Discovery {
    pub(super) fn handle_probe(
        &mut self,
        now: Instant,
        src: SocketAddr,
        p: &Probe,
    ) -> Result<(), Dropped> {
        let from = src.ip();
        if let Some(e) = self.peers.get_mut(&p.id) {
            if e.info.instance == p.instance {
                e.last_heard = now;
                e.verified |= e.info.addr.ip() == from;
            }
        } else if self.pairs_with(p.role)
            && let Some(info) = self.admission.probe(p.id, p.instance, from)
        {
            // Its announce came first, beyond the admission rate: now it
            // is heard twice.
            self.admit(now, info, true)?;
        }
        if !self.cfg.role.accepts() {
            return Ok(());
        }
        if self.known_to(p) {
            return Err(Dropped::KnownAnswer);
        }
        let ip = src.ip();
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if src.port() == 0
            || ip.is_unspecified()
            || broadcast
            || ip.is_multicast()
            || self.targets.iter().any(|t| t.broadcast == ip)
        {
            return Err(Dropped::BadSource);
        }
        if !self.take_token(now, ip) {
            return Err(Dropped::RateLimited);
        }
        self.transmits.push_back(Transmit {
            dst: src,
            payload: self.announce_bytes.clone(),
        });
        Ok(())
    }

    fn take_token(&mut self, now: Instant, ip: IpAddr) -> bool {
        let rate = f64::from(self.cfg.replies_per_source_per_sec);
        let burst = 2.0 * rate;
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= MAX_BUCKETS {
            // Forget sources whose bucket has refilled: they are no different
            // from new ones.
            self.buckets
                .retain(|_, b| b.level(now, rate, burst) < burst);
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        self.buckets.entry(ip).or_default().take(now, rate, burst)
    }

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

    /// Announces `metadata` from now on, and at once on every interface
    /// and to every static peer, so that peers see the change without
    /// waiting for a probe.
    pub fn set_metadata(&mut self, metadata: std::collections::BTreeMap<String, String>) {
        self.cfg.metadata = metadata;
        self.announce_bytes = super::announce_of(&self.cfg);
        if !self.cfg.role.accepts() {
            return;
        }
        let mut dsts: Vec<SocketAddr> = self
            .targets
            .iter()
            .filter(|t| t.up)
            .map(|t| t.destination(self.cfg.discovery_port))
            .collect();
        dsts.extend(self.cfg.static_peers.iter().copied());
        for dst in dsts {
            self.transmits.push_back(Transmit {
                dst,
                payload: self.announce_bytes.clone(),
            });
        }
    }
}
