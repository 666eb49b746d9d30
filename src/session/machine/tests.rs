//! Unit tests of the session machine, on made-up times.

use bytes::BytesMut;

use super::*;
use crate::testing::hello;
use crate::wire::frame;

const MS: Duration = Duration::from_millis(1);

fn cfg(id: u64, interval_ms: u64, timeout_ms: u64) -> SessionConfig {
    crate::testing::session_config_of(id, interval_ms, timeout_ms)
}

fn drain(s: &mut Session) -> (Vec<Frame>, Vec<SessionEvent>) {
    let mut f = Vec::new();
    while let Some(x) = s.poll_transmit() {
        f.push(x);
    }
    let mut e = Vec::new();
    while let Some(x) = s.poll_event() {
        e.push(x);
    }
    (f, e)
}

/// Two sessions joined by an in-memory link with a fixed one-way delay;
/// `cut` drops everything in flight and later.
struct Pair {
    now: Instant,
    a: Session,
    b: Session,
    delay: Duration,
    to_a: VecDeque<(Instant, Frame)>,
    to_b: VecDeque<(Instant, Frame)>,
    events_a: Vec<(Instant, SessionEvent)>,
    events_b: Vec<(Instant, SessionEvent)>,
    cut: bool,
    delivered_b: Vec<Bytes>,
    /// Pings B sent.
    pings_b: usize,
    /// A's pings lose their round-trip report (a minimal peer).
    strip_rtt: bool,
    /// The stream alone is cut: liveness datagrams still pass (unless
    /// `cut`).
    stream_cut: bool,
    /// Liveness datagrams in flight: when they arrive, and whether they
    /// are probes (answered).
    dg_to_a: VecDeque<(Instant, bool)>,
    dg_to_b: VecDeque<(Instant, bool)>,
    /// Probes each side sent.
    probes: [usize; 2],
}

impl Pair {
    fn new(a: SessionConfig, b: SessionConfig) -> Pair {
        let now = Instant::now();
        let expected = b.hello.id;
        Pair {
            now,
            a: Session::new(now, a, Some(expected)),
            b: Session::new(now, b, None),
            delay: MS,
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            events_a: Vec::new(),
            events_b: Vec::new(),
            cut: false,
            delivered_b: Vec::new(),
            pings_b: 0,
            strip_rtt: false,
            stream_cut: false,
            dg_to_a: VecDeque::new(),
            dg_to_b: VecDeque::new(),
            probes: [0; 2],
        }
    }

    fn pump(&mut self) {
        let arrive = self.now + self.delay;
        while let Some(mut f) = self.a.poll_transmit() {
            if let Frame::Ping { rtt_us, .. } = &mut f
                && self.strip_rtt
            {
                *rtt_us = None;
            }
            if !self.cut && !self.stream_cut {
                self.to_b.push_back((arrive, f));
            }
        }
        while let Some(f) = self.b.poll_transmit() {
            self.pings_b += usize::from(matches!(f, Frame::Ping { .. }));
            if !self.cut && !self.stream_cut {
                self.to_a.push_back((arrive, f));
            }
        }
        if self.a.take_probe() {
            self.probes[0] += 1;
            if !self.cut {
                self.dg_to_b.push_back((arrive, true));
            }
        }
        if self.b.take_probe() {
            self.probes[1] += 1;
            if !self.cut {
                self.dg_to_a.push_back((arrive, true));
            }
        }
        while let Some(e) = self.a.poll_event() {
            self.events_a.push((self.now, e));
        }
        while let Some(e) = self.b.poll_event() {
            self.events_b.push((self.now, e));
        }
    }

    /// Advances virtual time to `until`, one event at a time.
    /// A sends `message` while its in-flight window takes more; returns
    /// how many it sent.
    fn fill_window(&mut self, message: &Bytes) -> usize {
        let mut n = 0;
        while self.a.can_send() {
            self.a.record_data_sent(self.now, message.clone());
            self.to_b
                .push_back((self.now + self.delay, Frame::Data(message.clone())));
            n += 1;
        }
        n
    }

