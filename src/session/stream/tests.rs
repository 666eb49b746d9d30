//! The record layer against a real loopback connection: what is written
//! arrives whole and in order at any size, and a record that was tampered
//! with, replayed, reordered or cut short ends the stream with the
//! violation that names it. Also the handshake's refusals.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{MAX_RECORD_PLAINTEXT, NoiseStream, RECORD_HEADER, Stream, TAG, violation_of};
use crate::event::{DownReason, ProtocolViolation};
use crate::peer::PeerId;
use crate::session::noise::{Cipher, NoiseKeys, handshake};

const T: Duration = Duration::from_secs(5);

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dial = TcpStream::connect(l.local_addr().unwrap());
    let (a, b) = tokio::join!(dial, l.accept());
    (a.unwrap(), b.unwrap().0)
}

fn keys(secret: u8, psk: Option<[u8; 32]>, service: &str) -> NoiseKeys {
    NoiseKeys::new([secret; 32], psk, service)
}

/// Both sides' handshake results, initiator first.
async fn shake(
    a: NoiseKeys,
    b: NoiseKeys,
) -> (
    Result<(NoiseStream, [u8; 32]), DownReason>,
    Result<(NoiseStream, [u8; 32]), DownReason>,
) {
    let (ta, tb) = tcp_pair().await;
    tokio::join!(
        handshake(ta, &a, Some(Cipher::ChaChaPoly), T),
        handshake(tb, &b, None, T)
    )
}

async fn pair() -> (NoiseStream, NoiseStream) {
    let (a, b) = shake(keys(1, None, "s"), keys(2, None, "s")).await;
    (a.unwrap().0, b.unwrap().0)
}

/// Read sizes of the tests: one below the in-place size (records read
/// aside and copied as they are opened), one above it (opened in place,
/// with the `ring` feature).
const READ_SIZES: [usize; 2] = [3000, 65536];

/// Reads until the end of the stream or an error, `size` bytes at most
/// per read.
async fn read_to_end(s: &mut Stream, size: usize) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0; size];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

fn sealed(state: &mut super::Cipher, plain: &[u8]) -> Vec<u8> {
    let mut out = vec![0; RECORD_HEADER + plain.len() + TAG];
    let n = state.seal(plain, &mut out[RECORD_HEADER..]).unwrap();
    out[..RECORD_HEADER].copy_from_slice(&(n as u16).to_be_bytes());
    out
}

#[tokio::test]
async fn what_is_written_arrives_whole_and_in_order_at_any_size() {
    let (a, b) = pair().await;
    let (mut a, mut b) = (Stream::Noise(Box::new(a)), Stream::Noise(Box::new(b)));
    // Sizes around the stack path, one record, and many records.
    let sizes = [
        1,
        13,
        400,
        494,
        495,
        4096,
        MAX_RECORD_PLAINTEXT,
        65536,
        300_000,
    ];
    let data: Vec<u8> = (0..sizes.iter().sum::<usize>())
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            let mut at = 0;
            for n in sizes {
                a.write_all(&data[at..at + n]).await.unwrap();
                at += n;
            }
            a.shutdown().await.unwrap();
            assert_eq!(a.unwritten(), 0);
        })
    };
    // The first half in small reads (records opened aside), the rest in
    // large ones (opened in place), switching inside a record.
    let mut got = Vec::new();
    let mut small = vec![0; READ_SIZES[0]];
    while got.len() < data.len() / 2 {
        let n = b.read(&mut small).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&small[..n]);
    }
    let (rest, err) = read_to_end(&mut b, READ_SIZES[1]).await;
    got.extend(rest);
    writer.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
}

#[tokio::test]
async fn idle_streams_hold_no_buffers() {
    let (a, b) = pair().await;
    let (mut a, mut b) = (Stream::Noise(Box::new(a)), Stream::Noise(Box::new(b)));
    a.write_all(&[7; 13]).await.unwrap();
    let mut buf = [0; 256];
    assert_eq!(b.read(&mut buf).await.unwrap(), 13);
    a.write_all(&vec![1; 200_000]).await.unwrap();
    let mut left = 200_000;
    let mut big = vec![0; 65536];
    while left > 0 {
        left -= b.read(&mut big).await.unwrap();
    }
    for s in [&mut a, &mut b] {
        s.release_idle();
        let Stream::Noise(n) = s else { unreachable!() };
        assert_eq!(
            (n.rec.rx.capacity(), n.rec.plain.capacity(), n.tx.capacity()),
            (0, 0, 0)
        );
    }
}

