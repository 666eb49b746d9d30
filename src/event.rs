//! What the application sees: one ordered stream of [`Event`]s.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::error::FrameError;
use crate::peer::{PeerId, PeerInfo};

/// One thing that happened, in the order it happened.
///
/// For one peer the order is always: `Discovered`, then any number of
/// (`SessionUp`, `Message`/`Request`/`Rtt`..., `SessionDown`, `Unconfirmed`?,
/// `Undelivered`?)
/// rounds,
/// then `PeerLost` once discovery gives up on it (it may be discovered
/// again later).
///
/// A session that was cut (a timeout, a network error) is held for
/// [`Config::resume_grace`](crate::Config::resume_grace): its
/// `SessionDown` comes at once, but its `Unconfirmed` and `Undelivered`
/// only if it is not resumed: when the grace runs out (which may be after
/// `PeerLost`), or right before the `SessionUp` of a new session that
/// does not resume it (the peer restarted). A `SessionUp` with `resumed`
/// set carries on the held session: nothing of it is handed back, and
/// every message sent to the peer meanwhile arrives once, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Discovery found a peer (or it contacted us first). Boxed: the other
    /// events, messages above all, stay small.
    Discovered(Box<PeerInfo>),
    /// A session with a peer completed its handshake; messages can flow.
    SessionUp {
        /// The peer.
        peer: PeerId,
        /// Its name, from the handshake.
        name: String,
        /// Its end of the TCP connection.
        addr: SocketAddr,
        /// Whether this node dialed.
        outbound: bool,
        /// Its role, from the handshake.
        role: crate::peer::Role,
        /// Its metadata, as its announces last carried it (empty if it
        /// was never heard in discovery, e.g. a controller that dialed
        /// us). Proven by the fleet key when there is one; otherwise, like
        /// every discovery datagram, a hint. Boxed: events stay small.
        metadata: Box<std::collections::BTreeMap<String, String>>,
        /// This session resumes the one that ended last with this peer
        /// (see [`Config::resume_grace`](crate::Config::resume_grace)):
        /// the messages held since are delivered now, each once, in order,
        /// and none of them is handed back. False for a new session: then
        /// whatever the previous one held was handed back before this
        /// event.
        resumed: bool,
    },
    /// A message from a peer, in the order it was sent.
    Message {
        /// The sender.
        peer: PeerId,
        /// The bytes it sent (JSON if it used `send_json`).
        data: Bytes,
    },
    /// A request from a peer (its [`Node::request`](crate::Node::request)),
    /// in order with its messages. Answer it with
    /// [`Node::reply`](crate::Node::reply) and `reply`; a request never
    /// answered makes the requester time out.
    Request {
        /// The sender.
        peer: PeerId,
        /// The request (JSON if it used `request_json`).
        body: Bytes,
        /// Where the reply goes.
        reply: ReplyTo,
    },
    /// A heartbeat round trip was measured: about once per heartbeat
    /// interval on both sides of a session. The side that dialed measures
    /// it (ping sent to pong received); the side that accepted reports the
    /// dialer's sample, carried in the dialer's next ping, rather than
    /// pinging for its own (it measures itself only if the peer's pings
    /// carry no sample).
    ///
    /// A sample does not wake the application by itself: it comes with the
    /// next other event, or at most one tick of the node's timer (8 ms)
    /// after it was measured. With thousands of sessions, that is one
    /// wake-up per tick for all their samples instead of one per sample.
    ///
    /// Not sent at all with [`Config::rtt_events`](crate::Config::rtt_events)
    /// off; the latest sample is then still in `Node::peers`.
    Rtt {
        /// The peer.
        peer: PeerId,
        /// From ping sent to pong received.
        rtt: Duration,
    },
    /// A session ended.
    SessionDown {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: DownReason,
    },
    /// Messages written to the session that the peer had not acknowledged
    /// when it ended for good, oldest first: their fate is unknown. The
    /// peer's node may have received (and its application processed) any
    /// of them just before the end, or none. Follows the `SessionDown`
    /// (after the grace, for a session that was held), before any
    /// `Undelivered`. An application that resends them must be ready for
    /// the peer to see some twice. A session that is resumed hands back
    /// nothing: the peer gets each of these once.
    Unconfirmed {
        /// The peer.
        peer: PeerId,
        /// The messages, in the order they were sent.
        messages: Vec<Bytes>,
    },
    /// Messages accepted by `send` that were never written to the session
    /// before it ended for good, oldest first (for a held session, those
    /// sent during the grace too): the peer certainly did not get them,
    /// and resending them delivers each once. Follows the `SessionDown`
    /// (and the `Unconfirmed`, if any; these are newer).
    Undelivered {
        /// The peer.
        peer: PeerId,
        /// The messages, in the order they were sent.
        messages: Vec<Bytes>,
    },
    /// A peer announced new metadata (it called `Node::set_metadata`).
    /// Carried by discovery datagrams: proven by the fleet key when there
    /// is one, otherwise a hint like every announce.
    Metadata {
        /// The peer.
        peer: PeerId,
        /// All of its metadata now. Boxed: events stay small.
        metadata: Box<std::collections::BTreeMap<String, String>>,
    },
    /// Discovery gave up on a peer: it said goodbye, or it has not been
    /// heard from within `peer_expiry` since its session ended.
    PeerLost {
        /// The peer.
        peer: PeerId,
    },
    /// Two live nodes use one id (an identity or configuration copied to a
    /// second device): they were heard in turns. For the next minute the
    /// node keeps what it has with the one at `kept` and ignores the other
    /// (its announces and connections), so the session does not flap; the
    /// event comes again each minute while both are there. Fix by giving
    /// one of them its own id.
    DuplicateId {
        /// The shared id.
        peer: PeerId,
        /// Where the node that is kept was heard from.
        kept: std::net::SocketAddr,
        /// Where the other one was heard from.
        other: std::net::SocketAddr,
    },
}

