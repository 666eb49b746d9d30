//! The node: the handle the application holds, and the supervisor task
//! behind it.
//!
//! | file | owns |
//! | --- | --- |
//! | `handle.rs` | [`Node`]: start, send, peers, stats, shutdown |
//! | `events.rs` | [`Events`]: the application's end of the event stream |
//! | `request.rs` | requests and replies: `Node::request`, `Node::reply` |
//! | `sender.rs` | [`PeerSender`] and the send future |
//! | `supervisor.rs` | the node's task: discovery, dialing, approvals, one session per peer |
//! | `shared.rs` | what the handle and the supervisor share |

mod events;
mod handle;
mod request;
mod sender;
mod shared;
mod supervisor;

pub(crate) use events::EventQueue;
pub use events::Events;
pub use handle::{LocalInfo, Node};
pub use sender::PeerSender;
