//! Drivers shared by the fuzz targets (`fuzz/`) and the property tests: each
//! feeds arbitrary bytes to one piece of the protocol and checks its
//! invariants with assertions, so a violation is a crash the fuzzer keeps.
//! Not part of the public API.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::discovery::machine::{Discovery, DiscoveryConfig, DiscoveryEvent, Target};
use crate::event::DownReason;
use crate::peer::{PeerId, PeerInfo, Role};
use crate::session::machine::{Session, SessionConfig, SessionEvent};
use crate::wire::discovery::{Datagram, DatagramLimits};
use crate::wire::frame::{self, Frame, Frames, Hello, Outgoing};

const MAX_FRAME: u32 = 4096;
const MAX_UNACKED: usize = 8;

/// Liveness datagrams (PROTOCOL.md §7) into a session's receiver: made-up
/// ones never accepted, genuine ones replayed, reordered and altered
/// accepted exactly when unaltered and fresh (see `session::datagram`).
pub fn liveness(data: &[u8]) {
    crate::session::datagram::fuzz(data);
}

/// Arbitrary bytes into the datagram decoder: no panic; what decodes
/// re-encodes to something that decodes to the same message.
pub fn datagram(data: &[u8]) {
    let limits = DatagramLimits::default();
    if let Ok(d) = Datagram::decode(data, &limits) {
        let again = Datagram::decode(
            &d.encode(),
            &DatagramLimits {
                max_size: usize::MAX,
                ..limits
            },
        );
        assert_eq!(again, Ok(d));
    }
}

/// Arbitrary bytes, in arbitrary chunks, into the frame decoder: no panic,
/// the buffer never grows past what was fed plus one frame, what decodes
/// round-trips, and the session's chunk decoder (`Frames`, fed in other
/// pieces) yields exactly the same frames and error.
pub fn frames(data: &[u8]) {
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    let mut decoded = Vec::new();
    let mut chunked = Vec::new();
    let (mut cbuf, mut cframes, mut cfailed) = (BytesMut::new(), Frames::default(), false);
    for piece in data.chunks(11) {
        cbuf.extend_from_slice(piece);
        while !cfailed && cframes.fill(&mut cbuf, MAX_FRAME) {
            for r in cframes.by_ref() {
                cfailed |= r.is_err();
                chunked.push(r);
            }
        }
    }
    for chunk in data.chunks(7) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            match Frame::decode(&mut buf, MAX_FRAME) {
                Ok(Some(f)) => {
                    let mut enc = BytesMut::new();
                    f.encode(&mut enc);
                    assert_eq!(Frame::decode(&mut enc, u32::MAX), Ok(Some(f.clone())));
                    decoded.push(Ok(f));
                }
                Ok(None) => break,
                Err(e) => {
                    decoded.push(Err(e));
                    assert_eq!(chunked, decoded, "Frames disagrees with Frame::decode");
                    return;
                }
            }
        }
        assert!(
            buf.capacity() <= fed + MAX_FRAME as usize + 64,
            "buffer grew past the limit"
        );
    }
    assert_eq!(chunked, decoded, "Frames disagrees with Frame::decode");
}

/// A handshake as the session driver sees one (frames up to `MAX_FRAME`).
fn hello(id: u64, interval_ms: u64, timeout_ms: u64) -> Hello {
    Hello {
        max_frame_size: MAX_FRAME,
        ..crate::testing::hello(id, interval_ms, timeout_ms)
    }
}

