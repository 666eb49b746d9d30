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
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::admission::{Admission, TokenBucket};
use super::auth::DatagramAuth;
use crate::error::DatagramError;
use crate::event::DownReason;
use crate::peer::{PeerId, PeerInfo, PeerMap, PeerSet, PeerState, Role, should_dial};
use crate::wire::discovery::{Announce, Datagram, DatagramLimits, Goodbye};

pub use dropped::Dropped;

/// Rate-limit buckets remembered at most (one per source IP).
const MAX_BUCKETS: usize = 4096;

/// While unknown peers are held for a second hearing, probes go out at
/// least this often (so a real one answers soon, and a flood costs at most
/// two broadcasts a second).
const CANDIDATE_PROBE_GAP: Duration = Duration::from_millis(500);

/// Settings of the discovery machine.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// See [`Config::max_dials_per_sec`](crate::Config::max_dials_per_sec).
    pub dials_per_sec: u32,
    /// See [`Config::max_peers`](crate::Config::max_peers).
    pub max_peers: usize,
    /// See [`Config::replies_per_source_per_sec`](crate::Config::replies_per_source_per_sec).
    pub replies_per_source_per_sec: u32,
    /// Decoding limits.
    pub limits: DatagramLimits,
    /// The fleet key: every datagram sent is sealed with a sequence number
    /// and a MAC, every one received must carry a valid one, once.
    pub fleet_key: Option<crate::FleetKey>,
    /// Our announces say we take sessions sealed with AES-256-GCM (we
    /// speak protocol 2 and have AES instructions).
    pub aes_gcm: bool,
    /// The first sequence number of sealed datagrams: the clock in
    /// microseconds since the Unix epoch, so a restarted node goes on
    /// above its old numbers.
    pub first_seq: u64,
    /// Peers by address: probed by unicast, heard from any subnet.
    pub static_peers: Vec<SocketAddr>,
    /// Whether probes from outside the selected interfaces' subnets are
    /// answered (the node is not confined to named interfaces).
    pub accept_routed_probes: bool,
}

/// The IPv6 link-local multicast group discovery uses (PROTOCOL.md §1):
/// `ff02::6c62`, "lb".
pub const IPV6_GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x6c62);

/// A local interface address discovery broadcasts on: an IPv4 address and
/// its subnet's directed broadcast, or an interface's IPv6 link-local
/// address and the multicast group on that link.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Target {
    /// Interface name.
    pub interface: String,
    /// Our address on it.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Where datagrams for everyone on it go: the directed broadcast
    /// address of the subnet (IPv4), or [`IPV6_GROUP`] (IPv6).
    pub broadcast: IpAddr,
    /// The interface's index: the scope of IPv6 link-local addresses (0
    /// for IPv4).
    pub scope: u32,
    /// Whether the interface is up. Nothing is sent on a down interface, but
    /// datagrams from its subnet are still accepted; when it comes back up it
    /// counts as new (announce and probe at once).
    pub up: bool,
}

impl Target {
    /// An IPv4 target.
    pub fn v4(
        interface: &str,
        addr: std::net::Ipv4Addr,
        prefix_len: u8,
        broadcast: std::net::Ipv4Addr,
    ) -> Target {
        Target {
            interface: interface.to_owned(),
            addr: IpAddr::V4(addr),
            prefix_len,
            broadcast: IpAddr::V4(broadcast),
            scope: 0,
            up: true,
        }
    }

    /// The IPv6 target of an interface: its link-local address, the link's
    /// scope (the interface index).
    pub fn v6(interface: &str, link_local: Ipv6Addr, scope: u32) -> Target {
        Target {
            interface: interface.to_owned(),
            addr: IpAddr::V6(link_local),
            prefix_len: 64,
            broadcast: IpAddr::V6(IPV6_GROUP),
            scope,
            up: true,
        }
    }

    /// Whether a datagram from `src` comes from this target's link: an
    /// IPv4 source in its subnet, or an IPv6 link-local source received on
    /// its interface (the scope the kernel reports).
    pub fn contains(&self, src: SocketAddr) -> bool {
        match (self.addr, src) {
            (IpAddr::V4(ours), SocketAddr::V4(s)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(*s.ip()) & mask == u32::from(ours) & mask
            }
            (IpAddr::V6(_), SocketAddr::V6(s)) => {
                s.ip().is_unicast_link_local() && s.scope_id() == self.scope
            }
            _ => false,
        }
    }

