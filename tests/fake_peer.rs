//! A peer of protocol 1 (plaintext) written from `docs/PROTOCOL.md` alone —
//! raw bytes and JSON, none of the crate's wire code — talks to a real node
//! in insecure plaintext mode on loopback. It proves the document is
//! complete enough, and lets the test misbehave on purpose: go silent, send
//! garbage, speak another version. Protocol 2 (Noise) has its own such
//! peer in `noise_peer.rs`, which runs the frames below inside records.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use common::{config, free_port, trace, wait_for};
use lanbeat::{DownReason, Event, FrameError, Node, PeerId, ProtocolViolation};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::{Instant, sleep, timeout};

const FAKE_ID: &str = "00000000fa4e0001";

struct Fake {
    service: String,
    shared: UdpSocket,
    unicast: UdpSocket,
    listener: TcpListener,
    instance: &'static str,
}

impl Fake {
    /// PROTOCOL.md §1 "Sockets": one socket shared on the discovery port,
    /// one on an ephemeral port for everything sent.
    async fn new(service: &str, port: u16) -> Fake {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_reuse_address(true).unwrap();
        #[cfg(unix)]
        s.set_reuse_port(true).unwrap();
        s.set_nonblocking(true).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
            .unwrap();
        Fake {
            service: service.to_owned(),
            shared: UdpSocket::from_std(s.into()).unwrap(),
            unicast: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            instance: "0000000000000001",
        }
    }

    /// Waits for a probe of our service and answers it with an announce
    /// (kind 2) unicast to its source.
    async fn answer_probe(&self) -> Value {
        let mut buf = [0u8; 2048];
        loop {
            let (n, from) = self.shared.recv_from(&mut buf).await.unwrap();
            let d = &buf[..n];
            if n < 6 || &d[..4] != b"LNBT" || d[4] != 1 || d[5] != 1 {
                continue;
            }
            let body: Value = serde_json::from_slice(&d[6..]).unwrap();
            if body["service"] != self.service.as_str() {
                continue;
            }
            let announce = json!({
                "service": self.service,
                "id": FAKE_ID,
                "instance": self.instance,
                "role": "device",
                "name": "fake",
                "port": self.listener.local_addr().unwrap().port(),
            });
            let mut out = b"LNBT\x01\x02".to_vec();
            out.extend(serde_json::to_vec(&announce).unwrap());
            self.unicast.send_to(&out, from).await.unwrap();
            return body;
        }
    }

    /// Accepts the node's connection and completes the handshake (§2
    /// "Handshake"): both send hello first.
    async fn accept(&self, interval_ms: u64, timeout_ms: u64) -> (TcpStream, Value) {
        let (mut s, _) = self.listener.accept().await.unwrap();
        let hello = json!({
            "protocol": 1,
            "service": self.service,
            "id": FAKE_ID,
            "instance": self.instance,
            "name": "fake",
            "role": "device",
            "port": self.listener.local_addr().unwrap().port(),
            "heartbeat_interval_ms": interval_ms,
            "heartbeat_timeout_ms": timeout_ms,
            "max_frame_size": 65536,
        });
        write_frame(&mut s, 1, &serde_json::to_vec(&hello).unwrap()).await;
        let (ty, payload) = read_frame(&mut s).await.unwrap();
        assert_eq!(ty, 1, "first frame is hello");
        let theirs: Value = serde_json::from_slice(&payload).unwrap();
        (s, theirs)
    }
}

async fn write_frame(s: &mut TcpStream, ty: u8, payload: &[u8]) {
    let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(ty);
    f.extend_from_slice(payload);
    s.write_all(&f).await.unwrap();
}

/// Frames (type, payload) back to back, as on the wire.
fn encode(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (ty, payload) in frames {
        bytes.extend(((payload.len() + 1) as u32).to_be_bytes());
        bytes.push(*ty);
        bytes.extend(payload);
    }
    bytes
}

async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    assert!((1..=65536).contains(&len));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    let ty = body.remove(0);
    Some((ty, body))
}

