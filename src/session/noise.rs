//! Protocol 2's Noise handshake: `Noise_XX_25519_ChaChaPoly_BLAKE2s`
//! (`XXpsk0` with a fleet key), run by `snow` over the TCP stream before
//! the hellos. Each side proves the static key its id derives from; the
//! keys it leaves are those of [`NoiseStream`](super::stream::NoiseStream).
//! The byte layout is in docs/PROTOCOL.md §6.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::NoiseStream;
use super::transport::SplitKeys;
use crate::event::{DownReason, ProtocolViolation};

/// The Noise protocol name without a fleet key.
pub(crate) const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// With a fleet key: the key is mixed in before the first message, so a
/// node without it cannot complete (or even start) a handshake.
pub(crate) const PATTERN_PSK: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";

/// The session's cipher (PROTOCOL.md §6, "Cipher"): ChaCha20-Poly1305
/// unless both ends have AES instructions, where AES-256-GCM is several
/// times faster. The dialer chooses (from the peer's announce), and says
/// so in its first handshake message; the acceptor follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cipher {
    ChaChaPoly,
    AesGcm,
}

impl Cipher {
    /// The Noise protocol name, with or without a fleet key.
    fn pattern(self, psk: bool) -> &'static str {
        match (self, psk) {
            (Cipher::ChaChaPoly, false) => PATTERN,
            (Cipher::ChaChaPoly, true) => PATTERN_PSK,
            (Cipher::AesGcm, false) => "Noise_XX_25519_AESGCM_BLAKE2s",
            (Cipher::AesGcm, true) => "Noise_XXpsk0_25519_AESGCM_BLAKE2s",
        }
    }

    /// The payload of message 1 that names it: none for ChaCha20-Poly1305
    /// (what nodes that know no other send), one byte 1 for AES-256-GCM.
    fn marker(self) -> &'static [u8] {
        match self {
            Cipher::ChaChaPoly => &[],
            Cipher::AesGcm => &[1],
        }
    }

    /// The cipher a message-1 payload names.
    fn of_marker(payload: &[u8]) -> Option<Cipher> {
        match payload {
            [] => Some(Cipher::ChaChaPoly),
            [1] => Some(Cipher::AesGcm),
            _ => None,
        }
    }
}

/// Whether this machine has AES instructions (and carry-less multiply, for
/// GCM): then it announces AES-256-GCM, and dials with it peers that do.
pub(crate) fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The `snow` builder of every handshake: snow's primitives, but X25519
/// from aws-lc-rs with the `aws-lc` feature.
#[cfg(feature = "aws-lc")]
pub fn builder(params: snow::params::NoiseParams) -> snow::Builder<'static> {
    super::curve::builder(params)
}

/// The `snow` builder of every handshake: snow's primitives.
#[cfg(not(feature = "aws-lc"))]
pub fn builder(params: snow::params::NoiseParams) -> snow::Builder<'static> {
    snow::Builder::new(params)
}

/// The largest handshake message accepted (the three messages are 32 to
/// 96 bytes with empty payloads; payloads are reserved for later versions).
pub(crate) const MAX_HANDSHAKE_MESSAGE: usize = 1024;

/// What every connection of a node needs for its handshake: the node's
/// static key, the fleet key if any, and the prologue (which binds the
/// protocol version and the service: a peer of another service fails the
/// handshake).
pub(crate) struct NoiseKeys {
    secret: [u8; 32],
    psk: Option<[u8; 32]>,
    prologue: Vec<u8>,
}

impl std::fmt::Debug for NoiseKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseKeys")
            .field("psk", &self.psk.is_some())
            .finish_non_exhaustive()
    }
}

/// The prologue both sides feed the handshake: `"lanbeat/2"`, a zero
/// byte, the service name (UTF-8).
pub(crate) fn prologue(service: &str) -> Vec<u8> {
    let mut p = b"lanbeat/2\0".to_vec();
    p.extend_from_slice(service.as_bytes());
    p
}

impl NoiseKeys {
    pub(crate) fn new(secret: [u8; 32], psk: Option<[u8; 32]>, service: &str) -> NoiseKeys {
        NoiseKeys {
            secret,
            psk,
            prologue: prologue(service),
        }
    }

