//! Unit and property tests of the frame codec.

use super::*;
use proptest::prelude::*;

fn hello() -> Hello {
    crate::testing::hello(0xabc, 1000, 3000)
}

fn round_trip(f: Frame) {
    let mut buf = BytesMut::new();
    f.encode(&mut buf);
    let len = buf.len();
    // Every strict prefix is incomplete, never an error.
    for cut in 0..len {
        let mut part = BytesMut::from(&buf[..cut]);
        assert_eq!(
            Frame::decode(&mut part, 1 << 20),
            Ok(None),
            "{f:?} at {cut}"
        );
    }
    assert_eq!(Frame::decode(&mut buf, 1 << 20), Ok(Some(f)));
    assert!(buf.is_empty());
}

#[test]
fn every_frame_round_trips() {
    round_trip(Frame::Hello(Ok(Box::new(hello()))));
    round_trip(Frame::Hello(Err(3)));
    round_trip(Frame::Ping {
        seq: 1,
        rtt_us: None,
    });
    round_trip(Frame::Ping {
        seq: 2,
        rtt_us: Some(u32::MAX),
    });
    round_trip(Frame::Pong(u64::MAX));
    round_trip(Frame::Data(Bytes::from_static(b"hello")));
    round_trip(Frame::Data(Bytes::new()));
    round_trip(Frame::Ack(42));
    round_trip(Frame::Goodbye(GoodbyeBody {
        reason: "shutdown".into(),
    }));
    round_trip(Frame::Request {
        id: 1,
        body: Bytes::from_static(b"toggle"),
    });
    round_trip(Frame::Request {
        id: u64::MAX,
        body: Bytes::new(),
    });
    round_trip(Frame::Reply {
        id: 7,
        body: Bytes::from_static(b"{\"on\":true}"),
    });
}

/// The request and reply of PROTOCOL.md's example, byte for byte; the
/// outbox's encodings are the codec's.
#[test]
fn documented_request_and_reply_bytes() {
    let request = Frame::Request {
        id: 1,
        body: Bytes::from_static(b"toggle"),
    };
    let mut buf = BytesMut::new();
    request.encode(&mut buf);
    assert_eq!(&buf[..], b"\0\0\0\x0f\x07\0\0\0\0\0\0\0\x01toggle");
    assert_eq!(&request_frame(1, b"toggle")[..], &buf[..]);
    let reply = Frame::Reply {
        id: 1,
        body: Bytes::from_static(b"on"),
    };
    buf.clear();
    reply.encode(&mut buf);
    assert_eq!(&buf[..], b"\0\0\0\x0b\x08\0\0\0\0\0\0\0\x01on");
    assert_eq!(&reply_frame(1, b"on")[..], &buf[..]);
    assert_eq!(
        exchange_parts(&reply_frame(1, b"on")),
        Some((false, 1, Bytes::from_static(b"on")))
    );
    assert_eq!(exchange_parts(&Bytes::from_static(b"\0\0\0\x01\x04")), None);
}

#[test]
fn documented_ping_bytes() {
    let mut buf = BytesMut::new();
    Frame::Ping {
        seq: 1,
        rtt_us: None,
    }
    .encode(&mut buf);
    assert_eq!(&buf[..], b"\0\0\0\x09\x02\0\0\0\0\0\0\0\x01");
    assert_eq!(buf.len(), 13);
    buf.clear();
    Frame::Ping {
        seq: 2,
        rtt_us: Some(250),
    }
    .encode(&mut buf);
    assert_eq!(&buf[..], b"\0\0\0\x0d\x02\0\0\0\0\0\0\0\x02\0\0\0\xfa");
}

#[test]
fn oversized_prefix_is_rejected_before_allocating() {
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 4][..]);
    let cap = buf.capacity();
    assert_eq!(
        Frame::decode(&mut buf, 1 << 20),
        Err(FrameError::TooLarge {
            size: u32::MAX,
            limit: 1 << 20
        })
    );
    assert_eq!(buf.capacity(), cap);
}

