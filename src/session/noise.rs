//! Protocol 2's Noise handshake: `Noise_XX_25519_ChaChaPoly_BLAKE2s`
//! (`XXpsk0` with a fleet key), run by `snow` over the TCP stream before
//! the hellos. Each side proves the static key its id derives from; the
//! keys it leaves are those of [`NoiseStream`](super::stream::NoiseStream).
//! The byte layout is in docs/PROTOCOL.md §6.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::NoiseStream;
use crate::event::{DownReason, ProtocolViolation};

/// The Noise protocol name without a fleet key.
pub(crate) const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// With a fleet key: the key is mixed in before the first message, so a
/// node without it cannot complete (or even start) a handshake.
pub(crate) const PATTERN_PSK: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";
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

    fn state(&self, initiator: bool) -> Result<snow::HandshakeState, snow::Error> {
        let pattern = if self.psk.is_some() {
            PATTERN_PSK
        } else {
            PATTERN
        };
        let mut b = snow::Builder::new(pattern.parse()?)
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
) -> Result<(), DownReason> {
    let mut out = [0; 2 + MAX_HANDSHAKE_MESSAGE];
    let n = hs
        .write_message(&[], &mut out[2..])
        .map_err(|_| failed("cannot write a handshake message"))?;
    out[..2].copy_from_slice(&(n as u16).to_be_bytes());
    tcp.write_all(&out[..2 + n]).await.map_err(io)
}

/// Runs the handshake (we are the `initiator` when we dialed), within
/// `timeout`. Returns the secured stream and the static public key the
/// peer proved (its id derives from it).
pub(crate) async fn handshake(
    mut tcp: TcpStream,
    keys: &NoiseKeys,
    initiator: bool,
    timeout: Duration,
) -> Result<(NoiseStream, [u8; 32]), DownReason> {
    let run = async {
        let mut hs = keys
            .state(initiator)
            .map_err(|_| failed("cannot start the handshake"))?;
        let mut buf = [0; MAX_HANDSHAKE_MESSAGE];
        let mut payload = [0; MAX_HANDSHAKE_MESSAGE];
        // XX: -> e; <- e, ee, s, es; -> s, se.
        for turn in 0..3 {
            if (turn % 2 == 0) == initiator {
                write_message(&mut tcp, &mut hs).await?;
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
        let state = hs
            .into_transport_mode()
            .map_err(|_| failed("handshake incomplete"))?;
        Ok::<_, DownReason>((key, state))
    };
    let (key, state) = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r?,
        Err(_) => return Err(DownReason::HandshakeTimeout),
    };
    Ok((NoiseStream::new(tcp, state), key))
}
