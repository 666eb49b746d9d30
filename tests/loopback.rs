//! Several nodes in one process on loopback: discovery, sessions, messages,
//! goodbye, roles.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use common::{config, connected_pair, free_port, trace, wait_for, wait_up};
use lanbeat::{Bytes, DownReason, Error, Event, Node, PeerState, Role};
use tokio::time::{Instant, sleep};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_form_exactly_one_session_per_pair() {
    trace();
    let port = free_port();
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(
            Node::start(config("mesh", port).name(format!("n{i}")).build().unwrap())
                .await
                .unwrap(),
        );
    }
    let ids: Vec<_> = nodes.iter().map(|(n, _)| n.id()).collect();
    // Each node sees a SessionUp for each other node.
    let mut ups: Vec<HashSet<_>> = vec![HashSet::new(); 4];
    let deadline = Instant::now() + Duration::from_secs(5);
    while ups.iter().any(|u| u.len() < 3) {
        assert!(Instant::now() < deadline, "mesh incomplete: {ups:?}");
        for (i, (_, events)) in nodes.iter_mut().enumerate() {
            while let Some(e) = events.try_recv() {
                match e {
                    Event::SessionUp { peer, .. } => assert!(ups[i].insert(peer), "second session"),
                    Event::SessionDown { peer, reason } => panic!("{peer} down: {reason}"),
                    _ => {}
                }
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
    // Settle: no session churns, one session per pair.
    sleep(Duration::from_millis(500)).await;
    for (node, events) in &mut nodes {
        while let Some(e) = events.try_recv() {
            assert!(
                !matches!(e, Event::SessionUp { .. } | Event::SessionDown { .. }),
                "churn: {e:?}"
            );
        }
        let peers = node.peers();
        assert_eq!(peers.len(), 3);
        assert!(peers.iter().all(|p| p.state == PeerState::Connected));
        assert!(peers.iter().all(|p| p.last_rtt.is_some()));
        assert!(peers.iter().all(|p| ids.contains(&p.info.id)));
    }
    let total: u64 = nodes.iter().map(|(n, _)| n.stats().sessions_up).sum();
    assert_eq!(total, 12, "6 pairs, each session counted at both ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arrive_in_order_both_ways() {
    trace();
    let port = free_port();
    let ((a, mut ea), (b, mut eb)) = connected_pair(
        config("order", port).name("a").build().unwrap(),
        config("order", port).name("b").build().unwrap(),
    )
    .await;
    const N: u32 = 5000;
    let (a2, b2, ia, ib) = (a.clone(), b.clone(), a.id(), b.id());
    let send_a = tokio::spawn(async move {
        for i in 0..N {
            a2.send(ib, i.to_be_bytes().to_vec()).await.unwrap();
        }
    });
    let send_b = tokio::spawn(async move {
        for i in 0..N {
            b2.send_json(ia, &serde_json::json!({ "seq": i }))
                .await
                .unwrap();
        }
    });
    let mut next_at_b = 0u32;
    let mut next_at_a = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while next_at_a < N || next_at_b < N {
        assert!(
            Instant::now() < deadline,
            "only {next_at_a}/{next_at_b} arrived"
        );
        tokio::select! {
            Some(e) = eb.recv() => if let Event::Message { peer, data } = e {
                assert_eq!(peer, ia);
                assert_eq!(u32::from_be_bytes(data[..].try_into().unwrap()), next_at_b);
                next_at_b += 1;
            },
            Some(e) = ea.recv() => if let Event::Message { peer, data } = e {
                assert_eq!(peer, ib);
                let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
                assert_eq!(v["seq"], next_at_a);
                next_at_a += 1;
            },
        }
    }
    send_a.await.unwrap();
    send_b.await.unwrap();
    assert_eq!(a.stats().messages_received, u64::from(N));
    assert_eq!(b.stats().messages_sent, u64::from(N));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_is_seen_as_goodbye_long_before_the_timeout() {
    trace();
    let port = free_port();
    // A slow heartbeat: a timeout would take 3 s.
    let slow = |n| {
        config("bye", port)
            .name(n)
            .heartbeat(Duration::from_secs(1), Duration::from_secs(3))
            .build()
            .unwrap()
    };
    let ((a, mut ea), (b, mut eb)) = connected_pair(slow("bye-a"), slow("bye-b")).await;
    // A sender bound to the session delivers while it is up...
    let to_b = a.sender(b.id()).expect("session up");
    assert_eq!(to_b.peer(), b.id());
    to_b.send("via sender").await.unwrap();
    to_b.try_send("and again").unwrap();
    for want in ["via sender", "and again"] {
        let e = wait_for(&mut eb, Duration::from_secs(2), |e| {
            matches!(e, Event::Message { .. })
        })
        .await;
        assert_eq!(
            e,
            Event::Message {
                peer: a.id(),
                data: want.into()
            }
        );
    }
    // A batch: in order, all of it, and nothing at all if one is too large.
    let mut batch: VecDeque<Bytes> = (0..100).map(|i| Bytes::from(format!("m{i}"))).collect();
    to_b.send_batch(&mut batch).await.unwrap();
    assert!(batch.is_empty());
    for i in 0..100 {
        let e = wait_for(&mut eb, Duration::from_secs(2), |e| {
            matches!(e, Event::Message { .. })
        })
        .await;
        let Event::Message { data, .. } = e else {
            unreachable!()
        };
        assert_eq!(data, format!("m{i}"));
    }
    let mut big: VecDeque<Bytes> = [Bytes::from("ok"), Bytes::from(vec![0u8; 2 << 20])].into();
    assert!(matches!(
        to_b.send_batch(&mut big).await,
        Err(Error::MessageTooLarge { size, .. }) if size == 2 << 20
    ));
    assert_eq!(big.len(), 2);
    let t0 = Instant::now();
    b.shutdown().await;
    let e = wait_for(&mut ea, Duration::from_secs(2), |e| {
        matches!(e, Event::SessionDown { .. })
    })
    .await;
    let took = t0.elapsed();
    assert_eq!(
        e,
        Event::SessionDown {
            peer: b.id(),
            reason: DownReason::Goodbye
        }
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    // ...and hands messages back once it is down.
    match to_b.send("too late").await {
        Err(Error::NotConnected { peer, message }) => {
            assert_eq!(peer, b.id());
            assert_eq!(&message[..], b"too late");
        }
        other => panic!("{other:?}"),
    }
    let mut late: VecDeque<Bytes> = [Bytes::from("x"), Bytes::from("y")].into();
    match to_b.send_batch(&mut late).await {
        Err(Error::NotConnected { message, .. }) => assert_eq!(message, "x"),
        other => panic!("{other:?}"),
    }
    assert_eq!(late, [Bytes::from("y")]);
    // The node forgets the session right after reporting it down.
    let t1 = Instant::now();
    while a.sender(b.id()).is_some() {
        assert!(t1.elapsed() < Duration::from_secs(1), "session kept");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(
        &mut ea,
        Duration::from_secs(1),
        |e| matches!(e, Event::PeerLost { peer } if *peer == b.id()),
    )
    .await;
    assert!(a.peers().is_empty());
    // The stopped node's stream ends, after its own SessionDown(shutdown).
    let mut saw_shutdown = false;
    while let Some(e) = eb.recv().await {
        if matches!(
            e,
            Event::SessionDown {
                reason: DownReason::Shutdown,
                ..
            }
        ) {
            saw_shutdown = true;
        }
    }
    assert!(saw_shutdown);
    assert!(matches!(b.send(a.id(), "late").await, Err(Error::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_says_goodbye() {
    trace();
    let port = free_port();
    let (a, mut ea) = Node::start(config("drop", port).name("a").build().unwrap())
        .await
        .unwrap();
    let (b, eb) = Node::start(config("drop", port).name("b").build().unwrap())
        .await
        .unwrap();
    wait_up(&mut ea, b.id(), Duration::from_secs(5)).await;
    let bid = b.id();
    drop(b);
    drop(eb);
    let e = wait_for(&mut ea, Duration::from_secs(2), |e| {
        matches!(e, Event::SessionDown { .. })
    })
    .await;
    assert_eq!(
        e,
        Event::SessionDown {
            peer: bid,
            reason: DownReason::Goodbye
        }
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_pair_only_where_one_side_dials_and_the_other_accepts() {
    trace();
    let port = free_port();
    let start = |name: &'static str, role| async move {
        Node::start(config("roles", port).name(name).role(role).build().unwrap())
            .await
            .unwrap()
    };
    let (lamp1, mut e_lamp1) = start("lamp1", Role::Device).await;
    let (lamp2, mut e_lamp2) = start("lamp2", Role::Device).await;
    let (phone, mut e_phone) = start("phone", Role::Controller).await;
    let (tablet, mut e_tablet) = start("tablet", Role::Controller).await;
    for ev in [&mut e_phone, &mut e_tablet] {
        let mut up = HashSet::new();
        while up.len() < 2 {
            if let Event::SessionUp { peer, outbound, .. } =
                wait_for(ev, Duration::from_secs(5), |e| {
                    matches!(e, Event::SessionUp { .. })
                })
                .await
            {
                assert!(outbound, "a controller dials");
                up.insert(peer);
            }
        }
        assert_eq!(up, HashSet::from([lamp1.id(), lamp2.id()]));
    }
    sleep(Duration::from_millis(500)).await;
    // Devices never pair with each other, controllers never with each other.
    for (ev, expect) in [
        (&mut e_lamp1, vec![phone.id(), tablet.id()]),
        (&mut e_lamp2, vec![phone.id(), tablet.id()]),
    ] {
        let mut up = Vec::new();
        while let Some(e) = ev.try_recv() {
            if let Event::SessionUp { peer, outbound, .. } = e {
                assert!(!outbound);
                up.push(peer);
            }
        }
        up.sort();
        let mut expect = expect;
        expect.sort();
        assert_eq!(up, expect);
    }
    assert!(phone.peers().iter().all(|p| p.info.id != tablet.id()));
    assert_eq!(lamp1.peers().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_other_services_never_pair() {
    trace();
    let port = free_port();
    let (a, mut ea) = Node::start(config("svc", port).name("a").build().unwrap())
        .await
        .unwrap();
    let other = lanbeat::Config::builder(format!("other-{}", std::process::id()))
        .loopback_only()
        .discovery_port(port)
        .build()
        .unwrap();
    let (b, _eb) = Node::start(other).await.unwrap();
    let (c, _ec) = Node::start(config("svc", port).name("c").build().unwrap())
        .await
        .unwrap();
    wait_up(&mut ea, c.id(), Duration::from_secs(5)).await;
    sleep(Duration::from_millis(500)).await;
    assert!(a.peers().iter().all(|p| p.info.id != b.id()));
    assert!(b.peers().is_empty());
    assert!(a.stats().dropped_other_service > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_errors_hand_the_message_back() {
    let port = free_port();
    let (a, _ea) = Node::start(
        config("senderr", port)
            .max_frame_size(1024)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let nobody = lanbeat::PeerId::from_u64(42);
    match a.send(nobody, "hi").await {
        Err(Error::NotConnected { peer, message }) => {
            assert_eq!(peer, nobody);
            assert_eq!(&message[..], b"hi");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.try_send(nobody, vec![0u8; 2000]),
        Err(Error::MessageTooLarge {
            size: 2000,
            limit: 1023
        })
    ));
    let counts: HashMap<_, _> = [("sent", a.stats().messages_sent)].into();
    assert_eq!(counts["sent"], 0);
    // After shutdown, sending says so (not "not connected").
    a.shutdown().await;
    assert!(matches!(a.send(nobody, "late").await, Err(Error::Shutdown)));
    assert!(matches!(a.try_send(nobody, "late"), Err(Error::Shutdown)));
    assert!(matches!(a.send_all("late").await, Err(Error::Shutdown)));
    assert!(a.sender(nobody).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_application_pushes_back_without_loss_or_timeout() {
    trace();
    let port = free_port();
    // A tiny event queue: it fills at once while the application sleeps.
    let ((a, mut ea), (b, mut eb)) = connected_pair(
        config("slowapp", port)
            .name("a")
            .event_capacity(16)
            .build()
            .unwrap(),
        config("slowapp", port).name("b").build().unwrap(),
    )
    .await;
    const N: u32 = 2000;
    let (b2, aid) = (b.clone(), a.id());
    let sender = tokio::spawn(async move {
        for i in 0..N {
            b2.send(aid, i.to_be_bytes().to_vec()).await.unwrap();
        }
    });
    // The application does not look at its events for a second (three
    // heartbeat timeouts).
    sleep(Duration::from_secs(1)).await;
    let mut next = 0u32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while next < N {
        assert!(Instant::now() < deadline, "only {next} arrived");
        match tokio::time::timeout(Duration::from_secs(5), ea.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Message { data, .. } => {
                assert_eq!(u32::from_be_bytes(data[..].try_into().unwrap()), next);
                next += 1;
            }
            Event::SessionDown { reason, .. } => panic!("session down: {reason}"),
            _ => {}
        }
    }
    sender.await.unwrap();
    assert_eq!(
        a.stats().heartbeat_timeouts + b.stats().heartbeat_timeouts,
        0
    );
    while let Some(e) = eb.try_recv() {
        assert!(!matches!(e, Event::SessionDown { .. }), "{e:?}");
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interface_that_does_not_exist_fails_the_start_and_is_named() {
    // One named interface: the node's sockets are bound to it (Linux), so
    // a name that does not exist cannot start a node that would hear and
    // send nothing.
    let cfg = lanbeat::Config::builder("t-nope")
        .interface("nope0")
        .discovery_port(free_port())
        .build()
        .unwrap();
    match Node::start(cfg).await {
        Err(e @ Error::Interface { .. }) => {
            let Error::Interface { name, .. } = &e else {
                unreachable!()
            };
            assert_eq!(name, "nope0");
            assert!(e.to_string().contains("nope0"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a node started on an interface that does not exist"),
    }
    // One of several: the same, naming the missing one.
    let cfg = lanbeat::Config::builder("t-nope2")
        .interface("lo")
        .interface("nope1")
        .discovery_port(free_port())
        .build()
        .unwrap();
    match Node::start(cfg).await {
        Err(Error::Interface { name, .. }) => assert_eq!(name, "nope1"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a node started on an interface that does not exist"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_id_is_reported_and_its_session_stops_flapping() {
    // Two nodes started from one copied identity share its id; a third
    // (with a lower id, so it dials) sees them answer in turns. It must say so
    // and keep one session instead of replacing it on every announce.
    trace();
    let port = free_port();
    // The lower id dials: the observer gets the lower of two identities.
    let mut keys = [lanbeat::Identity::generate(), lanbeat::Identity::generate()];
    keys.sort_by_key(|k| k.peer_id());
    let [mine, copied] = keys;
    let dup = copied.peer_id();
    let (observer, mut events) = Node::start(
        config("dup", port)
            .name("observer")
            .identity(mine)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let node = |name: &str| {
        config("dup", port)
            .name(name)
            .identity(copied.clone())
            .build()
            .unwrap()
    };
    let (_a1, _e1) = Node::start(node("a1")).await.unwrap();
    wait_up(&mut events, dup, Duration::from_secs(5)).await;
    let (_a2, _e2) = Node::start(node("a2")).await.unwrap();
    let e = wait_for(&mut events, Duration::from_secs(10), |e| {
        matches!(e, Event::DuplicateId { .. })
    })
    .await;
    let Event::DuplicateId { peer, kept, other } = e else {
        unreachable!()
    };
    assert_eq!(peer, dup);
    assert_ne!(kept, other, "two nodes, two addresses");
    assert!(observer.stats().duplicate_ids >= 1);
    // Let what was under way settle, then watch: no more flapping.
    sleep(Duration::from_secs(1)).await;
    while events.try_recv().is_some() {}
    let quiet_until = Instant::now() + Duration::from_secs(4);
    let mut changes = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout_at(quiet_until, events.recv()).await {
        if matches!(&e, Event::SessionUp { peer, .. } | Event::SessionDown { peer, .. } if *peer == dup)
        {
            changes.push(e);
        }
    }
    assert!(changes.is_empty(), "still flapping: {changes:?}");
    let state = observer.peers().into_iter().find(|p| p.info.id == dup);
    assert_eq!(state.map(|p| p.state), Some(PeerState::Connected));
    assert!(observer.stats().dropped_duplicate_id > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtt_events_can_be_turned_off_and_json_goes_to_everyone() {
    trace();
    let port = free_port();
    let ((a, mut ea), (b, mut eb)) = connected_pair(
        config("quiet-rtt", port)
            .name("a")
            .rtt_events(false)
            .build()
            .unwrap(),
        config("quiet-rtt", port).name("b").build().unwrap(),
    )
    .await;
    // Heartbeats every 100 ms: a second is ten samples each way.
    let sent = a
        .send_all_json(&serde_json::json!({"lamp": "on"}))
        .await
        .unwrap();
    assert_eq!(sent, vec![b.id()]);
    let until = Instant::now() + Duration::from_secs(1);
    let mut rtt_a = 0;
    while let Ok(Some(e)) = tokio::time::timeout_at(until, ea.recv()).await {
        rtt_a += usize::from(matches!(e, Event::Rtt { .. }));
    }
    assert_eq!(rtt_a, 0, "no Rtt events with rtt_events(false)");
    let peer = a.peers().into_iter().find(|p| p.info.id == b.id()).unwrap();
    assert!(peer.last_rtt.is_some(), "the sample is still kept");
    let mut rtt_b = 0;
    let mut got = None;
    while let Some(e) = eb.try_recv() {
        match e {
            Event::Rtt { .. } => rtt_b += 1,
            Event::Message { data, .. } => got = Some(data),
            _ => {}
        }
    }
    assert!(rtt_b > 0, "the other node still reports them");
    assert_eq!(got.as_deref(), Some(&br#"{"lamp":"on"}"#[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_the_fleet_key_get_sessions() {
    // Nodes of one service: two share a fleet key, a third holds another,
    // a fourth none. Only the two with the same key pair; the others never
    // even learn of them: their datagrams carry no valid MAC (dropped and
    // counted), and the key holders' datagrams mean nothing to them.
    trace();
    let port = free_port();
    let fleet = lanbeat::FleetKey::generate();
    let node = |name: &str, key: Option<lanbeat::FleetKey>| {
        let mut b = config("fleet", port).name(name);
        if let Some(k) = key {
            b = b.fleet_key(k);
        }
        b.build().unwrap()
    };
    let ((a, mut ea), (b, mut eb)) =
        connected_pair(node("a", Some(fleet.clone())), node("b", Some(fleet))).await;
    let (other, mut eo) = Node::start(node("other", Some(lanbeat::FleetKey::generate())))
        .await
        .unwrap();
    let (open, mut en) = Node::start(node("open", None)).await.unwrap();
    // Long enough for every pair to discover and dial each other.
    sleep(Duration::from_secs(2)).await;
    for (who, events) in [("other", &mut eo), ("open", &mut en)] {
        while let Some(e) = events.try_recv() {
            match &e {
                Event::SessionUp { .. } => panic!("{who} got a session: {e:?}"),
                Event::Discovered(p) if p.id == a.id() || p.id == b.id() => {
                    panic!("{who} learned of a key holder: {e:?}")
                }
                _ => {}
            }
        }
    }
    for events in [&mut ea, &mut eb] {
        while let Some(e) = events.try_recv() {
            match e {
                Event::SessionUp { peer, .. } => {
                    panic!("a session with {peer}, who lacks the key")
                }
                Event::Discovered(p) => panic!("a key holder learned of {}", p.id),
                _ => {}
            }
        }
    }
    for n in [&a, &b, &other] {
        assert!(
            n.stats().dropped_unauthenticated > 0,
            "foreign datagrams were dropped"
        );
    }
    assert!(
        open.stats().dropped_malformed > 0,
        "sealed datagrams mean nothing without a key"
    );
    assert_eq!(
        a.stats().handshake_failures + b.stats().handshake_failures,
        0
    );
    assert!(a.sender(b.id()).is_some(), "the key holders stay connected");
    assert!(matches!(
        lanbeat::Config::builder("x")
            .insecure_plaintext()
            .fleet_key(lanbeat::FleetKey::generate())
            .build(),
        Err(lanbeat::ConfigError::FleetKeyWithoutNoise)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_policy_decides_who_holds_a_session() {
    // A gateway that asks the application about each peer it meets (trust
    // on first use): it accepts "lamp", refuses "mallory". A lamp that
    // trusts only the gateway's id. Mallory gets no session with either.
    trace();
    let port = free_port();
    let gateway_id = lanbeat::Identity::generate();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    let gateway = config("trust", port)
        .name("gateway")
        .identity(gateway_id.clone())
        .trust_with(move |r: &lanbeat::TrustRequest| {
            log.lock().unwrap().push(r.clone());
            r.name == "lamp"
        })
        .build()
        .unwrap();
    let lamp = config("trust", port)
        .name("lamp")
        .trust_only([gateway_id.peer_id()])
        .build()
        .unwrap();
    let ((g, mut eg), (l, mut el)) = connected_pair(gateway, lamp).await;
    let (m, mut em) = Node::start(config("trust", port).name("mallory").build().unwrap())
        .await
        .unwrap();
    sleep(Duration::from_secs(2)).await;
    // Mallory may count a connection as a session for a moment (each side
    // decides alone, and the refusing side closes without a goodbye), but
    // never holds one: the others never approve it, and send it nothing.
    g.send_all("for trusted peers").await.unwrap();
    l.send_all("for trusted peers").await.unwrap();
    sleep(Duration::from_millis(200)).await;
    while let Some(e) = em.try_recv() {
        assert!(!matches!(e, Event::Message { .. }), "mallory got {e:?}");
    }
    for events in [&mut eg, &mut el] {
        while let Some(e) = events.try_recv() {
            if let Event::SessionUp { peer, .. } = e {
                assert_ne!(peer, m.id(), "a session with mallory");
            }
        }
    }
    assert!(g.sender(l.id()).is_some() && l.sender(g.id()).is_some());
    let asked = asked.lock().unwrap().clone();
    // Each request names a key that proves its id; mallory was asked
    // about once (the refusal is remembered), the lamp once.
    for r in &asked {
        assert_eq!(lanbeat::PeerId::from_public_key(&r.public_key), r.id);
        assert_eq!(r.fingerprint, lanbeat::identity::fingerprint(&r.public_key));
    }
    let about = |name: &str| asked.iter().filter(|r| r.name == name).count();
    assert_eq!((about("lamp"), about("mallory")), (1, 1), "{asked:?}");
    // Every refused connection is counted (mallory may redial; the
    // application is not asked again).
    assert!(g.stats().sessions_untrusted >= 1);
    assert!(matches!(
        lanbeat::Config::builder("x")
            .insecure_plaintext()
            .trust_only([l.id()])
            .build(),
        Err(lanbeat::ConfigError::TrustWithoutNoise)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_named_by_address_is_found_without_broadcast() {
    // Two nodes on different discovery ports: no broadcast of one reaches
    // the other. One names the other's address; the session comes up, in
    // either id order (the naming side dials if the other cannot know it).
    trace();
    for round in 0..2 {
        let (pa, pb) = (free_port(), free_port());
        let (b, _eb) = Node::start(config("static", pb).name("b").build().unwrap())
            .await
            .unwrap();
        let (a, mut ea) = Node::start(
            config("static", pa)
                .name("a")
                .peer(format!("127.0.0.1:{pb}"))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
        wait_up(&mut ea, b.id(), Duration::from_secs(3)).await;
        assert!(a.sender(b.id()).is_some(), "round {round}");
        a.shutdown().await;
        b.shutdown().await;
    }
    // A name that does not resolve fails the start and is named.
    let r = Node::start(
        config("static", free_port())
            .peer("no-such-host.invalid")
            .build()
            .unwrap(),
    )
    .await;
    assert!(
        matches!(&r, Err(Error::PeerAddress { addr, .. }) if addr == "no-such-host.invalid"),
        "{:?}",
        r.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_same_identity_keeps_one_entry_found_by_name() {
    // A lamp keeps its identity across a restart: the controller holds one
    // entry for it (updated, not doubled), found by its name.
    trace();
    let port = free_port();
    let lamp_key = lanbeat::Identity::generate();
    let lamp = || {
        config("named", port)
            .name("kitchen")
            .identity(lamp_key.clone())
            .build()
            .unwrap()
    };
    let ((c, mut ec), (l, _el)) =
        connected_pair(config("named", port).name("phone").build().unwrap(), lamp()).await;
    let first = c.peers_named("kitchen");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].info.id, l.id());
    let old_instance = first[0].info.instance;
    l.shutdown().await;
    drop(l);
    let (l2, _el2) = Node::start(lamp()).await.unwrap();
    wait_up(&mut ec, l2.id(), Duration::from_secs(5)).await;
    let again = c.peers_named("kitchen");
    assert_eq!(again.len(), 1, "one entry, not a ghost: {again:?}");
    assert_eq!(again[0].info.id, l2.id());
    assert_ne!(
        again[0].info.instance, old_instance,
        "the entry is the new instance"
    );
    assert_eq!(again[0].state, PeerState::Connected);
    assert!(c.peers_named("hall").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_up_carries_the_peers_role_and_metadata() {
    trace();
    let port = free_port();
    let lamp = config("meta", port)
        .name("lamp")
        .role(Role::Device)
        .metadata("fw", "1.2")
        .metadata("room", "kitchen")
        .build()
        .unwrap();
    let (phone, mut ep) = Node::start(
        config("meta", port)
            .name("phone")
            .role(Role::Controller)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let (l, _el) = Node::start(lamp).await.unwrap();
    let up = wait_for(
        &mut ep,
        Duration::from_secs(5),
        |e| matches!(e, Event::SessionUp { peer, .. } if *peer == l.id()),
    )
    .await;
    let Event::SessionUp { role, metadata, .. } = up else {
        unreachable!()
    };
    assert_eq!(role, Role::Device);
    assert_eq!(metadata.get("fw").map(String::as_str), Some("1.2"));
    assert_eq!(metadata.get("room").map(String::as_str), Some("kitchen"));
    drop(phone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_set_at_runtime_reaches_peers_and_is_checked() {
    trace();
    let port = free_port();
    let ((phone, mut ep), (lamp, _el)) = connected_pair(
        config("setmeta", port).name("phone").build().unwrap(),
        config("setmeta", port)
            .name("lamp")
            .metadata("state", "off")
            .build()
            .unwrap(),
    )
    .await;
    let t0 = tokio::time::Instant::now();
    lamp.set_metadata([("state".to_owned(), "on".to_owned())])
        .await
        .unwrap();
    let e = wait_for(
        &mut ep,
        Duration::from_secs(2),
        |e| matches!(e, Event::Metadata { peer, .. } if *peer == lamp.id()),
    )
    .await;
    let Event::Metadata { metadata, .. } = e else {
        unreachable!()
    };
    assert_eq!(metadata.get("state").map(String::as_str), Some("on"));
    println!("metadata change seen after {:?}", t0.elapsed());
    let known = phone
        .peers()
        .into_iter()
        .find(|p| p.info.id == lamp.id())
        .unwrap();
    assert_eq!(
        known.info.metadata.get("state").map(String::as_str),
        Some("on")
    );
    // Over a limit: refused, nothing changes.
    let r = lamp.set_metadata([("k".to_owned(), "v".repeat(257))]).await;
    assert!(
        matches!(
            r,
            Err(Error::Config(lanbeat::ConfigError::MetadataValue {
                len: 257,
                ..
            }))
        ),
        "{r:?}"
    );
    lamp.shutdown().await;
    assert!(matches!(
        lamp.set_metadata([("a".to_owned(), "b".to_owned())]).await,
        Err(Error::Shutdown)
    ));
}

/// A node that chose ChaCha20-Poly1305 does not announce AES-256-GCM, so
/// no peer dials it with AES, while two `Auto` nodes announce the same
/// (AES exactly where the CPU has AES instructions); every pair holds a
/// session and carries messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_chose_chacha_offers_no_aes_and_still_pairs() {
    trace();
    let port = free_port();
    let chacha = config("cipher", port)
        .name("chacha")
        .session_cipher(lanbeat::SessionCipher::ChaCha20Poly1305)
        .build()
        .unwrap();
    let ((a, mut ea), (b, mut eb)) = connected_pair(
        chacha,
        config("cipher", port).name("auto-1").build().unwrap(),
    )
    .await;
    let (c, mut ec) = Node::start(config("cipher", port).name("auto-2").build().unwrap())
        .await
        .unwrap();
    // Both sessions of the third node, in either order.
    let mut up = HashSet::new();
    while up.len() < 2 {
        let e = wait_for(&mut ec, Duration::from_secs(5), |e| {
            matches!(e, Event::SessionUp { .. })
        })
        .await;
        if let Event::SessionUp { peer, .. } = e {
            up.insert(peer);
        }
    }
    assert_eq!(up, HashSet::from([a.id(), b.id()]));
    let offers = |viewer: &Node, of: &Node| {
        let p = viewer.peers().into_iter().find(|p| p.info.id == of.id());
        p.expect("a known peer").info.aes_gcm
    };
    assert!(!offers(&b, &a), "the ChaCha20 node announced AES-256-GCM");
    assert!(!offers(&c, &a), "the ChaCha20 node announced AES-256-GCM");
    // The two Auto nodes announce alike; the ChaCha20 node sees what they
    // announce.
    assert_eq!(offers(&b, &c), offers(&c, &b));
    assert_eq!(offers(&a, &b), offers(&c, &b));
    a.send(b.id(), b"to auto-1".to_vec()).await.unwrap();
    c.send(a.id(), b"to chacha".to_vec()).await.unwrap();
    let got = |e: &Event, from: lanbeat::PeerId, what: &[u8]| matches!(e, Event::Message { peer, data } if *peer == from && &data[..] == what);
    wait_for(&mut eb, Duration::from_secs(5), |e| {
        got(e, a.id(), b"to auto-1")
    })
    .await;
    wait_for(&mut ea, Duration::from_secs(5), |e| {
        got(e, c.id(), b"to chacha")
    })
    .await;
}
