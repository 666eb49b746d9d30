//! Unit tests of the discovery machine, on made-up times.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use crate::wire::discovery::Probe;

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
        dials_per_sec: 20,
        replies_per_source_per_sec: 5,
        limits: DatagramLimits::default(),
        fleet_key: None,
        aes_gcm: false,
        first_seq: 0,
        static_peers: Vec::new(),
        accept_routed_probes: false,
    }
}

fn target(host: u8) -> Target {
    Target::v4(
        "veth0",
        Ipv4Addr::new(10, 0, 0, host),
        24,
        Ipv4Addr::new(10, 0, 0, 255),
    )
}

fn addr(host: u8, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, host), port))
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
        aes_gcm: false,
    })
    .encode()
}

fn probe_of(id: u64) -> Vec<u8> {
    probe_with(id, id * 1000)
}

/// The probe node `id` sends with its start announce, as instance
/// `instance`.
fn probe_with(id: u64, instance: u64) -> Vec<u8> {
    Datagram::Probe(Probe {
        service: "svc".into(),
        id: PeerId::from_u64(id),
        instance,
        role: Role::Peer,
        known: Vec::new(),
    })
    .encode()
}

fn started(id: u64, role: Role, now: Instant) -> Discovery {
    started_with(cfg(id, role), now)
}

/// Node `c.id` started with the settings `c` on its one target.
fn started_with(c: DiscoveryConfig, now: Instant) -> Discovery {
    let id = c.id.as_u64();
    let mut d = Discovery::new(c, id);
    d.set_targets(now, vec![target(id as u8)]);
    d
}

