//! The transport keys of a completed Noise handshake, one per direction,
//! in the session's stream.
//!
//! What a heartbeat costs a server of 10 000 idle sessions is mostly the
//! cache misses on the session's own state, so this keeps that state
//! small (docs/DESIGN.md, "Transport keys"; docs/BENCHMARKS.md, eighteenth
//! round):
//!
//! - No shared transport state: snow's `StatelessTransportState` keeps
//!   both ciphers in boxes of a struct that the stream and the liveness
//!   datagrams would share behind an `Arc` (two dependent misses before
//!   the key). The stream holds its two directions itself; the session's
//!   datagrams ([`super::datagram`]) key a cipher from the same split keys
//!   when they need one.
//! - ChaCha20-Poly1305 keys as their 32 bytes: snow's ring cipher holds
//!   ring's prepared key, about 540 bytes of which a message reads two
//!   lines. Preparing a ChaCha20 key is a copy, so each message keys the
//!   thread's one snow cipher (hot in the cache) with the session's 32
//!   bytes instead: about 35 ns more per message while hot, two misses
//!   fewer while cold. An AES-256-GCM key is expanded when prepared
//!   (about 140 ns), so AES sessions keep snow's prepared cipher.
//!
//! The ciphers, the nonce encoding and the Noise `ENCRYPT`/`DECRYPT`
//! functions are snow's (`snow::types::Cipher`, resolved as snow's builder
//! resolves them); this module only applies the rules of snow's transport
//! state around them: the nonce 2^64 − 1 is never used, a message is at
//! most 65 535 bytes and at least its tag, and an output buffer too small
//! is an error, not a panic.

use snow::params::CipherChoice;
use snow::types::Cipher as SnowCipher;
use zeroize::Zeroizing;

use super::noise::Cipher;

/// The authentication tag of every transport message.
const TAG: usize = 16;
/// The largest Noise message.
const MAX_MESSAGE: usize = 65535;

/// The two keys `Split()` leaves at the end of a handshake (Noise §5.2),
/// as this side uses them: the first seals what we send, the second opens
/// what we receive. Wiped from memory when dropped.
pub(crate) struct SplitKeys {
    cipher: Cipher,
    send: Zeroizing<[u8; 32]>,
    recv: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SplitKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitKeys")
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl SplitKeys {
    /// The keys of a finished handshake `hs` of `cipher`; `None` if it is
    /// not finished. The initiator sends with the first key of the split,
    /// the responder with the second (as snow's transport states do).
    pub(crate) fn of(hs: &mut snow::HandshakeState, cipher: Cipher) -> Option<SplitKeys> {
        if !hs.is_handshake_finished() {
            return None;
        }
        let initiator = hs.is_initiator();
        let (k1, k2) = hs.dangerously_get_raw_split();
        let (k1, k2) = (Zeroizing::new(k1), Zeroizing::new(k2));
        let (send, recv) = if initiator { (k1, k2) } else { (k2, k1) };
        Some(SplitKeys { cipher, send, recv })
    }

    /// The ciphers of both directions, for the stream.
    pub(crate) fn transport(&self) -> Option<TransportKeys> {
        Some(TransportKeys {
            send: self.sealer()?,
            recv: self.opener()?,
        })
    }

    /// A cipher that seals what we send.
    pub(crate) fn sealer(&self) -> Option<Sealer> {
        Keyed::new(self.cipher, &self.send).map(Sealer)
    }

    /// A cipher that opens what we receive.
    pub(crate) fn opener(&self) -> Option<Opener> {
        Keyed::new(self.cipher, &self.recv).map(Opener)
    }
}

/// snow's cipher for `cipher`, keyed: ring's with the `ring` feature (as
/// snow's builder picks it then), else snow's default (RustCrypto).
fn resolve(cipher: Cipher, key: &[u8; 32]) -> Option<Box<dyn SnowCipher>> {
    use snow::resolvers::CryptoResolver;
    let choice = match cipher {
        Cipher::ChaChaPoly => CipherChoice::ChaChaPoly,
        Cipher::AesGcm => CipherChoice::AESGCM,
    };
    #[cfg(feature = "ring")]
    let c = snow::resolvers::RingResolver
        .resolve_cipher(&choice)
        .or_else(|| snow::resolvers::DefaultResolver.resolve_cipher(&choice));
    #[cfg(not(feature = "ring"))]
    let c = snow::resolvers::DefaultResolver.resolve_cipher(&choice);
    let mut c = c?;
    c.set(key);
    Some(c)
}

thread_local! {
    /// One ChaCha20-Poly1305 cipher of snow's per thread, keyed anew for
    /// each message of a session that holds only its 32-byte key. It
    /// holds the last message's key until the next one: no longer than
    /// snow's own ciphers hold theirs (they are not wiped either).
    static CHACHA: std::cell::RefCell<Option<Box<dyn SnowCipher>>> =
        const { std::cell::RefCell::new(None) };
}

/// One direction's key: ChaCha20-Poly1305's 32 bytes, keyed into the
/// thread's cipher per message (setting a ChaCha key is a copy), or
/// AES-256-GCM's prepared cipher (setting an AES key expands it).
enum Keyed {
    ChaCha(Zeroizing<[u8; 32]>),
    Prepared {
        cipher: Box<dyn SnowCipher>,
        /// The key, for [`InPlace`].
        #[cfg(feature = "ring")]
        key: Zeroizing<[u8; 32]>,
    },
}

impl Keyed {
    fn new(cipher: Cipher, key: &[u8; 32]) -> Option<Keyed> {
        match cipher {
            // snow always has ChaCha20-Poly1305 (RustCrypto's without
            // ring): a thread's cipher is resolved on its first message.
            Cipher::ChaChaPoly => Some(Keyed::ChaCha(Zeroizing::new(*key))),
            Cipher::AesGcm => resolve(cipher, key).map(|cipher| Keyed::Prepared {
                cipher,
                #[cfg(feature = "ring")]
                key: Zeroizing::new(*key),
            }),
        }
    }

