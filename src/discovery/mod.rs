//! Discovery: the sans-IO [`machine`], the limits on who enters its table
//! and how fast it dials (`admission`), and its socket setup.

pub(crate) mod admission;
pub(crate) mod auth;
pub mod machine;
pub(crate) mod socket;
pub(crate) mod watch;
