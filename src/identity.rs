//! A node's long-term identity: an X25519 key pair, and the [`PeerId`]
//! derived from its public key.
//!
//! Why: an id that comes from a key can be kept across restarts by keeping
//! the key (a file), and it is what the encrypted sessions of protocol
//! version 2 prove: only the holder of the private key can complete a
//! Noise handshake under that public key, so only it can present the id.
//! (In insecure plaintext mode an identity gives a stable id and a
//! fingerprint to compare, not proof.)
//!
//! The id is the first 8 bytes, big-endian, of BLAKE2s-256 of the 32-byte
//! public key (`docs/PROTOCOL.md`, "Identities"). The key file holds the
//! private key only, as 64 hex digits after a header line, readable by its
//! owner only.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use blake2::{Blake2s256, Digest};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::peer::PeerId;

/// The first line of an identity file.
const HEADER: &str = "lanbeat-identity-v1";

/// A node's key pair. Cloning copies the private key; [`fmt::Debug`]
/// shows the id and the fingerprint, never the key.
#[derive(Clone)]
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
}

/// Why an identity file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The file is not an identity file (or was damaged): nothing was
    /// changed; fix or remove it.
    #[error("identity file {path} is not a lanbeat identity: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A fleet key file that does not hold a key.
    #[error("fleet key file {path}: {why}")]
    FleetKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// A pre-shared key for a fleet: with one in [`Config::fleet_key`], a node
/// hears, answers and opens sessions with nodes that hold the same key
/// only (discovery datagrams carry a MAC under a key derived from it; it
/// is mixed into the Noise handshake, `Noise_XXpsk0`, so a node without it
/// cannot complete or even start one). 32 random bytes, shared out of band.
///
/// [`Config::fleet_key`]: crate::Config::fleet_key
#[derive(Clone, PartialEq, Eq)]
pub struct FleetKey([u8; 32]);

impl FleetKey {
    /// A new random key (to share with the other nodes of the fleet).
    pub fn generate() -> FleetKey {
        FleetKey(rand::random())
    }

    /// The key from its 32 bytes.
    pub fn from_bytes(key: [u8; 32]) -> FleetKey {
        FleetKey(key)
    }

    /// The key's 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Loads a key kept in a file as 64 hex digits (surrounding white
    /// space ignored).
    ///
    /// # Errors
    /// [`IdentityError::Io`] when the file cannot be read,
    /// [`IdentityError::FleetKey`] when it does not hold 64 hex digits.
    pub fn load(path: impl AsRef<Path>) -> Result<FleetKey, IdentityError> {
        let path = path.as_ref();
        let text = read(path)?;
        parse_hex32(text.trim())
            .map(FleetKey)
            .ok_or_else(|| IdentityError::FleetKey {
                path: path.to_owned(),
                why: "not 64 hex digits",
            })
    }
}

/// Never shows the key.
impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

impl Identity {
    /// A new key pair from the operating system's randomness (through
    /// `rand`'s thread generator, a CSPRNG seeded by the OS).
    pub fn generate() -> Identity {
        Identity::from_secret(rand::random())
    }

    /// The identity of a 32-byte X25519 private key.
    pub fn from_secret(secret: [u8; 32]) -> Identity {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        Identity { secret, public }
    }

    /// The 32-byte X25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The 32-byte private key, for a Noise library (keep it secret).
    pub fn secret_key(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The id this identity presents: derived from its public key.
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_public_key(&self.public_key())
    }