    /// Runs `f` with this direction's cipher, keyed; `None` if snow has no
    /// cipher (or, never in practice, `f` runs inside another `with`).
    fn with<R>(&self, f: impl FnOnce(&dyn SnowCipher) -> R) -> Option<R> {
        match self {
            Keyed::Prepared { cipher, .. } => Some(f(&**cipher)),
            Keyed::ChaCha(key) => CHACHA.with(|slot| {
                let mut slot = slot.try_borrow_mut().ok()?;
                match slot.as_mut() {
                    Some(c) => c.set(key),
                    // Resolved keyed with this message's key.
                    None => *slot = resolve(Cipher::ChaChaPoly, key),
                }
                Some(f(&**slot.as_ref()?))
            }),
        }
    }
}

/// The cipher of what we send.
pub(crate) struct Sealer(Keyed);

/// The cipher of what we receive.
pub(crate) struct Opener(Keyed);

impl Sealer {
    /// Seals `payload` under `nonce` into `out` (ciphertext, then the
    /// 16-byte tag); returns the message's length.
    pub(crate) fn seal(
        &self,
        nonce: u64,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = payload.len() + TAG;
        if nonce == u64::MAX || len > MAX_MESSAGE || len > out.len() {
            return Err(snow::Error::Input);
        }
        self.0
            .with(|c| c.encrypt(nonce, &[], payload, out))
            .ok_or(snow::Error::Input)
    }
}

impl Opener {
    /// Opens `message` (sealed under `nonce`) into `out`, which needs room
    /// for the plaintext (with room for the tag too, snow opens in place);
    /// returns the plaintext's length.
    pub(crate) fn open(
        &self,
        nonce: u64,
        message: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        if nonce == u64::MAX
            || message.len() > MAX_MESSAGE
            || message.len() < TAG
            || out.len() < message.len() - TAG
        {
            return Err(snow::Error::Decrypt);
        }
        self.0
            .with(|c| c.decrypt(nonce, &[], message, out))
            .unwrap_or(Err(snow::Error::Decrypt))
    }
}

impl Opener {
    /// ring's AEAD keyed for this direction, to open large records in
    /// place; `None` if ring refuses the key (never for 32 bytes).
    #[cfg(feature = "ring")]
    pub(crate) fn in_place(&self) -> Option<InPlace> {
        use ring::aead::{AES_256_GCM, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
        let (alg, key, chacha) = match &self.0 {
            Keyed::ChaCha(key) => (&CHACHA20_POLY1305, key, true),
            Keyed::Prepared { key, .. } => (&AES_256_GCM, key, false),
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, &key[..]).ok()?);
        Some(InPlace { key, chacha })
    }
}

/// One direction's cipher as ring's AEAD, which opens a message in place
/// and moves its plaintext to the front of the buffer as it goes: a record
/// read into the reader's buffer is opened there in one pass, where
/// snow's `decrypt` copies it to another buffer first. The same
/// ChaCha20-Poly1305 and AES-256-GCM that snow's ring resolver uses, with
/// Noise's nonce (§5.1 and §12: 32 zero bits, then the 64-bit counter,
/// little-endian for ChaChaPoly and big-endian for AESGCM) and empty
/// associated data, as snow's transport messages have; the same rules as
/// [`Opener::open`]. Made for one read and dropped (a ChaCha20 key is a
/// copy; an AES key is expanded, about 140 ns per read of up to 64 KiB).
#[cfg(feature = "ring")]
pub(crate) struct InPlace {
    key: ring::aead::LessSafeKey,
    chacha: bool,
}

#[cfg(feature = "ring")]
impl InPlace {
    /// Opens the message at `buf[from..]` (ciphertext, then its tag),
    /// sealed under `nonce`, into the front of `buf`; returns the
    /// plaintext's length.
    pub(crate) fn open_within(
        &self,
        nonce: u64,
        buf: &mut [u8],
        from: usize,
    ) -> Result<usize, snow::Error> {
        let len = buf.len().saturating_sub(from);
        if nonce == u64::MAX || from > buf.len() || !(TAG..=MAX_MESSAGE).contains(&len) {
            return Err(snow::Error::Decrypt);
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&if self.chacha {
            nonce.to_le_bytes()
        } else {
            nonce.to_be_bytes()
        });
        self.key
            .open_within(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::empty(),
                buf,
                from..,
            )
            .map(|plain| plain.len())
            .map_err(|_| snow::Error::Decrypt)
    }
}

/// The stream's ciphers, one per direction.
pub(crate) struct TransportKeys {
    pub(crate) send: Sealer,
    pub(crate) recv: Opener,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::noise::{NoiseKeys, run_in_memory};

