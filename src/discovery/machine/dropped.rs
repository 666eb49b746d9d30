//! Why the machine dropped a datagram (each reason has its counter).

use super::super::auth::AuthError;
use crate::error::DatagramError;

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dropped {
    /// It did not decode.
    Invalid(DatagramError),
    /// Our own datagram, looped back.
    Own,
    /// Of another service.
    OtherService,
    /// From outside the subnets of the selected interfaces.
    ForeignInterface,
    /// A probe from an address no reply may go to (broadcast, multicast,
    /// unspecified, port 0).
    BadSource,
    /// A probe over its source's reply rate.
    RateLimited,
    /// An announce of a new peer while the table is full.
    TableFull,
    /// An announce of an unknown id beyond the admission rate: remembered,
    /// entered once heard again (see `discovery::admission`).
    Unconfirmed,
    /// An announce of a second live instance of a known id, during the
    /// hold-down after that was detected (see [`DiscoveryEvent::Duplicate`](super::DiscoveryEvent::Duplicate)).
    DuplicateId,
    /// With a fleet key: no MAC, or one that does not verify (the sender
    /// lacks the key, or the datagram was altered).
    Unauthenticated,
    /// With a fleet key: a sequence number seen already, or too old (a
    /// captured datagram sent again).
    Replayed,
    /// Not an error: a probe from a peer that holds a session with us and
    /// lists us as known, so it gets no answer (`replies_suppressed`).
    KnownAnswer,
}

impl From<AuthError> for Dropped {
    fn from(e: AuthError) -> Dropped {
        match e {
            AuthError::Unauthenticated => Dropped::Unauthenticated,
            AuthError::Replayed => Dropped::Replayed,
        }
    }
}
