//! What a connection task and the node's supervisor tell each other, and
//! what the supervisor gives a connection when it starts one. Neither side
//! imports the other: both speak through these types.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::machine::SessionConfig;
use super::mailbox::Mailbox;
use super::resume::Suspended;
use super::timer::Timer;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::node::EventQueue;
use crate::peer::PeerId;
use crate::stats::Counters;
use crate::wire::frame::Hello;

/// The supervisor's answer to a completed handshake.
#[derive(Debug)]
pub(crate) enum Approval {
    /// The session is up; the peer's metadata as discovery last heard it.
    Accept {
        metadata: std::collections::BTreeMap<String, String>,
        /// How the session goes on.
        terms: Box<Terms>,
    },
    /// Refused (a duplicate, or too many sessions): the connection closes
    /// with this violation.
    Reject(ProtocolViolation),
    /// The node is shutting down.
    Shutdown,
}

/// What an approval decides about resumption (PROTOCOL.md "Resuming a
/// session").
#[derive(Debug, Default)]
pub(crate) struct Terms {
    /// The session's token; 0: it cannot be resumed.
    pub(crate) token: u64,
    /// The held session this connection resumes, and how many of its
    /// frames the peer received.
    pub(crate) resume: Option<(Box<Suspended>, u64)>,
    /// What an earlier held session handed back (the peer came back
    /// without it): for the application before `SessionUp`.
    pub(crate) handed_back: Vec<Event>,
}

/// From a connection to the supervisor.
#[derive(Debug)]
pub(crate) enum Report {
    /// The handshake completed; the supervisor answers on `approve`.
    Handshaken {
        conn: u64,
        hello: Box<Hello>,
        addr: SocketAddr,
        /// The static key the peer proved (Noise sessions).
        key: Option<[u8; 32]>,
        approve: oneshot::Sender<Approval>,
    },
    /// The connection is over: its socket is closed and the application
    /// was told (the last report of a connection).
    Ended {
        conn: u64,
        /// The peer, if the session was up.
        peer: Option<PeerId>,
        reason: DownReason,
        /// The session, held for the peer to resume it.
        held: Option<Box<Suspended>>,
    },
}

/// What the supervisor gives a connection task it starts.
pub(crate) struct NewConnection {
    /// Who the connection is and its line to the supervisor (kept by the
    /// connection as it is, apart from its hot state).
    pub(crate) params: ConnectionParams,
    /// The largest frame we take.
    pub(crate) max_frame: u32,
    pub(crate) node: Arc<NodeContext>,
    pub(crate) mailbox: Arc<Mailbox>,
}

/// What a connection uses only now and then: who it is, its settings, and
/// its line to the supervisor.
pub(crate) struct ConnectionParams {
    /// The supervisor's number for the connection (in every report).
    pub(crate) id: u64,
    pub(crate) session: Arc<SessionConfig>,
    /// The peer a dial was for (`None` for an accepted connection).
    pub(crate) expected: Option<PeerId>,
    /// Whether we dialed.
    pub(crate) outbound: bool,
    /// The peer's address.
    pub(crate) addr: SocketAddr,
    /// How long a write may make no progress before the session closes.
    pub(crate) write_timeout: Duration,
    /// The static key the peer proved in the Noise handshake.
    pub(crate) proven_key: Option<[u8; 32]>,
    /// Where the connection reports to the supervisor.
    pub(crate) reports: mpsc::UnboundedSender<Report>,
    /// The session's number for requests and replies: the connection's
    /// own, or that of the connection that started the session it resumes.
    pub(crate) lineage: u64,
    /// The dialer's offer to resume: the held session's token and what we
    /// received of it.
    pub(crate) offer: Option<(u64, u64)>,
    /// The dialer's cipher (PROTOCOL.md §6): AES-256-GCM when both ends
    /// have AES instructions. An acceptor takes the dialer's.
    pub(crate) cipher: super::noise::Cipher,
    /// The session's token (0: not resumable), the peer's instance and the
    /// grace both sides hold it for, once approved.
    pub(crate) token: u64,
    pub(crate) peer_instance: u64,
    pub(crate) grace: Duration,
}

/// What all the connections of a node share: the application's event
/// stream, the timer that keeps their deadlines, and the node's counters.
/// One pointer in each connection's hot state (the event stream and the
/// timer are used on every heartbeat).
pub(crate) struct NodeContext {
    /// The application's event stream.
    pub(crate) events: Arc<EventQueue>,
    /// The connections' deadlines.
    pub(crate) timer: Arc<Timer<Mailbox>>,
    /// The node's counters (also read by `Node::stats`).
    pub(crate) counters: Arc<Counters>,
    /// Whether round-trip samples become `Event::Rtt`.
    pub(crate) rtt_events: bool,
    /// The keys of the Noise handshake; `None` for plaintext sessions.
    pub(crate) noise: Option<super::noise::NoiseKeys>,
    /// The liveness datagrams' sockets and links; `None` for plaintext
    /// sessions.
    pub(crate) datagrams: Option<super::datagram::Sockets>,
    /// The node's requests awaiting replies.
    pub(crate) requests: Arc<super::requests::Requests>,
}

/// A connection being made (when we dial).
pub(crate) type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;
