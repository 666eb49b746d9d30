//! Error types, one enum per layer. Each variant says what happened and to
//! whom, and whether trying again can help.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::peer::PeerId;

/// A [`Config`](crate::Config) that cannot work. Nothing was started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The service name must be 1 to 64 bytes.
    #[error("service name must be 1 to 64 bytes, got {0}")]
    Service(usize),
    /// More metadata entries than an announce may carry.
    #[error("{count} metadata entries, more than the {limit} an announce may carry")]
    MetadataEntries {
        /// Entries configured.
        count: usize,
        /// The most an announce may carry.
        limit: usize,
    },
    /// A metadata key longer than an announce may carry.
    #[error("metadata key {key:?} is {len} bytes, over the limit of {limit}")]
    MetadataKey {
        /// The key.
        key: String,
        /// Its length in bytes.
        len: usize,
        /// The longest allowed.
        limit: usize,
    },
    /// A metadata value longer than an announce may carry.
    #[error("metadata value of {key:?} is {len} bytes, over the limit of {limit}")]
    MetadataValue {
        /// The key whose value is too long.
        key: String,
        /// The value's length in bytes.
        len: usize,
        /// The longest allowed.
        limit: usize,
    },
    /// An id was set without an identity, and sessions use Noise: no key
    /// could prove it. Keep an [`Identity`](crate::Identity) (the id derives
    /// from it), or choose insecure plaintext sessions.
    #[error(
        "an id without an identity cannot be proven to peers: set an identity (its id derives from its key), or choose insecure plaintext sessions"
    )]
    IdWithoutIdentity,
    /// A static peer address that is neither an IP address, `IP:port`,
    /// nor `host` or `host:port`.
    #[error("peer address {0:?} is not IP, IP:port, host or host:port")]
    PeerAddress(String),
    /// A fleet key was set with insecure plaintext sessions, which cannot
    /// use it: it would protect nothing.
    #[error("a fleet key needs Noise sessions; insecure plaintext sessions cannot use it")]
    FleetKeyWithoutNoise,
    /// A trust policy other than `Trust::Any` was set with insecure
    /// plaintext sessions, where ids prove nothing.
    #[error("a trust policy needs Noise sessions: in insecure plaintext mode an id proves nothing")]
    TrustWithoutNoise,
    /// An id and an identity were both set, and the identity's id is
    /// another: the id comes from the identity; leave the id unset.
    #[error("id {id} was set, but the identity's id is {identity}: set one of them")]
    IdAndIdentity {
        /// The id set.
        id: PeerId,
        /// The identity's id.
        identity: PeerId,
    },
    /// The node name must be at most 64 bytes.
    #[error("node name must be at most 64 bytes, got {0}")]
    Name(usize),
    /// The heartbeat timeout must be longer than the interval, or every
    /// session would time out between two heartbeats.
    #[error(
        "heartbeat_timeout ({timeout:?}) must be longer than heartbeat_interval ({interval:?})"
    )]
    HeartbeatTimeoutTooShort {
        /// The configured interval.
        interval: Duration,
        /// The configured timeout.
        timeout: Duration,
    },
    /// A duration or count that must be positive is zero.
    #[error("{0} must not be zero")]
    Zero(&'static str),
    /// A duration is unreasonably long.
    #[error("{0} is longer than an hour")]
    TooLong(&'static str),
    /// Two settings are in the wrong order.
    #[error("{smaller} must be smaller than {larger}")]
    Order {
        /// The setting that must be the smaller.
        smaller: &'static str,
        /// The setting that must be the larger.
        larger: &'static str,
    },
    /// `max_frame_size` is below the smallest usable frame (a handshake).
    #[error("max_frame_size {0} is below the minimum of 1024")]
    MaxFrameSize(u32),
    /// `max_datagram_size` must be 256 to 65507 bytes.
    #[error("max_datagram_size {0} must be 256 to 65507 bytes")]
    MaxDatagramSize(usize),
    /// This node's own announce (name, metadata) would not fit in one
    /// datagram.
    #[error(
        "the announce would be {size} bytes, over max_datagram_size {limit}: shorten name or metadata"
    )]
    AnnounceTooLarge {
        /// Encoded size of the announce.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// Errors returned by [`Node`](crate::Node) methods.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected; nothing was started.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A socket could not be set up (port taken, no permission...). Nothing
    /// was started; retrying helps only if the cause went away.
    #[error("cannot set up the {what} socket on {addr}: {source}")]
    Bind {
        /// Which socket: "discovery", "probe" or "tcp listener".
        what: &'static str,
        /// The address it was to be bound to.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The configuration names one interface, and the node's sockets cannot
    /// be bound to it: it does not exist (check the name), or the process
    /// may not bind to it. Nothing was started.
    #[error("cannot bind to interface {name:?}: {source}")]
    Interface {
        /// The interface named in the configuration.
        name: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A static peer's address did not resolve (a host name unknown).
    /// Nothing was started.
    #[error("cannot resolve peer address {addr:?}: {reason}")]
    PeerAddress {
        /// The address as configured.
        addr: String,
        /// Why.
        reason: String,
    },
    /// No session with that peer is up. The message is handed back.
    #[error("no session with peer {peer}")]
    NotConnected {
        /// The peer.
        peer: PeerId,
        /// The message that was not sent.
        message: Bytes,
    },
    /// The session's outbox is full (only from the non-waiting
    /// [`Node::try_send`](crate::Node::try_send)). Try again later or use
    /// [`Node::send`](crate::Node::send), which waits.
    #[error("outbox of peer {peer} is full")]
    OutboxFull {
        /// The peer.
        peer: PeerId,
        /// The message that was not sent.
        message: Bytes,
    },
    /// The message is larger than `max_frame_size` allows; it was not sent.
    #[error("message of {size} bytes exceeds the frame limit of {limit}")]
    MessageTooLarge {
        /// Size of the message.
        size: usize,
        /// Largest message that fits.
        limit: usize,
    },
    /// A request was certainly not processed: its session ended before it
    /// was written, or its timeout passed while it waited for room in the
    /// outbox. It is handed back; sending it again is safe.
    #[error("request to peer {peer} was not sent")]
    RequestNotSent {
        /// The peer.
        peer: PeerId,
        /// The request's body.
        request: Bytes,
    },
    /// The session ended after the request was written and before its
    /// reply came: the peer may have processed it.
    #[error(
        "session with peer {peer} ended before the reply came; the request may have been processed"
    )]
    RequestLost {
        /// The peer.
        peer: PeerId,
    },
    /// No reply came within the timeout. The peer may have processed the
    /// request (or may still); a reply that comes later is dropped.
    #[error("no reply from peer {peer} within {timeout:?}")]
    RequestTimedOut {
        /// The peer.
        peer: PeerId,
        /// The timeout that passed.
        timeout: std::time::Duration,
    },
    /// A value could not be encoded as JSON, or a JSON reply did not
    /// decode as the type asked for.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The node has shut down; nothing more can be done with it.
    #[error("the node has shut down")]
    Shutdown,
}

/// Why a discovery datagram was dropped. Nothing else changes: the node
/// counts it (see [`Stats`](crate::Stats)) and traces it at debug level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// Larger than `max_datagram_size`; not parsed.
    #[error("datagram of {0} bytes is over the size limit")]
    TooLarge(usize),
    /// Shorter than the 6-byte envelope, or not starting with the magic.
    #[error("not a lanbeat datagram")]
    NotLanbeat,
    /// A lanbeat datagram of a protocol version this node does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Unknown message kind byte.
    #[error("unknown datagram kind {0}")]
    Kind(u8),
    /// The JSON body is malformed, misses a field or breaks a limit.
    #[error("malformed datagram body")]
    Malformed,
}

/// Why a session frame was rejected. The session is closed with
/// [`DownReason::ProtocolError`](crate::DownReason::ProtocolError).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is over `max_frame_size` (checked before any
    /// allocation).
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The announced length.
        size: u32,
        /// The limit.
        limit: u32,
    },
    /// A zero length prefix (every frame has at least its type byte).
    #[error("empty frame")]
    Empty,
    /// Unknown frame type byte.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The payload does not fit the frame type.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}
