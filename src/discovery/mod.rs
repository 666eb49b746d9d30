//! Discovery: the sans-IO [`machine`] and its socket setup.

pub mod machine;
pub(crate) mod socket;