    fn run_until(&mut self, until: Instant) {
        loop {
            self.pump();
            let next = [
                self.a.poll_timeout(),
                self.b.poll_timeout(),
                self.to_a.front().map(|x| x.0),
                self.to_b.front().map(|x| x.0),
                self.dg_to_a.front().map(|x| x.0),
                self.dg_to_b.front().map(|x| x.0),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|&t| t <= until) else {
                self.now = until;
                self.pump();
                return;
            };
            self.now = self.now.max(next);
            if self.cut {
                self.to_a.clear();
                self.to_b.clear();
                self.dg_to_a.clear();
                self.dg_to_b.clear();
            }
            // A datagram proves its sender alive; a probe is answered at
            // once (by the node, not the machine).
            let answer = self.now + self.delay;
            while self.dg_to_a.front().is_some_and(|x| x.0 <= self.now) {
                let (_, probe) = self.dg_to_a.pop_front().unwrap();
                self.a.handle_datagram(self.now);
                if probe {
                    self.dg_to_b.push_back((answer, false));
                }
            }
            while self.dg_to_b.front().is_some_and(|x| x.0 <= self.now) {
                let (_, probe) = self.dg_to_b.pop_front().unwrap();
                self.b.handle_datagram(self.now);
                if probe {
                    self.dg_to_a.push_back((answer, false));
                }
            }
            // Each side reads all that has arrived, then finds no more (as
            // a connection's read that would wait).
            let (mut read_a, mut read_b) = (false, false);
            while self.to_a.front().is_some_and(|x| x.0 <= self.now) {
                let (_, f) = self.to_a.pop_front().unwrap();
                self.a.handle_frame(self.now, f);
                read_a = true;
            }
            while self.to_b.front().is_some_and(|x| x.0 <= self.now) {
                let (_, f) = self.to_b.pop_front().unwrap();
                if let Some(d) = self.b.handle_frame(self.now, f) {
                    self.delivered_b.push(d);
                }
                read_b = true;
            }
            if read_a {
                self.a.handle_drained();
            }
            if read_b {
                self.b.handle_drained();
            }
            if self.a.poll_timeout().is_some_and(|t| t <= self.now) {
                self.a.handle_timeout(self.now);
            }
            if self.b.poll_timeout().is_some_and(|t| t <= self.now) {
                self.b.handle_timeout(self.now);
            }
        }
    }

    fn closed_at(events: &[(Instant, SessionEvent)]) -> Option<(Instant, DownReason)> {
        events.iter().find_map(|(t, e)| match e {
            SessionEvent::Closed(r) => Some((*t, r.clone())),
            _ => None,
        })
    }
}

#[test]
fn handshake_establishes_both_sides_and_measures_rtt() {
    let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
    p.run_until(p.now + 50 * MS);
    assert!(p.a.is_established() && p.b.is_established());
    assert_eq!(p.a.peer(), Some(PeerId::from_u64(2)));
    let rtts: Vec<_> = p
        .events_a
        .iter()
        .filter_map(|(_, e)| match e {
            SessionEvent::Rtt(r) => Some(*r),
            _ => None,
        })
        .collect();
    assert_eq!(rtts, vec![2 * MS]);
}

#[test]
fn idle_session_stays_up_for_a_long_time() {
    let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
    let start = p.now;
    p.run_until(start + Duration::from_secs(600));
    assert!(p.a.is_established() && p.b.is_established());
    // About one ping per interval each way, not more.
    let rtts = p
        .events_a
        .iter()
        .filter(|(_, e)| matches!(e, SessionEvent::Rtt(_)))
        .count();
    assert!((5900..=6001).contains(&rtts), "{rtts}");
}

fn rtts(e: &[(Instant, SessionEvent)]) -> Vec<Duration> {
    e.iter()
        .filter_map(|(_, e)| match e {
            SessionEvent::Rtt(r) => Some(*r),
            _ => None,
        })
        .collect()
}

