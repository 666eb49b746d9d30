//! TCP sessions: the sans-IO [`machine`] and the tokio task that drives it.
//!
//! | file | owns |
//! | --- | --- |
//! | `machine.rs` | the session's protocol state machine (sans-IO) |
//! | `task.rs` | the connection's task: a future going through its phases |
//! | `connection.rs` | the running phase: the per-frame loop |
//! | `lifecycle.rs` | what runs once per connection: dial, approval, end |
//! | `noise.rs` | protocol 2's Noise handshake (with `snow`) |
//! | `curve.rs` | X25519 for it from aws-lc-rs (the `aws-lc` feature) |
//! | `stream.rs` | the stream frames run on: plaintext TCP, or Noise records |
//! | `transport.rs` | the transport keys a handshake leaves: snow's ciphers, one per direction |
//! | `mailbox.rs` | what a connection shares with its node (outbox, close request, RTT, deadline) |
//! | `outbox.rs` | how the outbox stores messages (small ones encoded as sent) |
//! | `resume.rs` | a cut session held for its peer to resume, and what it hands back when not |
//! | `requests.rs` | the requests awaiting replies, and how a session's end settles them |
//! | `supervision.rs` | what a connection and the supervisor tell each other |
//! | `timer.rs` | one timer wheel for all the sessions of a node |

mod connection;
#[cfg(feature = "aws-lc")]
mod curve;
pub(crate) mod datagram;
pub(crate) mod lifecycle;
pub mod machine;
pub(crate) mod mailbox;
pub(crate) mod noise;
pub(crate) mod outbox;
pub(crate) mod requests;
pub(crate) mod resume;
pub(crate) mod stream;
pub(crate) mod supervision;
pub(crate) mod task;
pub(crate) mod timer;
pub(crate) mod transport;

/// The `snow` builder this crate's handshakes use (X25519 from aws-lc-rs
/// with the `aws-lc` feature), for the benchmark's protocol client, which
/// stands for a lanbeat dialer. Not part of the stable API.
#[doc(hidden)]
pub use noise::builder as noise_builder;