    /// Both ends of a handshake of `cipher`, finished in memory.
    fn finished(cipher: Cipher) -> (snow::HandshakeState, snow::HandshakeState) {
        let (a, b) = (
            NoiseKeys::new([1; 32], None, "transport"),
            NoiseKeys::new([2; 32], None, "transport"),
        );
        let (mut i, mut r) = (
            a.state_with(true, cipher).unwrap(),
            b.state_with(false, cipher).unwrap(),
        );
        run_in_memory(&mut i, &mut r);
        (i, r)
    }

    /// The keys seal and open exactly as snow's own transport state of
    /// the same handshake, in both directions, for both ciphers: a peer
    /// using any Noise library's transport reads what we send. Each step
    /// uses another key than the one before, so the thread's ChaCha20
    /// cipher is keyed anew every time.
    #[test]
    fn the_same_messages_as_snows_transport_state() {
        for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
            let (mut i, mut r) = finished(cipher);
            let ours_i = SplitKeys::of(&mut i, cipher).unwrap().transport().unwrap();
            let ours_r = SplitKeys::of(&mut r, cipher).unwrap().transport().unwrap();
            let snow_i = i.into_stateless_transport_mode().unwrap();
            let snow_r = r.into_stateless_transport_mode().unwrap();
            for nonce in [0, 1, 7, 1 << 32, (1 << 63) + 5, u64::MAX - 1] {
                let payload = b"a heartbeat or a message";
                let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
                let n = ours_i.send.seal(nonce, payload, &mut a).unwrap();
                let m = snow_i.write_message(nonce, payload, &mut b).unwrap();
                assert_eq!(a[..n], b[..m], "{cipher:?} initiator, nonce {nonce}");
                let mut out = [0u8; 64];
                let k = snow_r.read_message(nonce, &a[..n], &mut out).unwrap();
                assert_eq!(&out[..k], payload);
                let n = ours_r.send.seal(nonce, payload, &mut a).unwrap();
                let m = snow_r.write_message(nonce, payload, &mut b).unwrap();
                assert_eq!(a[..n], b[..m], "{cipher:?} responder, nonce {nonce}");
                let k = ours_i.recv.open(nonce, &a[..n], &mut out).unwrap();
                assert_eq!(&out[..k], payload);
                // Under another nonce it does not open.
                assert!(ours_i.recv.open(nonce ^ 1, &a[..n], &mut out).is_err());
            }
        }
    }