#[test]
fn the_acceptor_reports_the_dialers_rtt_and_pings_only_when_it_stops() {
    let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
    p.run_until(p.now + Duration::from_secs(60));
    // The dialer measures every interval; the acceptor reports the same
    // samples from the dialer's pings and sends only its first ping.
    let (a, b) = (rtts(&p.events_a), rtts(&p.events_b));
    assert!((590..=601).contains(&a.len()), "{}", a.len());
    assert!((589..=601).contains(&b.len()), "{}", b.len());
    assert!(b.iter().all(|r| *r == 2 * MS), "{b:?}");
    assert_eq!(p.pings_b, 1);
    // If the dialer stops pinging (here: it is cut off), the acceptor
    // still detects the silence in time.
    let cut_at = p.now;
    p.cut = true;
    p.run_until(cut_at + Duration::from_secs(1));
    let (t, r) = Pair::closed_at(&p.events_b).unwrap();
    assert_eq!(r, DownReason::HeartbeatTimeout);
    assert!(t - cut_at <= Duration::from_millis(400));
}

#[test]
fn an_acceptor_measures_every_eighth_interval_if_pings_carry_no_rtt() {
    let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
    p.strip_rtt = true;
    p.run_until(p.now + Duration::from_secs(60));
    let b = rtts(&p.events_b);
    assert!((70..=80).contains(&b.len()), "{}", b.len());
    assert!((70..=80).contains(&p.pings_b), "{}", p.pings_b);
    assert!(p.a.is_established() && p.b.is_established());
}

#[test]
fn silence_is_detected_within_timeout_plus_one_interval() {
    // With liveness datagrams as well: a cut silences them too.
    let settings = [(100, 300), (1000, 3000), (200, 1000)];
    for (datagrams, (interval, timeout)) in [false, true]
        .into_iter()
        .flat_map(|d| settings.map(|s| (d, s)))
    {
        let mut p = Pair::new(cfg(1, interval, timeout), cfg(2, interval, timeout));
        p.run_until(p.now + 10 * MS);
        if datagrams {
            enable_datagrams(&mut p);
        }
        p.run_until(p.now + Duration::from_millis(5 * timeout));
        let cut_at = p.now;
        p.cut = true;
        p.run_until(cut_at + Duration::from_millis(3 * timeout));
        for events in [&p.events_a, &p.events_b] {
            let (t, reason) = Pair::closed_at(events).expect("closed");
            assert_eq!(reason, DownReason::HeartbeatTimeout);
            let delay = t - cut_at;
            assert!(
                delay <= Duration::from_millis(timeout + interval),
                "{delay:?}"
            );
            assert!(
                delay >= Duration::from_millis(timeout - interval),
                "{delay:?}"
            );
        }
        // The probes of the silence: about 1.5 intervals in, then 16 per
        // timeout for the rest of it; none without datagrams.
        let range = if datagrams { 8..=16 } else { 0..=0 };
        for n in p.probes {
            assert!(range.contains(&n), "{:?}", p.probes);
        }
    }
}

#[test]
fn different_settings_never_time_each_other_out() {
    // A is slow (1 s / 3 s), B is fast (100 ms / 300 ms): A must send
    // often enough for B.
    let mut p = Pair::new(cfg(1, 1000, 3000), cfg(2, 100, 300));
    p.run_until(p.now + Duration::from_secs(60));
    assert!(p.a.is_established() && p.b.is_established());
    assert_eq!(p.a.send_interval(), 100 * MS);
}

#[test]
fn busy_session_needs_no_pings_but_still_gets_acks() {
    let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
    p.run_until(p.now + 10 * MS);
    let start = p.now;
    for i in 0..100u32 {
        if p.a.can_send() {
            let m = Bytes::from(i.to_be_bytes().to_vec());
            p.a.record_data_sent(p.now, m.clone());
            p.to_b.push_back((p.now + p.delay, Frame::Data(m)));
        }
        p.run_until(p.now + 20 * MS);
    }
    assert!(p.now > start + Duration::from_secs(1));
    assert_eq!(p.delivered_b.len(), 100);
    assert!(p.a.take_unacked().is_empty());
    assert!(p.a.is_established());
}

