//! Wire formats: discovery datagrams and session frames. Pure code, no IO.
//! `docs/PROTOCOL.md` is the normative description.

pub mod discovery;
pub mod frame;

/// The protocol version of a node with encrypted sessions (the default):
/// discovery datagrams carry it, sessions start with a Noise handshake and
/// run inside its records.
pub const PROTOCOL_VERSION: u8 = 2;

/// The protocol version of a node in insecure plaintext mode
/// ([`Security::InsecurePlaintext`](crate::config::Security)): the same
/// datagrams and frames, on bare TCP. Nodes of the two versions ignore each
/// other's datagrams.
pub const PLAINTEXT_PROTOCOL_VERSION: u8 = 1;

/// The versions whose hello and datagram formats this crate can read (a
/// node accepts only its own, but tells another known version from garbage).
pub(crate) const KNOWN_VERSIONS: [u8; 2] = [PLAINTEXT_PROTOCOL_VERSION, PROTOCOL_VERSION];

/// Serde helper: a `u64` as 1 to 16 hex digits (JSON numbers lose precision
/// above 2^53 in many languages).
pub(crate) mod hex64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:016x}"))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        crate::peer::parse_hex_u64(&s).ok_or_else(|| serde::de::Error::custom("expected hex u64"))
    }
}
