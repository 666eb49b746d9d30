//! Resumption in the machine: the hellos, and counts that carry on.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::super::{Session, SessionConfig, SessionEvent};
use crate::event::{DownReason, ProtocolViolation};
use crate::wire::frame::Frame;

fn cfg(id: u64, grace_ms: u64) -> SessionConfig {
    let mut c = crate::testing::session_config_of(id, 1000, 3000);
    c.max_unacked = 64;
    c.resume_grace = Duration::from_millis(grace_ms);
    c.hello.grace_ms = grace_ms;
    c
}

/// Moves frames both ways until neither side has any; returns the data
/// frames B took.
fn pump(now: Instant, a: &mut Session, b: &mut Session) -> Vec<Bytes> {
    let mut got = Vec::new();
    loop {
        let mut moved = false;
        while let Some(f) = a.poll_transmit() {
            moved = true;
            if let Frame::Data(d) = f {
                if b.handle_data(now, d.len()) {
                    got.push(d);
                }
            } else {
                b.handle_frame(now, f);
            }
        }
        while let Some(f) = b.poll_transmit() {
            moved = true;
            a.handle_frame(now, f);
        }
        if !moved {
            return got;
        }
    }
}

fn hello_of(s: &mut Session) -> Box<crate::wire::frame::Hello> {
    match s.poll_transmit() {
        Some(Frame::Hello(Ok(h))) => h,
        other => panic!("expected a hello, got {other:?}"),
    }
}

#[test]
fn an_acceptor_that_resumes_answers_the_hello_once_approved() {
    let now = Instant::now();
    let mut a = Session::new(now, cfg(1, 30_000), Some(crate::peer::PeerId::from_u64(2)));
    a.offer_resume(0xabc, 7);
    let mut b = Session::new(now, cfg(2, 30_000), None);
    assert!(b.poll_transmit().is_none(), "no hello before the approval");
    let ha = hello_of(&mut a);
    assert_eq!((ha.resume, ha.received, ha.grace_ms), (0xabc, 7, 30_000));
    b.handle_frame(now, Frame::Hello(Ok(ha)));
    assert!(matches!(b.poll_event(), Some(SessionEvent::Established(_))));
    // A ping that came before the approval is answered after the hello.
    b.handle_frame(
        now,
        Frame::Ping {
            seq: 9,
            rtt_us: None,
        },
    );
    assert!(b.poll_transmit().is_none(), "nothing before the hello");
    b.send_hello(now, 0xabc, 3);
    let hb = hello_of(&mut b);
    assert_eq!((hb.resume, hb.received), (0xabc, 3));
    assert_eq!(b.poll_transmit(), Some(Frame::Pong(9)));
    assert!(matches!(b.poll_transmit(), Some(Frame::Ping { .. })));
    // Once only.
    b.send_hello(now, 1, 1);
    assert!(b.poll_transmit().is_none());
    // Without a grace the acceptor's hello goes at once, as before.
    let mut c = Session::new(now, cfg(3, 0), None);
    assert_eq!(hello_of(&mut c).resume, 0);
}

#[test]
fn a_dialer_that_offers_nothing_gets_the_acceptors_hello_at_once() {
    let now = Instant::now();
    for (dialer_grace, token) in [(30_000, 0x77), (0, 0)] {
        let mut a = Session::new(
            now,
            cfg(1, dialer_grace),
            Some(crate::peer::PeerId::from_u64(2)),
        );
        let mut b = Session::new(now, cfg(2, 30_000), None);
        b.set_fresh_token(0x77);
        assert!(b.poll_transmit().is_none());
        b.handle_frame(now, Frame::Hello(Ok(hello_of(&mut a))));
        // Before any approval: a new session, whatever the supervisor says.
        let hb = hello_of(&mut b);
        assert_eq!(
            (hb.resume, hb.received),
            (token, 0),
            "dialer grace {dialer_grace}"
        );
        assert!(matches!(b.poll_transmit(), Some(Frame::Ping { .. })));
        assert_eq!(b.hello_token(), token);
        // The approval's hello is then a no-op.
        b.send_hello(now, 0x99, 5);
        assert!(b.poll_transmit().is_none());
        assert_eq!(b.hello_token(), token);
    }
}