/// Arbitrary operations on a session: raw bytes from the peer, time passing,
/// sends, acks, errors. Checks: no panic; in-flight messages never exceed the
/// limit; the session reports `Closed` exactly once and nothing after it;
/// every timer it asks for lies in the future; what it transmits encodes.
pub fn session(data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let cfg = SessionConfig {
        hello: hello(1, 100, 300),
        max_unacked: MAX_UNACKED,
        write_timeout: Duration::from_millis(400),
        ..crate::testing::session_config_of(1, 100, 300)
    };
    let expected = data.first().map(|b| b & 1 == 1).unwrap_or(false);
    let mut s = Session::new(now, cfg, expected.then(|| PeerId::from_u64(2)));
    let mut rbuf = BytesMut::new();
    let mut frames = Frames::default();
    let mut closed = 0;
    let mut sent = 0u64;
    let mut it = data.iter().copied().skip(1);
    while let Some(op) = it.next() {
        let arg = it.next().unwrap_or(0);
        match op % 8 {
            0 => now += Duration::from_millis(u64::from(arg) * 7),
            1 => {
                let n = usize::from(arg) % 64;
                let bytes: Vec<u8> = it.by_ref().take(n).collect();
                rbuf.extend_from_slice(&bytes);
                // As the session task feeds it: data frames through
                // `handle_data`, the others through `handle_frame`.
                'frames: while frames.fill(&mut rbuf, MAX_FRAME) {
                    for decoded in frames.by_ref() {
                        match decoded {
                            Ok(Frame::Data(d)) => {
                                s.handle_data(now, d.len());
                            }
                            Ok(f) => {
                                s.handle_frame(now, f);
                            }
                            Err(e) => {
                                s.handle_decode_error(e);
                                rbuf.clear();
                                break 'frames;
                            }
                        }
                    }
                }
            }
            7 => {
                s.handle_data(now, 16);
            }
            2 => {
                let h = hello(
                    u64::from(arg % 4),
                    u64::from(arg) + 1,
                    u64::from(arg) * 3 + 2,
                );
                s.handle_frame(now, Frame::Hello(Ok(Box::new(h))));
            }
            3 if s.can_send() && arg % 2 == 0 => {
                s.record_data_sent(now, vec![arg].into());
                sent += 1;
            }
            // A run of small messages, as the outbox hands them over.
            3 if s.can_send() => {
                let n = 1 + usize::from(arg) % s.sendable();
                let mut wire = BytesMut::new();
                for i in 0..n {
                    frame::encode_data(&[arg; 3][..i % 4], &mut wire);
                }
                let wire = wire.freeze();
                s.record_sent(now, Outgoing::Frames { wire, count: n });
                sent += n as u64;
            }
            4 => {
                s.handle_frame(now, Frame::Ack(u64::from(arg) % (sent + 2)));
            }
            5 => {
                s.handle_frame(
                    now,
                    Frame::Ping {
                        seq: u64::from(arg),
                        rtt_us: (arg % 2 == 1).then_some(u32::from(arg)),
                    },
                );
            }
            6 => match arg % 4 {
                0 => s.handle_eof(),
                1 => s.handle_io_error(std::io::ErrorKind::ConnectionReset),
                2 => s.set_paused(now, arg & 4 != 0),
                _ => s.close(crate::DownReason::Shutdown, true),
            },
            _ => {}
        }
        if s.poll_timeout().is_some_and(|t| t <= now) {
            s.handle_timeout(now);
        }
        if let Some(t) = s.poll_timeout() {
            assert!(
                t > now || s.is_closed(),
                "timer in the past after handle_timeout"
            );
        }
        while let Some(f) = s.poll_transmit() {
            let mut enc = BytesMut::new();
            f.encode(&mut enc);
        }
        while let Some(e) = s.poll_event() {
            assert_eq!(closed, 0, "event after Closed: {e:?}");
            if matches!(e, SessionEvent::Closed(_)) {
                closed += 1;
            }
        }
        assert!(!s.can_send() || s.is_established());
        let unacked = s.unacked_len();
        assert!(unacked <= MAX_UNACKED);
    }
    // What is handed back is exactly what is unacknowledged.
    let unacked = s.unacked_len();
    assert_eq!(s.take_unacked().len(), unacked);
}

