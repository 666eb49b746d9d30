//! The transport cipher of an idle session: one seal and one open of a
//! 17-byte heartbeat under keys that are cold, as they are in a server
//! with thousands of sessions that each ping once a second.
//!
//! `cargo bench --bench cipher` prints, for both of the session ciphers
//! (ChaCha20-Poly1305 and AES-256-GCM) and for 1, 10 000 and 100 000
//! cipher pairs visited in random order (64 MiB of other memory written
//! between passes), the nanoseconds per seal + open of three ways to hold
//! the key behind snow's `Cipher` trait, and each as a ratio of snow's
//! ring cipher in the same run:
//!
//! - `snow ring`: snow's `RingResolver` cipher as snow's transport state
//!   holds it, which keeps ring's prepared key (about 540 bytes) per
//!   direction: what lanbeat's AES-256-GCM sessions hold (and its
//!   ChaCha20 sessions held before the eighteenth round);
//! - `snow default`: snow's `DefaultResolver` (RustCrypto's
//!   `chacha20poly1305` and `aes-gcm`), 32 bytes per direction, the
//!   cipher keyed on each call;
//! - `ring per call`: 32 bytes per direction, ring's key prepared on each
//!   call: what lanbeat's ChaCha20 sessions do (through one snow cipher per
//!   thread, keyed per message: src/session/transport.rs).
//!
//! The AES rows are why AES sessions keep the prepared key: expanding an
//! AES key costs more than the misses on the prepared one. This bench
//! sees only the cipher's own lines; the session's other state is
//! measured by `bench -- scale` (docs/BENCHMARKS.md, eighteenth and
//! nineteenth rounds).

use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use snow::params::CipherChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver, RingResolver};
use snow::types::Cipher;
use std::time::{Duration, Instant};

const TAG: usize = 16;

/// ChaCha20-Poly1305 or AES-256-GCM keeping only the key: ring's key is
/// prepared on each call.
struct PerCall {
    key: [u8; 32],
    aes: bool,
}

impl PerCall {
    fn key(&self) -> LessSafeKey {
        let alg = if self.aes {
            &AES_256_GCM
        } else {
            &CHACHA20_POLY1305
        };
        LessSafeKey::new(UnboundKey::new(alg, &self.key).expect("32-byte key"))
    }

    /// Noise's nonce: 4 zero bytes, then the counter, little-endian for
    /// ChaChaPoly and big-endian for AESGCM.
    fn nonce(&self, n: u64) -> Nonce {
        let mut b = [0u8; 12];
        if self.aes {
            b[4..].copy_from_slice(&n.to_be_bytes());
        } else {
            b[4..].copy_from_slice(&n.to_le_bytes());
        }
        Nonce::assume_unique_for_key(b)
    }
}

impl Cipher for PerCall {
    fn name(&self) -> &'static str {
        if self.aes { "AESGCM" } else { "ChaChaPoly" }
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key = *key;
    }

    fn encrypt(&self, n: u64, ad: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        out[..len].copy_from_slice(plaintext);
        let tag = self
            .key()
            .seal_in_place_separate_tag(self.nonce(n), Aad::from(ad), &mut out[..len])
            .expect("a heartbeat is far below the cipher's limit");
        out[len..len + TAG].copy_from_slice(tag.as_ref());
        len + TAG
    }

    fn decrypt(
        &self,
        n: u64,
        ad: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = ciphertext
            .len()
            .checked_sub(TAG)
            .ok_or(snow::Error::Decrypt)?;
        let tag = Tag::try_from(&ciphertext[len..]).map_err(|_| snow::Error::Decrypt)?;
        out[..len].copy_from_slice(&ciphertext[..len]);
        self.key()
            .open_in_place_separate_tag(self.nonce(n), Aad::from(ad), tag, &mut out[..len], 0..)
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(len)
    }
}

/// One session's two directions, each in its own allocation, as snow
/// boxes them.
struct Pair {
    tx: Box<dyn Cipher>,
    rx: Box<dyn Cipher>,
}

fn cipher(kind: &str, choice: CipherChoice) -> Box<dyn Cipher> {
    let aes = matches!(choice, CipherChoice::AESGCM);
    let mut c: Box<dyn Cipher> = match kind {
        "snow ring" => RingResolver.resolve_cipher(&choice),
        "snow default" => DefaultResolver.resolve_cipher(&choice),
        _ => Some(Box::new(PerCall { key: [0; 32], aes }) as Box<dyn Cipher>),
    }
    .expect("the cipher resolves");
    c.set(&[7; 32]);
    c
}

/// Nanoseconds per seal + open over `n` pairs in random order.
fn measure(kind: &str, choice: CipherChoice, n: usize, evict: &mut [u8]) -> f64 {
    // Other allocations between the pairs, as a session's other state.
    let mut spacers = Vec::with_capacity(n);
    let pairs: Vec<Pair> = (0..n)
        .map(|_| {
            spacers.push(vec![1u8; 700]);
            Pair {
                tx: cipher(kind, choice),
                rx: cipher(kind, choice),
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = 0x9e37_79b9_7f4a_7c15_u64;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let ping = [2u8; 17];
    let (mut sealed, mut opened) = ([0u8; 17 + TAG], [0u8; 17 + TAG]);
    let passes = (2_000_000 / n).max(1);
    let mut spent = Duration::ZERO;
    for pass in 0..passes as u64 {
        if n > 1 {
            for (k, b) in evict.iter_mut().enumerate().step_by(64) {
                *b = b.wrapping_add(k as u8);
            }
        }
        let t = Instant::now();
        for &i in &order {
            let p = &pairs[i];
            let m = p.tx.encrypt(pass, &[], &ping, &mut sealed);
            let k = p.rx.decrypt(pass, &[], &sealed[..m], &mut opened);
            assert_eq!(k.ok(), Some(ping.len()));
        }
        spent += t.elapsed();
    }
    std::hint::black_box(&spacers);
    spent.as_nanos() as f64 / (passes * n) as f64
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mut evict = vec![0u8; 64 << 20];
    println!("one seal + one open of a 17-byte heartbeat, ns (ratio to snow ring)\n");
    println!("| cipher | pairs | snow ring | snow default | ring per call |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, choice) in [
        ("ChaCha20-Poly1305", CipherChoice::ChaChaPoly),
        ("AES-256-GCM", CipherChoice::AESGCM),
    ] {
        for n in [1, 10_000, 100_000] {
            let base = measure("snow ring", choice, n, &mut evict);
            let default = measure("snow default", choice, n, &mut evict);
            let per_call = measure("ring per call", choice, n, &mut evict);
            println!(
                "| {name} | {n} | {base:.0} | {default:.0} ({:.2}×) | {per_call:.0} ({:.2}×) |",
                default / base,
                per_call / base
            );
        }
    }
}