#[test]
fn unacked_messages_are_handed_back_after_a_cut() {
    let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
    p.run_until(p.now + 10 * MS);
    p.cut = true;
    for i in 0..4u8 {
        assert!(p.a.can_send());
        p.a.record_data_sent(p.now, Bytes::from(vec![i]));
    }
    assert!(!p.a.can_send(), "max_unacked bounds what is in flight");
    p.run_until(p.now + Duration::from_secs(1));
    assert_eq!(
        Pair::closed_at(&p.events_a).unwrap().1,
        DownReason::HeartbeatTimeout
    );
    let back: Vec<u8> = p.a.take_unacked().iter().map(|b| b[0]).collect();
    assert_eq!(back, vec![0, 1, 2, 3]);
}

#[test]
fn handshake_timeout_closes_silent_connection() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    let (frames, _) = drain(&mut s);
    assert!(matches!(frames[..], [Frame::Hello(Ok(_))]));
    assert_eq!(s.poll_timeout(), Some(now + 500 * MS));
    s.handle_timeout(now + 499 * MS);
    assert!(!s.is_closed());
    s.handle_timeout(now + 500 * MS);
    assert_eq!(
        drain(&mut s).1,
        vec![SessionEvent::Closed(DownReason::HandshakeTimeout)]
    );
}

#[test]
fn handshake_violations_are_precise() {
    let now = Instant::now();
    let cases: Vec<(Option<u64>, Frame, ProtocolViolation)> = vec![
        (
            None,
            Frame::Hello(Err(2)),
            ProtocolViolation::UnsupportedVersion(2),
        ),
        (
            None,
            Frame::Ping {
                seq: 1,
                rtt_us: None,
            },
            ProtocolViolation::UnexpectedFrame("ping"),
        ),
        (
            None,
            Frame::Hello(Ok(Box::new(Hello {
                service: "other".into(),
                ..hello(2, 100, 300)
            }))),
            ProtocolViolation::ServiceMismatch,
        ),
        (
            None,
            Frame::Hello(Ok(Box::new(hello(1, 100, 300)))),
            ProtocolViolation::SelfConnection,
        ),
        (
            Some(3),
            Frame::Hello(Ok(Box::new(hello(2, 100, 300)))),
            ProtocolViolation::UnexpectedPeer {
                expected: PeerId::from_u64(3),
                got: PeerId::from_u64(2),
            },
        ),
        (
            None,
            Frame::Hello(Ok(Box::new(hello(2, 300, 300)))),
            ProtocolViolation::BadHeartbeat,
        ),
        // Limits an independent implementation found unchecked: a name
        // that an announce may not carry, a frame limit below the minimum.
        (
            None,
            Frame::Hello(Ok(Box::new(Hello {
                name: "n".repeat(65),
                ..hello(2, 100, 300)
            }))),
            ProtocolViolation::BadHello("name longer than 64 bytes"),
        ),
        (
            None,
            Frame::Hello(Ok(Box::new(Hello {
                max_frame_size: 100,
                ..hello(2, 100, 300)
            }))),
            ProtocolViolation::BadHello("max_frame_size below 1024"),
        ),
    ];
    for (expected, frame, violation) in cases {
        let mut s = Session::new(now, cfg(1, 100, 300), expected.map(PeerId::from_u64));
        drain(&mut s);
        assert_eq!(s.handle_frame(now, frame), None);
        assert_eq!(
            drain(&mut s),
            (
                vec![],
                vec![SessionEvent::Closed(DownReason::ProtocolError(violation))]
            )
        );
        assert!(s.is_closed());
    }
}