/// The address of a reply: the request it answers, on the session that
/// carried it. Given by [`Event::Request`]; pass it to
/// [`Node::reply`](crate::Node::reply). A reply can only go back on the
/// session the request came on: once that session ended, the requester has
/// been told its request was lost, and `reply` fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyTo {
    pub(crate) peer: PeerId,
    /// The supervisor's number for the session (its first connection's:
    /// a resumed session keeps it).
    pub(crate) conn: u64,
    /// The requester's id for the request.
    pub(crate) id: u64,
}

impl ReplyTo {
    /// The peer that asked.
    pub fn peer(&self) -> PeerId {
        self.peer
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownReason {
    /// Nothing arrived within the heartbeat timeout.
    HeartbeatTimeout,
    /// The peer said goodbye (it is shutting down).
    Goodbye,
    /// The peer closed the connection without a goodbye, or reset it (it
    /// crashed, or its process was killed and the kernel closed the socket).
    Closed,
    /// The peer broke the protocol; the session was closed.
    ProtocolError(ProtocolViolation),
    /// A socket error.
    Io(io::ErrorKind),
    /// The peer accepted no bytes within the write timeout.
    WriteTimeout,
    /// This node is shutting down.
    Shutdown,
    /// A newer connection with the same peer replaced this one.
    Replaced,
    /// The peer restarted (announced a new instance).
    PeerRestarted,
    /// The peer kept proving itself alive by liveness datagrams, but the
    /// stream delivered nothing for the stall timeout
    /// ([`Config::stall_timeout`](crate::Config::stall_timeout)).
    StreamStalled,
    /// The connection never completed its handshake in time. Such a
    /// connection was never a session: this reason shows only in logs and
    /// counters, never in [`Event::SessionDown`].
    HandshakeTimeout,
}

impl DownReason {
    /// A stable snake_case name, as printed by the example peer.
    pub fn as_str(&self) -> &'static str {
        match self {
            DownReason::HeartbeatTimeout => "heartbeat_timeout",
            DownReason::Goodbye => "goodbye",
            DownReason::Closed => "closed",
            DownReason::ProtocolError(_) => "protocol_error",
            DownReason::Io(_) => "io_error",
            DownReason::WriteTimeout => "write_timeout",
            DownReason::Shutdown => "shutdown",
            DownReason::Replaced => "replaced",
            DownReason::PeerRestarted => "peer_restarted",
            DownReason::StreamStalled => "stream_stalled",
            DownReason::HandshakeTimeout => "handshake_timeout",
        }
    }
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::ProtocolError(v) => write!(f, "protocol_error: {v}"),
            DownReason::Io(k) => write!(f, "io_error: {k}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// How a peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A frame could not be decoded.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The peer belongs to another service.
    #[error("peer is of another service")]
    ServiceMismatch,
    /// The dialed address answered with another id than discovery promised.
    #[error("expected peer {expected}, got {got}")]
    UnexpectedPeer {
        /// The id discovery announced.
        expected: PeerId,
        /// The id in the handshake.
        got: PeerId,
    },
    /// The connection leads back to this node.
    #[error("connected to itself")]
    SelfConnection,
    /// The handshake carried impossible heartbeat settings.
    #[error("handshake with impossible heartbeat settings")]
    BadHeartbeat,
    /// The handshake broke a limit of the protocol (the field is named).
    #[error("handshake breaks a limit: {0}")]
    BadHello(&'static str),
    /// A frame arrived that is not allowed in the current state.
    #[error("unexpected {0} frame")]
    UnexpectedFrame(&'static str),
    /// The peer acknowledged more messages than were sent.
    #[error("acknowledgement beyond what was sent")]
    BadAck,
    /// A session was resumed with counts that do not fit what was sent on
    /// it (more received than was sent, or fewer than was acknowledged),
    /// or resumed from state this node no longer holds.
    #[error("resumption that does not match the session's state")]
    BadResume,
    /// The Noise handshake failed (the step is named): the peer holds
    /// another fleet key, is of another service, or is not a lanbeat node
    /// of protocol 2.
    #[error("noise handshake failed: {0}")]
    Handshake(&'static str),
    /// The peer speaks protocol 1, unencrypted, and this node requires
    /// encryption (or the other way round).
    #[error("peer speaks the other protocol (plaintext against encrypted)")]
    PlaintextPeer,
    /// An encrypted record was tampered with, replayed, reordered, cut
    /// short or forged (which is named).
    #[error("bad record: {0}")]
    BadRecord(&'static str),
    /// The hello claims another id than the one the peer's key proves.
    #[error("hello claims {claimed}, the key proves {proven}")]
    Unauthenticated {
        /// The id in the hello.
        claimed: PeerId,
        /// The id of the key the peer proved in the handshake.
        proven: PeerId,
    },
    /// Refused by this node: too many sessions, or a duplicate that lost
    /// the tie-break.
    #[error("refused: {0}")]
    Refused(&'static str),
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_stay_small() {
        // Every message is moved several times on its way to the
        // application: a large variant would make them all large.
        assert!(std::mem::size_of::<super::Event>() <= 80);
    }
}
