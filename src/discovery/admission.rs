//! What an unknown id must do to enter the peer table, and how fast a node
//! dials: the limits that keep an announce flood (thousands of made-up ids
//! pointing wherever the sender likes) from filling the table, locking real
//! peers out, and turning the node into a connection cannon.
//!
//! - A new id enters the table at once while few new ids arrive (a token
//!   bucket of [`ADMIT_PER_SEC`]): normal networks see no delay.
//! - Beyond that rate a new id is only remembered as a *candidate*, and
//!   enters once heard again from the same address with the same instance
//!   (a second announce, or the probe every starting node sends with its
//!   announce). A flood of one-shot ids never enters; a real node does, at
//!   its next datagram.
//! - Dials start at most `dials_per_sec` a second (a token bucket), entries
//!   heard twice first.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::peer::{PeerId, PeerInfo, PeerMap};

/// New ids admitted at their first datagram, per second (and burst).
pub(crate) const ADMIT_PER_SEC: u32 = 20;

/// A token bucket: `rate` tokens a second, at most `burst` kept; full
/// until first used.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TokenBucket {
    tokens: f64,
    /// When `tokens` was counted (`None`: never used, full).
    at: Option<Instant>,
}

impl TokenBucket {
    /// The tokens there would be at `now`.
    pub(crate) fn level(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        match self.at {
            None => burst,
            Some(at) => {
                (self.tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(burst)
            }
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens = self.level(now, rate, burst);
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is there: `None` if one is there now (or the
    /// bucket was never used).
    pub(crate) fn ready_at(&self, rate: f64) -> Option<Instant> {
        let missing = 1.0 - self.tokens;
        match self.at {
            Some(at) if missing > 0.0 && rate > 0.0 => {
                Some(at + Duration::from_secs_f64(missing / rate))
            }
            _ => None,
        }
    }
}

/// An id heard once, beyond the admission rate.
#[derive(Debug)]
struct Candidate {
    info: PeerInfo,
    heard: Instant,
}

/// The admission of new ids and the rate of dials.
#[derive(Debug)]
pub(crate) struct Admission {
    admit: TokenBucket,
    dial: TokenBucket,
    dials_per_sec: f64,
    candidates: PeerMap<Candidate>,
    /// Candidates kept at most (the oldest goes).
    cap: usize,
}

impl Admission {
    pub(crate) fn new(dials_per_sec: u32, cap: usize) -> Self {
        Admission {
            admit: TokenBucket::default(),
            dial: TokenBucket::default(),
            dials_per_sec: f64::from(dials_per_sec),
            candidates: PeerMap::default(),
            cap,
        }
    }

    /// The announce of an id the table does not hold. Returns the peer and
    /// whether it was heard twice when it may enter the table now; `None`
    /// when it is only remembered.
    pub(crate) fn announce(&mut self, now: Instant, info: PeerInfo) -> Option<(PeerInfo, bool)> {
        if let Some(c) = self.candidates.remove(&info.id)
            && same_source(&c.info, info.instance, info.addr.ip())
        {
            return Some((info, true));
        }
        let rate = f64::from(ADMIT_PER_SEC);
        if self.admit.take(now, rate, rate) {
            return Some((info, false));
        }
        self.remember(now, info);
        None
    }

    /// The probe of an id the table does not hold: a candidate heard by
    /// announce from the same address, with the same instance, enters.
    pub(crate) fn probe(&mut self, id: PeerId, instance: u64, ip: IpAddr) -> Option<PeerInfo> {
        let c = self.candidates.get(&id)?;
        if !same_source(&c.info, instance, ip) {
            return None;
        }
        self.candidates.remove(&id).map(|c| c.info)
    }

    /// Keeps `info` as a candidate. When full, the oldest candidate of the
    /// source address that holds the most goes: a flood from one address
    /// pushes out its own candidates, not a real node's from another.
    fn remember(&mut self, now: Instant, info: PeerInfo) {
        if self.candidates.len() >= self.cap
            && !self.candidates.contains_key(&info.id)
            && let Some(victim) = self.victim()
        {
            self.candidates.remove(&victim);
        }
        self.candidates
            .insert(info.id, Candidate { info, heard: now });
    }

    /// The candidate to forget: the oldest of the busiest source.
    fn victim(&self) -> Option<PeerId> {
        let mut per_source: std::collections::HashMap<IpAddr, usize> = Default::default();
        for c in self.candidates.values() {
            *per_source.entry(c.info.addr.ip()).or_default() += 1;
        }
        let busiest = per_source.into_iter().max_by_key(|&(_, n)| n)?.0;
        self.candidates
            .iter()
            .filter(|(_, c)| c.info.addr.ip() == busiest)
            .min_by_key(|(_, c)| c.heard)
            .map(|(id, _)| *id)
    }

    /// Takes the right to start one dial now.
    pub(crate) fn take_dial(&mut self, now: Instant) -> bool {
        let rate = self.dials_per_sec;
        self.dial.take(now, rate, rate)
    }

    /// When the next dial may start: `None` if one may now.
    pub(crate) fn next_dial(&self) -> Option<Instant> {
        self.dial.ready_at(self.dials_per_sec)
    }

    /// Candidates held (for tests).
    #[cfg(test)]
    pub(crate) fn candidates(&self) -> usize {
        self.candidates.len()
    }
}

fn same_source(c: &PeerInfo, instance: u64, ip: IpAddr) -> bool {
    c.instance == instance && c.addr.ip() == ip
}