#[test]
fn a_hello_must_claim_the_id_the_key_proved_and_our_protocol() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.set_proven(PeerId::from_u64(7));
    drain(&mut s);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    let refused = ProtocolViolation::Unauthenticated {
        claimed: PeerId::from_u64(2),
        proven: PeerId::from_u64(7),
    };
    assert_eq!(
        drain(&mut s),
        (
            vec![],
            vec![SessionEvent::Closed(DownReason::ProtocolError(refused))]
        )
    );
    // The proven id is accepted.
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.set_proven(PeerId::from_u64(2));
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    assert!(s.is_established());
    // A hello of the other known protocol (plaintext against Noise).
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    let v1 = Hello {
        protocol: crate::wire::PLAINTEXT_PROTOCOL_VERSION,
        ..hello(2, 100, 300)
    };
    s.handle_frame(now, Frame::Hello(Ok(Box::new(v1))));
    assert_eq!(
        drain(&mut s).1,
        vec![SessionEvent::Closed(DownReason::ProtocolError(
            ProtocolViolation::UnsupportedVersion(1)
        ))]
    );
}

#[test]
fn established_violations_close() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    drain(&mut s);
    s.handle_frame(now, Frame::Ack(1));
    assert_eq!(
        drain(&mut s).1,
        vec![SessionEvent::Closed(DownReason::ProtocolError(
            ProtocolViolation::BadAck
        ))]
    );
}

#[test]
fn every_ping_gets_its_pong_in_order_and_samples_precede_the_close() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    // The handshake and a ping fed before anything is polled: the
    // handshake is reported first.
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    let ping = |seq, rtt_us| Frame::Ping { seq, rtt_us };
    s.handle_frame(now, ping(1, Some(40)));
    let (frames, events) = drain(&mut s);
    assert!(matches!(frames[0], Frame::Hello(_)), "{frames:?}");
    assert_eq!(frames.last(), Some(&Frame::Pong(1)));
    assert!(
        matches!(events[..], [SessionEvent::Established(_), SessionEvent::Rtt(r)] if r == 40 * Duration::from_micros(1))
    );
    // Three pings at once: three pongs, in order; the latest sample.
    for seq in 2..=4 {
        s.handle_frame(now, ping(seq, Some(seq as u32)));
    }
    s.handle_frame(now, Frame::Goodbye(GoodbyeBody { reason: "x".into() }));
    let (frames, events) = drain(&mut s);
    assert_eq!(frames, [Frame::Pong(2), Frame::Pong(3), Frame::Pong(4)]);
    assert_eq!(
        events,
        [
            SessionEvent::Rtt(4 * Duration::from_micros(1)),
            SessionEvent::Closed(DownReason::Goodbye)
        ]
    );
    // A violation drops what was to be sent, the pong too.
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    drain(&mut s);
    s.handle_frame(now, ping(5, None));
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    assert_eq!(drain(&mut s).0, []);
}

#[test]
fn goodbye_and_pause() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    drain(&mut s);
    s.set_paused(now, true);
    s.handle_timeout(now + Duration::from_secs(10));
    assert!(
        s.is_established(),
        "no timeout while we are the ones not reading"
    );
    s.set_paused(now + Duration::from_secs(10), false);
    s.handle_timeout(now + Duration::from_millis(10_200));
    assert!(s.is_established());
    s.handle_frame(
        now,
        Frame::Goodbye(GoodbyeBody {
            reason: "shutdown".into(),
        }),
    );
    assert!(
        drain(&mut s)
            .1
            .contains(&SessionEvent::Closed(DownReason::Goodbye))
    );
}

/// A goodbye that says the connection is being replaced (or was taken for
/// a dead instance's) ends the session as `replaced`: the peer is not
/// leaving, so discovery keeps it.
#[test]
fn a_replacing_goodbye_is_not_a_departure() {
    let now = Instant::now();
    for (said, reason) in [
        ("replaced", DownReason::Replaced),
        ("peer_restarted", DownReason::Replaced),
        ("shutdown", DownReason::Goodbye),
        ("anything else", DownReason::Goodbye),
    ] {
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        drain(&mut s);
        s.handle_frame(
            now,
            Frame::Goodbye(GoodbyeBody {
                reason: said.into(),
            }),
        );
        assert_eq!(drain(&mut s).1, [SessionEvent::Closed(reason)], "{said}");
    }
}