    /// Where to send to everyone on this target's link, at `port`.
    pub fn destination(&self, port: u16) -> SocketAddr {
        match self.broadcast {
            IpAddr::V4(b) => SocketAddr::new(IpAddr::V4(b), port),
            IpAddr::V6(g) => SocketAddr::V6(SocketAddrV6::new(g, port, 0, self.scope)),
        }
    }
}

/// A datagram to send from the unicast socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transmit {
    /// Destination: a broadcast address (or the IPv6 group, with its
    /// interface as scope) and the discovery port, or a prober's address.
    pub dst: SocketAddr,
    /// The encoded datagram.
    pub payload: Vec<u8>,
}

/// What discovery tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoveryEvent {
    /// A peer was found (or found again after it went missing).
    Discovered(PeerInfo),
    /// Open a session to this peer now; report the outcome.
    Dial(PeerInfo),
    /// The peer is forgotten.
    Lost(PeerId),
    /// A known peer announced other metadata (same instance).
    MetadataChanged(PeerInfo),
    /// Two live instances share the peer's id (a copied identity or
    /// configuration): they were heard in turns. For the hold-down period
    /// the instance that holds the entry keeps it, and the other one is
    /// ignored (its announces dropped, its handshakes refused), so sessions
    /// do not flap. Reported once per hold-down.
    Duplicate {
        /// The shared id.
        id: PeerId,
        /// Where the instance that keeps the entry was last heard from.
        kept: SocketAddr,
        /// Where the other instance was heard from.
        other: SocketAddr,
    },
}

/// Where a known peer's session stands, as discovery sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    /// No session, no dial under way.
    None,
    /// We dial it.
    Dialing,
    /// A session is up.
    Connected,
}

#[derive(Debug)]
struct Entry {
    info: PeerInfo,
    last_heard: Instant,
    session: SessionState,
    /// Lost without a goodbye and not heard from since: discovery is
    /// looking for it and will not dial before it answers again.
    missing: bool,
    /// When it went missing: probing is fast for its first `peer_expiry`
    /// only (a peer whose probes still arrive while ours never reach it,
    /// one-way loss, would otherwise be probed every second forever).
    missing_since: Instant,
    next_dial: Option<Instant>,
    redial_backoff: Duration,
    /// The instance this entry had before its latest change, and when it
    /// changed: a change back to it soon after is a second live instance.
    prev_instance: Option<(u64, Instant)>,
    /// Until then, other instances of this id are ignored (a duplicate
    /// was detected).
    duplicate_until: Option<Instant>,
    /// Heard twice from its address with this instance, or had a session:
    /// dialed before entries that were heard once.
    verified: bool,
    /// A dial to an announced new instance is under way while the session
    /// is up (at most one at a time).
    restart_dial: bool,
}

impl Entry {
    fn new(info: PeerInfo, now: Instant, session: SessionState, redial: Duration) -> Entry {
        Entry {
            info,
            last_heard: now,
            session,
            missing: false,
            missing_since: now,
            next_dial: None,
            redial_backoff: redial,
            prev_instance: None,
            duplicate_until: None,
            verified: session == SessionState::Connected,
            restart_dial: false,
        }
    }

    fn state(&self) -> PeerState {
        match self.session {
            SessionState::Connected => PeerState::Connected,
            SessionState::Dialing => PeerState::Connecting,
            SessionState::None if self.missing => PeerState::Missing,
            SessionState::None => PeerState::Discovered,
        }
    }
}

/// The earliest expiry and the earliest dial among the peers without a
/// session (the field `soonest` of `Discovery`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Soonest {
    expire: Option<Instant>,
    dial: Option<Instant>,
}

