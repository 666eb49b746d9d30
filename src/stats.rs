//! Counters of everything a node dropped, refused or rejected.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::discovery::machine::Dropped;
use crate::error::DatagramError;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// A snapshot of a node's counters, from [`Node::stats`](crate::Node::stats).
        /// Every dropped datagram, refused connection and rejected frame is
        /// counted in exactly one field.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Discovery datagrams received (before any check).
    datagrams_received,
    /// Discovery datagrams sent.
    datagrams_sent,
    /// Liveness probes sent by sessions whose stream went quiet
    /// (PROTOCOL.md §7).
    liveness_probes_sent,
    /// Liveness datagrams accepted: authentic and fresh, each a proof that
    /// a peer is alive.
    liveness_received,
    /// Liveness datagrams dropped: malformed, naming no session of ours,
    /// or failing authentication (forged, tampered, an earlier session's).
    liveness_dropped,
    /// Liveness datagrams dropped as replayed: authentic, but their nonce
    /// is not above every one accepted before.
    liveness_replayed,
    /// Datagrams that could not be sent (no route, interface gone...).
    datagram_send_errors,
    /// Dropped: larger than `max_datagram_size`.
    dropped_too_large,
    /// Dropped: not a lanbeat datagram (no magic, too short).
    dropped_not_lanbeat,
    /// Dropped: another protocol version.
    dropped_version,
    /// Dropped: unknown kind byte, malformed JSON, missing field or a limit
    /// broken.
    dropped_malformed,
    /// Dropped: our own datagram, looped back.
    dropped_own,
    /// Dropped: another service.
    dropped_other_service,
    /// Dropped: from outside the selected interfaces' subnets.
    dropped_foreign_interface,
    /// Dropped: a probe from an address no reply may go to.
    dropped_bad_source,
    /// Dropped: a probe over its source's reply rate.
    dropped_rate_limited,
    /// Dropped: an announce of a new peer while the peer table is full.
    dropped_table_full,
    /// Held back: an announce of an unknown peer beyond the admission rate
    /// (20 new peers a second); the peer enters when heard again.
    dropped_unconfirmed,
    /// Dropped: an announce of a second live node with a known id, while
    /// that duplicate is held down.
    dropped_duplicate_id,
    /// Dropped, with a fleet key: a datagram without a valid MAC (its
    /// sender lacks the key, or it was altered).
    dropped_unauthenticated,
    /// Dropped, with a fleet key: a datagram whose sequence number was
    /// seen already or is too old (a replay).
    dropped_replayed,
    /// Probes not answered because their sender holds a session with this
    /// node and said so (known-answer suppression).
    replies_suppressed,
    /// Times two live nodes were found sharing one id (each also an
    /// `Event::DuplicateId`).
    duplicate_ids,
    /// Sessions that came up.
    sessions_up,
    /// Connections refused at once: too many sessions or handshakes.
    sessions_refused,
    /// Sessions refused after the handshake because the trust policy does
    /// not admit the peer (`Config::trust`).
    sessions_untrusted,
    /// Connections refused at once: named interfaces are selected and the
    /// connection came from outside their subnets.
    refused_foreign_interface,
    /// Connections closed for not completing the handshake in time.
    handshake_timeouts,
    /// Connections that failed their handshake (bad hello, duplicate...).
    handshake_failures,
    /// Outbound connects that failed.
    dials_failed,
    /// Sessions closed for a protocol violation (bad frame, bad ack...).
    protocol_errors,
    /// Sessions closed by the heartbeat timeout.
    heartbeat_timeouts,
    /// Sessions closed by the write timeout.
    write_timeouts,
    /// Sessions closed by the stall timeout: the stream delivered nothing
    /// while liveness datagrams proved the peer alive.
    stream_stalls,
    /// Sessions held after a cut for their peer to resume them
    /// (`Config::resume_grace`).
    sessions_suspended,
    /// Held sessions that a new connection resumed.
    sessions_resumed,
    /// Held sessions given up: the grace ran out, the peer came back
    /// restarted or without the session's state, or the node shut down
    /// (what they held was handed back).
    resumptions_expired,
    /// Refused resumptions: the peer's counts did not fit what was sent,
    /// or it resumed state this node no longer held.
    resumptions_refused,
    /// Messages written again by a resumed session (the peer had not
    /// received them before the cut).
    messages_resent,
    /// Application messages written to sessions (a message written again
    /// after a resumption counts once more).
    messages_sent,
    /// Application messages received.
    messages_received,
    /// Messages handed back in `Unconfirmed` events (written, not
    /// acknowledged: their fate unknown).
    messages_unconfirmed,
    /// Messages handed back in `Undelivered` events (never written).
    messages_undelivered,
    /// RTT samples not reported because the event queue was full.
    rtt_events_skipped,
    /// Requests received (each an `Event::Request`).
    requests_received,
    /// Replies received that no request waited for (it had timed out or
    /// been cancelled, or the id was never this peer's): dropped.
    replies_unmatched,
    /// Replies written or queued that the peer had not acknowledged when
    /// the session ended (its requester was told the request was lost).
    replies_unconfirmed,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        Self::bump(match why {
            Dropped::Invalid(DatagramError::TooLarge(_)) => &self.dropped_too_large,
            Dropped::Invalid(DatagramError::NotLanbeat) => &self.dropped_not_lanbeat,
            Dropped::Invalid(DatagramError::Version(_)) => &self.dropped_version,
            Dropped::Invalid(DatagramError::Kind(_) | DatagramError::Malformed) => {
                &self.dropped_malformed
            }
            Dropped::Own => &self.dropped_own,
            Dropped::OtherService => &self.dropped_other_service,
            Dropped::ForeignInterface => &self.dropped_foreign_interface,
            Dropped::BadSource => &self.dropped_bad_source,
            Dropped::RateLimited => &self.dropped_rate_limited,
            Dropped::TableFull => &self.dropped_table_full,
            Dropped::DuplicateId => &self.dropped_duplicate_id,
            Dropped::Unconfirmed => &self.dropped_unconfirmed,
            Dropped::Unauthenticated => &self.dropped_unauthenticated,
            Dropped::Replayed => &self.dropped_replayed,
            Dropped::KnownAnswer => &self.replies_suppressed,
        });
    }
}
