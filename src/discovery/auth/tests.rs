//! The MAC and the replay window of authenticated discovery.

use super::{AuthError, DatagramAuth, TRAILER, WINDOW};
use crate::peer::PeerId;

fn pair() -> (DatagramAuth, DatagramAuth) {
    (
        DatagramAuth::new(&[7; 32], 1000, 8),
        DatagramAuth::new(&[7; 32], 5, 8),
    )
}

#[test]
fn a_sealed_datagram_opens_with_the_key_only() {
    let (mut a, b) = pair();
    let mut d = b"LNBT\x02\x01{\"x\":1}".to_vec();
    let body = d.clone();
    a.seal(&mut d);
    assert_eq!(d.len(), body.len() + TRAILER);
    assert_eq!(b.open(&d), Ok((&body[..], 1000)));
    // Another key, an altered byte anywhere, a cut, nothing at all.
    let other = DatagramAuth::new(&[8; 32], 0, 8);
    assert_eq!(other.open(&d), Err(AuthError::Unauthenticated));
    for i in 0..d.len() {
        let mut bad = d.clone();
        bad[i] ^= 0x80;
        assert_eq!(b.open(&bad), Err(AuthError::Unauthenticated), "byte {i}");
    }
    assert_eq!(b.open(&d[..d.len() - 1]), Err(AuthError::Unauthenticated));
    assert_eq!(b.open(&body), Err(AuthError::Unauthenticated));
    assert_eq!(b.open(b"short"), Err(AuthError::Unauthenticated));
    // The next datagram has the next number.
    let mut d2 = body.clone();
    a.seal(&mut d2);
    assert_eq!(b.open(&d2).unwrap().1, 1001);
}

#[test]
fn each_number_is_taken_once_and_reordering_within_the_window_is_fine() {
    let (_, mut b) = pair();
    let id = PeerId::from_u64(1);
    assert_eq!(b.accept(id, 100), Ok(()));
    assert_eq!(b.accept(id, 100), Err(AuthError::Replayed));
    assert_eq!(b.accept(id, 103), Ok(()));
    // Late, but unseen and within the window: taken once.
    assert_eq!(b.accept(id, 101), Ok(()));
    assert_eq!(b.accept(id, 101), Err(AuthError::Replayed));
    assert_eq!(b.accept(id, 102), Ok(()));
    assert_eq!(b.accept(id, 100), Err(AuthError::Replayed));
    // Far ahead: everything at or below the window's end is old.
    assert_eq!(b.accept(id, 1000), Ok(()));
    assert_eq!(b.accept(id, 1000 - WINDOW - 1), Err(AuthError::Replayed));
    assert_eq!(b.accept(id, 1000 - WINDOW), Ok(()));
    assert_eq!(b.accept(id, 103), Err(AuthError::Replayed));
    // Another sender has numbers of its own.
    assert_eq!(b.accept(PeerId::from_u64(2), 100), Ok(()));
    // A forgotten sender (its clock went back) is believed again.
    b.forget(id);
    assert_eq!(b.accept(id, 5), Ok(()));
}

#[test]
fn the_senders_remembered_are_bounded() {
    let (_, mut b) = pair();
    for i in 0..100u64 {
        assert_eq!(b.accept(PeerId::from_u64(i), 1_000 + i), Ok(()));
    }
    assert!(b.seen.len() <= 8);
    // The newest are kept.
    assert_eq!(
        b.accept(PeerId::from_u64(99), 1_099),
        Err(AuthError::Replayed)
    );
}

#[test]
fn the_worked_example_of_the_spec() {
    // docs/PROTOCOL.md §1, "Datagrams under a fleet key": fleet key 32
    // bytes of 07, first sequence number 1000.
    let mut a = DatagramAuth::new(&[7; 32], 1000, 8);
    let body = br#"LNBT{"service":"lamps","id":"156c329c9ca9dea7","instance":"0000000000000001"}"#;
    let mut d = [&body[..4], b"\x02\x01", &body[4..]].concat();
    let plain = d.clone();
    a.seal(&mut d);
    let hex: String = d[plain.len()..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, "00000000000003e86270b259d33229d03cfac175e3d7a396");
}