/// Arbitrary datagrams into a discovery machine, from arbitrary sources on
/// its subnet, with time passing and dials and sessions coming and going:
/// no panic, table and rate-limit state stay within their limits, every
/// reply goes to a unicast address, the peers without a session are
/// exactly those the machine tracks deadlines for.
pub fn discovery(data: &[u8]) {
    let mut now = Instant::now();
    let cfg = DiscoveryConfig {
        service: "fuzz".into(),
        id: PeerId::from_u64(1),
        instance: 1,
        name: "f".into(),
        role: Role::Peer,
        tcp_port: 1,
        metadata: BTreeMap::new(),
        discovery_port: 9,
        probe_initial: Duration::from_millis(100),
        probe_max: Duration::from_secs(3),
        probe_max_missing: Duration::from_secs(1),
        redial_initial: Duration::from_millis(100),
        peer_expiry: Duration::from_secs(10),
        max_peers: 4,
        dials_per_sec: 20,
        replies_per_source_per_sec: 2,
        limits: DatagramLimits::default(),
        fleet_key: None,
        aes_gcm: false,
        first_seq: 0,
        static_peers: Vec::new(),
        accept_routed_probes: false,
    };
    let mut d = Discovery::new(cfg, 0);
    d.set_targets(
        now,
        vec![Target::v4(
            "f0",
            [10, 0, 0, 1].into(),
            24,
            [10, 0, 0, 255].into(),
        )],
    );
    // Dials asked for and sessions up, as the node would report them.
    let (mut dialing, mut up): (Vec<PeerInfo>, Vec<PeerId>) = (Vec::new(), Vec::new());
    for chunk in data.split(|b| *b == 0xff) {
        let Some((&head, body)) = chunk.split_first() else {
            continue;
        };
        now += Duration::from_millis(u64::from(head) * 13);
        // The outcome of a dial or a session, chosen by the input.
        match head % 8 {
            0 => {
                if let Some(info) = dialing.pop() {
                    up.push(info.id);
                    d.session_up(now, info);
                }
            }
            1 => {
                if let Some(info) = dialing.pop() {
                    d.dial_failed(now, info.id);
                }
            }
            2 => {
                if let Some(id) = up.pop() {
                    let reason = [
                        DownReason::Goodbye,
                        DownReason::HeartbeatTimeout,
                        DownReason::PeerRestarted,
                    ][usize::from(head / 8) % 3]
                        .clone();
                    d.session_down(now, id, &reason);
                }
            }
            3 => {
                // A peer we never heard of dials us.
                let id = PeerId::from_u64(100 + u64::from(head / 8) % 4);
                d.session_up(
                    now,
                    PeerInfo {
                        id,
                        instance: 1,
                        name: "in".into(),
                        addr: ([10, 0, 0, 9], 9).into(),
                        interface: None,
                        role: Role::Peer,
                        metadata: BTreeMap::new(),
                        aes_gcm: false,
                    },
                );
                up.push(id);
            }
            _ => {}
        }
        let src = std::net::SocketAddr::from(([10, 0, 0, head], u16::from(head) * 3));
        let _ = d.handle_datagram(now, src, body);
        if d.poll_timeout().is_some_and(|t| t <= now) {
            d.handle_timeout(now);
        }
        while let Some(t) = d.poll_transmit() {
            assert!(!t.dst.ip().is_unspecified() && t.dst.port() != 0);
        }
        while let Some(e) = d.poll_event() {
            if let DiscoveryEvent::Dial(info) = e {
                dialing.push(info);
            }
        }
        d.check_invariants();
        // Announced peers are capped; peers that dial us are not (the
        // node caps sessions): four of those here.
        assert!(d.peers().count() <= 4 + 4);
    }
}