    #[cfg(any(test, fuzzing))]
    fn state(&self, initiator: bool) -> Result<snow::HandshakeState, snow::Error> {
        self.state_with(initiator, Cipher::ChaChaPoly)
    }

    pub(crate) fn state_with(
        &self,
        initiator: bool,
        cipher: Cipher,
    ) -> Result<snow::HandshakeState, snow::Error> {
        let pattern = cipher.pattern(self.psk.is_some());
        let mut b = builder(pattern.parse()?)
            .local_private_key(&self.secret)?
            .prologue(&self.prologue)?;
        if let Some(psk) = &self.psk {
            b = b.psk(0, psk)?;
        }
        if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
    }
}

/// A failed handshake, as the session reports it.
fn failed(what: &'static str) -> DownReason {
    DownReason::ProtocolError(ProtocolViolation::Handshake(what))
}

fn io(e: std::io::Error) -> DownReason {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => DownReason::Closed,
        k => DownReason::Io(k),
    }
}

/// Reads one length-prefixed handshake message into `buf`; returns its
/// length.
async fn read_message(
    tcp: &mut TcpStream,
    buf: &mut [u8; MAX_HANDSHAKE_MESSAGE],
) -> Result<usize, DownReason> {
    let mut len = [0; 2];
    tcp.read_exact(&mut len).await.map_err(io)?;
    let len = u16::from_be_bytes(len) as usize;
    if len == 0 {
        // Protocol 1 starts with a frame's 4-byte length, whose first two
        // bytes are zero for any hello.
        return Err(DownReason::ProtocolError(ProtocolViolation::PlaintextPeer));
    }
    if len > MAX_HANDSHAKE_MESSAGE {
        return Err(failed("handshake message longer than 1024 bytes"));
    }
    tcp.read_exact(&mut buf[..len]).await.map_err(io)?;
    Ok(len)
}

async fn write_message(
    tcp: &mut TcpStream,
    hs: &mut snow::HandshakeState,
    payload: &[u8],
) -> Result<(), DownReason> {
    let mut out = [0; 2 + MAX_HANDSHAKE_MESSAGE];
    let n = hs
        .write_message(payload, &mut out[2..])
        .map_err(|_| failed("cannot write a handshake message"))?;
    out[..2].copy_from_slice(&(n as u16).to_be_bytes());
    tcp.write_all(&out[..2 + n]).await.map_err(io)
}

/// The responder's side of message 1: the handshake state of the cipher
/// the initiator chose. Without a fleet key message 1 is the initiator's
/// ephemeral key and its payload in the clear, which names the cipher;
/// with one it is sealed under the cipher, so each is tried in turn and the
/// one that opens it must be the one its payload names.
fn respond(keys: &NoiseKeys, message: &[u8]) -> Result<(snow::HandshakeState, Cipher), DownReason> {
    let mut payload = [0; MAX_HANDSHAKE_MESSAGE];
    let named = |n: usize, payload: &[u8]| Cipher::of_marker(&payload[..n]);
    let start = |c| {
        keys.state_with(false, c)
            .map_err(|_| failed("cannot start the handshake"))
    };
    if keys.psk.is_none() {
        let cipher = message
            .get(32..)
            .and_then(Cipher::of_marker)
            .ok_or_else(|| {
                failed("message 1 names no known cipher, or is sealed with a fleet key")
            })?;
        let mut hs = start(cipher)?;
        hs.read_message(message, &mut payload)
            .map_err(|_| failed("handshake message failed authentication"))?;
        return Ok((hs, cipher));
    }
    for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
        let mut hs = start(cipher)?;
        if let Ok(n) = hs.read_message(message, &mut payload) {
            if named(n, &payload) != Some(cipher) {
                return Err(failed("message 1 names another cipher"));
            }
            return Ok((hs, cipher));
        }
    }
    Err(failed("handshake message failed authentication"))
}