#[test]
fn a_resumed_session_sends_again_only_what_the_peer_did_not_receive() {
    let now = Instant::now();
    let pid = crate::peer::PeerId::from_u64(2);
    let (mut a, mut b) = (
        Session::new(now, cfg(1, 0), Some(pid)),
        Session::new(now, cfg(2, 0), None),
    );
    pump(now, &mut a, &mut b);
    assert!(a.is_established() && b.is_established());
    let msgs: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("m{i}"))).collect();
    for m in &msgs {
        a.record_data_sent(now, m.clone());
    }
    // B received the first three; then the link was cut (their ack, and
    // the last two, were lost).
    for _ in 0..3 {
        assert!(b.handle_data(now, 16));
    }
    a.close(DownReason::HeartbeatTimeout, false);
    b.close(DownReason::HeartbeatTimeout, false);
    let (held_a, held_b) = (a.hold(), b.hold());
    assert_eq!(
        (held_a.acked, held_a.unacked_len(), held_a.received),
        (0, 5, 0)
    );
    assert_eq!(
        (held_b.acked, held_b.unacked_len(), held_b.received),
        (0, 0, 3)
    );

    // A new connection: each side resumes from what the other received.
    let (mut a2, mut b2) = (
        Session::new(now, cfg(1, 0), Some(pid)),
        Session::new(now, cfg(2, 0), None),
    );
    pump(now, &mut a2, &mut b2);
    let b_received = held_b.received;
    assert_eq!(a2.resume(now, held_a, b_received), Some(2));
    assert_eq!(b2.resume(now, held_b, 0), Some(0));
    let mut resent = BytesMut::new();
    for piece in a2.unacked_pieces() {
        piece.encode(&mut resent);
    }
    assert_eq!(a2.unacked_len(), 2);
    // The two B did not get, in order: B counts them on from 3 and acks 5.
    for _ in 0..2 {
        assert!(b2.handle_data(now, 16));
    }
    assert_eq!(b2.received(), 5);
    let later = now + Duration::from_millis(20);
    b2.handle_timeout(later);
    let mut acked = false;
    while let Some(f) = b2.poll_transmit() {
        acked |= f == Frame::Ack(5);
        a2.handle_frame(later, f);
    }
    assert!(acked, "the ack counts the whole session");
    assert_eq!(a2.unacked_len(), 0);
    assert!(a2.is_established(), "an ack of 5 is no violation");
    assert!(a2.can_send());
    // What was written again is m3 and m4, as data frames.
    let mut expect = BytesMut::new();
    for m in &msgs[3..] {
        crate::wire::frame::encode_data(m, &mut expect);
    }
    assert_eq!(resent, expect);
}

#[test]
fn counts_that_do_not_fit_what_was_sent_close_the_session() {
    let now = Instant::now();
    let pid = crate::peer::PeerId::from_u64(2);
    for peer_received in [1, 7] {
        let (mut a, mut b) = (
            Session::new(now, cfg(1, 0), Some(pid)),
            Session::new(now, cfg(2, 0), None),
        );
        pump(now, &mut a, &mut b);
        for i in 0..4 {
            a.record_data_sent(now, Bytes::from(vec![i]));
        }
        // Two acknowledged, two in flight: the peer received 2 to 4.
        a.handle_frame(now, Frame::Ack(2));
        let held = a.hold();
        assert_eq!((held.acked, held.unacked_len()), (2, 2));
        let (mut a2, mut b2) = (
            Session::new(now, cfg(1, 0), Some(pid)),
            Session::new(now, cfg(2, 0), None),
        );
        pump(now, &mut a2, &mut b2);
        while a2.poll_event().is_some() {}
        assert_eq!(a2.resume(now, held, peer_received), None, "{peer_received}");
        assert!(a2.is_closed());
        // Nothing dropped: the end of the session hands them back.
        assert_eq!(
            a2.take_unacked(),
            [Bytes::from(vec![2]), Bytes::from(vec![3])]
        );
        assert_eq!(
            a2.poll_event(),
            Some(SessionEvent::Closed(DownReason::ProtocolError(
                ProtocolViolation::BadResume
            )))
        );
    }
}