#[test]
fn start_announces_and_probes_on_every_target() {
    let now = Instant::now();
    let mut d = Discovery::new(cfg(1, Role::Peer), 1);
    let mut lo = target(1);
    lo.interface = "lo".into();
    lo.addr = Ipv4Addr::LOCALHOST.into();
    lo.prefix_len = 8;
    lo.broadcast = Ipv4Addr::new(127, 255, 255, 255).into();
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
    assert_eq!(t[3].dst.ip(), Ipv4Addr::new(127, 255, 255, 255));
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
    // The dial is due at once: the node's task is woken for it.
    assert!(small.poll_timeout().is_some_and(|t| t <= now));
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
fn dials_beyond_the_rate_wait_for_its_next_token() {
    let now = Instant::now();
    let mut c = cfg(1, Role::Peer);
    c.dials_per_sec = 2;
    let mut d = started_with(c, now);
    for id in 2..5u64 {
        d.handle_datagram(
            now,
            addr(id as u8, 999),
            &announce_of(id, id * 1000, Role::Peer),
        )
        .unwrap();
    }
    events(&mut d);
    let dials = |d: &mut Discovery| {
        events(d)
            .iter()
            .filter(|e| matches!(e, DiscoveryEvent::Dial(_)))
            .count()
    };
    d.handle_timeout(now);
    assert_eq!(dials(&mut d), 2, "a burst of the rate");
    // The third is dialed when the rate allows (a token in 0.5 s), not at
    // some later probe.
    let mut t = now;
    while dials(&mut d) == 0 {
        t = d.poll_timeout().unwrap();
        assert!(t < now + 600 * MS, "still waiting at {:?}", t - now);
        d.handle_timeout(t);
    }
    assert!(t >= now + 499 * MS, "{:?}", t - now);
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
        known: Vec::new(),
    })
    .encode();
    assert_eq!(d.handle_datagram(now, addr(1, 1), &own), Err(Dropped::Own));
    let other = Datagram::Probe(Probe {
        service: "other".into(),
        id: PeerId::from_u64(5),
        instance: 1,
        role: Role::Peer,
        known: Vec::new(),
    })
    .encode();
    assert_eq!(
        d.handle_datagram(now, addr(5, 1), &other),
        Err(Dropped::OtherService)
    );
    assert_eq!(
        d.handle_datagram(
            now,
            SocketAddr::from((Ipv4Addr::new(192, 168, 1, 5), 1)),
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
fn table_is_bounded_and_a_newcomer_takes_the_place_of_the_oldest_idle_peer() {
    let t0 = Instant::now();
    // Node 20 does not dial the smaller ids: their entries stay idle.
    let mut d = started(20, Role::Peer, t0);
    for id in 2..10u64 {
        let t = t0 + (id as u32) * MS;
        d.handle_datagram(t, addr(id as u8, 9), &announce_of(id, id, Role::Peer))
            .unwrap();
    }
    events(&mut d);
    // Full (8): the oldest idle peer, heard once, makes room.
    let t = t0 + 100 * MS;
    d.handle_datagram(t, addr(30, 9), &announce_of(30, 30, Role::Peer))
        .unwrap();
    assert_eq!(d.peers().count(), 8);
    let e = events(&mut d);
    assert!(
        matches!(&e[..], [DiscoveryEvent::Lost(gone), DiscoveryEvent::Discovered(i)]
            if *gone == PeerId::from_u64(2) && i.id == PeerId::from_u64(30)),
        "{e:?}"
    );
    // Peers with a session are never dropped: with every place taken by
    // one, the newcomer is.
    let mut d = started(1, Role::Peer, t0);
    for id in 2..10u64 {
        d.handle_datagram(t0, addr(id as u8, 9), &announce_of(id, id, Role::Peer))
            .unwrap();
    }
    d.handle_timeout(t0);
    for e in events(&mut d) {
        if let DiscoveryEvent::Dial(i) = e {
            d.session_up(t0, i);
        }
    }
    assert_eq!(
        d.handle_datagram(t0, addr(40, 9), &announce_of(40, 40, Role::Peer)),
        Err(Dropped::TableFull)
    );
    assert_eq!(d.peers().count(), 8);
}

/// An announce flood: 2 000 made-up ids in 2 s, each heard once. At most
/// the admission rate enters the table, dials stay within the dial rate,
/// and a real node that starts during the flood (announce and probe, as
/// every node sends at start) enters at once and is dialed first.
#[test]
fn an_announce_flood_neither_locks_out_a_real_peer_nor_drives_dials() {
    let t0 = Instant::now();
    let mut cfg = cfg(1, Role::Peer);
    cfg.max_peers = 64;
    let mut d = started_with(cfg, t0);
    let (mut discovered, mut dials, mut held) = (0, 0, 0);
    let mut real_dialed = None;
    let real = 999_999u64;
    for k in 0..2000u32 {
        let now = t0 + k * MS;
        let fake = 1_000 + u64::from(k);
        match d.handle_datagram(now, addr(77, 9), &announce_of(fake, fake, Role::Peer)) {
            Ok(()) => {}
            Err(Dropped::Unconfirmed) => held += 1,
            Err(e) => panic!("{e:?}"),
        }
        if k == 1000 {
            let (a, p) = (announce_of(real, 5, Role::Peer), probe_with(real, 5));
            // Beyond the admission rate: held, then entered by its probe.
            assert_eq!(
                d.handle_datagram(now, addr(50, 9), &a),
                Err(Dropped::Unconfirmed)
            );
            d.handle_datagram(now, addr(50, 9), &p).unwrap();
        }
        d.handle_timeout(now);
        for e in events(&mut d) {
            match e {
                DiscoveryEvent::Discovered(_) => discovered += 1,
                DiscoveryEvent::Dial(i) => {
                    dials += 1;
                    if i.id == PeerId::from_u64(real) {
                        real_dialed.get_or_insert(now);
                    }
                    d.dial_failed(now, i.id);
                }
                _ => {}
            }
        }
    }
    // 20 at once, then 20 a second, over 2 s: 60, the real one included.
    assert!(discovered <= 61, "{discovered} entered");
    assert!(held >= 1900, "{held} held back");
    assert!(dials <= 61, "{dials} dials in 2 s");
    let dialed = real_dialed.expect("the real peer was dialed");
    assert!(
        dialed - (t0 + 1000 * MS) <= 60 * MS,
        "dialed after {:?}",
        dialed - t0
    );
    assert!(d.admission.candidates() <= 64, "candidates are bounded");
}

/// Node 1, which heard node 2's announce, dialed it and holds a session.
fn node_1_with_a_session_to_2(now: Instant) -> (Discovery, PeerInfo) {
    let mut d = started(1, Role::Peer, now);
    d.handle_datagram(now, addr(2, 9), &announce_of(2, 2000, Role::Peer))
        .unwrap();
    d.handle_timeout(now);
    let info = match &events(&mut d)[..] {
        [DiscoveryEvent::Discovered(_), DiscoveryEvent::Dial(i)] => i.clone(),
        e => panic!("{e:?}"),
    };
    d.session_up(now, info.clone());
    (d, info)
}

#[test]
fn timeout_makes_peer_missing_until_it_answers_again() {
    let now = Instant::now();
    let (mut d, info) = node_1_with_a_session_to_2(now);
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

/// An announce of a new instance while the session is up is only a hint:
/// the session stays and the entry keeps what the session proved; the node
/// dials the announced address once, and only a handshake there with the
/// new instance (`session_up`) makes the entry follow. A failed dial
/// changes nothing; a later announce may try again.
#[test]
fn a_new_instance_while_the_session_is_up_is_dialed_not_believed() {
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
    // Claimed from elsewhere: dialed there, once.
    for _ in 0..3 {
        d.handle_datagram(now, addr(9, 9), &announce_of(2, 2001, Role::Peer))
            .unwrap();
    }
    let dialed = match &events(&mut d)[..] {
        [DiscoveryEvent::Dial(i)] => i.clone(),
        e => panic!("{e:?}"),
    };
    assert_eq!((dialed.instance, dialed.addr.ip()), (2001, addr(9, 9).ip()));
    let (kept, state) = d.peer(info.id).unwrap();
    assert_eq!((kept.instance, kept.addr), (2000, info.addr));
    assert_eq!(state, PeerState::Connected);
    // Nobody there: the session stays; the next claim is dialed again.
    d.dial_failed(now, info.id);
    assert_eq!(d.peer(info.id).unwrap().1, PeerState::Connected);
    d.handle_datagram(
        now + 100 * MS,
        addr(9, 9),
        &announce_of(2, 2001, Role::Peer),
    )
    .unwrap();
    assert!(matches!(&events(&mut d)[..], [DiscoveryEvent::Dial(_)]));
    // A real restart: the handshake there proves the new instance.
    d.session_up(now, dialed.clone());
    let (now_info, _) = d.peer(info.id).unwrap();
    assert_eq!((now_info.instance, now_info.addr), (2001, dialed.addr));
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
        aes_gcm: false,
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
    assert!(t.contains(SocketAddr::from((Ipv4Addr::new(10, 0, 0, 200), 1))));
    assert!(!t.contains(SocketAddr::from((Ipv4Addr::new(10, 0, 1, 1), 1))));
    let all = Target {
        prefix_len: 0,
        ..target(1)
    };
    assert!(all.contains(SocketAddr::from((Ipv4Addr::new(1, 2, 3, 4), 1))));
}

/// Two live nodes with id 2 (instances 2000 at .2 and 2001 at .3) answer
/// in turns: the change back to 2000 is a duplicate, reported once; for the
/// hold-down the entry stays with 2001 and 2000 is dropped, so the session
/// is replaced once, not on every announce. A real restart (a new instance
/// that stays) is never taken for one.
#[test]
fn a_duplicated_id_is_reported_once_and_held_down() {
    let t0 = Instant::now();
    let mut d = started(1, Role::Peer, t0);
    let (first, second) = (addr(2, 9), addr(3, 9));
    d.handle_datagram(t0, first, &announce_of(2, 2000, Role::Peer))
        .unwrap();
    d.handle_timeout(t0);
    let info = match &events(&mut d)[..] {
        [_, DiscoveryEvent::Dial(i)] => i.clone(),
        e => panic!("{e:?}"),
    };
    d.session_up(t0, info.clone());
    // The second node: looks like a restart, once. It is dialed, its
    // handshake is not a duplicate yet, and it replaces the session.
    let t1 = t0 + 500 * MS;
    d.handle_datagram(t1, second, &announce_of(2, 2001, Role::Peer))
        .unwrap();
    let restarted = match &events(&mut d)[..] {
        [DiscoveryEvent::Dial(i)] if i.instance == 2001 => i.clone(),
        e => panic!("{e:?}"),
    };
    assert!(!d.duplicate_instance(t1, restarted.id, 2001, restarted.addr));
    d.session_up(t1, restarted);
    // The first one again: a duplicate.
    let t2 = t1 + 500 * MS;
    assert_eq!(
        d.handle_datagram(t2, first, &announce_of(2, 2000, Role::Peer)),
        Err(Dropped::DuplicateId)
    );
    match &events(&mut d)[..] {
        [DiscoveryEvent::Duplicate { id, kept, other }] => {
            assert_eq!(*id, PeerId::from_u64(2));
            assert_eq!(kept.ip(), second.ip());
            assert_eq!(*other, SocketAddr::new(first.ip(), 7002));
        }
        e => panic!("{e:?}"),
    }
    // Held down: the first is ignored, silently; the second is kept; the
    // handshake path is refused the same way.
    for k in 1..20u32 {
        let t = t2 + k * 1000 * MS;
        assert_eq!(
            d.handle_datagram(t, first, &announce_of(2, 2000, Role::Peer)),
            Err(Dropped::DuplicateId)
        );
        d.handle_datagram(t, second, &announce_of(2, 2001, Role::Peer))
            .unwrap();
    }
    let hello_addr = first;
    assert!(d.duplicate_instance(t2 + 20_000 * MS, PeerId::from_u64(2), 2000, hello_addr));
    assert!(!d.duplicate_instance(t2 + 20_000 * MS, PeerId::from_u64(2), 2001, hello_addr));
    assert!(
        events(&mut d).iter().all(|e| !matches!(
            e,
            DiscoveryEvent::Dial(_) | DiscoveryEvent::Duplicate { .. }
        )),
        "no restart, no second report during the hold-down"
    );
    // After the hold-down, the first one again: one change (dialed, its
    // handshake replaces the session), then reported again on the change
    // back.
    let t3 = t2 + DUPLICATE_HOLD + 1000 * MS;
    d.handle_datagram(t3, first, &announce_of(2, 2000, Role::Peer))
        .unwrap();
    let back = match &events(&mut d)[..] {
        [DiscoveryEvent::Dial(i)] => i.clone(),
        e => panic!("{e:?}"),
    };
    assert!(!d.duplicate_instance(t3, back.id, 2000, back.addr));
    d.session_up(t3, back);
    assert_eq!(
        d.handle_datagram(t3 + 100 * MS, second, &announce_of(2, 2001, Role::Peer)),
        Err(Dropped::DuplicateId)
    );
    assert!(matches!(
        &events(&mut d)[..],
        [DiscoveryEvent::Duplicate { .. }]
    ));
}

#[test]
fn restarts_are_never_taken_for_duplicates() {
    let t0 = Instant::now();
    let mut d = started(1, Role::Peer, t0);
    // Three restarts in a row, seconds apart: each a new instance.
    for (k, instance) in [2000u64, 2001, 2002, 2003].into_iter().enumerate() {
        let t = t0 + (k as u32) * 2000 * MS;
        d.handle_datagram(t, addr(2, 9), &announce_of(2, instance, Role::Peer))
            .unwrap();
    }
    assert!(
        events(&mut d)
            .iter()
            .all(|e| !matches!(e, DiscoveryEvent::Duplicate { .. }))
    );
}

/// Under a flood from one address, a real node's once-heard announce from
/// another address is not pushed out of the bounded candidates: its
/// confirming probe, half a second and hundreds of made-up ids later,
/// still finds it.
#[test]
fn a_flood_from_one_address_cannot_push_out_another_addresss_candidate() {
    let t0 = Instant::now();
    let mut cfg = cfg(1, Role::Peer);
    cfg.max_peers = 16;
    let mut d = started_with(cfg, t0);
    let mut fake = 10_000u64;
    let mut flood = |d: &mut Discovery, n: u32, at: Instant| {
        for _ in 0..n {
            fake += 1;
            let _ = d.handle_datagram(at, addr(77, 9), &announce_of(fake, fake, Role::Peer));
        }
    };
    flood(&mut d, 100, t0);
    let real = 999u64;
    assert_eq!(
        d.handle_datagram(t0, addr(50, 9), &announce_of(real, 5, Role::Peer)),
        Err(Dropped::Unconfirmed)
    );
    flood(&mut d, 500, t0 + 100 * MS);
    assert!(d.admission.candidates() <= 16);
    d.handle_datagram(t0 + 500 * MS, addr(50, 9), &probe_with(real, 5))
        .unwrap();
    assert!(
        d.peer(PeerId::from_u64(real)).is_some(),
        "the real node entered"
    );
}

fn with_key(mut c: DiscoveryConfig, key: u8, first_seq: u64) -> DiscoveryConfig {
    c.fleet_key = Some(crate::FleetKey::from_bytes([key; 32]));
    c.first_seq = first_seq;
    c
}

/// The announce and the probe a started machine sends first (sealed if
/// it has a key).
fn first_sent(d: &mut Discovery) -> (Vec<u8>, Vec<u8>) {
    let mut t = transmits(d).into_iter().map(|t| t.payload);
    (t.next().unwrap(), t.next().unwrap())
}

/// The announce a started machine sends first.
fn first_announce(d: &mut Discovery) -> Vec<u8> {
    first_sent(d).0
}

#[test]
fn with_a_fleet_key_only_key_holders_are_heard_and_answered_once() {
    let now = Instant::now();
    let start = |id: u64, key: Option<u8>| {
        let c = match key {
            Some(k) => with_key(cfg(id, Role::Peer), k, 1_000 * id),
            None => cfg(id, Role::Peer),
        };
        let mut d = Discovery::new(c, id);
        d.set_targets(now, vec![target(id as u8)]);
        d
    };
    let mut a = start(1, Some(7));
    let mut b = start(2, Some(7));
    let mut other = start(3, Some(8));
    let mut open = start(4, None);
    transmits(&mut a);
    let (from_b, mut b_probe) = first_sent(&mut b);
    // The holder of the same key is heard.
    assert_eq!(a.handle_datagram(now, addr(2, 9000), &from_b), Ok(()));
    assert!(
        events(&mut a)
            .iter()
            .any(|e| matches!(e, DiscoveryEvent::Discovered(_)))
    );
    // Sent again (a capture replayed): dropped, nothing happens.
    assert_eq!(
        a.handle_datagram(now, addr(2, 9000), &from_b),
        Err(Dropped::Replayed)
    );
    assert!(events(&mut a).is_empty());
    // Another key, or none: dropped, and a probe gets no answer.
    for d in [&mut other, &mut open] {
        let announce = first_announce(d);
        let probe = transmits(d)
            .into_iter()
            .next()
            .map_or(announce.clone(), |t| t.payload);
        for bytes in [announce, probe] {
            assert_eq!(
                a.handle_datagram(now, addr(3, 9000), &bytes),
                Err(Dropped::Unauthenticated)
            );
        }
    }
    assert!(
        transmits(&mut a).is_empty(),
        "no reply to a node without the key"
    );
    assert!(events(&mut a).is_empty());
    // A datagram of the holder altered on the way: dropped.
    let at = b_probe.len() / 2;
    b_probe[at] ^= 1;
    assert_eq!(
        a.handle_datagram(now, addr(2, 9000), &b_probe),
        Err(Dropped::Unauthenticated)
    );
    // The key holder's own datagrams carry the trailer and still fit.
    let t = transmits(&mut a);
    assert!(
        t.iter()
            .all(|t| t.payload.len() <= DatagramLimits::default().max_size)
    );
}

#[test]
fn a_restarted_key_holder_goes_on_above_its_old_numbers() {
    let now = Instant::now();
    let mut a = Discovery::new(with_key(cfg(1, Role::Peer), 7, 0), 1);
    a.set_targets(now, vec![target(1)]);
    // Instance 1 started at t = 1 000 µs and sent a few datagrams.
    let mut b1 = Discovery::new(with_key(cfg(2, Role::Peer), 7, 1_000), 2);
    b1.set_targets(now, vec![target(2)]);
    let old = first_announce(&mut b1);
    assert_eq!(a.handle_datagram(now, addr(2, 9000), &old), Ok(()));
    // Restarted a second later (the clock moved on): a new instance.
    let mut c = cfg(2, Role::Peer);
    c.instance += 1;
    let mut b2 = Discovery::new(with_key(c, 7, 1_001_000), 2);
    b2.set_targets(now, vec![target(2)]);
    let new = first_announce(&mut b2);
    assert_eq!(a.handle_datagram(now, addr(2, 9000), &new), Ok(()));
    // The old instance's capture, replayed now: dropped.
    assert_eq!(
        a.handle_datagram(now, addr(2, 9000), &old),
        Err(Dropped::Replayed)
    );
}

fn routed(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(192, 168, 9, host), port))
}

#[test]
fn static_peers_are_probed_by_unicast_and_heard_from_any_subnet() {
    let now = Instant::now();
    let mut c = cfg(1, Role::Peer);
    c.static_peers = vec![routed(5, PORT)];
    let mut d = Discovery::new(c, 1);
    // Even with no interface that can broadcast.
    d.set_targets(now, vec![]);
    let t = transmits(&mut d);
    assert_eq!(
        t.iter().filter(|t| t.dst == routed(5, PORT)).count(),
        2,
        "announce and probe"
    );
    // Each later probe round too.
    let next = d.poll_timeout().expect("probing is scheduled");
    d.handle_timeout(next);
    assert!(transmits(&mut d).iter().any(|t| t.dst == routed(5, PORT)));
    // The static peer's announce, from its own subnet, is taken.
    assert_eq!(
        d.handle_datagram(now, routed(5, 9000), &announce_of(5, 5000, Role::Peer)),
        Ok(())
    );
    assert!(events(&mut d).iter().any(
        |e| matches!(e, DiscoveryEvent::Discovered(i) if i.interface.as_deref() == Some("routed"))
    ));
    // Anyone else's from there is not; nor its probes, by default.
    assert_eq!(
        d.handle_datagram(now, routed(6, 9000), &announce_of(6, 6000, Role::Peer)),
        Err(Dropped::ForeignInterface)
    );
    assert_eq!(
        d.handle_datagram(now, routed(6, 9000), &probe_of(6)),
        Err(Dropped::ForeignInterface)
    );
}

#[test]
fn a_node_not_confined_to_its_interfaces_answers_a_routed_probe() {
    let now = Instant::now();
    let mut c = cfg(2, Role::Peer);
    c.accept_routed_probes = true;
    let mut d = Discovery::new(c, 2);
    d.set_targets(now, vec![target(2)]);
    transmits(&mut d);
    assert_eq!(
        d.handle_datagram(now, routed(7, 9000), &probe_of(7)),
        Ok(())
    );
    let t = transmits(&mut d);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].dst, routed(7, 9000), "answered by unicast");
    // Announces from there are still not taken (only static peers').
    assert_eq!(
        d.handle_datagram(now, routed(7, 9000), &announce_of(7, 7000, Role::Peer)),
        Err(Dropped::ForeignInterface)
    );
}

