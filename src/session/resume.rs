//! What a cut session leaves with the supervisor while its peer may come
//! back (`Config::resume_grace`), and how what it holds is handed back to
//! the application when the peer does not (PROTOCOL.md "Resuming a
//! session"; the machine's side is in `machine/resume.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::machine::Held;
use super::mailbox::Mailbox;
use super::outbox::Outbox;
use super::requests::Requests;
use crate::event::{DownReason, Event};
use crate::peer::PeerId;
use crate::stats::Counters;
use crate::wire::frame::Outgoing;

/// A session that was cut, held for its peer to resume it.
#[derive(Debug)]
pub(crate) struct Suspended {
    /// The session's token (both sides know it from the hellos).
    pub(crate) token: u64,
    /// The peer's instance: a restarted peer cannot resume.
    pub(crate) instance: u64,
    /// How long it is held: the shorter of the two sides' graces.
    pub(crate) grace: Duration,
    /// The session's number for requests and replies (the connection that
    /// started it).
    pub(crate) lineage: u64,
    /// The counts, and what was written and not acknowledged.
    pub(crate) held: Held,
    /// Its mailbox, whose outbox stays open to senders meanwhile.
    pub(crate) mailbox: Arc<Mailbox>,
    /// Until when it is held (set by the supervisor when it takes it).
    pub(crate) until: Option<Instant>,
}

/// Whether a session that ended for `reason` may be resumed: it was cut
/// (a timeout, a network error, a close without goodbye) or replaced by a
/// newer connection of the same peer, rather than ended by either side.
pub(crate) fn resumable(reason: &DownReason) -> bool {
    matches!(
        reason,
        DownReason::HeartbeatTimeout
            | DownReason::WriteTimeout
            | DownReason::StreamStalled
            | DownReason::Io(_)
            | DownReason::Closed
            | DownReason::Replaced
    )
}

/// Hands back what a session that is over for good leaves: what it wrote
/// and the peer did not acknowledge (`Unconfirmed`), and what was still in
/// its outbox (`Undelivered`, the outbox closed to senders). Its requests
/// are settled. Returns the events, for the application, in that order.
pub(crate) fn hand_back(
    peer: PeerId,
    lineage: u64,
    unacked: Vec<Outgoing>,
    mailbox: &Mailbox,
    requests: &Requests,
    counters: &Counters,
) -> Vec<Event> {
    let (mut unconfirmed, mut written) = (Vec::new(), Vec::new());
    for piece in unacked {
        piece.into_messages(&mut unconfirmed, &mut written);
    }
    let (undelivered, unwritten) = mailbox.outbox().close_and_take_with(Outbox::take_parts);
    requests.session_ended(lineage, &written, &unwritten, counters);
    Counters::add(&counters.messages_unconfirmed, unconfirmed.len() as u64);
    Counters::add(&counters.messages_undelivered, undelivered.len() as u64);
    let mut events = Vec::new();
    if !unconfirmed.is_empty() {
        events.push(Event::Unconfirmed {
            peer,
            messages: std::mem::take(&mut unconfirmed),
        });
    }
    if !undelivered.is_empty() {
        events.push(Event::Undelivered {
            peer,
            messages: undelivered,
        });
    }
    events
}

impl Suspended {
    /// The peer did not resume it in time, or came back without it: what
    /// it holds goes back to the application (see [`hand_back`]).
    pub(crate) fn hand_back(
        self,
        peer: PeerId,
        requests: &Requests,
        counters: &Counters,
    ) -> Vec<Event> {
        Counters::bump(&counters.resumptions_expired);
        hand_back(
            peer,
            self.lineage,
            self.held.unacked,
            &self.mailbox,
            requests,
            counters,
        )
    }
}

/// The messages of `events` (as [`hand_back`] makes them), for logs.
pub(crate) fn counts(events: &[Event]) -> (usize, usize) {
    let n = |want: bool| {
        events
            .iter()
            .map(|e| match e {
                Event::Unconfirmed { messages, .. } if want => messages.len(),
                Event::Undelivered { messages, .. } if !want => messages.len(),
                _ => 0,
            })
            .sum()
    };
    (n(true), n(false))
}