/// Runs the handshake within `timeout`: as the initiator (we dialed) with
/// the cipher we chose, or as the responder (`None`) with the initiator's.
/// Returns the secured stream and the static public key the peer proved
/// (its id derives from it).
pub(crate) async fn handshake(
    mut tcp: TcpStream,
    keys: &NoiseKeys,
    initiator: Option<Cipher>,
    timeout: Duration,
) -> Result<(NoiseStream, [u8; 32]), DownReason> {
    let run = async {
        let mut buf = [0; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0; MAX_HANDSHAKE_MESSAGE];
        // XX: -> e; <- e, ee, s, es; -> s, se.
        let (mut hs, cipher) = match initiator {
            Some(cipher) => {
                let mut hs = keys
                    .state_with(true, cipher)
                    .map_err(|_| failed("cannot start the handshake"))?;
                write_message(&mut tcp, &mut hs, cipher.marker()).await?;
                (hs, cipher)
            }
            None => {
                let n = read_message(&mut tcp, &mut buf).await?;
                respond(keys, &buf[..n])?
            }
        };
        let initiator = initiator.is_some();
        for turn in 1..3 {
            if (turn % 2 == 0) == initiator {
                write_message(&mut tcp, &mut hs, &[]).await?;
            } else {
                let n = read_message(&mut tcp, &mut buf).await?;
                hs.read_message(&buf[..n], &mut payload)
                    .map_err(|_| failed("handshake message failed authentication"))?;
            }
        }
        let key: [u8; 32] = hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| failed("no static key"))?;
        let split = SplitKeys::of(&mut hs, cipher).ok_or_else(|| failed("handshake incomplete"))?;
        Ok::<_, DownReason>((key, split))
    };
    let (key, split) = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r?,
        Err(_) => return Err(DownReason::HandshakeTimeout),
    };
    let stream =
        NoiseStream::new(tcp, split).ok_or_else(|| failed("no cipher for the transport"))?;
    Ok((stream, key))
}

/// The keys of both ends of a completed handshake, in memory (initiator
/// first): for the fuzzer and tests of the record layer.
#[cfg(any(test, fuzzing))]
pub(crate) fn transport_pair() -> (SplitKeys, SplitKeys) {
    let (a, b) = (
        NoiseKeys::new([1; 32], None, "fuzz"),
        NoiseKeys::new([2; 32], None, "fuzz"),
    );
    let (mut i, mut r) = (a.state(true).unwrap(), b.state(false).unwrap());
    run_in_memory(&mut i, &mut r);
    (
        SplitKeys::of(&mut i, Cipher::ChaChaPoly).unwrap(),
        SplitKeys::of(&mut r, Cipher::ChaChaPoly).unwrap(),
    )
}

/// The three XX messages between `i` (initiator) and `r`, in memory, with
/// empty payloads; returns them.
#[cfg(any(test, fuzzing))]
pub(crate) fn run_in_memory(
    i: &mut snow::HandshakeState,
    r: &mut snow::HandshakeState,
) -> Vec<Vec<u8>> {
    let (mut buf, mut out) = ([0u8; 200], [0u8; 200]);
    let mut msgs = Vec::new();
    for turn in 0..3 {
        let (w, rd) = if turn % 2 == 0 {
            (&mut *i, &mut *r)
        } else {
            (&mut *r, &mut *i)
        };
        let n = w.write_message(&[], &mut buf).unwrap();
        rd.read_message(&buf[..n], &mut out).unwrap();
        msgs.push(buf[..n].to_vec());
    }
    msgs
}

/// A responder's handshake fed `messages` (length-prefixed, as on the
/// wire) from someone without any key: returns whether it completed.
#[cfg(any(test, fuzzing))]
pub(crate) fn respond_to(messages: &[u8], psk: bool) -> bool {
    let keys = NoiseKeys::new([2; 32], psk.then_some([9; 32]), "fuzz");
    let (mut payload, mut out) = (
        [0u8; MAX_HANDSHAKE_MESSAGE],
        [0u8; 2 + MAX_HANDSHAKE_MESSAGE],
    );
    let mut rest = messages;
    let mut next = || {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = u16::from_be_bytes(*len) as usize;
        if len == 0 || len > MAX_HANDSHAKE_MESSAGE || tail.len() < len {
            return None;
        }
        rest = &tail[len..];
        Some(&tail[..len])
    };
    // Read message 1 (which names the cipher), write message 2, read
    // message 3.
    let Some(Ok((mut hs, _))) = next().map(|m| respond(&keys, m)) else {
        return false;
    };
    if hs.write_message(&[], &mut out).is_err() {
        return false;
    }
    let Some(m3) = next() else {
        return false;
    };
    hs.read_message(m3, &mut payload).is_ok() && hs.is_handshake_finished()
}