#[test]
fn acks_can_end_inside_a_run_of_messages() {
    let now = Instant::now();
    let mut c = cfg(1, 100, 300);
    c.max_unacked = 6;
    let mut s = Session::new(now, c, None);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    drain(&mut s);
    let mut wire = BytesMut::new();
    for m in ["a", "b", "c", "d"] {
        frame::encode_data(m.as_bytes(), &mut wire);
    }
    let run = Outgoing::Frames {
        wire: wire.freeze(),
        count: 4,
    };
    assert_eq!(s.sendable(), 6);
    s.record_sent(now, run);
    s.record_data_sent(now, Bytes::from_static(b"e"));
    assert_eq!((s.sendable(), s.unacked_len()), (1, 5));
    s.handle_frame(now, Frame::Ack(3));
    assert_eq!((s.sendable(), s.unacked_len()), (4, 2));
    s.handle_frame(now, Frame::Ack(4));
    assert_eq!(s.unacked_len(), 1);
    assert_eq!(s.take_unacked(), ["e"]);
    // Sequence numbers go on after messages handed back; an ack of
    // more than was sent is a violation.
    s.record_data_sent(now, Bytes::from_static(b"f"));
    s.handle_frame(now, Frame::Ack(7));
    assert!(
        drain(&mut s)
            .1
            .contains(&SessionEvent::Closed(DownReason::ProtocolError(
                ProtocolViolation::BadAck
            )))
    );
}

#[test]
fn a_peer_that_acknowledges_nothing_is_closed_after_the_write_timeout() {
    // It keeps pinging (so it is alive) but never consumes our messages.
    let now = Instant::now();
    let mut c = cfg(1, 100, 300);
    c.write_timeout = Duration::from_millis(1000);
    let mut s = Session::new(now, c, None);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    drain(&mut s);
    s.record_data_sent(now, Bytes::from_static(b"x"));
    let mut t = now;
    while t < now + Duration::from_millis(1500) && !s.is_closed() {
        t += Duration::from_millis(50);
        s.handle_frame(
            t,
            Frame::Ping {
                seq: 1,
                rtt_us: None,
            },
        );
        if s.poll_timeout().is_some_and(|d| d <= t) {
            s.handle_timeout(t);
        }
    }
    assert!(s.is_closed());
    assert!(t >= now + Duration::from_millis(1000) && t <= now + Duration::from_millis(1050));
    let (_, e) = drain(&mut s);
    assert!(e.contains(&SessionEvent::Closed(DownReason::WriteTimeout)));
    assert_eq!(s.take_unacked(), vec![Bytes::from_static(b"x")]);
}

#[test]
fn unacked_bytes_bound_what_is_in_flight() {
    let now = Instant::now();
    let mut c = cfg(1, 100, 300);
    c.max_unacked = 100;
    c.max_unacked_bytes = 1000;
    let mut s = Session::new(now, c, None);
    s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
    s.record_data_sent(now, Bytes::from(vec![0; 600]));
    assert!(s.can_send());
    s.record_data_sent(now, Bytes::from(vec![0; 600]));
    assert!(!s.can_send());
    s.handle_frame(now, Frame::Ack(1));
    assert!(s.can_send());
}

#[test]
fn resets_are_closes_other_errors_are_io() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.handle_io_error(std::io::ErrorKind::ConnectionReset);
    assert_eq!(
        drain(&mut s).1,
        vec![SessionEvent::Closed(DownReason::Closed)]
    );
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    s.handle_io_error(std::io::ErrorKind::TimedOut);
    assert_eq!(
        drain(&mut s).1,
        vec![SessionEvent::Closed(DownReason::Io(
            std::io::ErrorKind::TimedOut
        ))]
    );
}