#[test]
fn a_peer_that_holds_a_session_with_the_prober_and_is_listed_does_not_answer() {
    let now = Instant::now();
    let mut b = started(2, Role::Peer, now);
    transmits(&mut b);
    // B has a session with A (instance 1000).
    b.handle_datagram(now, addr(1, 9000), &announce_of(1, 1000, Role::Peer))
        .unwrap();
    b.session_up(
        now,
        PeerInfo {
            id: PeerId::from_u64(1),
            instance: 1000,
            name: "n1".into(),
            addr: addr(1, 7001),
            interface: Some("veth0".into()),
            role: Role::Peer,
            metadata: BTreeMap::new(),
            aes_gcm: false,
        },
    );
    transmits(&mut b);
    let probe = |known: Vec<u64>, instance: u64| {
        Datagram::Probe(Probe {
            service: "svc".into(),
            id: PeerId::from_u64(1),
            instance,
            role: Role::Peer,
            known: known.into_iter().map(PeerId::from_u64).collect(),
        })
        .encode()
    };
    // Listed, session up with that instance: no answer.
    assert_eq!(
        b.handle_datagram(now, addr(1, 9000), &probe(vec![2, 3], 1000)),
        Err(Dropped::KnownAnswer)
    );
    assert!(transmits(&mut b).is_empty());
    // Not listed, or listed by another instance (A restarted): answered.
    let later = now + 1000 * MS;
    assert_eq!(
        b.handle_datagram(later, addr(1, 9000), &probe(vec![3], 1000)),
        Ok(())
    );
    assert_eq!(transmits(&mut b).len(), 1);
    let later = later + 1000 * MS;
    assert_eq!(
        b.handle_datagram(later, addr(1, 9000), &probe(vec![2], 1001)),
        Ok(())
    );
    assert_eq!(transmits(&mut b).len(), 1);
    // And B's own probes list A.
    let next = b.poll_timeout().unwrap();
    b.handle_timeout(next.max(later));
    let sent: Vec<_> = transmits(&mut b)
        .into_iter()
        .filter_map(
            |t| match Datagram::decode(&t.payload, &DatagramLimits::default()) {
                Ok(Datagram::Probe(p)) => Some(p.known),
                _ => None,
            },
        )
        .collect();
    assert!(
        sent.iter().all(|k| k == &vec![PeerId::from_u64(1)]),
        "{sent:?}"
    );
}