/// The violation the reader ends with after `raw` arrives in place of
/// the records the peer would send.
async fn violation_after(
    raw: impl FnOnce(&mut super::Cipher) -> Vec<u8>,
    size: usize,
) -> ProtocolViolation {
    let (a, b) = pair().await;
    let mut reader = Stream::Noise(Box::new(a));
    let NoiseStream { mut tcp, rec, .. } = b;
    let mut state = rec.state;
    let bytes = raw(&mut state);
    tcp.write_all(&bytes).await.unwrap();
    tcp.shutdown().await.unwrap();
    let (_, err) = read_to_end(&mut reader, size).await;
    violation_of(&err.expect("the stream must fail")).expect("a protocol violation")
}

/// What the reader must end with after each kind of broken record.
#[tokio::test]
async fn broken_records_end_the_stream_with_the_named_violation() {
    type Raw = fn(&mut super::Cipher) -> Vec<u8>;
    let cases: [(&str, Raw, &str); 5] = [
        (
            "tampered",
            |s| {
                let mut r = sealed(s, b"turn the lamp on");
                r[RECORD_HEADER + 3] ^= 1;
                r
            },
            "record failed authentication",
        ),
        (
            "replayed",
            |s| {
                let r = sealed(s, b"unlock");
                [r.clone(), r].concat()
            },
            "record failed authentication",
        ),
        (
            "reordered",
            |s| {
                let first = sealed(s, b"one");
                let second = sealed(s, b"two");
                [second, first].concat()
            },
            "record failed authentication",
        ),
        (
            "cut short",
            |s| {
                let r = sealed(s, b"half of this arrives");
                r[..r.len() / 2].to_vec()
            },
            "connection ended inside a record",
        ),
        (
            "shorter than its tag",
            |_| vec![0, 5, 1, 2, 3, 4, 5],
            "record shorter than its tag",
        ),
    ];
    for size in READ_SIZES {
        for (what, raw, why) in cases {
            let v = violation_after(raw, size).await;
            assert_eq!(
                v,
                ProtocolViolation::BadRecord(why),
                "{what}, reads of {size}"
            );
        }
    }
}

#[tokio::test]
async fn each_side_proves_its_key() {
    let (a, b) = shake(keys(1, None, "s"), keys(2, None, "s")).await;
    let (a_saw, b_saw) = (a.unwrap().1, b.unwrap().1);
    let public = |s: u8| crate::Identity::from_secret([s; 32]).public_key();
    assert_eq!((a_saw, b_saw), (public(2), public(1)));
    assert_eq!(
        PeerId::from_public_key(&a_saw),
        crate::Identity::from_secret([2; 32]).peer_id()
    );
}

fn handshake_failed(r: Result<(NoiseStream, [u8; 32]), DownReason>) -> DownReason {
    r.err().expect("the handshake must fail")
}

#[tokio::test]
async fn another_service_or_fleet_key_fails_the_handshake() {
    let psk = Some([9; 32]);
    for (a, b) in [
        (keys(1, None, "lamps"), keys(2, None, "locks")),
        (keys(1, psk, "s"), keys(2, Some([8; 32]), "s")),
        (keys(1, psk, "s"), keys(2, None, "s")),
        (keys(1, None, "s"), keys(2, psk, "s")),
    ] {
        let (ra, rb) = shake(a, b).await;
        // The side that cannot authenticate what it read names the step;
        // the other sees the connection end.
        let reasons = [handshake_failed(ra), handshake_failed(rb)];
        let named = |what| {
            reasons.contains(&DownReason::ProtocolError(ProtocolViolation::Handshake(
                what,
            )))
        };
        assert!(
            named("handshake message failed authentication")
                || named("message 1 names no known cipher, or is sealed with a fleet key"),
            "{reasons:?}"
        );
    }
    let (ra, rb) = shake(keys(1, psk, "s"), keys(2, psk, "s")).await;
    assert!(ra.is_ok() && rb.is_ok());
}

#[tokio::test]
async fn a_plaintext_peer_is_named() {
    let (ta, mut tb) = tcp_pair().await;
    // Protocol 1 opens with a hello frame: a 4-byte length below 64 KiB.
    tb.write_all(&[0, 0, 0, 40, 1]).await.unwrap();
    let r = handshake(ta, &keys(1, None, "s"), None, T).await;
    assert_eq!(
        handshake_failed(r),
        DownReason::ProtocolError(ProtocolViolation::PlaintextPeer)
    );
}

#[tokio::test]
async fn an_oversized_or_silent_handshake_is_refused() {
    let (ta, mut tb) = tcp_pair().await;
    tb.write_all(&[0x10, 0x00]).await.unwrap();
    let r = handshake(ta, &keys(1, None, "s"), None, T).await;
    assert_eq!(
        handshake_failed(r),
        DownReason::ProtocolError(ProtocolViolation::Handshake(
            "handshake message longer than 1024 bytes"
        ))
    );
    let (ta, _tb) = tcp_pair().await;
    let r = handshake(ta, &keys(1, None, "s"), None, Duration::from_millis(50)).await;
    assert_eq!(handshake_failed(r), DownReason::HandshakeTimeout);
}

