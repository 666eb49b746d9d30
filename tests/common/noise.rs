//! A protocol-2 session peer written from docs/PROTOCOL.md §6 alone, with
//! `snow` as the standard Noise library and none of the crate's code: the
//! handshake messages and records are framed here by hand. Tests use it to
//! talk to a real node, and to misbehave (forge a hello, tamper with a
//! record) where a real node never would.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The protocol name (§6).
pub const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// The protocol name with AES-256-GCM (§6 "Cipher"), which the dialer
/// names with a message-1 payload of one byte 1.
pub const PATTERN_AES: &str = "Noise_XX_25519_AESGCM_BLAKE2s";

/// `"lanbeat/2"`, a zero byte, the service name.
pub fn prologue(service: &str) -> Vec<u8> {
    let mut p = b"lanbeat/2\0".to_vec();
    p.extend_from_slice(service.as_bytes());
    p
}

/// A key pair from a fixed seed (any 32 bytes are an X25519 secret).
pub fn secret(seed: u8) -> [u8; 32] {
    [seed; 32]
}

/// The public key of `secret`: X25519 of the base point.
pub fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret)).to_bytes()
}

/// The id a public key proves: the first 8 bytes of its BLAKE2s-256
/// hash, big-endian (§5).
pub fn id_of_key(public: &[u8; 32]) -> lanbeat::PeerId {
    use blake2::Digest;
    let h = blake2::Blake2s256::digest(public);
    lanbeat::PeerId::from_u64(u64::from_be_bytes(h[..8].try_into().unwrap()))
}

/// The id of the key pair of `secret`.
pub fn id_of(secret: &[u8; 32]) -> lanbeat::PeerId {
    id_of_key(&public_of(secret))
}

/// A session connection after the Noise handshake.
pub struct NoiseConn {
    pub tcp: TcpStream,
    pub state: snow::TransportState,
    /// Plaintext received, not yet taken as frames.
    plain: Vec<u8>,
    /// The static key the other side proved.
    pub remote_key: [u8; 32],
}

async fn write_msg(tcp: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    tcp.write_all(&out).await
}

async fn read_msg(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0; 2];
    tcp.read_exact(&mut len).await?;
    let mut msg = vec![0; u16::from_be_bytes(len) as usize];
    tcp.read_exact(&mut msg).await?;
    Ok(msg)
}

/// Runs the XX handshake on `tcp` (`initiator` when we dialed), with
/// snow's own primitives.
pub async fn handshake(
    tcp: TcpStream,
    service: &str,
    secret: &[u8; 32],
    initiator: bool,
) -> std::io::Result<NoiseConn> {
    handshake_with(tcp, service, secret, initiator, snow::Builder::new).await
}

/// [`handshake`] with the primitives `builder` resolves (the benchmark
/// passes lanbeat's, so that its client costs what a lanbeat dialer does).
pub async fn handshake_with(
    tcp: TcpStream,
    service: &str,
    secret: &[u8; 32],
    initiator: bool,
    builder: fn(snow::params::NoiseParams) -> snow::Builder<'static>,
) -> std::io::Result<NoiseConn> {
    handshake_cipher(tcp, service, secret, initiator, builder, false).await
}

/// [`handshake_with`], with AES-256-GCM when `aes` (we must dial then:
/// the dialer names the cipher).
pub async fn handshake_cipher(
    mut tcp: TcpStream,
    service: &str,
    secret: &[u8; 32],
    initiator: bool,
    builder: fn(snow::params::NoiseParams) -> snow::Builder<'static>,
    aes: bool,
) -> std::io::Result<NoiseConn> {
    assert!(initiator || !aes, "the dialer names the cipher");
    let prologue = prologue(service);
    let pattern = if aes { PATTERN_AES } else { PATTERN };
    let b = builder(pattern.parse().unwrap())
        .local_private_key(secret)
        .unwrap()
        .prologue(&prologue)
        .unwrap();
    let mut hs = if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .unwrap();
    let mut buf = [0u8; 1024];
    for turn in 0..3 {
        if (turn % 2 == 0) == initiator {
            let marker: &[u8] = if aes && turn == 0 { &[1] } else { &[] };
            let n = hs.write_message(marker, &mut buf).unwrap();
            write_msg(&mut tcp, &buf[..n]).await?;
        } else {
            let msg = read_msg(&mut tcp).await?;
            hs.read_message(&msg, &mut buf)
                .map_err(|e| std::io::Error::other(format!("handshake: {e}")))?;
        }
    }
    let remote_key = hs.get_remote_static().unwrap().try_into().unwrap();
    Ok(NoiseConn {
        tcp,
        state: hs.into_transport_mode().unwrap(),
        plain: Vec::new(),
        remote_key,
    })
}

/// A session frame: 4-byte length of type and payload, type, payload.
pub fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(ty);
    f.extend_from_slice(payload);
    f
}

impl NoiseConn {
    /// Seals `plain` as one record (up to 65 519 bytes).
    pub fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0; 2 + plain.len() + 16];
        let n = self.state.write_message(plain, &mut out[2..]).unwrap();
        out[..2].copy_from_slice(&(n as u16).to_be_bytes());
        out
    }

    /// Sends `plain` (frames) in records.
    pub async fn send(&mut self, plain: &[u8]) -> std::io::Result<()> {
        for chunk in plain.chunks(65519) {
            let r = self.seal(chunk);
            self.tcp.write_all(&r).await?;
        }
        Ok(())
    }

    /// The next frame, `None` at the end of the stream (or a bad record).
    pub async fn recv_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.plain.len() >= 4 {
                let len = u32::from_be_bytes(self.plain[..4].try_into().unwrap()) as usize;
                if self.plain.len() >= 4 + len {
                    let f: Vec<u8> = self.plain.drain(..4 + len).collect();
                    return Some((f[4], f[5..].to_vec()));
                }
            }
            let record = read_msg(&mut self.tcp).await.ok()?;
            let mut out = vec![0; record.len()];
            let n = self.state.read_message(&record, &mut out).ok()?;
            self.plain.extend_from_slice(&out[..n]);
        }
    }

    /// Sends our hello (JSON), reads the node's.
    pub async fn exchange_hellos(&mut self, hello: &Value) -> Value {
        self.send(&frame(1, &serde_json::to_vec(hello).unwrap()))
            .await
            .unwrap();
        let (ty, body) = self.recv_frame().await.expect("the node's hello");
        assert_eq!(ty, 1, "the first frame is a hello");
        serde_json::from_slice(&body).unwrap()
    }
}

/// A protocol-2 hello for `service` claiming `id`.
pub fn hello(service: &str, id: lanbeat::PeerId, name: &str) -> Value {
    serde_json::json!({
        "protocol": 2, "service": service, "id": id.to_string(), "instance": "1",
        "name": name, "role": "peer", "port": 0,
        "heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 1000, "max_frame_size": 1048576,
    })
}
