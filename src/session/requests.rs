//! The requests a node is waiting on a reply to: one table per node,
//! shared by [`Node::request`](crate::Node::request), which registers and
//! waits, and the connections, which complete them when a reply arrives or
//! their session ends.
//!
//! A reply is matched by its id and checked against the peer and the
//! session the request went out on: a peer cannot answer (or spoil) a
//! request made of another peer, nor one of an earlier session.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::debug;

use crate::peer::PeerId;
use crate::stats::Counters;
use crate::wire::frame::exchange_parts;

/// Why a request got no reply (besides its timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// Its session ended before it was written: the peer never saw it.
    NotSent,
    /// Its session ended after it was written: the peer may have
    /// processed it.
    Lost,
}

/// What a waiting request is told.
pub(crate) type Outcome = Result<Bytes, Unanswered>;

#[derive(Debug)]
struct Pending {
    peer: PeerId,
    /// The supervisor's number for the connection it went out on.
    conn: u64,
    done: oneshot::Sender<Outcome>,
}

/// The node's table of requests awaiting replies.
#[derive(Debug, Default)]
pub(crate) struct Requests {
    last_id: AtomicU64,
    pending: Mutex<BTreeMap<u64, Pending>>,
}

impl Requests {
    /// Registers a request to `peer` over connection `conn`: its id (unique
    /// in this node), and where its outcome will come.
    pub(crate) fn register(&self, peer: PeerId, conn: u64) -> (u64, oneshot::Receiver<Outcome>) {
        let id = self.last_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (done, rx) = oneshot::channel();
        lock(&self.pending).insert(id, Pending { peer, conn, done });
        (id, rx)
    }

    /// The requester stopped waiting (it has its answer, timed out, or was
    /// cancelled): a reply that comes now is unmatched.
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.pending).remove(&id);
    }

    /// A reply from `peer` on connection `conn` to request `id`. Returns
    /// false when no such request waits (it timed out, or was never made
    /// of this peer on this session).
    pub(crate) fn answer(&self, peer: PeerId, conn: u64, id: u64, body: Bytes) -> bool {
        let mut pending = lock(&self.pending);
        match pending.get(&id) {
            Some(p) if p.peer == peer && p.conn == conn => {}
            _ => return false,
        }
        let Some(p) = pending.remove(&id) else {
            return false;
        };
        drop(pending);
        // The requester may have just given up: then nobody waits.
        p.done.send(Ok(body)).is_ok()
    }

    /// Connection `conn` ended. `written` are the request and reply frames
    /// it wrote that were not acknowledged, `unwritten` those still in its
    /// outbox. Its unwritten requests are certainly not processed; every
    /// other request still waiting on it is lost. Replies not acknowledged
    /// are counted: their requester learns of the loss from its own side.
    pub(crate) fn session_ended(
        &self,
        conn: u64,
        written: &[Bytes],
        unwritten: &[Bytes],
        counters: &Counters,
    ) {
        let mut replies = 0;
        let mut pending = lock(&self.pending);
        for (frame, was_written) in written
            .iter()
            .map(|f| (f, true))
            .chain(unwritten.iter().map(|f| (f, false)))
        {
            match exchange_parts(frame) {
                Some((false, ..)) => replies += 1,
                Some((true, id, _)) if !was_written => {
                    if let Some(p) = pending.remove(&id) {
                        let _ = p.done.send(Err(Unanswered::NotSent));
                    }
                }
                _ => {}
            }
        }
        let lost: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(p) = pending.remove(&id) {
                let _ = p.done.send(Err(Unanswered::Lost));
            }
        }
        drop(pending);
        if replies > 0 {
            debug!(
                conn,
                replies, "replies not confirmed before the session ended"
            );
            Counters::add(&counters.replies_unconfirmed, replies);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each change to the table is one insert or remove: a panic elsewhere
    // cannot leave it half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Forgets a request when its requester stops waiting, however it stops
/// (answered, timed out, or the future dropped).
pub(crate) struct Waiting<'a> {
    pub(crate) requests: &'a Requests,
    pub(crate) id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.requests.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{reply_frame, request_frame};

    fn peer(n: u64) -> PeerId {
        PeerId::from_u64(n)
    }

    #[test]
    fn a_reply_completes_only_its_own_peers_request_on_its_session() {
        let r = Requests::default();
        let (id, mut rx) = r.register(peer(1), 10);
        assert!(!r.answer(peer(2), 10, id, "forged".into()), "another peer");
        assert!(
            !r.answer(peer(1), 11, id, "stale".into()),
            "another session"
        );
        assert!(!r.answer(peer(1), 10, id + 1, "unknown".into()));
        assert!(rx.try_recv().is_err(), "still waiting");
        assert!(r.answer(peer(1), 10, id, "ok".into()));
        assert_eq!(rx.try_recv().unwrap(), Ok(Bytes::from("ok")));
        assert!(
            !r.answer(peer(1), 10, id, "again".into()),
            "one reply counts"
        );
    }

    #[test]
    fn a_session_end_tells_unwritten_from_lost_and_leaves_other_sessions() {
        let r = Requests::default();
        let counters = Counters::default();
        let (sent, mut sent_rx) = r.register(peer(1), 10);
        let (queued, mut queued_rx) = r.register(peer(1), 10);
        let (other, mut other_rx) = r.register(peer(2), 20);
        let written = [request_frame(sent, b"a"), reply_frame(99, b"r")];
        let unwritten = [request_frame(queued, b"b")];
        r.session_ended(10, &written, &unwritten, &counters);
        assert_eq!(sent_rx.try_recv().unwrap(), Err(Unanswered::Lost));
        assert_eq!(queued_rx.try_recv().unwrap(), Err(Unanswered::NotSent));
        assert!(other_rx.try_recv().is_err(), "another session's waits on");
        assert_eq!(counters.snapshot().replies_unconfirmed, 1);
        r.forget(other);
        assert!(lock(&r.pending).is_empty());
    }

    #[test]
    fn a_forgotten_request_takes_no_reply() {
        let r = Requests::default();
        let (id, _rx) = r.register(peer(1), 1);
        drop(Waiting { requests: &r, id });
        assert!(!r.answer(peer(1), 1, id, "late".into()));
    }
}