/// The record layer of Noise sessions. The first byte picks the case:
///
/// - even: the rest is ciphertext from someone without the keys, fed in
///   pieces: no panic, nothing ever opens (a forgery would), the error is
///   a `BadRecord` violation, the buffers stay within one record and a read;
/// - odd: the rest is plaintext, sealed in writes of sizes taken from it,
///   the stream cut into pieces and read into buffers of sizes taken from
///   it, and, when the first byte says so, one byte altered: no panic;
///   unaltered, exactly the plaintext comes out, in order; altered, an
///   error comes before any plaintext that differs.
pub fn records(data: &[u8]) {
    use crate::session::stream::{Records, violation_of};
    use tokio::io::ReadBuf;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (tx, rx) = crate::session::noise::transport_pair();
    let mut rec = Records::new(rx.transport().expect("ciphers"));
    let piece = 1 + usize::from(mode >> 1) % 61;
    let read_size = 1 + usize::from(mode >> 2) % 300;
    // Reads what the buffered records give, into buffers of `read_size`.
    let drain = |rec: &mut Records, got: &mut Vec<u8>| -> std::io::Result<()> {
        let mut buf = vec![0u8; read_size];
        loop {
            let mut out = ReadBuf::new(&mut buf);
            rec.read_buffered(&mut out)?;
            if out.filled().is_empty() {
                return Ok(());
            }
            got.extend_from_slice(out.filled());
        }
    };
    if mode % 2 == 0 {
        let mut got = Vec::new();
        for chunk in rest.chunks(piece) {
            rec.feed(chunk);
            if let Err(e) = drain(&mut rec, &mut got) {
                assert!(
                    matches!(
                        violation_of(&e),
                        Some(crate::ProtocolViolation::BadRecord(_))
                    ),
                    "{e}"
                );
                break;
            }
            assert!(rec.buffered() <= 2 + 65535 + piece);
        }
        assert!(got.is_empty(), "a record from no key opened");
        return;
    }
    // Seal `rest` in writes of sizes from its own bytes.
    let mut wire = BytesMut::new();
    let mut at = 0;
    let mut sealer = Records::new(tx.transport().expect("ciphers"));
    while at < rest.len() {
        let n = (1 + usize::from(rest[at]) * 37).min(rest.len() - at);
        sealer.seal(&rest[at..at + n], &mut wire).unwrap();
        at += n;
    }
    let altered = (mode & 0x80 != 0 && !wire.is_empty()).then(|| {
        let i = usize::from(mode) * 131 % wire.len();
        wire[i] ^= 1 << (mode % 8);
        i
    });
    let mut got = Vec::new();
    let mut failed = false;
    for chunk in wire.chunks(piece) {
        rec.feed(chunk);
        if drain(&mut rec, &mut got).is_err() {
            failed = true;
            break;
        }
    }
    // What came out is always a prefix of what went in.
    assert!(rest.starts_with(&got), "other plaintext came out");
    match altered {
        None => {
            assert!(!failed && !rec.inside_record());
            assert_eq!(got.len(), rest.len());
        }
        Some(_) => assert!(failed || rec.inside_record(), "an altered record opened"),
    }
    // The same wire, opened in place in the buffers it is read into (each
    // piece read behind the partial record carried from the last), gives
    // the same: the plaintext, or an error before anything else.
    #[cfg(feature = "ring")]
    {
        let mut rec = Records::new(rx.transport().expect("ciphers"));
        let key = rec.in_place_key().expect("ring keys");
        let mut got = Vec::new();
        let mut failed = false;
        for chunk in wire.chunks(piece) {
            let mut buf = vec![0u8; rec.buffered() + chunk.len()];
            let mut out = ReadBuf::new(&mut buf);
            let start = rec.carry_into(&mut out);
            out.put_slice(chunk);
            if rec.open_read(&key, &mut out, start).is_err() {
                failed = true;
                break;
            }
            got.extend_from_slice(out.filled());
            assert!(rec.buffered() <= 2 + 65535);
        }
        assert!(rest.starts_with(&got), "other plaintext came out in place");
        match altered {
            None => {
                assert!(!failed && !rec.inside_record());
                assert_eq!(got.len(), rest.len());
            }
            Some(_) => assert!(
                failed || rec.inside_record(),
                "an altered record opened in place"
            ),
        }
    }
}

/// Arbitrary handshake messages to a responder, from someone without any
/// key (with and without a fleet key): no panic, and never a completed
/// handshake (that would take the keys the messages must be made with).
pub fn handshake(data: &[u8]) {
    for psk in [false, true] {
        assert!(
            !crate::session::noise::respond_to(data, psk),
            "a handshake of made-up bytes completed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn datagram_decoder_survives_anything(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            datagram(&data);
        }

        #[test]
        fn frame_decoder_survives_anything(data in proptest::collection::vec(any::<u8>(), 0..6000)) {
            frames(&data);
        }

        #[test]
        fn session_machine_survives_anything(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            session(&data);
        }

        #[test]
        fn discovery_machine_survives_anything(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            discovery(&data);
        }
    }

    proptest! {
        // Each case runs a handshake (curve operations): fewer cases.
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn records_open_only_what_was_sealed(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            records(&data);
        }

        #[test]
        fn liveness_datagrams_pass_only_when_genuine_and_fresh(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            liveness(&data);
        }

        #[test]
        fn handshakes_of_made_up_bytes_never_complete(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            handshake(&data);
        }
    }

    /// Inputs the fuzzers found; each must stay fixed.
    #[test]
    fn regressions() {
        // A hello-shaped frame with an ack before any data.
        session(&[0, 2, 9, 4, 3]);
        // A malformed goodbye followed by a bad length prefix: Frames must
        // stop at the first error, like Frame::decode.
        frames(&[
            0x00, 0x00, 0x00, 0x21, 0x06, 0x7b, 0x22, 0x7b, 0x22, 0x3a, 0x0d, 0x0d, 0x0d, 0xff,
            0xff, 0xff, 0x1a, 0x00, 0x22, 0x3a, 0x0d, 0x0d, 0x0d, 0xff, 0xff, 0xff, 0x1a, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x0d, 0xff,
        ]);
        // A peer dials us, its session ends, it dials again: the set of
        // peers without a session must follow (found with that update
        // left out on purpose).
        discovery(&[155, 255, 34, 255, 251]);
    }
}
