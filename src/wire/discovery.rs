//! Discovery datagrams: probe, announce, goodbye.
//!
//! Layout: 4 bytes magic `LNBT`, 1 byte protocol version, 1 byte kind, then a
//! UTF-8 JSON object. The whole datagram is size-checked before anything is
//! parsed, so decoding allocates at most about its size.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::PROTOCOL_VERSION;
use crate::error::DatagramError;
use crate::peer::{PeerId, Role};

/// First four bytes of every lanbeat datagram.
pub const MAGIC: [u8; 4] = *b"LNBT";
/// Bytes before the JSON body: magic, version, kind.
pub const HEADER_LEN: usize = 6;

const KIND_PROBE: u8 = 1;
const KIND_ANNOUNCE: u8 = 2;
const KIND_GOODBYE: u8 = 3;

/// Size limits applied when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DatagramLimits {
    /// Largest datagram accepted, header included.
    pub max_size: usize,
    /// Longest service or node name, in bytes.
    pub max_text_len: usize,
    /// Most metadata entries.
    pub max_meta_entries: usize,
    /// Longest metadata key, in bytes.
    pub max_meta_key: usize,
    /// Longest metadata value, in bytes.
    pub max_meta_value: usize,
    /// The protocol version accepted (a node's own): datagrams of another
    /// are dropped.
    pub protocol: u8,
}

impl Default for DatagramLimits {
    fn default() -> Self {
        DatagramLimits {
            max_size: 1200,
            max_text_len: 64,
            max_meta_entries: 16,
            max_meta_key: 64,
            max_meta_value: 256,
            protocol: PROTOCOL_VERSION,
        }
    }
}

/// "Who of `service` is there?" Broadcast by probing nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probe {
    /// Service name.
    pub service: String,
    /// Sender id.
    pub id: PeerId,
    /// Sender instance.
    pub instance: u64,
    /// Sender role.
    pub role: Role,
    /// Peers the sender holds a session with (at most [`MAX_KNOWN`]): they
    /// need not answer (known-answer suppression, so that steady-state
    /// discovery does not grow with the number of nodes).
    pub known: Vec<PeerId>,
}

/// Most ids a probe lists in `known`.
pub const MAX_KNOWN: usize = 40;

/// "Here I am." Unicast in reply to a probe, or broadcast once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Announce {
    /// Service name.
    pub service: String,
    /// Sender id.
    pub id: PeerId,
    /// Sender instance; changes on every restart.
    pub instance: u64,
    /// Sender role.
    pub role: Role,
    /// Sender's human-readable name.
    pub name: String,
    /// TCP port the sender accepts sessions on.
    pub port: u16,
    /// Small string key/values.
    pub metadata: BTreeMap<String, String>,
    /// Protocol 2: the sender has AES instructions and takes sessions
    /// sealed with AES-256-GCM (PROTOCOL.md §6, "Cipher").
    pub aes_gcm: bool,
}

/// "I am leaving." Broadcast by a node that stops gracefully.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Goodbye {
    /// Service name.
    pub service: String,
    /// Sender id.
    pub id: PeerId,
    /// Sender instance.
    pub instance: u64,
}

/// A decoded discovery datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Datagram {
    /// See [`Probe`].
    Probe(Probe),
    /// See [`Announce`].
    Announce(Announce),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
}

/// The JSON body shared by all kinds; which fields are required depends on
/// the kind.
#[derive(Serialize, Deserialize)]
struct Body {
    service: String,
    id: PeerId,
    #[serde(with = "super::hex64")]
    instance: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    known: Option<Vec<PeerId>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    aesgcm: bool,
}

impl Datagram {
    /// Sender id.
    pub fn id(&self) -> PeerId {
        match self {
            Datagram::Probe(p) => p.id,
            Datagram::Announce(a) => a.id,
            Datagram::Goodbye(g) => g.id,
        }
    }

    /// Service name.
    pub fn service(&self) -> &str {
        match self {
            Datagram::Probe(p) => &p.service,
            Datagram::Announce(a) => &a.service,
            Datagram::Goodbye(g) => &g.service,
        }
    }

