//! Discovery datagrams under a fleet key: each carries a sequence number
//! and a MAC after its JSON body, so a node without the key can neither
//! make one that is believed nor get an answer, and one captured and sent
//! again later is dropped. Layout and rules: docs/PROTOCOL.md §1,
//! "Datagrams under a fleet key".
//!
//! The MAC is BLAKE2s keyed (RFC 7693's keyed mode, the `blake2` crate's
//! `Blake2sMac`), truncated to 16 bytes, under a key derived from the
//! fleet key so that the fleet key itself is used for one purpose only.
//! Sequence numbers start at the sender's clock in microseconds when it
//! starts and count up by one per datagram: a restarted node goes on
//! above what it sent before, so the receiver's rule is the same across
//! instances (only higher numbers, or unseen ones within the window).

use std::collections::HashMap;

use blake2::Blake2sMac;
use blake2::digest::consts::{U16, U32};
use blake2::digest::{FixedOutput, KeyInit, Mac, Update};

use crate::peer::PeerId;

/// The sequence number and the MAC after the body.
pub(crate) const TRAILER: usize = 8 + 16;
/// How far below the highest sequence number seen a datagram may be and
/// still be taken (once), for datagrams the network reordered.
const WINDOW: u64 = 64;
/// What the MAC key derives from the fleet key with.
const CONTEXT: &[u8] = b"lanbeat/2 discovery";

/// Why a datagram under a fleet key was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// No MAC, or one that does not verify: the sender lacks the key, or
    /// the datagram was altered.
    Unauthenticated,
    /// A sequence number seen already, or too old: a replay.
    Replayed,
}

/// The sequence numbers seen from one id: the highest, and which of the
/// `WINDOW` below it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    top: u64,
    /// Bit `i` set: `top - 1 - i` was seen.
    below: u64,
}

impl Seen {
    /// Takes `seq` if it is new; returns whether it was.
    fn take(&mut self, seq: u64) -> bool {
        if seq > self.top {
            let shift = seq - self.top;
            self.below = if shift > WINDOW {
                0
            } else {
                // The old top becomes bit `shift - 1`.
                ((self.below << 1) | 1) << (shift - 1)
            };
            self.top = seq;
            return true;
        }
        let back = self.top - seq;
        if back == 0 || back > WINDOW {
            return false;
        }
        let bit = 1 << (back - 1);
        let new = self.below & bit == 0;
        self.below |= bit;
        new
    }
}

/// A node's side of authenticated discovery: the key, its own next
/// sequence number, and what it has seen of each sender.
pub(crate) struct DatagramAuth {
    key: [u8; 32],
    next_seq: u64,
    seen: HashMap<PeerId, Seen>,
    /// Most senders remembered (then the one with the lowest sequence
    /// number, the longest silent as clocks go, is forgotten).
    cap: usize,
}

/// Never shows the key.
impl std::fmt::Debug for DatagramAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramAuth")
            .field("next_seq", &self.next_seq)
            .field("senders", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl DatagramAuth {
    /// With the fleet key, a first sequence number (the clock in µs), and
    /// room for `cap` senders.
    pub(crate) fn new(fleet_key: &[u8; 32], first_seq: u64, cap: usize) -> DatagramAuth {
        let mut prf = <Blake2sMac<U32> as KeyInit>::new_from_slice(fleet_key)
            .expect("32 bytes is a valid BLAKE2s key");
        Update::update(&mut prf, CONTEXT);
        DatagramAuth {
            key: prf.finalize_fixed().into(),
            next_seq: first_seq,
            seen: HashMap::new(),
            cap: cap.max(1),
        }
    }

    fn mac(&self, data: &[u8]) -> Blake2sMac<U16> {
        let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.key)
            .expect("32 bytes is a valid BLAKE2s key");
        Update::update(&mut m, data);
        m
    }

    /// Appends the next sequence number and the MAC of everything before.
    pub(crate) fn seal(&mut self, datagram: &mut Vec<u8>) {
        datagram.extend_from_slice(&self.next_seq.to_be_bytes());
        self.next_seq += 1;
        let tag = self.mac(datagram).finalize_fixed();
        datagram.extend_from_slice(&tag);
    }

    /// Checks the MAC; returns the datagram without its trailer, and the
    /// sequence number (to [`DatagramAuth::accept`] once the sender's id
    /// is known).
    pub(crate) fn open<'a>(&self, datagram: &'a [u8]) -> Result<(&'a [u8], u64), AuthError> {
        let Some(at) = datagram.len().checked_sub(TRAILER) else {
            return Err(AuthError::Unauthenticated);
        };
        let (signed, tag) = datagram.split_at(at + 8);
        self.mac(signed)
            .verify_slice(tag)
            .map_err(|_| AuthError::Unauthenticated)?;
        let seq = u64::from_be_bytes(signed[at..].try_into().expect("8 bytes"));
        Ok((&datagram[..at], seq))
    }

    /// Takes sequence number `seq` from `id` if it was not seen before.
    pub(crate) fn accept(&mut self, id: PeerId, seq: u64) -> Result<(), AuthError> {
        if let Some(seen) = self.seen.get_mut(&id) {
            return if seen.take(seq) {
                Ok(())
            } else {
                Err(AuthError::Replayed)
            };
        }
        if self.seen.len() >= self.cap {
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(_, s)| s.top)
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(id, Seen { top: seq, below: 0 });
        Ok(())
    }

    /// Forgets what was seen from `id` (the peer was forgotten: a node
    /// whose clock went back since is believed again once it has expired).
    pub(crate) fn forget(&mut self, id: PeerId) {
        self.seen.remove(&id);
    }
}

#[cfg(test)]
mod tests;
