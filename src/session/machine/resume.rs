//! The machine's side of resuming a session (PROTOCOL.md "Resuming a
//! session"): the hellos that carry the session's token and counts, what a
//! cut session leaves behind, and how a new connection carries on with it.
//!
//! The counts are those of the session, not of a connection: a resumed
//! session goes on numbering its data, request and reply frames where the
//! one it resumes stopped, and its acks count from there too. Each side
//! tells the other how many frames it received; the other sends again what
//! came after, and takes the rest as acknowledged.

use std::time::Instant;

use bytes::Bytes;

use super::Session;
use crate::event::ProtocolViolation;
use crate::wire::frame::{Frame, Outgoing};

/// What a session leaves behind when it is cut, to be resumed.
#[derive(Debug, Default)]
pub struct Held {
    /// Data, request and reply frames received on the session.
    pub received: u64,
    /// Of those we sent, how many the peer acknowledged (the sequence of
    /// the first in `unacked`).
    pub acked: u64,
    /// What we wrote that the peer did not acknowledge, oldest first.
    pub unacked: Vec<Outgoing>,
}

impl Held {
    /// Messages in `unacked`.
    pub fn unacked_len(&self) -> usize {
        self.unacked.iter().map(Outgoing::count).sum()
    }
}

impl Session {
    /// Whether our hello waits for [`Session::send_hello`]: an accepting
    /// side that resumes sessions answers the dialer's hello once the
    /// supervisor decided whether the session resumes.
    pub(super) fn defers_hello(&self) -> bool {
        self.expected.is_none() && !self.cfg.resume_grace.is_zero()
    }

    /// As the dialer, before anything was written: our hello asks to
    /// resume session `token`, of which we received `received` frames.
    pub fn offer_resume(&mut self, token: u64, received: u64) {
        if let Some(Frame::Hello(Ok(hello))) = self.transmits.front_mut() {
            hello.resume = token;
            hello.received = received;
        }
    }

    /// As an acceptor that resumes sessions: the token a new session gets
    /// (random, not 0), should the dialer offer no resumption.
    pub fn set_fresh_token(&mut self, token: u64) {
        self.token = token;
    }

    /// The token our hello named (0: not resumable), once sent.
    pub fn hello_token(&self) -> u64 {
        if self.hello_owed { 0 } else { self.token }
    }

    /// The dialer's hello arrived. If it offers no resumption the session is
    /// new whatever the supervisor decides, so our hello goes at once (with
    /// the fresh token when the dialer resumes sessions too) instead of
    /// after the approval.
    pub(super) fn answer_fresh(&mut self, now: Instant, offer: u64, peer_grace: u64) {
        if offer == 0 {
            let token = if peer_grace > 0 { self.token } else { 0 };
            self.send_hello(now, token, 0);
        }
    }

    /// As the acceptor, once the supervisor approved the dialer's hello
    /// (or at once, when the dialer offered no resumption): sends ours, naming the
    /// session's token (0: not resumable) and, when it resumes, what we
    /// received on it. Then pings, as a dialer does when the hellos are
    /// done. Only the first call counts.
    pub fn send_hello(&mut self, now: Instant, token: u64, received: u64) {
        if !self.hello_owed {
            return;
        }
        self.hello_owed = false;
        self.token = token;
        let mut hello = Box::new(self.cfg.hello.clone());
        hello.resume = token;
        hello.received = received;
        // The hello goes first; a pong owed meanwhile after it.
        self.transmits.push_front(Frame::Hello(Ok(hello)));
        if std::mem::take(&mut self.pong_due) {
            self.transmits.insert(1, Frame::Pong(self.pong_seq));
        }
        self.has_transmits = true;
        if self.is_established() {
            self.send_ping(now);
        }
    }

    /// Carries on session `held` (ours, from the connection that was cut)
    /// on this connection, whose peer received `peer_received` frames of
    /// it. What the peer received is acknowledged; the rest becomes this
    /// connection's in flight, to be written first (see
    /// [`Session::unacked_pieces`]). Returns how many messages that is, or
    /// `None` when the counts do not fit what we sent (the session is then
    /// closed as a violation).
    pub fn resume(&mut self, now: Instant, held: Held, peer_received: u64) -> Option<usize> {
        let Held {
            received,
            acked,
            mut unacked,
        } = held;
        let sent = acked + unacked.iter().map(|o| o.count() as u64).sum::<u64>();
        if !self.is_established() || peer_received < acked || peer_received > sent {
            // Kept as in flight: the end of the session hands them back.
            self.unacked_count = (sent - acked) as usize;
            self.unacked_bytes = unacked.iter().map(Outgoing::wire_len).sum();
            self.unacked = unacked.into();
            self.violation(ProtocolViolation::BadResume);
            return None;
        }
        // What the peer received before the cut: delivered.
        let mut confirmed = (peer_received - acked) as usize;
        unacked.retain_mut(|piece| {
            if confirmed == 0 {
                return true;
            }
            if piece.count() <= confirmed {
                confirmed -= piece.count();
                return false;
            }
            piece.split_to(confirmed);
            confirmed = 0;
            true
        });
        self.rx_data = received;
        self.rx_acked = received;
        self.rx_unacked_bytes = 0;
        self.tx_base = peer_received;
        let count = (sent - peer_received) as usize;
        if count > 0 {
            self.ack_progress = now;
            self.last_ping_or_data = now;
        }
        self.unacked_count = count;
        self.unacked_bytes = unacked.iter().map(Outgoing::wire_len).sum();
        self.front_acked = 0;
        self.unacked = unacked.into();
        self.window.sent(sent, self.unacked_bytes, now);
        Some(count)
    }

    /// What is in flight, oldest first: after [`Session::resume`], what
    /// the driver writes before anything else.
    pub fn unacked_pieces(&self) -> impl Iterator<Item = &Outgoing> {
        self.unacked.iter()
    }

    /// Messages written but never acknowledged, oldest first (taken: the
    /// session keeps nothing in flight afterwards).
    pub fn take_unacked(&mut self) -> Vec<Bytes> {
        let (mut out, mut exchanges) = (Vec::new(), Vec::new());
        for piece in self.hold().unacked {
            piece.into_messages(&mut out, &mut exchanges);
        }
        out
    }

    /// What the session leaves behind for a later connection to resume:
    /// its counts, and what it wrote that was not acknowledged (the
    /// session keeps nothing in flight afterwards).
    pub fn hold(&mut self) -> Held {
        let skip = std::mem::take(&mut self.front_acked);
        let mut unacked: Vec<Outgoing> = self.unacked.drain(..).collect();
        if let Some(front) = unacked.first_mut() {
            front.split_to(skip);
        }
        let held = Held {
            received: self.rx_data,
            acked: self.tx_base,
            unacked,
        };
        self.tx_base += self.unacked_count as u64;
        self.unacked_count = 0;
        self.unacked_bytes = 0;
        self.window.clear();
        held
    }
}

#[cfg(test)]
mod tests;