#[cfg(test)]
mod tests {
    //! The worked example of docs/PROTOCOL.md §6, byte for byte: with the
    //! documented static and ephemeral keys, any Noise library produces
    //! these messages.

    use super::{PATTERN, prologue};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 7748's Alice and Bob as the static keys; ephemerals of all
    /// 0x11 and all 0x22 bytes.
    const ALICE: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const BOB: &str = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";

    #[test]
    fn the_worked_example_of_the_spec() {
        let (alice, bob) = (unhex(ALICE), unhex(BOB));
        let (ea, eb) = ([0x11; 32], [0x22; 32]);
        let p = prologue("lamps");
        fn build<'a>(s: &'a [u8], e: &'a [u8], p: &'a [u8]) -> snow::Builder<'a> {
            snow::Builder::new(PATTERN.parse().unwrap())
                .local_private_key(s)
                .unwrap()
                .fixed_ephemeral_key_for_testing_only(e)
                .prologue(p)
                .unwrap()
        }
        let mut i = build(&alice, &ea, &p).build_initiator().unwrap();
        let mut r = build(&bob, &eb, &p).build_responder().unwrap();
        let msgs: Vec<String> = super::run_in_memory(&mut i, &mut r)
            .iter()
            .map(|m| hex(m))
            .collect();
        let (mut buf, mut out) = ([0u8; 200], [0u8; 200]);
        let mut i = i.into_transport_mode().unwrap();
        let mut r = r.into_transport_mode().unwrap();
        // The initiator's first frame after the handshake, as a record: a
        // ping, seq 1 (a hello is sealed the same way).
        let ping = [0, 0, 0, 9, 2, 0, 0, 0, 0, 0, 0, 0, 1];
        let n = i.write_message(&ping, &mut buf).unwrap();
        let record = hex(&buf[..n]);
        assert_eq!(r.read_message(&buf[..n], &mut out).unwrap(), 13);
        let got = [msgs[0].as_str(), &msgs[1], &msgs[2], &record];
        let want = [EXAMPLE_MSG1, EXAMPLE_MSG2, EXAMPLE_MSG3, EXAMPLE_PING];
        assert_eq!(got, want, "docs/PROTOCOL.md §6 must be updated");
    }

    /// §7's example: the initiator's first liveness datagram, a probe at
    /// nonce 2^63, under the transport keys of §6's example.
    #[test]
    fn the_worked_example_of_a_liveness_datagram() {
        let (alice, bob) = (unhex(ALICE), unhex(BOB));
        let p = prologue("lamps");
        let build = |s: &[u8], e: [u8; 32], initiator: bool| {
            let b = snow::Builder::new(PATTERN.parse().unwrap())
                .local_private_key(s)
                .unwrap()
                .fixed_ephemeral_key_for_testing_only(&e)
                .prologue(&p)
                .unwrap();
            if initiator {
                b.build_initiator().unwrap()
            } else {
                b.build_responder().unwrap()
            }
        };
        let (mut i, mut r) = (
            build(&alice, [0x11; 32], true),
            build(&bob, [0x22; 32], false),
        );
        super::run_in_memory(&mut i, &mut r);
        let i = i.into_stateless_transport_mode().unwrap();
        let r = r.into_stateless_transport_mode().unwrap();
        let nonce = 1u64 << 63;
        let mut sealed = [0u8; 17];
        assert_eq!(i.write_message(nonce, &[1], &mut sealed).unwrap(), 17);
        let mut kind = [0u8; 17];
        assert_eq!(r.read_message(nonce, &sealed, &mut kind).unwrap(), 1);
        assert_eq!(kind[0], 1);
        assert_eq!(
            hex(&sealed),
            EXAMPLE_DATAGRAM,
            "docs/PROTOCOL.md §7 must be updated"
        );
    }

    /// Over a real connection, each cipher with and without a fleet key:
    /// the acceptor follows the dialer's choice, and records sealed by one
    /// side open on the other; a payload naming no cipher is refused.
    #[tokio::test]
    async fn the_acceptor_takes_the_cipher_the_dialer_chose() {
        use super::{Cipher, NoiseKeys, handshake};
        use std::time::Duration;
        for psk in [None, Some([7; 32])] {
            for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let (a, b) = (
                    NoiseKeys::new([1; 32], psk, "lamps"),
                    NoiseKeys::new([2; 32], psk, "lamps"),
                );
                let t = Duration::from_secs(2);
                let accept = async {
                    let (tcp, _) = l.accept().await.unwrap();
                    handshake(tcp, &b, None, t).await
                };
                let dial = async {
                    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                    handshake(tcp, &a, Some(cipher), t).await
                };
                let (r, i) = tokio::join!(accept, dial);
                let (mut r, mut i) = (r.unwrap().0, i.unwrap().0);
                let mut sealed = [0u8; 64];
                let n = i
                    .take_split()
                    .unwrap()
                    .sealer()
                    .unwrap()
                    .seal(5, b"record", &mut sealed)
                    .unwrap();
                let mut open = [0u8; 64];
                let m = r
                    .take_split()
                    .unwrap()
                    .opener()
                    .unwrap()
                    .open(5, &sealed[..n], &mut open)
                    .unwrap();
                assert_eq!(&open[..m], b"record", "{cipher:?} psk {}", psk.is_some());
            }
        }
        // Message 1 naming an unknown cipher.
        let b = NoiseKeys::new([2; 32], None, "lamps");
        let mut bad = vec![0x11; 32];
        bad.push(7);
        assert!(super::respond(&b, &bad).is_err());
        assert!(super::respond(&b, &[0x11; 32]).is_ok());
    }

    /// A man in the middle that rewrites the dialer's AES-256-GCM choice
    /// to ChaCha20-Poly1305 (drops message 1's payload) gets no session:
    /// the protocol name is in the handshake hash, so message 2 fails at
    /// the dialer.
    #[test]
    fn a_cipher_choice_altered_on_the_way_fails_the_handshake() {
        use super::{Cipher, NoiseKeys, respond};
        let (a, b) = (
            NoiseKeys::new([1; 32], None, "lamps"),
            NoiseKeys::new([2; 32], None, "lamps"),
        );
        let mut i = a.state_with(true, Cipher::AesGcm).unwrap();
        let (mut m1, mut m2, mut out) = ([0u8; 200], [0u8; 200], [0u8; 200]);
        let n = i.write_message(Cipher::AesGcm.marker(), &mut m1).unwrap();
        assert_eq!(n, 33);
        // Unaltered, the acceptor follows and the dialer reads message 2.
        let (mut r, _) = respond(&b, &m1[..n]).unwrap();
        let k = r.write_message(&[], &mut m2).unwrap();
        assert!(i.read_message(&m2[..k], &mut out).is_ok());
        // Altered: the acceptor takes ChaCha, and the dialer refuses.
        let mut i = a.state_with(true, Cipher::AesGcm).unwrap();
        let n = i.write_message(Cipher::AesGcm.marker(), &mut m1).unwrap();
        let (mut r, c) = respond(&b, &m1[..n - 1]).unwrap();
        assert_eq!(c, Cipher::ChaChaPoly);
        let k = r.write_message(&[], &mut m2).unwrap();
        assert!(i.read_message(&m2[..k], &mut out).is_err());
    }

    const EXAMPLE_MSG1: &str = "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13";
    const EXAMPLE_MSG2: &str = "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f208103467573e75d654adf3b58cf04eda48ca3994a50c47b0dee5d2e1cc1e039f95b7b6bf018a12da76d59b9b2776514167996c726e04393ab0d44679428423b49";
    const EXAMPLE_MSG3: &str = "612e4d559ac8a4809b345c048078a8fce9c1e0f71d3be0a51aff0d06e1b8715ac2a2d606e347bfa42a280ff9fca30c12f98d4b96e06070d30e7af8efa2218e21";
    const EXAMPLE_PING: &str = "659463df2912fee1296164f7b29c2980b2c307b3005057ac334ee9aa10";
    const EXAMPLE_DATAGRAM: &str = "48f72c8011b0ae3c5dcfa1fb0d1e6155f6";
}