#[test]
fn bad_frames_have_precise_errors() {
    let mut b = BytesMut::from(&[0, 0, 0, 0][..]);
    assert_eq!(Frame::decode(&mut b, 100), Err(FrameError::Empty));
    let mut b = BytesMut::from(&[0, 0, 0, 1, 99][..]);
    assert_eq!(Frame::decode(&mut b, 100), Err(FrameError::UnknownType(99)));
    // A request or reply holds at least its 8-byte id.
    for (ty, name) in [(T_REQUEST, "request"), (T_REPLY, "reply")] {
        let mut b = BytesMut::from(&[0, 0, 0, 8, ty, 0, 0, 0, 0, 0, 0, 1][..]);
        assert_eq!(Frame::decode(&mut b, 100), Err(FrameError::Malformed(name)));
    }
    let mut b = BytesMut::from(&[0, 0, 0, 3, T_PING, 1, 2][..]);
    assert_eq!(
        Frame::decode(&mut b, 100),
        Err(FrameError::Malformed("ping"))
    );
    // A ping is 8 or 12 bytes, nothing in between.
    let mut b = BytesMut::from(&[0, 0, 0, 11, T_PING, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0][..]);
    assert_eq!(
        Frame::decode(&mut b, 100),
        Err(FrameError::Malformed("ping"))
    );
    // A pong is the bare sequence number: an echoed 12-byte ping is not.
    let mut b = BytesMut::from(&[0, 0, 0, 13, T_PONG, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9][..]);
    assert_eq!(
        Frame::decode(&mut b, 100),
        Err(FrameError::Malformed("pong"))
    );
    let mut b = BytesMut::new();
    json_frame(
        &mut b,
        T_HELLO,
        &serde_json::json!({"protocol": 1, "id": "zz"}),
    );
    assert_eq!(
        Frame::decode(&mut b, 1 << 20),
        Err(FrameError::Malformed("hello"))
    );
    let mut b = BytesMut::new();
    json_frame(
        &mut b,
        T_HELLO,
        &serde_json::json!({"protocol": 9, "anything": true}),
    );
    assert_eq!(
        Frame::decode(&mut b, 1 << 20),
        Ok(Some(Frame::Hello(Err(9))))
    );
}

/// Everything `Frame::decode` gives, one call per frame, until it needs
/// more bytes or fails.
fn decode_each(bytes: &[u8], max: u32) -> Vec<Result<Frame, FrameError>> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    loop {
        match Frame::decode(&mut buf, max) {
            Ok(Some(f)) => out.push(Ok(f)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

/// The same through `Frames`, fed in pieces of `step` bytes.
fn decode_chunked(bytes: &[u8], max: u32, step: usize) -> Vec<Result<Frame, FrameError>> {
    let mut buf = BytesMut::new();
    let mut frames = Frames::default();
    let mut out = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        while frames.fill(&mut buf, max) {
            for r in frames.by_ref() {
                let failed = r.is_err();
                out.push(r);
                if failed {
                    return out;
                }
            }
        }
    }
    out
}

#[test]
fn frames_decode_like_decode_and_report_errors_after_the_good_frames() {
    let mut bytes = BytesMut::new();
    Frame::Ping {
        seq: 1,
        rtt_us: Some(9),
    }
    .encode(&mut bytes);
    Frame::Data(Bytes::from_static(b"abc")).encode(&mut bytes);
    Frame::Ack(3).encode(&mut bytes);
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 4]);
    // The first error ends it: a malformed ping, then anything.
    let mut bad = BytesMut::from(&[0, 0, 0, 2, T_PING, 1][..]);
    bad.extend_from_slice(&bytes);
    let mut frames = Frames::default();
    assert!(frames.fill(&mut bad, 1024));
    assert_eq!(frames.next(), Some(Err(FrameError::Malformed("ping"))));
    assert_eq!(frames.next(), None);
    let want = decode_each(&bytes, 1024);
    assert_eq!(want.len(), 4);
    assert!(matches!(want[3], Err(FrameError::TooLarge { .. })));
    for step in [1, 3, 13, 1000] {
        assert_eq!(decode_chunked(&bytes, 1024, step), want, "step {step}");
    }
}

