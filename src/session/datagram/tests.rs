use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::{ANSWER, HEADER, LEN, Link, Links, PROBE, Rejected};
use crate::peer::PeerId;
use crate::session::noise::transport_pair;

const A: PeerId = PeerId::from_u64(0xa);
const B: PeerId = PeerId::from_u64(0xb);

async fn socket() -> Arc<UdpSocket> {
    Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap())
}

/// The two ends of one session: A's node knows B's link and the other
/// way round.
async fn pair() -> (Links, Arc<Link>, Links, Arc<Link>) {
    let (i, r) = transport_pair();
    let to: SocketAddr = (Ipv4Addr::LOCALHOST, 9).into();
    let a = Arc::new(Link::new(Box::new(i), A, B, to, socket().await));
    let b = Arc::new(Link::new(Box::new(r), B, A, to, socket().await));
    let (at_a, at_b) = (Links::default(), Links::default());
    at_a.insert(a.clone());
    at_b.insert(b.clone());
    (at_a, a, at_b, b)
}

#[tokio::test]
async fn a_probe_is_answered_and_both_prove_life() {
    let (at_a, a, at_b, b) = pair().await;
    let now = Instant::now();
    assert_eq!(a.heard(), None);
    let probe = b.seal(PROBE).unwrap();
    assert_eq!(probe.len(), LEN);
    let (link, answer) = at_a.receive(&probe, now).unwrap();
    assert!(Arc::ptr_eq(&link, &a) && answer);
    assert!(
        a.heard()
            .is_some_and(|h| h.duration_since(now) < Duration::from_millis(1))
    );
    let reply = a.seal(ANSWER).unwrap();
    let (link, answer) = at_b.receive(&reply, now).unwrap();
    assert!(Arc::ptr_eq(&link, &b) && !answer);
    assert!(b.heard().is_some());
}

#[tokio::test]
async fn replayed_and_overtaken_datagrams_are_refused() {
    let (at_a, _a, _at_b, b) = pair().await;
    let now = Instant::now();
    let (first, second) = (b.seal(PROBE).unwrap(), b.seal(PROBE).unwrap());
    at_a.receive(&first, now).unwrap();
    assert_eq!(at_a.receive(&first, now).unwrap_err(), Rejected::Replayed);
    at_a.receive(&second, now).unwrap();
    assert_eq!(at_a.receive(&first, now).unwrap_err(), Rejected::Replayed);
    assert_eq!(at_a.receive(&second, now).unwrap_err(), Rejected::Replayed);
}

#[tokio::test]
async fn forged_tampered_and_foreign_datagrams_are_refused() {
    let (at_a, a, _at_b, b) = pair().await;
    let now = Instant::now();
    let good = b.seal(PROBE).unwrap();
    // Every bit of the nonce, the ciphertext and the tag is covered.
    for byte in 9..LEN {
        let mut d = good;
        d[byte] ^= 0x10;
        assert_eq!(
            at_a.receive(&d, now).unwrap_err(),
            Rejected::Unauthenticated,
            "byte {byte}"
        );
    }
    // Another id: no session, or the wrong keys.
    let mut d = good;
    d[8] ^= 1;
    assert_eq!(at_a.receive(&d, now).unwrap_err(), Rejected::UnknownSender);
    // Our own datagram sent back to us (reflected) names us, not the peer.
    assert_eq!(
        at_a.receive(&a.seal(PROBE).unwrap(), now).unwrap_err(),
        Rejected::UnknownSender
    );
    // A datagram of another session between the same two ids.
    let (_x, _xa, _xb, other_b) = pair().await;
    assert_eq!(
        at_a.receive(&other_b.seal(PROBE).unwrap(), now)
            .unwrap_err(),
        Rejected::Unauthenticated
    );
    // A nonce of the stream's range, sealed with the right key: a stream
    // record must never pass as a datagram.
    let mut d = good;
    d[9..HEADER].copy_from_slice(&5u64.to_be_bytes());
    b.keys
        .sealer()
        .unwrap()
        .seal(5, &[PROBE], &mut d[HEADER..])
        .unwrap();
    assert_eq!(
        at_a.receive(&d, now).unwrap_err(),
        Rejected::Unauthenticated
    );
    // Wrong sizes and versions.
    assert_eq!(
        at_a.receive(&good[..LEN - 1], now).unwrap_err(),
        Rejected::Malformed
    );
    assert_eq!(
        at_a.receive(&[good.as_slice(), &[0]].concat(), now)
            .unwrap_err(),
        Rejected::Malformed
    );
    let mut d = good;
    d[0] = 3;
    assert_eq!(at_a.receive(&d, now).unwrap_err(), Rejected::Malformed);
    // None of it counted as life, and the genuine datagram still passes.
    assert_eq!(a.heard(), None);
    at_a.receive(&good, now).unwrap();
}

#[tokio::test]
async fn an_unknown_kind_is_refused() {
    let (at_a, _a, _at_b, b) = pair().await;
    let nonce = b
        .next_nonce
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut d = b.seal(PROBE).unwrap();
    d[9..HEADER].copy_from_slice(&nonce.to_be_bytes());
    b.keys
        .sealer()
        .unwrap()
        .seal(nonce, &[7], &mut d[HEADER..])
        .unwrap();
    assert_eq!(
        at_a.receive(&d, Instant::now()).unwrap_err(),
        Rejected::Unauthenticated
    );
}

#[tokio::test]
async fn only_the_link_itself_is_removed() {
    let (at_a, a, _at_b, _b) = pair().await;
    let (_x, newer, _xb, _xbl) = pair().await;
    at_a.insert(newer.clone());
    at_a.remove(&a);
    assert!(at_a.get(B).is_some_and(|l| Arc::ptr_eq(&l, &newer)));
    at_a.remove(&newer);
    assert!(at_a.get(B).is_none());
}
