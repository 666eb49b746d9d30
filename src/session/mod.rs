//! TCP sessions: the sans-IO [`machine`] and the tokio task that drives it.

pub(crate) mod conn;
pub mod machine;
pub(crate) mod outbox;
pub(crate) mod timer;