/// Answers pings with pongs and data with acks for `d`; returns the number of
/// pings seen.
async fn behave(s: &mut TcpStream, d: Duration) -> usize {
    let mut pings = 0;
    let mut received = 0u64;
    let end = Instant::now() + d;
    while let Ok(Some((ty, payload))) = timeout(end - Instant::now(), read_frame(s)).await {
        match ty {
            2 => {
                // A ping is the sequence number, then (12 bytes) the
                // sender's round-trip report; the pong echoes the number.
                // Once one of its pings was answered, the node has a
                // sample, and every later ping reports it.
                if pings == 0 {
                    assert!(matches!(payload.len(), 8 | 12), "ping of {payload:?}");
                } else {
                    assert_eq!(payload.len(), 12, "ping without a report: {payload:?}");
                    let rtt_us = u32::from_be_bytes(payload[8..12].try_into().unwrap());
                    assert!((1..1_000_000).contains(&rtt_us), "reported {rtt_us} µs");
                }
                pings += 1;
                write_frame(s, 3, &payload[..8]).await;
            }
            4 => {
                received += 1;
                write_frame(s, 5, &received.to_be_bytes()).await;
            }
            3 | 5 => {}
            other => panic!("unexpected frame type {other}"),
        }
    }
    pings
}

/// A node of service `name` for the fake to dial, its address, and the
/// fake's hello with the given heartbeat (ms).
async fn node_to_dial(
    name: &str,
    interval_ms: u64,
    timeout_ms: u64,
) -> (Node, lanbeat::Events, SocketAddrV4, Value) {
    trace();
    let cfg = config(name, free_port())
        .insecure_plaintext()
        .build()
        .unwrap();
    let hello = json!({
        "protocol": 1, "service": cfg.service, "id": FAKE_ID, "instance": "2", "name": "dialer",
        "role": "peer", "port": 0, "heartbeat_interval_ms": interval_ms,
        "heartbeat_timeout_ms": timeout_ms, "max_frame_size": 65536,
    });
    let (node, events) = Node::start(cfg).await.unwrap();
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, node.local().tcp_port);
    (node, events, addr, hello)
}

/// Dials the node at `addr` as the fake, sends `hello`, and waits until the
/// node reports the session (no Nagle delay: tests cut segments by hand).
async fn dial_with(addr: SocketAddrV4, hello: &Value, events: &mut lanbeat::Events) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    write_frame(&mut s, 1, &serde_json::to_vec(hello).unwrap()).await;
    wait_for(
        events,
        Duration::from_secs(2),
        |e| matches!(e, Event::SessionUp { peer, .. } if *peer == fake_id()),
    )
    .await;
    s
}