/// IPv6: datagrams go to the group on each link, a peer heard from a
/// link-local address is reached at it with its scope, and a link-local
/// source on another interface is not from this link.
#[test]
fn ipv6_links_are_reached_by_the_group_and_peers_by_scoped_addresses() {
    let now = Instant::now();
    let mut d = Discovery::new(cfg(1, Role::Peer), 1);
    d.set_targets(now, vec![Target::v6("eth0", "fe80::1".parse().unwrap(), 2)]);
    let group: SocketAddr = "[ff02::6c62%2]:5000".parse().unwrap();
    let t = transmits(&mut d);
    assert!(t.len() == 2 && t.iter().all(|t| t.dst == group), "{t:?}");
    let peer: SocketAddr = "[fe80::5%2]:40000".parse().unwrap();
    // An announce and the probe it comes with: heard twice, admitted.
    d.handle_datagram(now, peer, &announce_of(2, 2000, Role::Peer))
        .unwrap();
    let _ = d.handle_datagram(now, peer, &probe_with(2, 2000));
    let found = events(&mut d);
    let info = found
        .iter()
        .find_map(|e| match e {
            DiscoveryEvent::Discovered(i) => Some(i),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(info.addr, "[fe80::5%2]:7002".parse::<SocketAddr>().unwrap());
    assert_eq!(info.interface.as_deref(), Some("eth0"));
    // The probe is answered at its own scoped address.
    assert!(transmits(&mut d).iter().any(|t| t.dst == peer));
    let elsewhere: SocketAddr = "[fe80::5%3]:40000".parse().unwrap();
    assert_eq!(
        d.handle_datagram(now, elsewhere, &announce_of(3, 3000, Role::Peer)),
        Err(Dropped::ForeignInterface)
    );
}

/// One-way loss: a peer whose probes keep arriving while nothing of ours
/// reaches it stays missing. Probing is fast for `peer_expiry` (a lost
/// peer is found again within a second), then backs off to the normal cap
/// instead of going on every second forever.
#[test]
fn a_peer_missing_longer_than_its_expiry_no_longer_speeds_probing_up() {
    let now = Instant::now();
    let (mut d, info) = node_1_with_a_session_to_2(now);
    d.session_down(now, info.id, &DownReason::HeartbeatTimeout);
    transmits(&mut d);
    // 40 s: the peer's probes arrive every 500 ms, our answers never do.
    let mut probes = Vec::new();
    let mut t = now;
    let mut next_peer_probe = now;
    while t < now + Duration::from_secs(40) {
        let due = d.poll_timeout().unwrap().min(next_peer_probe);
        t = due;
        if t >= next_peer_probe {
            let _ = d.handle_datagram(t, addr(2, 9), &probe_with(2, 2000));
            next_peer_probe = t + 500 * MS;
        }
        d.handle_timeout(t);
        for x in transmits(&mut d) {
            let probe = matches!(
                Datagram::decode(&x.payload, &DatagramLimits::default()),
                Ok(Datagram::Probe(_))
            );
            if probe && x.dst == addr(255, PORT) {
                probes.push(t - now);
            }
        }
    }
    assert_eq!(
        d.peers().next().unwrap().1,
        PeerState::Missing,
        "still kept"
    );
    let gaps = |from: u64, to: u64| -> Vec<Duration> {
        probes
            .windows(2)
            .filter(|w| w[0] >= Duration::from_secs(from) && w[1] <= Duration::from_secs(to))
            .map(|w| w[1] - w[0])
            .collect()
    };
    let early = gaps(2, 9);
    assert!(
        early.iter().all(|g| *g <= 1300 * MS),
        "fast at first: {early:?}"
    );
    let late = gaps(15, 40);
    assert!(late.iter().all(|g| *g >= 2200 * MS), "backed off: {late:?}");
    assert!(late.len() <= 12, "{late:?}");
}
