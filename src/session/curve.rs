//! X25519 for the Noise handshake from aws-lc-rs, with the `aws-lc`
//! feature: snow's own X25519 (curve25519-dalek, pure Rust) takes about
//! twice as long per Diffie-Hellman operation, and a handshake does three
//! on each side. Everything else (cipher, hash, randomness) stays with
//! snow's resolvers.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// A snow builder whose X25519 is aws-lc's; the rest as `Builder::new`
/// resolves it.
pub(crate) fn builder(params: snow::params::NoiseParams) -> snow::Builder<'static> {
    #[cfg(feature = "ring")]
    let rest: BoxedCryptoResolver = Box::new(FallbackResolver::new(
        Box::new(snow::resolvers::RingResolver),
        Box::new(DefaultResolver),
    ));
    #[cfg(not(feature = "ring"))]
    let rest: BoxedCryptoResolver = Box::new(DefaultResolver);
    snow::Builder::with_resolver(
        params,
        Box::new(FallbackResolver::new(Box::new(AwsLc), rest)),
    )
}

/// Resolves X25519 only.
struct AwsLc;

impl CryptoResolver for AwsLc {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| Box::new(Key::default()) as Box<dyn Dh>)
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// One X25519 key pair (a node's static key, or a handshake's ephemeral).
#[derive(Default)]
struct Key {
    /// `None` until a key is set or generated.
    key: Option<PrivateKey>,
    private: [u8; 32],
    public: [u8; 32],
}

impl Key {
    fn set_bytes(&mut self, private: [u8; 32]) {
        // Rejected only for a length other than 32; any 32 bytes are a
        // key (they are clamped, as RFC 7748 says).
        self.key = PrivateKey::from_private_key(&X25519, &private).ok();
        self.public = [0; 32];
        if let Some(public) = self.key.as_ref().and_then(|k| k.compute_public_key().ok())
            && let Ok(p) = <[u8; 32]>::try_from(public.as_ref())
        {
            self.public = p;
        }
        self.private = private;
    }
}

impl Dh for Key {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut private = [0; 32];
        let n = privkey.len().min(32);
        private[..n].copy_from_slice(&privkey[..n]);
        self.set_bytes(private);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut private = [0; 32];
        rng.try_fill_bytes(&mut private)?;
        self.set_bytes(private);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private
    }

    /// Fails for a peer key of small order (the shared secret would be
    /// all zeros), which the Noise specification allows (§12.1).
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?;
        let peer = UnparsedPublicKey::new(&X25519, pubkey.get(..32).ok_or(snow::Error::Dh)?);
        // A reference: aws-lc-rs before 1.19 takes no other form.
        #[allow(clippy::needless_borrows_for_generic_args)]
        agreement::agree(key, &peer, snow::Error::Dh, |secret| {
            out.get_mut(..32)
                .ok_or(snow::Error::Dh)?
                .copy_from_slice(secret);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same keys and shared secrets as curve25519-dalek's (which the
    /// node's id derives from, and peers without this feature use).
    #[test]
    fn agrees_with_curve25519_dalek() {
        for i in 0..64u8 {
            let (a, b) = ([i; 32], [i.wrapping_mul(31).wrapping_add(7); 32]);
            let (mut ka, mut kb) = (Key::default(), Key::default());
            ka.set(&a);
            kb.set(&b);
            let da = x25519_dalek::StaticSecret::from(a);
            let db = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(b));
            assert_eq!(ka.pubkey(), x25519_dalek::PublicKey::from(&da).as_bytes());
            assert_eq!(kb.pubkey(), db.as_bytes());
            let mut out = [0; 32];
            ka.dh(kb.pubkey(), &mut out).unwrap();
            assert_eq!(&out, da.diffie_hellman(&db).as_bytes());
        }
    }

    /// A peer key of small order (here u = 0, of order 2, and u = 1, of
    /// order 4) is refused instead of agreeing on zeros.
    #[test]
    fn a_small_order_peer_key_fails() {
        let mut k = Key::default();
        k.set(&[5; 32]);
        let mut out = [0; 32];
        assert!(k.dh(&[0; 32], &mut out).is_err());
        let mut one = [0; 32];
        one[0] = 1;
        assert!(k.dh(&one, &mut out).is_err());
        assert!(k.dh(&[0; 31], &mut out).is_err(), "too short");
    }
}