/// `a` or `b`, whichever is earlier (`None` is never).
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
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
    /// Lower bounds of the unconnected peers' deadlines, so that
    /// `poll_timeout` (asked on every turn of the node's task) does not
    /// scan them. A change that makes a deadline earlier folds it in
    /// (`fold`); one that makes it later, or removes a peer, leaves the
    /// bound as it is, which can only wake the node early: the turn then
    /// finds nothing due, and `handle_timeout`, which looks at every peer
    /// anyway, computes the bounds afresh. With thousands of peers that
    /// came and went, the scan was a quarter of an accepting node's time.
    soonest: Soonest,
    probe_interval: Duration,
    next_probe: Option<Instant>,
    /// When we last probed.
    last_probe: Option<Instant>,
    buckets: HashMap<IpAddr, TokenBucket>,
    /// New ids and dials, limited (see `admission`).
    admission: Admission,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DiscoveryEvent>,
    /// Peers whose entry changed (or went) since the last `poll_changed`.
    changed: Vec<PeerId>,
    announce_bytes: Vec<u8>,
    /// With a fleet key: sealing and checking datagrams.
    auth: Option<DatagramAuth>,
    /// The static peers have had their first announce and probe.
    statics_started: bool,
}

/// Our announce, as `cfg` describes us.
fn announce_of(cfg: &DiscoveryConfig) -> Vec<u8> {
    Datagram::Announce(Announce {
        service: cfg.service.clone(),
        id: cfg.id,
        instance: cfg.instance,
        role: cfg.role,
        name: cfg.name.clone(),
        port: cfg.tcp_port,
        metadata: cfg.metadata.clone(),
        aes_gcm: cfg.aes_gcm,
    })
    .encode_as(cfg.limits.protocol)
}

impl Discovery {
    /// A machine with no targets yet; `seed` makes the jitter reproducible.
    pub fn new(cfg: DiscoveryConfig, seed: u64) -> Self {
        let announce_bytes = announce_of(&cfg);
        let admission = Admission::new(cfg.dials_per_sec, cfg.max_peers);
        let auth = cfg
            .fleet_key
            .as_ref()
            .map(|k| DatagramAuth::new(&k.to_bytes(), cfg.first_seq, 2 * cfg.max_peers));
        Discovery {
            auth,
            statics_started: false,
            probe_interval: cfg.probe_initial,
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            targets: Vec::new(),
            peers: PeerMap::default(),
            unconnected: PeerSet::default(),
            soonest: Soonest::default(),
            next_probe: None,
            last_probe: None,
            buckets: HashMap::new(),
            admission,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            changed: Vec::new(),
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
            self.introduce(t.destination(self.cfg.discovery_port), true);
        }
        if !added.is_empty() && self.cfg.role.dials() {
            // We just probed: the next one after the first gap.
            self.next_probe = Some(now + self.jitter(self.cfg.probe_initial));
            self.probe_interval = (self.cfg.probe_initial * 2).min(self.cfg.probe_max_missing);
        }
        self.start_static_peers(now);
        changed
    }

