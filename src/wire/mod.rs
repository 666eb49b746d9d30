//! Wire formats: discovery datagrams and session frames. Pure code, no IO.
//! `docs/PROTOCOL.md` is the normative description.

pub mod discovery;
pub mod frame;

/// The protocol version this crate speaks, in datagrams and handshakes.
pub const PROTOCOL_VERSION: u8 = 1;

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