    /// A short text to compare by eye or read out: the first 16 bytes of
    /// BLAKE2s-256 of the public key, as eight groups of four hex digits.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key())
    }

    /// Loads the identity kept in `path`.
    ///
    /// # Errors
    /// [`IdentityError::Io`] when the file cannot be read,
    /// [`IdentityError::Malformed`] when it is not an identity file.
    pub fn load(path: impl AsRef<Path>) -> Result<Identity, IdentityError> {
        let path = path.as_ref();
        let text = read(path)?;
        let bad = |why| IdentityError::Malformed {
            path: path.to_owned(),
            why,
        };
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        if lines.next().map(str::trim) != Some(HEADER) {
            return Err(bad("the first line is not `lanbeat-identity-v1`"));
        }
        let hex = lines.next().map(str::trim).ok_or_else(|| bad("no key"))?;
        if lines.next().is_some() {
            return Err(bad("more than a header and a key"));
        }
        let secret = parse_hex32(hex).ok_or_else(|| bad("the key is not 64 hex digits"))?;
        Ok(Identity::from_secret(secret))
    }

    /// Writes the identity to `path`, replacing the file, readable and
    /// writable by its owner only (mode 0600 on Unix). The file is written
    /// beside `path` first and then renamed, so a crash leaves the old one.
    ///
    /// # Errors
    /// [`IdentityError::Io`] when it cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), IdentityError> {
        let path = path.as_ref();
        let io = |source| IdentityError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io)?;
        let hex: String = self
            .secret_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        writeln!(f, "{HEADER}\n{hex}").map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Loads the identity kept in `path`, or makes a new one and keeps it
    /// there if the file does not exist: same file, same id.
    ///
    /// # Errors
    /// As [`Identity::load`] and [`Identity::save`]; an existing file that
    /// is not an identity is an error, never overwritten.
    pub fn load_or_create(path: impl AsRef<Path>) -> Result<Identity, IdentityError> {
        let path = path.as_ref();
        match Identity::load(path) {
            Err(IdentityError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                let id = Identity::generate();
                id.save(path)?;
                Ok(id)
            }
            other => other,
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Identity) -> bool {
        self.public == other.public
    }
}

impl Eq for Identity {}

impl PeerId {
    /// The id of the node holding the private key of `public_key` (an
    /// X25519 public key): the first 8 bytes, big-endian, of its
    /// BLAKE2s-256 hash.
    pub fn from_public_key(public_key: &[u8; 32]) -> PeerId {
        let hash = Blake2s256::digest(public_key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        PeerId::from_u64(u64::from_be_bytes(first))
    }
}

/// The fingerprint of a public key (see [`Identity::fingerprint`]).
pub fn fingerprint(public_key: &[u8; 32]) -> String {
    let hash = Blake2s256::digest(public_key);
    hash[..16]
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join("-")
}

/// A key file's text.
fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lanbeat-{}-{name}", std::process::id()))
    }

    #[test]
    fn the_same_file_gives_the_same_id() {
        let path = temp_path("same");
        let _ = std::fs::remove_file(&path);
        let first = Identity::load_or_create(&path).unwrap();
        let again = Identity::load_or_create(&path).unwrap();
        assert_eq!(first, again);
        assert_eq!(first.peer_id(), again.peer_id());
        assert_eq!(first.fingerprint(), again.fingerprint());
        // A new identity is another id.
        assert_ne!(Identity::generate().peer_id(), first.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_id_and_fingerprint_derive_from_the_public_key() {
        // RFC 7748's test key pair (Alice): fixed inputs, fixed outputs.
        let secret =
            parse_hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let id = Identity::from_secret(secret);
        let public: String = id.public_key().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            public,
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let hash = Blake2s256::digest(id.public_key());
        let expected = u64::from_be_bytes(hash[..8].try_into().unwrap());
        assert_eq!(id.peer_id(), PeerId::from_u64(expected));
        // As docs/PROTOCOL.md §5 shows them.
        assert_eq!(id.peer_id().to_string(), "156c329c9ca9dea7");
        assert_eq!(id.fingerprint(), "156c-329c-9ca9-dea7-d5cd-d2c4-e5c3-b25f");
        let fp = id.fingerprint();
        assert_eq!(fp.len(), 8 * 4 + 7);
        assert!(fp.starts_with(&format!("{:02x}{:02x}-", hash[0], hash[1])));
        // The key never shows in debug output.
        let shown = format!("{id:?}");
        assert!(!shown.contains("77076d0a"), "{shown}");
        assert!(shown.contains(&id.peer_id().to_string()), "{shown}");
    }

    #[test]
    fn a_file_that_is_not_an_identity_is_refused_and_kept() {
        let path = temp_path("bad");
        for (content, why) in [
            ("hello\n", "the first line is not `lanbeat-identity-v1`"),
            ("lanbeat-identity-v1\n", "no key"),
            ("lanbeat-identity-v1\nzz\n", "the key is not 64 hex digits"),
            (
                "lanbeat-identity-v1\n0000000000000000000000000000000000000000000000000000000000000000\nextra\n",
                "more than a header and a key",
            ),
        ] {
            std::fs::write(&path, content).unwrap();
            match Identity::load_or_create(&path) {
                Err(IdentityError::Malformed { why: w, .. }) => assert_eq!(w, why),
                other => panic!("{content:?}: {other:?}"),
            }
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                content,
                "never overwritten"
            );
        }
        std::fs::remove_file(&path).unwrap();
        match Identity::load(temp_path("missing")) {
            Err(IdentityError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("{other:?}"),
        }
    }
}
