//! What the handle, the supervisor and the senders share: the tables the
//! supervisor keeps up to date for the handle, the node's counters, and the
//! commands the handle sends the supervisor.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use crate::error::Error;
use crate::node::sender::{check_size, try_push_message};
use crate::peer::{PeerId, PeerInfo, PeerMap, PeerState};
use crate::session::mailbox::Mailbox;
use crate::session::requests::Requests;
use crate::stats::Counters;

/// State shared by the handle and the supervisor.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The mailbox of each session that is up or held for resumption,
    /// tagged with its connection.
    pub(crate) mailboxes: Mutex<PeerMap<Published>>,
    /// What discovery knows, refreshed by the supervisor.
    pub(crate) peers: Mutex<BTreeMap<PeerId, (PeerInfo, PeerState)>>,
    /// Latest RTT of peers whose session ended (a live session keeps its
    /// own in its mailbox), until the peer is lost.
    pub(crate) rtts: Mutex<PeerMap<Duration>>,
    /// The node's counters; the connections hold them too.
    pub(crate) counters: Arc<Counters>,
    /// The requests awaiting replies; the connections hold it too.
    pub(crate) requests: Arc<Requests>,
}

/// Locks one of the tables of [`Shared`].
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The mailbox of `peer`'s session, if one is up, and the largest
    /// message the peer takes.
    pub(crate) fn mailbox(&self, peer: PeerId) -> Option<(Arc<Mailbox>, usize)> {
        lock(&self.mailboxes)
            .get(&peer)
            .map(|p| (p.mailbox.clone(), p.max_message))
    }

    /// Queues `message` for `peer`'s session if its outbox has room: one
    /// look, under the table's lock, and no handle of the mailbox taken
    /// (the path of almost every send). `Err(OutboxFull)` hands the message
    /// back for a send that waits.
    pub(crate) fn try_push(&self, peer: PeerId, message: Bytes) -> Result<(), Error> {
        match lock(&self.mailboxes).get(&peer) {
            Some(p) => check_size(message, p.max_message)
                .and_then(|message| try_push_message(peer, &p.mailbox, message)),
            None => Err(Error::NotConnected { peer, message }),
        }
    }

    /// [`Shared::mailbox`], and the session's number (for requests and
    /// replies: it stays when the session is resumed).
    pub(crate) fn session(&self, peer: PeerId) -> Option<(Arc<Mailbox>, usize, u64)> {
        lock(&self.mailboxes)
            .get(&peer)
            .map(|p| (p.mailbox.clone(), p.max_message, p.lineage))
    }
}

/// A session as senders see it.
#[derive(Debug)]
pub(crate) struct Published {
    /// The supervisor's number for the connection.
    pub(crate) conn: u64,
    /// The session's number: the connection's, or, for a resumed session,
    /// that of the connection that started it.
    pub(crate) lineage: u64,
    pub(crate) mailbox: Arc<Mailbox>,
    /// The largest message the peer takes: its hello's `max_frame_size`
    /// less the type byte (kept here, not in the mailbox, whose size every
    /// idle session pays).
    pub(crate) max_message: usize,
}

/// From the handle to the supervisor.
#[derive(Debug)]
pub(crate) enum Command {
    /// Say goodbye to everyone and stop.
    Shutdown,
    /// Announce this metadata from now on (checked against the limits by
    /// the supervisor, which answers).
    SetMetadata(
        std::collections::BTreeMap<String, String>,
        tokio::sync::oneshot::Sender<Result<(), crate::error::ConfigError>>,
    ),
}