fn fake_id() -> PeerId {
    FAKE_ID.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_then_is_found_again() {
    trace();
    let port = free_port();
    let (interval, to) = (100u64, 300u64);
    let cfg = config("fake-silent", port)
        .insecure_plaintext()
        .heartbeat(Duration::from_millis(interval), Duration::from_millis(to))
        .build()
        .unwrap();
    let fake = Fake::new(&cfg.service, port).await;
    let (node, mut events) = Node::start(cfg).await.unwrap();

    let probe = fake.answer_probe().await;
    assert_eq!(probe["id"], node.id().to_string());
    let (mut conn, hello) = fake.accept(interval, to).await;
    assert_eq!(hello["id"], node.id().to_string());
    assert_eq!(hello["protocol"], 1);
    wait_for(
        &mut events,
        Duration::from_secs(2),
        |e| matches!(e, Event::SessionUp { peer, .. } if *peer == fake_id()),
    )
    .await;
    // Behave for a while: the node pings at its interval and we answer.
    let pings = behave(&mut conn, Duration::from_millis(1000)).await;
    assert!((8..=13).contains(&pings), "{pings} pings in 1 s at 100 ms");
    node.send(fake_id(), "acked").await.unwrap();
    behave(&mut conn, Duration::from_millis(100)).await;

    // Go silent (keep the socket open, read and write nothing).
    let silent_at = Instant::now();
    for i in 0..10u8 {
        node.send(fake_id(), vec![i]).await.unwrap();
    }
    let e = wait_for(&mut events, Duration::from_secs(3), |e| {
        matches!(e, Event::SessionDown { .. })
    })
    .await;
    let detected = silent_at.elapsed();
    assert_eq!(
        e,
        Event::SessionDown {
            peer: fake_id(),
            reason: DownReason::HeartbeatTimeout
        }
    );
    assert!(
        detected <= Duration::from_millis(to + interval),
        "detected after {detected:?}"
    );
    // Messages it never acknowledged come back, in order, as unconfirmed
    // (they were written: it may have read them); the acked one not.
    match events.recv().await.unwrap() {
        Event::Unconfirmed { peer, messages } => {
            assert_eq!(peer, fake_id());
            let got: Vec<u8> = messages.iter().map(|m| m[0]).collect();
            assert_eq!(got, (0..10).collect::<Vec<u8>>());
        }
        other => panic!("{other:?}"),
    }
    drop(conn);

    // Discovery restarts: the node probes fast; answer and be dialed again.
    let back_at = Instant::now();
    fake.answer_probe().await;
    let (mut conn2, _) = fake.accept(interval, to).await;
    let mut rediscovered = false;
    loop {
        match wait_for(&mut events, Duration::from_secs(2), |_| true).await {
            Event::Discovered(info) if info.id == fake_id() => rediscovered = true,
            Event::SessionUp { peer, .. } if peer == fake_id() => break,
            _ => {}
        }
    }
    assert!(rediscovered);
    let reconnect = back_at.elapsed();
    assert!(reconnect < Duration::from_secs(1), "{reconnect:?}");
    behave(&mut conn2, Duration::from_millis(300)).await;
    let stats = node.stats();
    assert_eq!(stats.heartbeat_timeouts, 1);
    assert_eq!(stats.messages_unconfirmed, 10);
    assert_eq!(stats.messages_undelivered, 0);
    println!("detection {detected:?}, reconnect {reconnect:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_closes_the_session() {
    trace();
    let port = free_port();
    let cfg = config("fake-huge", port)
        .insecure_plaintext()
        .build()
        .unwrap();
    let fake = Fake::new(&cfg.service, port).await;
    let (node, mut events) = Node::start(cfg).await.unwrap();
    fake.answer_probe().await;
    let (mut conn, _) = fake.accept(100, 300).await;
    wait_for(&mut events, Duration::from_secs(2), |e| {
        matches!(e, Event::SessionUp { .. })
    })
    .await;
    // A 4 GiB length prefix.
    conn.write_all(&[0xff, 0xff, 0xff, 0xff, 4]).await.unwrap();
    let e = wait_for(&mut events, Duration::from_secs(2), |e| {
        matches!(e, Event::SessionDown { .. })
    })
    .await;
    assert_eq!(
        e,
        Event::SessionDown {
            peer: fake_id(),
            reason: DownReason::ProtocolError(ProtocolViolation::Frame(FrameError::TooLarge {
                size: u32::MAX,
                limit: 1 << 20
            }))
        }
    );
    assert_eq!(node.stats().protocol_errors, 1);
    // The node closed its end.
    let mut buf = [0u8; 64];
    let closed = timeout(Duration::from_secs(1), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_never_become_sessions() {
    trace();
    let port = free_port();
    let cfg = config("fake-hello", port)
        .insecure_plaintext()
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let (node, mut events) = Node::start(cfg).await.unwrap();
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, node.local().tcp_port);
    let hello_v2 = serde_json::to_vec(&json!({"protocol": 2, "whatever": true})).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("version 2", {
            let mut f = ((hello_v2.len() + 1) as u32).to_be_bytes().to_vec();
            f.push(1);
            f.extend(hello_v2);
            f
        }),
        ("truncated", vec![0, 0, 0, 50, 1, b'{']),
        ("unknown type", vec![0, 0, 0, 1, 99]),
        ("empty frame", vec![0, 0, 0, 0]),
        ("silent", vec![]),
        ("ping first", vec![0, 0, 0, 9, 2, 0, 0, 0, 0, 0, 0, 0, 1]),
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
    ];
    let start = Instant::now();
    for (what, bytes) in &cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        // The node closes on us; whatever it wrote before is its hello.
        let mut seen = Vec::new();
        let r = timeout(Duration::from_secs(2), s.read_to_end(&mut seen)).await;
        assert!(r.is_ok(), "{what}: not closed");
        assert!(seen.is_empty() || seen[4] == 1, "{what}: {seen:?}");
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    sleep(Duration::from_millis(50)).await;
    let stats = node.stats();
    assert_eq!(stats.handshake_timeouts, 2, "silent + truncated");
    assert_eq!(stats.handshake_failures, 5);
    assert_eq!(stats.sessions_up, 0);
    while let Some(e) = events.try_recv() {
        assert!(!matches!(
            e,
            Event::SessionUp { .. } | Event::SessionDown { .. }
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagrams_are_dropped_and_counted() {
    trace();
    let port = free_port();
    let cfg = config("fake-dgram", port)
        .insecure_plaintext()
        .build()
        .unwrap();
    let service = cfg.service.clone();
    let (node, _events) = Node::start(cfg).await.unwrap();
    sleep(Duration::from_millis(100)).await;
    let before = node.stats();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let body = |v: Value| serde_json::to_vec(&v).unwrap();
    let with = |header: &[u8], b: Vec<u8>| {
        let mut v = header.to_vec();
        v.extend(b);
        v
    };
    let probe = body(json!({"service": service, "id": "1", "instance": "1"}));
    let datagrams: Vec<(&str, Vec<u8>)> = vec![
        ("too large", vec![b'L'; 1500]),
        ("not lanbeat", b"M-SEARCH * HTTP/1.1\r\n".to_vec()),
        ("short", b"LNB".to_vec()),
        ("version", with(b"LNBT\x02\x01", probe.clone())),
        ("kind", with(b"LNBT\x01\x09", probe.clone())),
        ("json", with(b"LNBT\x01\x01", b"{not json".to_vec())),
        (
            "truncated",
            with(b"LNBT\x01\x01", probe[..probe.len() / 2].to_vec()),
        ),
        (
            "no port",
            with(
                b"LNBT\x01\x02",
                body(json!({"service": service, "id": "2", "instance": "2", "name": "x"})),
            ),
        ),
        (
            "other service",
            with(
                b"LNBT\x01\x01",
                body(json!({"service": "nope", "id": "3", "instance": "3"})),
            ),
        ),
        (
            "own",
            with(
                b"LNBT\x01\x01",
                body(json!({"service": service, "id": node.id().to_string(), "instance": "3"})),
            ),
        ),
    ];
    for (_, d) in &datagrams {
        sock.send_to(d, dst).await.unwrap();
    }
    sleep(Duration::from_millis(200)).await;
    let after = node.stats();
    let delta = |f: fn(&lanbeat::Stats) -> u64| f(&after) - f(&before);
    assert_eq!(delta(|s| s.dropped_too_large), 1);
    assert_eq!(delta(|s| s.dropped_not_lanbeat), 2);
    assert_eq!(delta(|s| s.dropped_version), 1);
    assert_eq!(delta(|s| s.dropped_malformed), 4);
    assert_eq!(delta(|s| s.dropped_other_service), 1);
    assert!(delta(|s| s.dropped_own) >= 1);
    assert!(node.peers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_and_data_in_one_segment_are_both_taken() {
    // A peer may send its hello and its first messages in one write: the
    // node must approve the session before it delivers the messages.
    let (_node, mut events, addr, hello) = node_to_dial("fake-burst", 100, 300).await;
    let bytes = encode(&[
        (1, serde_json::to_vec(&hello).unwrap()),
        (4, b"one".to_vec()),
        (4, b"two".to_vec()),
    ]);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    wait_for(
        &mut events,
        Duration::from_secs(2),
        |e| matches!(e, Event::SessionUp { peer, .. } if *peer == fake_id()),
    )
    .await;
    for want in [&b"one"[..], b"two"] {
        match wait_for(&mut events, Duration::from_secs(2), |e| {
            matches!(e, Event::Message { .. })
        })
        .await
        {
            Event::Message { peer, data } => {
                assert_eq!(peer, fake_id());
                assert_eq!(&data[..], want);
            }
            _ => unreachable!(),
        }
    }
    // As the dialer, the fake reports its round trip in a ping (4242 µs):
    // the node answers with the bare sequence number and reports the
    // sample as its own RTT.
    let mut ping = 7u64.to_be_bytes().to_vec();
    ping.extend(4242u32.to_be_bytes());
    write_frame(&mut s, 2, &ping).await;
    let pong = loop {
        match timeout(Duration::from_secs(2), read_frame(&mut s)).await {
            Ok(Some((3, payload))) => break payload,
            Ok(Some(_)) => continue,
            other => panic!("no pong: {other:?}"),
        }
    };
    assert_eq!(pong, 7u64.to_be_bytes());
    let e = wait_for(&mut events, Duration::from_secs(2), |e| {
        matches!(e, Event::Rtt { .. })
    })
    .await;
    assert_eq!(
        e,
        Event::Rtt {
            peer: fake_id(),
            rtt: Duration::from_micros(4242)
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_cut_anywhere_and_mixed_are_all_taken_in_order() {
    // A node handles an idle session's heartbeats straight from what it
    // read, and buffers only the rest: pings, messages and partial frames
    // mixed in one segment, or cut at any byte, must all come out right.
    let (node, mut events, addr, hello) = node_to_dial("fake-cut", 1000, 3000).await;
    let mut s = dial_with(addr, &hello, &mut events).await;
    let big: Vec<u8> = (0..700u32).map(|i| i as u8).collect();
    let mut frames = Vec::new();
    let mut sent = Vec::new();
    for seq in 1..=12u64 {
        frames.push((2, seq.to_be_bytes().to_vec()));
        let msg = if seq % 3 == 0 {
            big.clone()
        } else {
            format!("m{seq}").into_bytes()
        };
        frames.push((4, msg.clone()));
        sent.push(msg);
    }
    // Cut into pieces of 1 to 300 bytes, each written on its own.
    let bytes = encode(&frames);
    let mut at = 0;
    for cut in [1usize, 3, 13, 4, 17, 300, 5, 60, 2, 150].iter().cycle() {
        let end = (at + cut).min(bytes.len());
        s.write_all(&bytes[at..end]).await.unwrap();
        s.flush().await.unwrap();
        sleep(Duration::from_millis(2)).await;
        at = end;
        if at == bytes.len() {
            break;
        }
    }
    // Every ping answered, in order.
    let mut pongs = Vec::new();
    while pongs.len() < 12 {
        match timeout(Duration::from_secs(2), read_frame(&mut s)).await {
            Ok(Some((3, payload))) => pongs.push(u64::from_be_bytes(payload.try_into().unwrap())),
            Ok(Some(_)) => {}
            other => panic!("after {} pongs: {other:?}", pongs.len()),
        }
    }
    assert_eq!(pongs, (1..=12).collect::<Vec<u64>>());
    // Every message delivered once, in order.
    for want in sent {
        match wait_for(&mut events, Duration::from_secs(2), |e| {
            matches!(e, Event::Message { .. })
        })
        .await
        {
            Event::Message { peer, data } => {
                assert_eq!(peer, fake_id());
                assert_eq!(&data[..], &want[..]);
            }
            _ => unreachable!(),
        }
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sends_nothing_larger_than_the_peer_advertised() {
    // The fake takes frames of at most 1024 bytes (type byte included), the
    // smallest limit a hello may state: the node's senders refuse a
    // 1024-byte message for it, with the peer's limit named, instead of
    // sending a frame the peer would close the session over.
    let (node, mut events, addr, mut hello) = node_to_dial("fake-limit", 100, 300).await;
    hello["max_frame_size"] = json!(1024);
    let mut s = dial_with(addr, &hello, &mut events).await;
    let too_large = |r: Result<(), lanbeat::Error>| {
        matches!(
            r,
            Err(lanbeat::Error::MessageTooLarge {
                size: 1024,
                limit: 1023
            })
        )
    };
    assert!(too_large(node.send(fake_id(), vec![7u8; 1024]).await));
    assert!(too_large(node.try_send(fake_id(), vec![7u8; 1024])));
    let sender = node.sender(fake_id()).unwrap();
    assert!(too_large(sender.send(vec![7u8; 1024]).await));
    assert_eq!(node.send_all(vec![7u8; 1024]).await.unwrap(), vec![]);
    // The largest message that fits arrives whole.
    node.send(fake_id(), vec![7u8; 1023]).await.unwrap();
    loop {
        match timeout(Duration::from_secs(2), read_frame(&mut s)).await {
            Ok(Some((4, payload))) => break assert_eq!(payload, vec![7u8; 1023]),
            Ok(Some(_)) => continue,
            other => panic!("no data frame: {other:?}"),
        }
    }
}
