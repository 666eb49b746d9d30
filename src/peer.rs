//! Peer identity and what is known about a peer.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The identity of a node: 64 random bits, printed as 16 lowercase hex digits.
///
/// A node keeps its id for its whole life (or for ever, if the application
/// stores it and passes it back through [`Config::id`](crate::Config::id)).
/// Ids also order peers: of two [`Role::Peer`] nodes, the one with the smaller
/// id dials, so that a pair never ends up with two sessions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u64);

impl PeerId {
    /// Wraps a raw id.
    pub const fn from_u64(raw: u64) -> Self {
        PeerId(raw)
    }

    /// The raw 64-bit value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// A fresh random id from the operating system's random source.
    pub fn random() -> Self {
        PeerId(rand::random())
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({:016x})", self.0)
    }
}

/// The text was not 1 to 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: expected 1 to 16 hex digits")]
#[non_exhaustive]
pub struct ParseIdError(pub String);

impl FromStr for PeerId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex_u64(s)
            .map(PeerId)
            .ok_or_else(|| ParseIdError(s.chars().take(32).collect()))
    }
}

/// Maps keyed by peer id. Ids are looked up on every `send`; foldhash is
/// several times faster than the default SipHash and still seeded per
/// process.
pub(crate) type PeerMap<V> = std::collections::HashMap<PeerId, V, foldhash::fast::RandomState>;

/// A set of peer ids, hashed as [`PeerMap`] keys are.
pub(crate) type PeerSet = std::collections::HashSet<PeerId, foldhash::fast::RandomState>;

/// Parses 1 to 16 hex digits (no sign, no prefix) into a `u64`.
pub(crate) fn parse_hex_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

impl Serialize for PeerId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a node does on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Probes, answers probes, dials and accepts (the default).
    #[default]
    Peer,
    /// Probes and dials only: invisible to others until it connects
    /// (a phone app, a hub).
    Controller,
    /// Answers probes and accepts only: never probes or dials (a lamp, a
    /// sensor).
    Device,
}

impl Role {
    /// Whether this role sends probes and opens TCP sessions.
    pub const fn dials(self) -> bool {
        !matches!(self, Role::Device)
    }

    /// Whether this role answers probes, announces itself and accepts
    /// sessions.
    pub const fn accepts(self) -> bool {
        !matches!(self, Role::Controller)
    }

    /// The lowercase name used on the wire and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Peer => "peer",
            Role::Controller => "controller",
            Role::Device => "device",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "peer" => Ok(Role::Peer),
            "controller" => Ok(Role::Controller),
            "device" => Ok(Role::Device),
            other => Err(format!(
                "unknown role {other:?} (expected peer, controller or device)"
            )),
        }
    }
}

/// Decides which of two nodes opens the TCP session, so that a pair of peers
/// gets exactly one session even when both discover each other at once.
///
/// A node dials when it can dial, the other side accepts, and either the
/// other side cannot dial, this side cannot accept, or this side has the
/// smaller id.
pub(crate) fn should_dial(me: PeerId, my_role: Role, them: PeerId, their_role: Role) -> bool {
    my_role.dials()
        && their_role.accepts()
        && (!their_role.dials() || !my_role.accepts() || me < them)
}

/// What discovery learned about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's id.
    pub id: PeerId,
    /// Changes every time the peer process restarts.
    pub instance: u64,
    /// Human-readable name the peer chose (not unique).
    pub name: String,
    /// Where its TCP sessions are accepted: the source IP of its announce and
    /// the TCP port it announced.
    pub addr: SocketAddr,
    /// The local interface the peer was found on, when known.
    pub interface: Option<String>,
    /// The peer's role.
    pub role: Role,
    /// Small string key/values the peer published.
    pub metadata: BTreeMap<String, String>,
    /// Its announces say it takes sessions sealed with AES-256-GCM: a
    /// dialer that has AES instructions too uses that cipher
    /// (PROTOCOL.md §6, "Cipher").
    pub aes_gcm: bool,
}

/// Where a known peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PeerState {
    /// Found by discovery; no session yet (the other side may be about to
    /// dial, or a dial is scheduled).
    Discovered,
    /// A TCP connection to it is being opened or is in its handshake.
    Connecting,
    /// A session is up.
    Connected,
    /// Its session was lost without a goodbye; discovery is looking for it.
    Missing,
}

/// A snapshot of one peer, as returned by [`Node::peers`](crate::Node::peers).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStatus {
    /// What discovery (or the session handshake) told us.
    pub info: PeerInfo,
    /// Where the peer stands.
    pub state: PeerState,
    /// The last round-trip time measured on its session.
    pub last_rtt: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_text() {
        let id = PeerId::from_u64(0x00ab_cdef_0123_4567);
        assert_eq!(id.to_string(), "00abcdef01234567");
        assert_eq!("00abcdef01234567".parse::<PeerId>().unwrap(), id);
        assert!("".parse::<PeerId>().is_err());
        assert!("+1".parse::<PeerId>().is_err());
        assert!("0123456789abcdef0".parse::<PeerId>().is_err());
        assert!("xyz".parse::<PeerId>().is_err());
    }

    #[test]
    fn exactly_one_side_dials() {
        let a = PeerId::from_u64(1);
        let b = PeerId::from_u64(2);
        let roles = [Role::Peer, Role::Controller, Role::Device];
        for ra in roles {
            for rb in roles {
                let ab = should_dial(a, ra, b, rb);
                let ba = should_dial(b, rb, a, ra);
                assert!(!(ab && ba), "both dial: {ra:?} {rb:?}");
                let can_pair = (ra.dials() && rb.accepts()) || (rb.dials() && ra.accepts());
                assert_eq!(ab || ba, can_pair, "{ra:?} {rb:?}");
            }
        }
        assert!(should_dial(a, Role::Peer, b, Role::Peer));
        assert!(!should_dial(b, Role::Peer, a, Role::Peer));
    }
}