    /// Encodes into a new buffer, as protocol version 2
    /// ([`PROTOCOL_VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(PROTOCOL_VERSION)
    }

    /// Encodes into a new buffer, with the given protocol version in the
    /// header (the body is the same in versions 1 and 2).
    pub fn encode_as(&self, protocol: u8) -> Vec<u8> {
        let (kind, body) = match self {
            Datagram::Probe(p) => (
                KIND_PROBE,
                Body {
                    service: p.service.clone(),
                    id: p.id,
                    instance: p.instance,
                    role: Some(p.role),
                    name: None,
                    port: None,
                    meta: None,
                    known: (!p.known.is_empty()).then(|| p.known.clone()),
                    aesgcm: false,
                },
            ),
            Datagram::Announce(a) => (
                KIND_ANNOUNCE,
                Body {
                    service: a.service.clone(),
                    id: a.id,
                    instance: a.instance,
                    role: Some(a.role),
                    name: Some(a.name.clone()),
                    port: Some(a.port),
                    meta: (!a.metadata.is_empty()).then(|| a.metadata.clone()),
                    known: None,
                    aesgcm: a.aes_gcm,
                },
            ),
            Datagram::Goodbye(g) => (
                KIND_GOODBYE,
                Body {
                    service: g.service.clone(),
                    id: g.id,
                    instance: g.instance,
                    role: None,
                    name: None,
                    port: None,
                    meta: None,
                    known: None,
                    aesgcm: false,
                },
            ),
        };
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&MAGIC);
        out.push(protocol);
        out.push(kind);
        serde_json::to_writer(&mut out, &body)
            .expect("serializing strings and numbers cannot fail");
        out
    }

    /// Decodes one datagram, enforcing `limits` before and after parsing.
    ///
    /// # Errors
    /// A [`DatagramError`] saying why the datagram must be dropped.
    pub fn decode(buf: &[u8], limits: &DatagramLimits) -> Result<Datagram, DatagramError> {
        if buf.len() > limits.max_size {
            return Err(DatagramError::TooLarge(buf.len()));
        }
        if buf.len() < HEADER_LEN || buf[..4] != MAGIC {
            return Err(DatagramError::NotLanbeat);
        }
        if buf[4] != limits.protocol {
            return Err(DatagramError::Version(buf[4]));
        }
        let kind = buf[5];
        if !(KIND_PROBE..=KIND_GOODBYE).contains(&kind) {
            return Err(DatagramError::Kind(kind));
        }
        let body: Body =
            serde_json::from_slice(&buf[HEADER_LEN..]).map_err(|_| DatagramError::Malformed)?;
        let text_ok = |s: &str| s.len() <= limits.max_text_len;
        if body.service.is_empty() || !text_ok(&body.service) {
            return Err(DatagramError::Malformed);
        }
        let role = body.role.unwrap_or_default();
        Ok(match kind {
            KIND_PROBE => {
                let known = body.known.unwrap_or_default();
                if known.len() > MAX_KNOWN {
                    return Err(DatagramError::Malformed);
                }
                Datagram::Probe(Probe {
                    service: body.service,
                    id: body.id,
                    instance: body.instance,
                    role,
                    known,
                })
            }
            KIND_ANNOUNCE => {
                let (Some(name), Some(port)) = (body.name, body.port) else {
                    return Err(DatagramError::Malformed);
                };
                let metadata = body.meta.unwrap_or_default();
                let meta_ok = metadata.len() <= limits.max_meta_entries
                    && metadata.iter().all(|(k, v)| {
                        k.len() <= limits.max_meta_key && v.len() <= limits.max_meta_value
                    });
                if !text_ok(&name) || port == 0 || !meta_ok {
                    return Err(DatagramError::Malformed);
                }
                Datagram::Announce(Announce {
                    service: body.service,
                    id: body.id,
                    instance: body.instance,
                    role,
                    name,
                    port,
                    metadata,
                    aes_gcm: body.aesgcm,
                })
            }
            _ => Datagram::Goodbye(Goodbye {
                service: body.service,
                id: body.id,
                instance: body.instance,
            }),
        })
    }
}

