//! # lanbeat
//!
//! Local-network peer discovery plus heartbeat-checked TCP sessions.
//!
//! Nodes of one *service* find each other with a UDP probe broadcast on every
//! usable IPv4 interface and multicast on every IPv6 link (or sent to peers
//! named by address); each answers with its id, name and TCP port. The
//! prober dials, a Noise handshake proves each side's key (the id derives
//! from it) and encrypts everything after it, the hellos exchange ids and
//! heartbeat settings, and ping/pong heartbeats keep the session honest.
//! When nothing arrives within
//! the heartbeat timeout the session closes with
//! [`DownReason::HeartbeatTimeout`] and discovery looks for the peer, fast,
//! until it is back and a new session is up.
//!
//! ```text
//!  node A (id 1)                               node B (id 2)
//!     |--- probe (UDP broadcast) ---------------->|
//!     |<-- announce (UDP unicast: id, port) ------|
//!     |=== TCP connect (smaller id dials) =======>|
//!     |<-- Noise XX handshake (both keys proven) ->|
//!     |<-- hello / hello (encrypted) ------------>|  SessionUp on both
//!     |<-- ping / pong, data / ack -------------->|  Rtt, Message
//!     |          ... silence > timeout ...        |  SessionDown(heartbeat_timeout)
//!     |--- probe, probe, probe ------------------>|  until B answers again
//! ```
//!
//! Applications see one ordered stream of [`Event`]s and send to peers by
//! id; they never touch sockets. For streams of small messages,
//! [`Node::sender`] gives a [`PeerSender`] (with
//! [`send_batch`](PeerSender::send_batch)) and [`Events::recv_many`] takes
//! events in batches.
//!
//! ```no_run
//! use lanbeat::{Config, Event, Node};
//!
//! # async fn run() -> Result<(), lanbeat::Error> {
//! let config = Config::builder("lamp-control").name("hub").build()?;
//! let (node, mut events) = Node::start(config).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::SessionUp { peer, name, .. } => {
//!             println!("{name} is here");
//!             node.send(peer, "hello").await?;
//!         }
//!         Event::Message { peer, data } => println!("{peer}: {data:?}"),
//!         Event::SessionDown { peer, reason } => println!("{peer} gone: {reason}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The wire protocol is specified in `docs/PROTOCOL.md`, the architecture in
//! `docs/DESIGN.md`. The protocol logic lives in two sans-IO state machines,
//! [`discovery::machine::Discovery`] and [`session::machine::Session`], which
//! take `(now, input)` and return what to send and when to wake; the tokio
//! tasks around them only move bytes and timers.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | [`config`] | [`Config`], its builder, defaults and validation |
//! | [`peer`] | [`PeerId`], [`PeerInfo`], [`Role`] |
//! | [`event`] | [`Event`] and the reasons it carries |
//! | [`error`] | [`Error`] and the errors of each layer |
//! | `node` | [`Node`], [`Events`], [`PeerSender`] and the supervisor task |
//! | [`discovery`] | the discovery machine and its sockets |
//! | [`session`] | the session machine and the connection task that drives it |
//! | [`wire`] | datagram and frame codecs |
//! | `queue`, `clock`, `sync`, `stats` | the bounded queue, the one clock read, the sync primitives, the counters |
//!
//! # Stability
//!
//! What an application uses — [`Node`], [`Events`], [`PeerSender`],
//! [`Config`], [`Event`], [`PeerId`], [`PeerInfo`], the errors and
//! [`Stats`] — follows semantic versioning; types that may grow are
//! `#[non_exhaustive]`. The sans-IO machines ([`discovery::machine`],
//! [`session::machine`]) and the codecs ([`wire`]) are public so that
//! other drivers and tests can use them, but they are **not yet stable
//! API**: they change with the protocol (version 2 brings encrypted
//! sessions) and may change in any 0.x release.

#![forbid(unsafe_code)]
#![deny(missing_docs, unreachable_pub)]

mod clock;
pub mod config;
pub mod discovery;
pub mod error;
pub mod event;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
mod node;
pub mod peer;
mod queue;
pub mod session;
mod stats;
mod sync;
#[cfg(any(test, fuzzing))]
mod testing;
pub mod trust;
pub mod wire;

pub use bytes::Bytes;
pub use config::{
    Config, ConfigBuilder, DEFAULT_DISCOVERY_PORT, InterfaceSelection, Security, SessionCipher,
};
pub use error::{ConfigError, DatagramError, Error, FrameError};
pub use event::{DownReason, Event, ProtocolViolation, ReplyTo};
pub use identity::{FleetKey, Identity, IdentityError};
pub use node::{Events, LocalInfo, Node, PeerSender};
pub use peer::{PeerId, PeerInfo, PeerState, PeerStatus, Role};
pub use stats::Stats;
pub use trust::{Trust, TrustRequest};

/// The README's code must compile.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