#[test]
fn local_close_sends_goodbye() {
    let now = Instant::now();
    let mut s = Session::new(now, cfg(1, 100, 300), None);
    drain(&mut s);
    s.close(DownReason::Shutdown, true);
    let (f, e) = drain(&mut s);
    assert_eq!(
        f,
        vec![Frame::Goodbye(GoodbyeBody {
            reason: "shutdown".into()
        })]
    );
    assert_eq!(e, vec![SessionEvent::Closed(DownReason::Shutdown)]);
}

/// Both sides of `p` take liveness datagrams from now on.
fn enable_datagrams(p: &mut Pair) {
    p.a.enable_datagrams(p.now);
    p.b.enable_datagrams(p.now);
}

/// Two sessions at 200 ms / 1 s, established, taking liveness datagrams.
fn datagram_pair() -> Pair {
    let mut p = Pair::new(cfg(1, 200, 1000), cfg(2, 200, 1000));
    p.run_until(p.now + 10 * MS);
    enable_datagrams(&mut p);
    p
}

#[test]
fn a_healthy_session_sends_no_liveness_probes() {
    let mut p = datagram_pair();
    p.run_until(p.now + Duration::from_secs(120));
    assert!(p.a.is_established() && p.b.is_established());
    assert_eq!(p.probes, [0, 0]);
}

#[test]
fn datagrams_keep_a_session_whose_stream_stalls_up_until_the_stall_timeout() {
    // Heartbeat 200 ms / 1 s; the stall timeout is 10 s here.
    let mut p = datagram_pair();
    p.run_until(p.now + Duration::from_secs(2));
    let stalled = p.now;
    p.stream_cut = true;
    p.run_until(stalled + Duration::from_secs(9));
    assert!(p.a.is_established() && p.b.is_established());
    // A side probes 1.5 intervals into the silence; a probe (like its
    // answer) proves its sender alive, so the two sides take turns: one
    // probe per 1.5 intervals between them.
    let total = p.probes[0] + p.probes[1];
    assert!((25..=35).contains(&total), "{:?}", p.probes);
    p.run_until(stalled + Duration::from_secs(11));
    for events in [&p.events_a, &p.events_b] {
        let (t, reason) = Pair::closed_at(events).expect("closed");
        assert_eq!(reason, DownReason::StreamStalled);
        // Ten seconds after the last frame, which came up to an interval
        // before the stall began.
        let after = t - stalled;
        assert!(
            after >= Duration::from_millis(9_700) && after <= Duration::from_millis(10_100),
            "{after:?}"
        );
    }
}

#[test]
fn a_stalled_stream_is_not_a_write_timeout_while_datagrams_prove_the_peer() {
    // A message in flight, then the stream stalls; without datagrams the
    // same stall is a heartbeat timeout, as before.
    for datagrams in [true, false] {
        let mut c = cfg(1, 200, 1000);
        c.write_timeout = Duration::from_secs(2);
        let mut p = Pair::new(c, cfg(2, 200, 1000));
        p.run_until(p.now + 10 * MS);
        if datagrams {
            enable_datagrams(&mut p);
        }
        p.stream_cut = true;
        let stalled = p.now;
        p.a.record_data_sent(p.now, Bytes::from_static(b"on"));
        p.run_until(stalled + Duration::from_secs(5));
        if datagrams {
            assert!(p.a.is_established(), "{:?}", Pair::closed_at(&p.events_a));
        } else {
            let (t, reason) = Pair::closed_at(&p.events_a).expect("closed");
            assert_eq!(reason, DownReason::HeartbeatTimeout);
            assert!(t - stalled <= Duration::from_millis(1200));
        }
    }
}