    /// What snow's transport state refuses is refused here too, without
    /// a panic: the reserved nonce, a message shorter than its tag or
    /// longer than 65 535 bytes, an output too small, an unfinished
    /// handshake.
    #[test]
    fn bad_input_is_an_error() {
        let cipher = Cipher::ChaChaPoly;
        let (mut i, mut r) = finished(cipher);
        let (ti, tr) = (
            SplitKeys::of(&mut i, cipher).unwrap().transport().unwrap(),
            SplitKeys::of(&mut r, cipher).unwrap().transport().unwrap(),
        );
        let mut out = [0u8; 64];
        assert!(ti.send.seal(u64::MAX, b"x", &mut out).is_err());
        assert!(ti.send.seal(0, b"x", &mut out[..16]).is_err());
        assert!(ti.send.seal(0, &vec![0; MAX_MESSAGE], &mut out).is_err());
        let n = ti.send.seal(3, b"x", &mut out).unwrap();
        let sealed = out[..n].to_vec();
        assert!(tr.recv.open(u64::MAX, &sealed, &mut out).is_err());
        assert!(tr.recv.open(3, &sealed[..15], &mut out).is_err());
        assert!(tr.recv.open(3, &sealed, &mut []).is_err());
        assert!(
            tr.recv
                .open(3, &vec![0; MAX_MESSAGE + 1], &mut out)
                .is_err()
        );
        assert_eq!(tr.recv.open(3, &sealed, &mut out).unwrap(), 1);
        let a = NoiseKeys::new([1; 32], None, "transport");
        let mut unfinished = a.state_with(true, cipher).unwrap();
        assert!(SplitKeys::of(&mut unfinished, cipher).is_none());
    }

    /// Opening in place (ring's AEAD, the receiver's large reads) takes
    /// exactly what snow's transport state sealed, for both ciphers, at any
    /// shift of the plaintext toward the front, and nothing altered or
    /// under another nonce.
    #[cfg(feature = "ring")]
    #[test]
    fn in_place_opens_what_snow_sealed_and_nothing_else() {
        for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
            let (i, mut r) = finished(cipher);
            let ours_r = SplitKeys::of(&mut r, cipher).unwrap().transport().unwrap();
            let snow_i = i.into_stateless_transport_mode().unwrap();
            let key = ours_r.recv.in_place().unwrap();
            for (nonce, len, shift) in [(0, 0, 0), (1, 1, 2), (7, 1000, 18), (1 << 40, 65519, 3)] {
                let payload: Vec<u8> = (0..len).map(|k| (k * 31 % 251) as u8).collect();
                let mut sealed = vec![0u8; len + TAG];
                let n = snow_i.write_message(nonce, &payload, &mut sealed).unwrap();
                let mut buf = vec![0xAA; shift];
                buf.extend_from_slice(&sealed[..n]);
                let got = key.open_within(nonce, &mut buf, shift).unwrap();
                assert_eq!(&buf[..got], &payload[..], "{cipher:?} nonce {nonce}");
                // Another nonce, a flipped bit, a cut tag: refused.
                let mut again = vec![0; shift];
                again.extend_from_slice(&sealed[..n]);
                assert!(
                    key.open_within(nonce + 1, &mut again.clone(), shift)
                        .is_err()
                );
                let last = again.len() - 1;
                again[last] ^= 1;
                assert!(key.open_within(nonce, &mut again.clone(), shift).is_err());
                assert!(key.open_within(nonce, &mut again[..last], shift).is_err());
            }
            let mut short = [0u8; 20];
            assert!(key.open_within(0, &mut short, 5).is_err());
            assert!(key.open_within(u64::MAX, &mut [0u8; 40], 0).is_err());
            assert!(key.open_within(0, &mut [0u8; 40], 41).is_err());
        }
    }
}