impl Announce {
    /// Size of this announce once encoded.
    pub fn encoded_len(&self) -> usize {
        Datagram::Announce(self.clone()).encode().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn announce() -> Announce {
        Announce {
            service: "lamps".into(),
            id: PeerId::from_u64(0x1234),
            instance: u64::MAX,
            role: Role::Device,
            name: "kitchen".into(),
            port: 4242,
            metadata: [("fw".to_owned(), "1.2".to_owned())].into(),
            aes_gcm: false,
        }
    }

    #[test]
    fn documented_example_decodes() {
        // The worked example of docs/PROTOCOL.md.
        let mut bytes = b"LNBT\x02\x02".to_vec();
        bytes.extend_from_slice(br#"{"service":"lamps","id":"0000000000001234","instance":"ffffffffffffffff","role":"device","name":"kitchen","port":4242,"meta":{"fw":"1.2"}}"#);
        let d = Datagram::decode(&bytes, &DatagramLimits::default()).unwrap();
        assert_eq!(d, Datagram::Announce(announce()));
        assert_eq!(d.encode(), bytes);
    }

    #[test]
    fn rejects_with_precise_reasons() {
        let l = DatagramLimits::default();
        let good = Datagram::Announce(announce()).encode();
        assert_eq!(
            Datagram::decode(&vec![0; 1201], &l),
            Err(DatagramError::TooLarge(1201))
        );
        assert_eq!(Datagram::decode(b"LNB", &l), Err(DatagramError::NotLanbeat));
        assert_eq!(
            Datagram::decode(b"HTTP/1.1", &l),
            Err(DatagramError::NotLanbeat)
        );
        let mut v3 = good.clone();
        v3[4] = 3;
        assert_eq!(Datagram::decode(&v3, &l), Err(DatagramError::Version(3)));
        // A plaintext node (protocol 1) and an encrypted one ignore each
        // other's datagrams.
        let plain = DatagramLimits { protocol: 1, ..l };
        assert_eq!(
            Datagram::decode(&good, &plain),
            Err(DatagramError::Version(2))
        );
        let v1 = Datagram::Announce(announce()).encode_as(1);
        assert_eq!(Datagram::decode(&v1, &l), Err(DatagramError::Version(1)));
        assert_eq!(
            Datagram::decode(&v1, &plain),
            Ok(Datagram::Announce(announce()))
        );
        let mut k = good.clone();
        k[5] = 9;
        assert_eq!(Datagram::decode(&k, &l), Err(DatagramError::Kind(9)));
        for cut in [HEADER_LEN, good.len() / 2, good.len() - 1] {
            assert_eq!(
                Datagram::decode(&good[..cut], &l),
                Err(DatagramError::Malformed),
                "truncated at {cut}"
            );
        }
        let no_port =
            b"LNBT\x02\x02{\"service\":\"s\",\"id\":\"1\",\"instance\":\"1\",\"name\":\"n\"}";
        assert_eq!(Datagram::decode(no_port, &l), Err(DatagramError::Malformed));
        let long_name = Datagram::Announce(Announce {
            name: "x".repeat(65),
            ..announce()
        })
        .encode();
        assert_eq!(
            Datagram::decode(&long_name, &l),
            Err(DatagramError::Malformed)
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let d = b"LNBT\x02\x01{\"service\":\"s\",\"id\":\"a\",\"instance\":\"b\",\"future\":[1,2]}";
        let p = Datagram::decode(d, &DatagramLimits::default()).unwrap();
        assert_eq!(p.id(), PeerId::from_u64(10));
    }

    fn arb_text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9 _\\-é\"\\\\]{1,20}"
    }

    proptest! {
        #[test]
        fn round_trip(service in arb_text(), name in arb_text(), id: u64, instance: u64,
                      port in 1u16.., kind in 0u8..3, role in 0u8..3,
                      meta in proptest::collection::btree_map(arb_text(), arb_text(), 0..4)) {
            let role = [Role::Peer, Role::Controller, Role::Device][role as usize];
            let id = PeerId::from_u64(id);
            let d = match kind {
                0 => Datagram::Probe(Probe { service, id, instance, role, known: vec![PeerId::from_u64(id.as_u64() ^ 1)] }),
                1 => Datagram::Announce(Announce { service, id, instance, role, name, port, metadata: meta, aes_gcm: id.as_u64().is_multiple_of(2) }),
                _ => Datagram::Goodbye(Goodbye { service, id, instance }),
            };
            let bytes = d.encode();
            prop_assert_eq!(Datagram::decode(&bytes, &DatagramLimits::default()), Ok(d));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = Datagram::decode(&bytes, &DatagramLimits::default());
        }

        #[test]
        fn garbage_after_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..600), kind in 0u8..5) {
            let mut bytes = b"LNBT\x01".to_vec();
            bytes.push(kind);
            bytes.extend(body);
            let _ = Datagram::decode(&bytes, &DatagramLimits::default());
        }
    }
}
