//! The sans-IO discovery machine: probe schedule (backoff with jitter), the
//! peer table, dial decisions, expiry, and reply rate limits.
//!
//! It owns no socket and never reads the clock. The driver feeds it
//! [`Discovery::set_targets`] (the usable interfaces, after each scan),
//! [`Discovery::handle_datagram`], [`Discovery::handle_timeout`] and the
//! session outcomes ([`Discovery::session_up`], [`Discovery::session_down`],
//! [`Discovery::dial_failed`]); after each call it drains
//! [`Discovery::poll_transmit`] (datagrams to send from the unicast socket)
//! and [`Discovery::poll_event`], and sleeps until [`Discovery::poll_timeout`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::error::DatagramError;
use crate::event::DownReason;
use crate::peer::{PeerId, PeerInfo, PeerMap, PeerSet, PeerState, Role, should_dial};
use crate::wire::discovery::{Announce, Datagram, DatagramLimits, Goodbye, Probe};

/// Rate-limit buckets remembered at most (one per source IP).
const MAX_BUCKETS: usize = 4096;

/// Settings of the discovery machine.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Service name.
    pub service: String,
    /// Our id.
    pub id: PeerId,
    /// Our instance.
    pub instance: u64,
    /// Our name.
    pub name: String,
    /// Our role.
    pub role: Role,
    /// The TCP port we accept sessions on.
    pub tcp_port: u16,
    /// What we announce besides.
    pub metadata: BTreeMap<String, String>,
    /// The UDP port probes and announces are broadcast to.
    pub discovery_port: u16,
    /// See [`Config::probe_initial`](crate::Config::probe_initial).
    pub probe_initial: Duration,
    /// See [`Config::probe_max`](crate::Config::probe_max).
    pub probe_max: Duration,
    /// See [`Config::probe_max_missing`](crate::Config::probe_max_missing).
    pub probe_max_missing: Duration,
    /// See [`Config::redial_initial`](crate::Config::redial_initial).
    pub redial_initial: Duration,
    /// See [`Config::peer_expiry`](crate::Config::peer_expiry).
    pub peer_expiry: Duration,
    /// See [`Config::max_peers`](crate::Config::max_peers).
    pub max_peers: usize,
    /// See [`Config::replies_per_source_per_sec`](crate::Config::replies_per_source_per_sec).
    pub replies_per_source_per_sec: u32,
    /// Decoding limits.
    pub limits: DatagramLimits,
}

/// A local interface address discovery broadcasts on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Interface name.
    pub interface: String,
    /// Our address on it.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The directed broadcast address of its subnet.
    pub broadcast: Ipv4Addr,
    /// Whether the interface is up. Nothing is sent on a down interface, but
    /// datagrams from its subnet are still accepted; when it comes back up it
    /// counts as new (announce and probe at once).
    pub up: bool,
}

impl Target {
    /// Whether `ip` is in this target's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

/// A datagram to send from the unicast socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination: a broadcast address and the discovery port, or a
    /// prober's address.
    pub dst: SocketAddrV4,
    /// The encoded datagram.
    pub payload: Vec<u8>,
}

/// What discovery tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A peer was found (or found again after it went missing).
    Discovered(PeerInfo),
    /// A peer restarted: any session with its old instance is stale.
    Restarted(PeerInfo),
    /// Open a session to this peer now; report the outcome.
    Dial(PeerInfo),
    /// The peer is forgotten.
    Lost(PeerId),
}

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// It did not decode.
    Invalid(DatagramError),
    /// Our own datagram, looped back.
    Own,
    /// Of another service.
    OtherService,
    /// From outside the subnets of the selected interfaces.
    ForeignInterface,
    /// A probe from an address no reply may go to (broadcast, multicast,
    /// unspecified, port 0).
    BadSource,
    /// A probe over its source's reply rate.
    RateLimited,
    /// An announce of a new peer while the table is full.
    TableFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Known, no session, no dial under way.
    Idle,
    Dialing,
    Connected,
}

#[derive(Debug)]
struct Entry {
    info: PeerInfo,
    last_heard: Instant,
    link: Link,
    /// Lost without a goodbye and not heard from since: discovery is
    /// looking for it and will not dial before it answers again.
    missing: bool,
    next_dial: Option<Instant>,
    redial_backoff: Duration,
}