/// The lengths of the records in `wire`.
fn record_lengths(mut wire: &[u8]) -> Vec<usize> {
    let mut lens = Vec::new();
    while wire.len() >= RECORD_HEADER {
        let len = u16::from_be_bytes([wire[0], wire[1]]) as usize;
        lens.push(len - TAG);
        wire = &wire[RECORD_HEADER + len..];
    }
    assert!(wire.is_empty());
    lens
}

#[tokio::test]
async fn writes_are_sealed_in_even_records_and_opened_in_place() {
    let (a, b) = pair().await;
    let (mut a, mut b) = (a.rec, b.rec);
    a.state.large = true;
    // A 64 KiB message and its frame header: two even records, not one
    // full record and a 26-byte one.
    let mut wire = bytes::BytesMut::new();
    a.seal(&vec![3; 65536 + 9], &mut wire).unwrap();
    assert_eq!(record_lengths(&wire), [32773, 32772]);
    // On a slow path, records of at most 16 KiB, as even.
    a.state.large = false;
    let mut slow = bytes::BytesMut::new();
    a.seal(&vec![4; 40_000], &mut slow).unwrap();
    assert_eq!(record_lengths(&slow), [13334, 13334, 13332]);
    // A reader with room for the first record only gets it opened in place;
    // the second waits whole for the next read instead of being opened
    // aside and copied in part.
    b.feed(&wire);
    let mut room = vec![std::mem::MaybeUninit::uninit(); 32773 + TAG + 100];
    let mut out = tokio::io::ReadBuf::uninit(&mut room);
    b.read_buffered(&mut out).unwrap();
    assert_eq!(out.filled().len(), 32773);
    assert!(b.plain.is_empty());
    assert!(b.inside_record() && b.has_buffered());
    // A reader whose buffer is smaller than a record still gets bytes.
    let mut small = [std::mem::MaybeUninit::uninit(); 1000];
    let mut out = tokio::io::ReadBuf::uninit(&mut small);
    b.read_buffered(&mut out).unwrap();
    assert_eq!(out.filled(), &[3; 1000][..]);
    assert_eq!(b.plain.len(), 32772 - 1000);
}

/// A large message sealed from its own buffer (`seal_frame`) arrives in
/// order with what was written before and after it, at any record size,
/// and its frame header and what preceded it are one record of their own.
#[tokio::test]
async fn frames_sealed_from_their_own_buffer_arrive_in_order() {
    let (a, b) = pair().await;
    let (mut a, mut b) = (Stream::Noise(Box::new(a)), Stream::Noise(Box::new(b)));
    let body: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
    let mut want = Vec::new();
    for large in [false, true] {
        a.set_large_records(large);
        a.write_all(b"before").await.unwrap();
        assert!(a.seal_frame(b"acks+head", &body).unwrap());
        // Nothing ahead of the body: the body alone.
        assert!(a.seal_frame(&[], &body[..9000]).unwrap());
        a.write_all(b"after").await.unwrap();
        want.extend_from_slice(b"before");
        want.extend_from_slice(b"acks+head");
        want.extend_from_slice(&body);
        want.extend_from_slice(&body[..9000]);
        want.extend_from_slice(b"after");
    }
    a.flush().await.unwrap();
    assert_eq!(a.unwritten(), 0);
    a.shutdown().await.unwrap();
    let (got, err) = read_to_end(&mut b, READ_SIZES[1]).await;
    assert!(err.is_none(), "{err:?}");
    assert!(got == want, "the bytes differ");
    // On a plaintext stream it does nothing.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let mut plain = Stream::Plain(c);
    assert!(!plain.seal_frame(b"head", &body).unwrap());
    assert_eq!(plain.unwritten(), 0);
}

#[test]
fn the_sealed_buffer_keeps_what_waits_in_order_as_it_grows() {
    let mut s = super::Sealed::default();
    s.extend_from_slice(b"abcdef");
    s.advance(2);
    assert_eq!(s.pending(), b"cdef");
    // Growing moves what waits to the front first.
    s.extend_from_slice(&[b'g'; 100]);
    assert_eq!(&s.pending()[..5], b"cdefg");
    assert_eq!(s.len(), 104);
    let cap = s.capacity();
    // Written out: the room is reused, not grown.
    s.advance(104);
    assert!(s.is_empty());
    s.extend_from_slice(&[1; 100]);
    assert_eq!(s.capacity(), cap);
    // Advancing past the end stops at it.
    s.advance(1000);
    assert!(s.is_empty());
    s.release_idle();
    assert_eq!(s.capacity(), 0);
}