#[test]
fn the_in_flight_window_starts_small_and_opens_with_fast_acks() {
    let mut c = cfg(1, 1000, 3000);
    c.max_unacked = 100_000;
    let mut p = Pair::new(c, cfg(2, 1000, 3000));
    p.run_until(p.now + 10 * MS);
    let message = Bytes::from(vec![7u8; 995]);
    let fill = |p: &mut Pair| p.fill_window(&message);
    // 8 KiB at first: 8 messages of 1000 bytes on the wire, one past.
    assert_eq!(fill(&mut p), 9);
    // Each round of acks within 1 ms of a 1 s interval doubles it.
    for _ in 0..12 {
        p.run_until(p.now + 20 * MS);
        fill(&mut p);
    }
    p.run_until(p.now + 20 * MS);
    assert!(
        fill(&mut p) >= 1000,
        "the window opened to the most (1 MiB here)"
    );
}

#[test]
fn an_ack_is_due_at_32_frames_256_kib_of_bodies_or_4_kib_once_all_is_read() {
    let mut p = Pair::new(cfg(1, 1000, 3000), cfg(2, 1000, 3000));
    p.run_until(p.now + 10 * MS);
    let (now, b) = (p.now, &mut p.b);
    drain(b);
    let acks = |b: &mut Session| -> Vec<Frame> {
        let (f, _) = drain(b);
        f.into_iter()
            .filter(|f| matches!(f, Frame::Ack(_)))
            .collect()
    };
    // Small frames wait for the 32nd...
    for _ in 0..31 {
        assert!(b.handle_data(now, 16));
    }
    assert_eq!(acks(b), []);
    assert!(b.handle_data(now, 16));
    assert_eq!(acks(b), [Frame::Ack(32)]);
    // ...larger ones, while more keeps arriving, for 256 KiB of bodies,
    // counted from the last ack: an ack per four 64 KiB messages.
    for _ in 0..3 {
        assert!(b.handle_data(now, 64 * 1024));
    }
    assert_eq!(acks(b), []);
    assert!(b.handle_data(now, 64 * 1024));
    assert_eq!(acks(b), [Frame::Ack(36)]);
    // Once all that arrived is read, 4 KiB of bodies are due...
    for _ in 0..3 {
        assert!(b.handle_data(now, 1000));
    }
    b.handle_drained();
    assert_eq!(acks(b), []);
    assert!(b.handle_data(now, 1096));
    assert_eq!(acks(b), []);
    b.handle_drained();
    assert_eq!(acks(b), [Frame::Ack(40)]);
    // ...and one large message is acknowledged as soon as it is read.
    assert!(b.handle_data(now, 64 * 1024));
    b.handle_drained();
    assert_eq!(acks(b), [Frame::Ack(41)]);
    // A trickle of small messages, each read on its own, waits for the
    // 10 ms rule rather than getting an ack each.
    for _ in 0..5 {
        assert!(b.handle_data(now, 100));
        b.handle_drained();
    }
    assert_eq!(acks(b), []);
    b.handle_timeout(now + 10 * MS);
    assert_eq!(acks(b), [Frame::Ack(46)]);
    // Nothing unacknowledged: nothing due.
    b.handle_drained();
    assert_eq!(acks(b), []);
}

#[test]
fn large_messages_open_the_window_a_round_trip_at_a_time() {
    let mut c = cfg(1, 1000, 3000);
    c.max_unacked = 100_000;
    c.max_unacked_bytes = 8 << 20;
    let mut p = Pair::new(c, cfg(2, 1000, 3000));
    p.run_until(p.now + 10 * MS);
    let message = Bytes::from(vec![7u8; 64 * 1024]);
    let fill = |p: &mut Pair| p.fill_window(&message);
    // The window starts at 8 KiB (one message); 1 ms each way. Were each
    // message acknowledged only after the 10 ms ack delay, 40 ms would
    // open it to a handful; a round trip per doubling opens it to the most.
    let start = p.now;
    let mut last = 0;
    while p.now < start + 40 * MS {
        last = fill(&mut p);
        p.run_until(p.now + 2 * MS + MS / 10);
    }
    assert!(
        p.a.window.bytes() == 8 << 20,
        "the window is {} after 40 ms",
        p.a.window.bytes()
    );
    assert!(
        last >= 32,
        "{last} messages went out in the last round trip"
    );
}