impl Entry {
    fn state(&self) -> PeerState {
        match self.link {
            Link::Connected => PeerState::Connected,
            Link::Dialing => PeerState::Connecting,
            Link::Idle if self.missing => PeerState::Missing,
            Link::Idle => PeerState::Discovered,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The discovery state of one node.
#[derive(Debug)]
pub struct Discovery {
    cfg: DiscoveryConfig,
    rng: SmallRng,
    targets: Vec<Target>,
    peers: PeerMap<Entry>,
    /// The peers without a session (idle or being dialed): the only ones
    /// with deadlines. With thousands of sessions, scanning the whole table
    /// for deadlines on every turn of the node's task cost each session's
    /// heartbeat about three cache misses.
    unconnected: PeerSet,
    probe_interval: Duration,
    next_probe: Option<Instant>,
    buckets: HashMap<Ipv4Addr, Bucket>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DiscoveryEvent>,
    /// Peers whose entry changed (or went) since the last `poll_changed`.
    changed: Vec<PeerId>,
    probe_bytes: Vec<u8>,
    announce_bytes: Vec<u8>,
}

impl Discovery {
    /// A machine with no targets yet; `seed` makes the jitter reproducible.
    pub fn new(cfg: DiscoveryConfig, seed: u64) -> Self {
        let probe_bytes = Datagram::Probe(Probe {
            service: cfg.service.clone(),
            id: cfg.id,
            instance: cfg.instance,
            role: cfg.role,
        })
        .encode();
        let announce_bytes = Datagram::Announce(Announce {
            service: cfg.service.clone(),
            id: cfg.id,
            instance: cfg.instance,
            role: cfg.role,
            name: cfg.name.clone(),
            port: cfg.tcp_port,
            metadata: cfg.metadata.clone(),
        })
        .encode();
        Discovery {
            probe_interval: cfg.probe_initial,
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            targets: Vec::new(),
            peers: PeerMap::default(),
            unconnected: PeerSet::default(),
            next_probe: None,
            buckets: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            changed: Vec::new(),
            probe_bytes,
            announce_bytes,
        }
    }

    /// The interfaces in use.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Replaces the interface list. On each new target we announce ourselves
    /// (unprompted, so listeners learn of us at once) and probe, and probing
    /// restarts fast. Returns whether anything changed.
    pub fn set_targets(&mut self, now: Instant, targets: Vec<Target>) -> bool {
        let added: Vec<Target> = targets
            .iter()
            .filter(|t| t.up && !self.targets.contains(t))
            .cloned()
            .collect();
        let changed = targets != self.targets;
        self.targets = targets;
        for t in &added {
            let dst = SocketAddrV4::new(t.broadcast, self.cfg.discovery_port);
            if self.cfg.role.accepts() {
                self.transmits.push_back(Transmit {
                    dst,
                    payload: self.announce_bytes.clone(),
                });
            }
            if self.cfg.role.dials() {
                self.transmits.push_back(Transmit {
                    dst,
                    payload: self.probe_bytes.clone(),
                });
            }
        }
        if !added.is_empty() && self.cfg.role.dials() {
            // We just probed: the next one after the first gap.
            self.next_probe = Some(now + self.jitter(self.cfg.probe_initial));
            self.probe_interval = (self.cfg.probe_initial * 2).min(self.cfg.probe_max_missing);
        }
        changed
    }

    /// Feeds one received datagram from `src`.
    ///
    /// # Errors
    /// Why it was dropped; the machine's state did not change.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddrV4,
        bytes: &[u8],
    ) -> Result<(), Dropped> {
        let Some(interface) = self
            .targets
            .iter()
            .find(|t| t.contains(*src.ip()))
            .map(|t| t.interface.clone())
        else {
            return Err(Dropped::ForeignInterface);
        };
        let datagram = Datagram::decode(bytes, &self.cfg.limits).map_err(Dropped::Invalid)?;
        if datagram.id() == self.cfg.id {
            return Err(Dropped::Own);
        }
        if datagram.service() != self.cfg.service {
            return Err(Dropped::OtherService);
        }
        match datagram {
            Datagram::Probe(p) => self.handle_probe(now, src, &p),
            Datagram::Announce(a) => self.handle_announce(now, src, interface, a),
            Datagram::Goodbye(g) => {
                self.handle_goodbye(&g);
                Ok(())
            }
        }
    }

    fn handle_probe(&mut self, now: Instant, src: SocketAddrV4, p: &Probe) -> Result<(), Dropped> {
        if let Some(e) = self.peers.get_mut(&p.id)
            && e.info.instance == p.instance
        {
            e.last_heard = now;
        }
        if !self.cfg.role.accepts() {
            return Ok(());
        }
        let ip = *src.ip();
        if src.port() == 0
            || ip.is_unspecified()
            || ip.is_broadcast()
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

    fn take_token(&mut self, now: Instant, ip: Ipv4Addr) -> bool {
        let rate = f64::from(self.cfg.replies_per_source_per_sec);
        let burst = 2.0 * rate;
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= MAX_BUCKETS {
            // Forget sources whose bucket has refilled: they are no different
            // from new ones.
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn pairs_with(&self, role: Role) -> bool {
        (self.cfg.role.dials() && role.accepts()) || (role.dials() && self.cfg.role.accepts())
    }

    fn we_dial(&self, info: &PeerInfo) -> bool {
        should_dial(self.cfg.id, self.cfg.role, info.id, info.role)
    }

    fn handle_announce(
        &mut self,
        now: Instant,
        src: SocketAddrV4,
        interface: String,
        a: Announce,
    ) -> Result<(), Dropped> {
        if !self.pairs_with(a.role) {
            return Ok(());
        }
        let info = PeerInfo {
            id: a.id,
            instance: a.instance,
            name: a.name,
            addr: SocketAddr::V4(SocketAddrV4::new(*src.ip(), a.port)),
            interface: Some(interface),
            role: a.role,
            metadata: a.metadata,
        };
        let we_dial = self.we_dial(&info);
        self.changed.push(a.id);
        match self.peers.get_mut(&a.id) {
            Some(e) if e.info.instance != info.instance => {
                // Restarted: whatever session we have is with a ghost.
                let was_linked = e.link != Link::Idle;
                e.info = info.clone();
                e.last_heard = now;
                e.missing = false;
                e.redial_backoff = self.cfg.redial_initial;
                if was_linked {
                    // The driver closes the old session; `session_down`
                    // with `PeerRestarted` schedules the dial.
                    self.events
                        .push_back(DiscoveryEvent::Restarted(info.clone()));
                } else {
                    e.next_dial = we_dial.then_some(now);
                }
                self.events.push_back(DiscoveryEvent::Discovered(info));
            }
            Some(e) => {
                e.last_heard = now;
                if e.link != Link::Connected {
                    e.info.addr = info.addr;
                    e.info.interface = info.interface.clone();
                }
                if e.missing {
                    e.missing = false;
                    e.redial_backoff = self.cfg.redial_initial;
                    if e.link == Link::Idle && we_dial {
                        e.next_dial = Some(now);
                    }
                    self.events
                        .push_back(DiscoveryEvent::Discovered(e.info.clone()));
                }
            }
            None => {
                if self.peers.len() >= self.cfg.max_peers {
                    return Err(Dropped::TableFull);
                }
                self.unconnected.insert(a.id);
                self.peers.insert(
                    a.id,
                    Entry {
                        info: info.clone(),
                        last_heard: now,
                        link: Link::Idle,
                        missing: false,
                        next_dial: we_dial.then_some(now),
                        redial_backoff: self.cfg.redial_initial,
                    },
                );
                self.events.push_back(DiscoveryEvent::Discovered(info));
            }
        }
        Ok(())
    }

    fn handle_goodbye(&mut self, g: &Goodbye) {
        // A connected peer's session reports its own goodbye.
        if let Some(e) = self.peers.get(&g.id)
            && e.info.instance == g.instance
            && e.link == Link::Idle
        {
            self.forget(g.id);
            self.changed.push(g.id);
            self.events.push_back(DiscoveryEvent::Lost(g.id));
        }
    }

    /// Probes, dials and expiries that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_probe.is_some_and(|t| now >= t) {
            for t in self.targets.iter().filter(|t| t.up) {
                self.transmits.push_back(Transmit {
                    dst: SocketAddrV4::new(t.broadcast, self.cfg.discovery_port),
                    payload: self.probe_bytes.clone(),
                });
            }
            let cap = if self.unconnected_entries().any(|e| e.missing) {
                self.cfg.probe_max_missing
            } else {
                self.cfg.probe_max
            };
            let gap = self.probe_interval.min(cap);
            self.probe_interval = (gap * 2).min(cap);
            self.next_probe = Some(now + self.jitter(gap));
        }
        let expiry = self.cfg.peer_expiry;
        let mut lost = Vec::new();
        for id in &self.unconnected {
            let Some(e) = self.peers.get_mut(id) else {
                continue;
            };
            if e.link != Link::Idle {
                continue;
            }
            if now >= e.last_heard + expiry {
                lost.push(*id);
            } else if e.next_dial.is_some_and(|t| now >= t) {
                e.next_dial = None;
                e.link = Link::Dialing;
                self.changed.push(*id);
                self.events.push_back(DiscoveryEvent::Dial(e.info.clone()));
            }
        }
        lost.sort();
        for id in lost {
            self.forget(id);
            self.changed.push(id);
            self.events.push_back(DiscoveryEvent::Lost(id));
        }
    }

    /// Checks that `unconnected` holds exactly the peers without a session
    /// (for tests and fuzzing).
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        for (id, e) in &self.peers {
            assert_eq!(
                self.unconnected.contains(id),
                e.link != Link::Connected,
                "{id} {:?}",
                e.link
            );
        }
        assert!(
            self.unconnected
                .iter()
                .all(|id| self.peers.contains_key(id))
        );
    }

    /// The entries of the peers without a session.
    fn unconnected_entries(&self) -> impl Iterator<Item = &Entry> {
        self.unconnected.iter().filter_map(|id| self.peers.get(id))
    }

    fn forget(&mut self, id: PeerId) {
        self.peers.remove(&id);
        self.unconnected.remove(&id);
    }

    /// When [`Discovery::handle_timeout`] next has work.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self
            .unconnected_entries()
            .filter(|e| e.link == Link::Idle)
            .map(|e| {
                let expire = e.last_heard + self.cfg.peer_expiry;
                e.next_dial.map_or(expire, |d| d.min(expire))
            });
        self.next_probe.into_iter().chain(peers).min()
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<DiscoveryEvent> {
        self.events.pop_front()
    }

    /// A dial (connect or handshake) failed: retry with backoff.
    pub fn dial_failed(&mut self, now: Instant, id: PeerId) {
        let cap = self.cfg.probe_max_missing;
        let Some(e) = self.peers.get_mut(&id) else {
            return;
        };
        if e.link != Link::Dialing {
            return;
        }
        e.link = Link::Idle;
        self.changed.push(id);
        let delay = e.redial_backoff;
        e.redial_backoff = (delay * 2).min(cap);
        let at = now + self.jitter(delay);
        if let Some(e) = self.peers.get_mut(&id) {
            e.next_dial = Some(at);
        }
    }

    /// A session with `info.id` came up (either direction). An unknown peer
    /// (it dialed us first) is added and reported as discovered.
    pub fn session_up(&mut self, now: Instant, info: PeerInfo) {
        self.changed.push(info.id);
        match self.peers.get_mut(&info.id) {
            Some(e) => {
                if e.info.instance != info.instance {
                    e.info.instance = info.instance;
                    e.info.name = info.name;
                    e.info.role = info.role;
                }
                e.link = Link::Connected;
                self.unconnected.remove(&info.id);
                e.missing = false;
                e.last_heard = now;
                e.next_dial = None;
                e.redial_backoff = self.cfg.redial_initial;
            }
            None => {
                self.peers.insert(
                    info.id,
                    Entry {
                        info: info.clone(),
                        last_heard: now,
                        link: Link::Connected,
                        missing: false,
                        next_dial: None,
                        redial_backoff: self.cfg.redial_initial,
                    },
                );
                self.events.push_back(DiscoveryEvent::Discovered(info));
            }
        }
    }

    /// A session with `id` ended. After a goodbye the peer is forgotten;
    /// after a restart it is dialed again; otherwise it is missing and
    /// probing speeds up until it answers.
    pub fn session_down(&mut self, now: Instant, id: PeerId, reason: &DownReason) {
        let Some(e) = self.peers.get_mut(&id) else {
            return;
        };
        e.link = Link::Idle;
        self.unconnected.insert(id);
        self.changed.push(id);
        match reason {
            DownReason::Goodbye | DownReason::Shutdown => {
                self.forget(id);
                self.events.push_back(DiscoveryEvent::Lost(id));
            }
            DownReason::PeerRestarted => {
                let info = e.info.clone();
                if self.we_dial(&info)
                    && let Some(e) = self.peers.get_mut(&id)
                {
                    e.next_dial = Some(now);
                }
            }
            _ => {
                e.missing = true;
                e.last_heard = now;
                e.next_dial = None;
                if self.cfg.role.dials() {
                    self.probe_interval = self.cfg.probe_initial;
                    self.next_probe = Some(now);
                }
            }
        }
    }

    /// Queues goodbyes on every target (only for roles that announce).
    pub fn shutdown(&mut self) {
        if !self.cfg.role.accepts() {
            return;
        }
        let payload = Datagram::Goodbye(Goodbye {
            service: self.cfg.service.clone(),
            id: self.cfg.id,
            instance: self.cfg.instance,
        })
        .encode();
        for t in self.targets.iter().filter(|t| t.up) {
            self.transmits.push_back(Transmit {
                dst: SocketAddrV4::new(t.broadcast, self.cfg.discovery_port),
                payload: payload.clone(),
            });
        }
    }

    /// Every known peer and where it stands.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerInfo, PeerState)> {
        self.peers.values().map(|e| (&e.info, e.state()))
    }

    /// One peer and where it stands.
    pub fn peer(&self, id: PeerId) -> Option<(&PeerInfo, PeerState)> {
        self.peers.get(&id).map(|e| (&e.info, e.state()))
    }

    /// The peers whose entry changed or went since the last call (for a
    /// driver that mirrors the table); may repeat an id.
    pub fn poll_changed(&mut self) -> Vec<PeerId> {
        std::mem::take(&mut self.changed)
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.rng.random_range(0.75..1.25))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const PORT: u16 = 5000;

    fn cfg(id: u64, role: Role) -> DiscoveryConfig {
        DiscoveryConfig {
            service: "svc".into(),
            id: PeerId::from_u64(id),
            instance: id * 1000,
            name: format!("n{id}"),
            role,
            tcp_port: 7000 + id as u16,
            metadata: BTreeMap::new(),
            discovery_port: PORT,
            probe_initial: 100 * MS,
            probe_max: 3000 * MS,
            probe_max_missing: 1000 * MS,
            redial_initial: 100 * MS,
            peer_expiry: 10_000 * MS,
            max_peers: 8,
            replies_per_source_per_sec: 5,
            limits: DatagramLimits::default(),
        }
    }

    fn target(host: u8) -> Target {
        Target {
            interface: "veth0".into(),
            addr: Ipv4Addr::new(10, 0, 0, host),
            prefix_len: 24,
            broadcast: Ipv4Addr::new(10, 0, 0, 255),
            up: true,
        }
    }

    fn addr(host: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, host), port)
    }

    fn events(d: &mut Discovery) -> Vec<DiscoveryEvent> {
        std::iter::from_fn(|| d.poll_event()).collect()
    }

    fn transmits(d: &mut Discovery) -> Vec<Transmit> {
        std::iter::from_fn(|| d.poll_transmit()).collect()
    }

    fn announce_of(id: u64, instance: u64, role: Role) -> Vec<u8> {
        Datagram::Announce(Announce {
            service: "svc".into(),
            id: PeerId::from_u64(id),
            instance,
            role,
            name: format!("n{id}"),
            port: 7000 + id as u16,
            metadata: BTreeMap::new(),
        })
        .encode()
    }

    fn probe_of(id: u64) -> Vec<u8> {
        Datagram::Probe(Probe {
            service: "svc".into(),
            id: PeerId::from_u64(id),
            instance: id * 1000,
            role: Role::Peer,
        })
        .encode()
    }

    fn started(id: u64, role: Role, now: Instant) -> Discovery {
        let mut d = Discovery::new(cfg(id, role), id);
        d.set_targets(now, vec![target(id as u8)]);
        d
    }

    #[test]
    fn start_announces_and_probes_on_every_target() {
        let now = Instant::now();
        let mut d = Discovery::new(cfg(1, Role::Peer), 1);
        let mut lo = target(1);
        lo.interface = "lo".into();
        lo.addr = Ipv4Addr::LOCALHOST;
        lo.prefix_len = 8;
        lo.broadcast = Ipv4Addr::new(127, 255, 255, 255);
        assert!(d.set_targets(now, vec![target(1), lo]));
        let t = transmits(&mut d);
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].dst, addr(255, PORT));
        assert!(matches!(
            Datagram::decode(&t[0].payload, &DatagramLimits::default()),
            Ok(Datagram::Announce(_))
        ));
        assert!(matches!(
            Datagram::decode(&t[1].payload, &DatagramLimits::default()),
            Ok(Datagram::Probe(_))
        ));
        assert_eq!(t[3].dst.ip(), &Ipv4Addr::new(127, 255, 255, 255));
        // Same list again: nothing new.
        assert!(!d.set_targets(now, d.targets().to_vec()));
        assert!(transmits(&mut d).is_empty());
    }

    #[test]
    fn a_link_that_comes_back_up_counts_as_new() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        transmits(&mut d);
        let mut down = target(1);
        down.up = false;
        assert!(d.set_targets(now, vec![down.clone()]));
        // Nothing is sent on a down link...
        let t = now + Duration::from_secs(10);
        d.handle_timeout(t);
        assert!(transmits(&mut d).is_empty());
        // ...but its subnet is still heard.
        assert!(
            d.handle_datagram(t, addr(2, 9), &announce_of(2, 2000, Role::Peer))
                .is_ok()
        );
        assert!(d.set_targets(t, vec![target(1)]));
        assert_eq!(transmits(&mut d).len(), 2, "announce and probe at once");
    }

    #[test]
    fn roles_decide_what_is_sent() {
        let now = Instant::now();
        let mut dev = started(1, Role::Device, now);
        let kinds: Vec<_> = transmits(&mut dev)
            .iter()
            .map(|t| Datagram::decode(&t.payload, &DatagramLimits::default()).unwrap())
            .collect();
        assert!(matches!(kinds[..], [Datagram::Announce(_)]));
        assert_eq!(dev.poll_timeout(), None, "a device never probes");
        let mut ctl = started(2, Role::Controller, now);
        let kinds: Vec<_> = transmits(&mut ctl)
            .iter()
            .map(|t| Datagram::decode(&t.payload, &DatagramLimits::default()).unwrap())
            .collect();
        assert!(matches!(kinds[..], [Datagram::Probe(_)]));
        // A controller does not answer probes.
        ctl.handle_datagram(now, addr(3, 999), &probe_of(3))
            .unwrap();
        assert!(transmits(&mut ctl).is_empty());
    }

    #[test]
    fn probing_backs_off_with_jitter_to_the_cap() {
        let start = Instant::now();
        let mut d = started(1, Role::Peer, start);
        transmits(&mut d);
        let mut now = start;
        let mut gaps = Vec::new();
        for _ in 0..12 {
            let next = d.poll_timeout().unwrap();
            gaps.push(next - now);
            now = next;
            d.handle_timeout(now);
            assert_eq!(transmits(&mut d).len(), 1);
        }
        // 100, 200, 400, 800, 1600, 3000... each ±25 %.
        let nominal = [100, 200, 400, 800, 1600, 3000, 3000, 3000];
        for (gap, n) in gaps.iter().zip(nominal) {
            let n = n as f64;
            let g = gap.as_secs_f64() * 1000.0;
            assert!(g >= n * 0.75 - 1.0 && g <= n * 1.25 + 1.0, "{gaps:?}");
        }
        assert!(
            gaps[6..].iter().any(|g| *g != gaps[6]),
            "jittered: {gaps:?}"
        );
    }

    #[test]
    fn announce_discovers_and_the_smaller_id_dials() {
        let now = Instant::now();
        let mut small = started(1, Role::Peer, now);
        let mut big = started(2, Role::Peer, now);
        small
            .handle_datagram(now, addr(2, 999), &announce_of(2, 2000, Role::Peer))
            .unwrap();
        big.handle_datagram(now, addr(1, 999), &announce_of(1, 1000, Role::Peer))
            .unwrap();
        let e = events(&mut small);
        assert!(
            matches!(&e[..], [DiscoveryEvent::Discovered(i)] if i.addr == "10.0.0.2:7002".parse().unwrap())
        );
        assert!(matches!(
            &events(&mut big)[..],
            [DiscoveryEvent::Discovered(_)]
        ));
        small.handle_timeout(now);
        big.handle_timeout(now);
        assert!(
            matches!(&events(&mut small)[..], [DiscoveryEvent::Dial(i)] if i.id == PeerId::from_u64(2))
        );
        assert!(events(&mut big).is_empty(), "the bigger id waits");
        assert_eq!(
            small.peers().next().unwrap().0.interface.as_deref(),
            Some("veth0")
        );
    }

    #[test]
    fn probes_are_answered_unicast_and_rate_limited() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        transmits(&mut d);
        let mut answered = 0;
        let mut limited = 0;
        for _ in 0..50 {
            match d.handle_datagram(now, addr(9, 4444), &probe_of(9)) {
                Ok(()) => answered += 1,
                Err(Dropped::RateLimited) => limited += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!((answered, limited), (10, 40), "burst of twice the rate");
        let t = transmits(&mut d);
        assert_eq!(t.len(), 10);
        assert!(t.iter().all(|t| t.dst == addr(9, 4444)));
        // One second later, five more.
        let later = now + Duration::from_secs(1);
        let ok = (0..50)
            .filter(|_| {
                d.handle_datagram(later, addr(9, 4444), &probe_of(9))
                    .is_ok()
            })
            .count();
        assert_eq!(ok, 5);
        // Another source has its own budget.
        assert!(
            d.handle_datagram(later, addr(8, 4444), &probe_of(8))
                .is_ok()
        );
    }

    #[test]
    fn drops_are_classified() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        let own = Datagram::Probe(Probe {
            service: "svc".into(),
            id: PeerId::from_u64(1),
            instance: 1000,
            role: Role::Peer,
        })
        .encode();
        assert_eq!(d.handle_datagram(now, addr(1, 1), &own), Err(Dropped::Own));
        let other = Datagram::Probe(Probe {
            service: "other".into(),
            id: PeerId::from_u64(5),
            instance: 1,
            role: Role::Peer,
        })
        .encode();
        assert_eq!(
            d.handle_datagram(now, addr(5, 1), &other),
            Err(Dropped::OtherService)
        );
        assert_eq!(
            d.handle_datagram(
                now,
                SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 5), 1),
                &probe_of(5)
            ),
            Err(Dropped::ForeignInterface)
        );
        assert_eq!(
            d.handle_datagram(now, addr(255, 1), &probe_of(5)),
            Err(Dropped::BadSource)
        );
        assert_eq!(
            d.handle_datagram(now, addr(5, 0), &probe_of(5)),
            Err(Dropped::BadSource)
        );
        assert_eq!(
            d.handle_datagram(now, addr(5, 1), b"garbage"),
            Err(Dropped::Invalid(DatagramError::NotLanbeat))
        );
        let mut v9 = probe_of(5);
        v9[4] = 9;
        assert_eq!(
            d.handle_datagram(now, addr(5, 1), &v9),
            Err(Dropped::Invalid(DatagramError::Version(9)))
        );
        assert!(events(&mut d).is_empty());
    }

    #[test]
    fn table_is_bounded() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        for id in 2..10 {
            d.handle_datagram(now, addr(id as u8, 9), &announce_of(id, id, Role::Peer))
                .unwrap();
        }
        assert_eq!(
            d.handle_datagram(now, addr(20, 9), &announce_of(20, 20, Role::Peer)),
            Err(Dropped::TableFull)
        );
        assert_eq!(d.peers().count(), 8);
    }

    #[test]
    fn timeout_makes_peer_missing_until_it_answers_again() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        d.handle_datagram(now, addr(2, 9), &announce_of(2, 2000, Role::Peer))
            .unwrap();
        d.handle_timeout(now);
        let info = match &events(&mut d)[..] {
            [DiscoveryEvent::Discovered(_), DiscoveryEvent::Dial(i)] => i.clone(),
            e => panic!("{e:?}"),
        };
        d.session_up(now, info.clone());
        transmits(&mut d);
        // Slow probing while all is well...
        let t = now + Duration::from_secs(30);
        for step in 0..30 {
            d.handle_timeout(t - Duration::from_secs(30 - step));
        }
        transmits(&mut d);
        d.session_down(t, info.id, &DownReason::HeartbeatTimeout);
        assert_eq!(d.peers().next().unwrap().1, PeerState::Missing);
        // ...fast again: a probe now, then 100, 200, 400, 800, 1000 ms.
        assert_eq!(d.poll_timeout(), Some(t));
        let mut now2 = t;
        for _ in 0..5 {
            d.handle_timeout(now2);
            now2 = d.poll_timeout().unwrap();
        }
        let spent = now2 - t;
        assert!(
            spent > Duration::from_millis(1800) && spent < Duration::from_millis(3200),
            "{spent:?}"
        );
        assert!(events(&mut d).is_empty(), "no dial before it answers");
        d.handle_datagram(now2, addr(2, 9), &announce_of(2, 2000, Role::Peer))
            .unwrap();
        d.handle_timeout(now2);
        assert!(matches!(
            &events(&mut d)[..],
            [DiscoveryEvent::Discovered(_), DiscoveryEvent::Dial(_)]
        ));
    }

    #[test]
    fn missing_peer_expires_and_goodbye_forgets_at_once() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        d.handle_datagram(now, addr(2, 9), &announce_of(2, 2000, Role::Peer))
            .unwrap();
        d.handle_datagram(now, addr(3, 9), &announce_of(3, 3000, Role::Peer))
            .unwrap();
        events(&mut d);
        let bye = Datagram::Goodbye(Goodbye {
            service: "svc".into(),
            id: PeerId::from_u64(3),
            instance: 3000,
        })
        .encode();
        d.handle_datagram(now, addr(3, 9), &bye).unwrap();
        assert_eq!(
            events(&mut d),
            vec![DiscoveryEvent::Lost(PeerId::from_u64(3))]
        );
        d.handle_timeout(now);
        events(&mut d);
        // Peer 2 is dialing; the dial fails repeatedly and the peer stays
        // silent: it is lost after peer_expiry.
        let mut t = now;
        while d.peers().count() > 0 {
            if d.peers().next().unwrap().1 == PeerState::Connecting {
                d.dial_failed(t, PeerId::from_u64(2));
            }
            t = d.poll_timeout().unwrap();
            d.handle_timeout(t);
        }
        let e = events(&mut d);
        assert_eq!(e.last(), Some(&DiscoveryEvent::Lost(PeerId::from_u64(2))));
        let dials = e
            .iter()
            .filter(|e| matches!(e, DiscoveryEvent::Dial(_)))
            .count();
        assert!((8..=20).contains(&dials), "redials back off: {dials}");
        assert!(t - now >= Duration::from_secs(10) && t - now < Duration::from_millis(10_100));
    }

    #[test]
    fn restarted_peer_replaces_the_old_session() {
        let now = Instant::now();
        let mut d = started(1, Role::Peer, now);
        d.handle_datagram(now, addr(2, 9), &announce_of(2, 2000, Role::Peer))
            .unwrap();
        d.handle_timeout(now);
        let info = match &events(&mut d)[..] {
            [_, DiscoveryEvent::Dial(i)] => i.clone(),
            e => panic!("{e:?}"),
        };
        d.session_up(now, info.clone());
        d.handle_datagram(now, addr(2, 9), &announce_of(2, 2001, Role::Peer))
            .unwrap();
        let e = events(&mut d);
        assert!(
            matches!(&e[..], [DiscoveryEvent::Restarted(i), DiscoveryEvent::Discovered(_)] if i.instance == 2001)
        );
        d.session_down(now, info.id, &DownReason::PeerRestarted);
        d.handle_timeout(now);
        assert!(matches!(&events(&mut d)[..], [DiscoveryEvent::Dial(i)] if i.instance == 2001));
    }

    #[test]
    fn inbound_session_from_unknown_peer_is_discovered() {
        let now = Instant::now();
        let mut d = started(2, Role::Peer, now);
        let info = PeerInfo {
            id: PeerId::from_u64(1),
            instance: 5,
            name: "n1".into(),
            addr: "10.0.0.1:7001".parse().unwrap(),
            interface: None,
            role: Role::Controller,
            metadata: BTreeMap::new(),
        };
        d.session_up(now, info.clone());
        assert_eq!(events(&mut d), vec![DiscoveryEvent::Discovered(info)]);
        d.session_down(now, PeerId::from_u64(1), &DownReason::Goodbye);
        assert_eq!(
            events(&mut d),
            vec![DiscoveryEvent::Lost(PeerId::from_u64(1))]
        );
    }

    #[test]
    fn target_subnet_math() {
        let t = target(1);
        assert!(t.contains(Ipv4Addr::new(10, 0, 0, 200)));
        assert!(!t.contains(Ipv4Addr::new(10, 0, 1, 1)));
        let all = Target {
            prefix_len: 0,
            ..target(1)
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }
}