    /// Feeds one received datagram from `src`.
    ///
    /// # Errors
    /// Why it was dropped; the machine's state did not change.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        src: SocketAddr,
        bytes: &[u8],
    ) -> Result<(), Dropped> {
        // The kind byte, before anything is checked: only a probe may come
        // from anywhere (see `statics`).
        let is_probe = bytes.get(5) == Some(&1);
        let Some(interface) = self.source_interface(src, is_probe) else {
            return Err(Dropped::ForeignInterface);
        };
        if bytes.len() > self.cfg.limits.max_size {
            return Err(Dropped::Invalid(DatagramError::TooLarge(bytes.len())));
        }
        let (bytes, seq) = match &self.auth {
            Some(auth) => {
                let (body, seq) = auth.open(bytes)?;
                (body, Some(seq))
            }
            None => (bytes, None),
        };
        let datagram = Datagram::decode(bytes, &self.cfg.limits).map_err(Dropped::Invalid)?;
        if datagram.id() == self.cfg.id {
            return Err(Dropped::Own);
        }
        if datagram.service() != self.cfg.service {
            return Err(Dropped::OtherService);
        }
        if let (Some(auth), Some(seq)) = (&mut self.auth, seq) {
            auth.accept(datagram.id(), seq)?;
        }
        let id = datagram.id();
        let handled = match datagram {
            Datagram::Probe(p) => self.handle_probe(now, src, &p),
            Datagram::Announce(a) => self.handle_announce(now, src, interface, a),
            Datagram::Goodbye(g) => {
                self.handle_goodbye(&g);
                Ok(())
            }
        };
        // A new peer, or a dial set for now.
        self.fold(id);
        handled
    }

    fn pairs_with(&self, role: Role) -> bool {
        (self.cfg.role.dials() && role.accepts()) || (role.dials() && self.cfg.role.accepts())
    }

    /// Whether we dial `info`: as the rule says, or, for a static peer
    /// (which may not know us, so would never dial), whenever we can.
    fn we_dial(&self, info: &PeerInfo) -> bool {
        should_dial(self.cfg.id, self.cfg.role, info.id, info.role)
            || (self.is_static(info.addr) && self.cfg.role.dials() && info.role.accepts())
    }

    fn handle_announce(
        &mut self,
        now: Instant,
        src: SocketAddr,
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
            // The source, with its scope for an IPv6 link-local one.
            addr: with_port(src, a.port),
            interface: Some(interface),
            role: a.role,
            metadata: a.metadata,
            aes_gcm: a.aes_gcm,
        };
        if self.duplicate_instance(now, a.id, a.instance, info.addr) {
            return Err(Dropped::DuplicateId);
        }
        let we_dial = self.we_dial(&info);
        self.changed.push(a.id);
        match self.peers.get_mut(&a.id) {
            Some(e) if e.info.instance != info.instance && e.session == SessionState::Connected => {
                // A new instance while a session is up: a restart, or a
                // datagram anyone could have sent. Discovery is only a
                // hint: the live session stays, and the entry keeps what
                // the session proved. If we dial this peer, we dial the
                // announced address once (within the dial rate); only a
                // handshake there with the new instance replaces the
                // session (the driver does that, as `PeerRestarted`). If
                // the peer dials us, a restarted one will.
                if we_dial && !e.restart_dial && self.admission.take_dial(now) {
                    e.restart_dial = true;
                    self.events.push_back(DiscoveryEvent::Dial(info));
                }
            }
            Some(e) if e.info.instance != info.instance => {
                // Restarted, and no session to keep: the entry follows.
                e.info = info.clone();
                e.last_heard = now;
                e.missing = false;
                e.redial_backoff = self.cfg.redial_initial;
                if e.session == SessionState::None {
                    e.next_dial = we_dial.then_some(now);
                }
                self.events.push_back(DiscoveryEvent::Discovered(info));
            }
            Some(e) => {
                e.last_heard = now;
                e.verified |= e.info.addr.ip() == info.addr.ip();
                if e.info.metadata != info.metadata {
                    e.info.metadata = info.metadata.clone();
                    self.changed.push(e.info.id);
                    self.events
                        .push_back(DiscoveryEvent::MetadataChanged(e.info.clone()));
                }
                e.info.aes_gcm = info.aes_gcm;
                if e.session != SessionState::Connected {
                    e.info.addr = info.addr;
                    e.info.interface = info.interface.clone();
                }
                if e.missing {
                    e.missing = false;
                    e.redial_backoff = self.cfg.redial_initial;
                    if e.session == SessionState::None && we_dial {
                        e.next_dial = Some(now);
                    }
                    self.events
                        .push_back(DiscoveryEvent::Discovered(e.info.clone()));
                }
            }
            None => {
                let Some((info, verified)) = self.admission.announce(now, info) else {
                    // Held until heard again: a probe soon asks it (and
                    // every other candidate) to answer, at most one per
                    // `CANDIDATE_PROBE_GAP` however many arrive.
                    if self.cfg.role.dials() {
                        let soon = self
                            .last_probe
                            .map_or(now, |t| (t + CANDIDATE_PROBE_GAP).max(now));
                        self.next_probe = Some(self.next_probe.map_or(soon, |t| t.min(soon)));
                    }
                    return Err(Dropped::Unconfirmed);
                };
                self.admit(now, info, verified)?;
            }
        }
        Ok(())
    }

    fn handle_goodbye(&mut self, g: &Goodbye) {
        // A connected peer's session reports its own goodbye.
        if let Some(e) = self.peers.get(&g.id)
            && e.info.instance == g.instance
            && e.session == SessionState::None
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
                    dst: t.destination(self.cfg.discovery_port),
                    payload: self.probe(),
                });
            }
            self.send_to_static_peers(false);
            // Slow only when every known peer has a session (their
            // probes' answers are suppressed anyway); peers without one
            // must be heard again well within their expiry.
            // A peer missing for longer than its expiry and still kept is
            // one whose probes reach us while nothing of ours reaches it
            // (one-way loss): it no longer speeds probing up, and needs
            // no probes to stay known.
            let expiry = self.cfg.peer_expiry;
            let recent = |e: &&Entry| !e.missing || now < e.missing_since + expiry;
            let cap = if self
                .unconnected_entries()
                .any(|e| e.missing && now < e.missing_since + expiry)
            {
                self.cfg.probe_max_missing
            } else if self.unconnected_entries().find(recent).is_some() {
                self.cfg
                    .probe_max
                    .min(self.cfg.peer_expiry / 3)
                    .max(self.cfg.probe_max_missing)
            } else {
                self.cfg.probe_max
            };
            let gap = self.probe_interval.min(cap);
            self.probe_interval = (gap * 2).min(cap);
            self.next_probe = Some(now + self.jitter(gap));
            self.last_probe = Some(now);
        }
        let expiry = self.cfg.peer_expiry;
        let mut lost = Vec::new();
        let mut due = Vec::new();
        // The deadlines of the peers that stay, found on the way (those
        // of due dials below, once it is known which wait).
        let mut soonest = Soonest::default();
        for id in &self.unconnected {
            let Some(e) = self.peers.get(id) else {
                continue;
            };
            if e.session != SessionState::None {
                continue;
            }
            if now >= e.last_heard + expiry {
                lost.push(*id);
                continue;
            }
            soonest.expire = earliest(soonest.expire, Some(e.last_heard + expiry));
            match e.next_dial {
                Some(t) if now >= t => due.push((!e.verified, t, *id)),
                later => soonest.dial = earliest(soonest.dial, later),
            }
        }
        // As many dials as the rate allows; peers heard twice first, then
        // the longest waiting. The others stay due.
        due.sort();
        let mut due = due.into_iter();
        let mut waits = None;
        for (_, t, id) in due.by_ref() {
            if !self.admission.take_dial(now) {
                waits = Some(t);
                break;
            }
            if let Some(e) = self.peers.get_mut(&id) {
                e.next_dial = None;
                e.session = SessionState::Dialing;
                self.changed.push(id);
                self.events.push_back(DiscoveryEvent::Dial(e.info.clone()));
            }
        }
        let waits = earliest(waits, due.map(|(_, t, _)| t).min());
        soonest.dial = earliest(soonest.dial, waits);
        self.soonest = soonest;
        lost.sort();
        for id in lost {
            self.forget(id);
            self.changed.push(id);
            self.events.push_back(DiscoveryEvent::Lost(id));
        }
    }

    /// Checks that `unconnected` holds exactly the peers without a session,
    /// and that the kept deadline bounds are never later than the
    /// deadlines (for tests and fuzzing).
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        for (id, e) in &self.peers {
            assert_eq!(
                self.unconnected.contains(id),
                e.session != SessionState::Connected,
                "{id} {:?}",
                e.session
            );
        }
        assert!(
            self.unconnected
                .iter()
                .all(|id| self.peers.contains_key(id))
        );
        // The bounds are never later than the deadlines.
        {
            let s = self.soonest;
            let now = self.scan_deadlines();
            let never_later = |bound: Option<Instant>, at: Option<Instant>| match (bound, at) {
                (Some(b), Some(a)) => b <= a,
                (None, a) => a.is_none(),
                (Some(_), None) => true,
            };
            assert!(never_later(s.expire, now.expire), "{s:?} {now:?}");
            assert!(never_later(s.dial, now.dial), "{s:?} {now:?}");
        }
    }

    /// The entries of the peers without a session.
    fn unconnected_entries(&self) -> impl Iterator<Item = &Entry> {
        self.unconnected.iter().filter_map(|id| self.peers.get(id))
    }

    fn forget(&mut self, id: PeerId) {
        self.peers.remove(&id);
        self.unconnected.remove(&id);
        if let Some(auth) = &mut self.auth {
            auth.forget(id);
        }
    }

    /// When [`Discovery::handle_timeout`] next has work (possibly a
    /// little early, never late).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        #[cfg(test)]
        self.check_invariants();
        let soonest = self.soonest;
        // A due dial waits for the dial rate's next token.
        let dial = match (soonest.dial, self.admission.next_dial()) {
            (Some(d), Some(t)) => Some(d.max(t)),
            (d, _) => d,
        };
        earliest(self.next_probe, earliest(soonest.expire, dial))
    }

    /// The earliest expiry and dial of the peers without a session, by
    /// looking at every one.
    fn scan_deadlines(&self) -> Soonest {
        self.unconnected_entries()
            .filter(|e| e.session == SessionState::None)
            .fold(Soonest::default(), |s, e| Soonest {
                expire: earliest(s.expire, Some(e.last_heard + self.cfg.peer_expiry)),
                dial: earliest(s.dial, e.next_dial),
            })
    }

    /// Folds `id`'s deadlines into the bounds, after a change that may
    /// have made one of them earlier.
    fn fold(&mut self, id: PeerId) {
        let (s, Some(e)) = (self.soonest, self.peers.get(&id)) else {
            return;
        };
        if e.session == SessionState::None {
            self.soonest = Soonest {
                expire: earliest(s.expire, Some(e.last_heard + self.cfg.peer_expiry)),
                dial: earliest(s.dial, e.next_dial),
            };
        }
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let mut t = self.transmits.pop_front()?;
        if let Some(auth) = &mut self.auth {
            auth.seal(&mut t.payload);
        }
        Some(t)
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
        // A dial to a new instance's address while the session was up
        // (see `handle_announce`) failed: the session stays.
        e.restart_dial = false;
        if e.session != SessionState::Dialing {
            return;
        }
        e.session = SessionState::None;
        self.changed.push(id);
        let delay = e.redial_backoff;
        e.redial_backoff = (delay * 2).min(cap);
        let at = now + self.jitter(delay);
        if let Some(e) = self.peers.get_mut(&id) {
            e.next_dial = Some(at);
        }
        self.fold(id);
    }

    /// A session with `info.id` came up (either direction). An unknown peer
    /// (it dialed us first) is added and reported as discovered.
    pub fn session_up(&mut self, now: Instant, info: PeerInfo) {
        self.changed.push(info.id);
        match self.peers.get_mut(&info.id) {
            Some(e) => {
                if e.info.instance != info.instance {
                    // Proven by the handshake now.
                    e.info.instance = info.instance;
                    e.info.name = info.name;
                    e.info.role = info.role;
                    e.info.addr = info.addr;
                }
                e.restart_dial = false;
                e.session = SessionState::Connected;
                self.unconnected.remove(&info.id);
                e.missing = false;
                e.last_heard = now;
                e.next_dial = None;
                e.redial_backoff = self.cfg.redial_initial;
            }
            None => {
                let e = Entry::new(
                    info.clone(),
                    now,
                    SessionState::Connected,
                    self.cfg.redial_initial,
                );
                self.peers.insert(info.id, e);
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
        e.session = SessionState::None;
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
                e.missing_since = now;
                e.last_heard = now;
                e.next_dial = None;
                if self.cfg.role.dials() {
                    self.probe_interval = self.cfg.probe_initial;
                    self.next_probe = Some(now);
                }
            }
        }
        // Unconnected again: its expiry (and dial) count.
        self.fold(id);
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
        .encode_as(self.cfg.limits.protocol);
        for t in self.targets.iter().filter(|t| t.up) {
            self.transmits.push_back(Transmit {
                dst: t.destination(self.cfg.discovery_port),
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

mod admit;
mod dropped;
mod duplicates;
mod quiet;
mod statics;
#[cfg(test)]
mod tests;

pub use duplicates::{DUPLICATE_HOLD, DUPLICATE_WINDOW};

/// `addr` with `port` instead of its own (an IPv6 address keeps its scope).
fn with_port(mut addr: SocketAddr, port: u16) -> SocketAddr {
    addr.set_port(port);
    addr
}