proptest! {
    #[test]
    fn frames_agree_with_decode(
        frames in proptest::collection::vec((0u8..7, proptest::collection::vec(any::<u8>(), 0..40)), 0..20),
        junk in proptest::collection::vec(any::<u8>(), 0..16),
        step in 1usize..64,
    ) {
        let mut bytes = BytesMut::new();
        for (kind, payload) in frames {
            match kind {
                0 => Frame::Data(Bytes::from(payload)).encode(&mut bytes),
                1 => Frame::Ping { seq: payload.len() as u64, rtt_us: None }.encode(&mut bytes),
                2 => Frame::Ping { seq: 7, rtt_us: Some(payload.len() as u32) }.encode(&mut bytes),
                3 => Frame::Pong(payload.len() as u64).encode(&mut bytes),
                4 => Frame::Ack(payload.len() as u64).encode(&mut bytes),
                // Raw bytes as a frame of any type, valid or not.
                _ => {
                    bytes.put_u32(payload.len() as u32);
                    bytes.put_slice(&payload);
                }
            }
        }
        bytes.extend_from_slice(&junk);
        let want = decode_each(&bytes, 48);
        prop_assert_eq!(decode_chunked(&bytes, 48, step), want);
    }

    #[test]
    fn data_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
        round_trip(Frame::Data(Bytes::from(payload)));
    }

    #[test]
    fn garbage_never_panics_and_stays_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            match Frame::decode(&mut buf, 2048) {
                Ok(Some(_)) => continue,
                Ok(None) => { prop_assert!(buf.capacity() <= 4096 + 2048 + 8); break }
                Err(_) => break,
            }
        }
    }
}

/// The worked example of PROTOCOL.md "Resuming a session": the two hellos,
/// byte for byte as the document prints them (length prefix, type, JSON).
#[test]
fn the_resumption_example_of_the_protocol_document_is_what_we_send() {
    let doc = include_str!("../../../docs/PROTOCOL.md");
    let section = &doc[doc.find("### Resuming a session").unwrap()..];
    let mut dialer = crate::testing::hello(0xa1, 1000, 3000);
    dialer.service = "lamps".into();
    dialer.instance = 0x5f3c_9e2a_7b1d_4e60;
    dialer.name = "hub".into();
    dialer.port = 40123;
    dialer.datagram_port = 40124;
    dialer.grace_ms = 30_000;
    dialer.resume = 0x9e1f_00c2_d4b3_a871;
    dialer.received = 3;
    let mut acceptor = dialer.clone();
    acceptor.id = PeerId::from_u64(0x1234);
    acceptor.instance = 0x0c4d_2e8f_6a9b_1357;
    acceptor.name = "lamp".into();
    acceptor.port = 40200;
    acceptor.datagram_port = 40201;
    acceptor.received = 2;
    for h in [dialer, acceptor] {
        let mut wire = BytesMut::new();
        Frame::Hello(Ok(Box::new(h))).encode(&mut wire);
        let head: Vec<String> = wire[..5].iter().map(|b| format!("{b:02x}")).collect();
        let line = format!(
            "{} {}",
            head.join(" "),
            std::str::from_utf8(&wire[5..]).unwrap()
        );
        assert!(section.contains(&line), "not in the document: {line}");
    }
    let mut ack = BytesMut::new();
    Frame::Ack(5).encode(&mut ack);
    let hex: Vec<String> = ack.iter().map(|b| format!("{b:02x}")).collect();
    assert!(section.contains(&hex.join(" ")));
}

/// A small payload is copied out of the read buffer, so a message the
/// application keeps does not keep the buffer shared (the next read reuses
/// it); a large one is a slice of it, not copied.
#[test]
fn small_payloads_are_copied_and_large_ones_sliced() {
    let mut buf = BytesMut::new();
    encode_data(&[1; COPY_MAX], &mut buf);
    encode_exchange(T_REQUEST, 9, &[2; COPY_MAX], &mut buf);
    encode_data(&[3; COPY_MAX + 1], &mut buf);
    let span = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let sliced = |b: &Bytes| span.contains(&(b.as_ptr() as usize));
    let mut frames = Frames::default();
    assert!(frames.fill(&mut buf, 1 << 20));
    let Some(Ok(Frame::Data(small))) = frames.next() else {
        panic!("not a data frame")
    };
    let Some(Ok(Frame::Request { id: 9, body })) = frames.next() else {
        panic!("not the request")
    };
    let Some(Ok(Frame::Data(large))) = frames.next() else {
        panic!("not a data frame")
    };
    assert!(frames.next().is_none());
    assert_eq!(
        (&small[..], &body[..]),
        (&[1; COPY_MAX][..], &[2; COPY_MAX][..])
    );
    assert_eq!(&large[..], &[3; COPY_MAX + 1][..]);
    assert!(
        !sliced(&small) && !sliced(&body),
        "small payloads are copies"
    );
    assert!(
        sliced(&large),
        "a large payload is a slice of the read buffer"
    );
}
