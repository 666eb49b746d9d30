//! Liveness datagrams (protocol 2, docs/PROTOCOL.md §7): proof that the
//! peer is alive which does not wait behind the stream.
//!
//! TCP delivers in order: one lost segment holds back everything behind
//! it, and its retransmission backs off (0.2 s, 0.4 s, 0.8 s...). Under
//! loss the heartbeat then arrives after the timeout from a peer that is
//! alive. A session whose stream has gone quiet for 1.5 send intervals
//! sends small UDP probes, sealed with the session's own transport keys at
//! nonces of a range the stream never uses; the peer answers each. Any
//! such datagram that authenticates, with a nonce above every earlier one,
//! proves the peer's node alive now: the heartbeat timeout counts from the
//! later of the last frame and the last datagram. A stream that moves
//! nothing while datagrams keep arriving ends after the stall timeout.
//!
//! Layout (34 bytes): version `02`, the sender's id (u64, big-endian),
//! the nonce (u64, big-endian, at least 2^63), then the Noise transport
//! message of one byte (1 probe, 2 answer): 17 bytes, ciphertext and tag.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tracing::{debug, trace};

use super::stream::{DATAGRAM_NONCES, TAG};
use super::transport::SplitKeys;
use crate::clock;
use crate::peer::PeerId;
use crate::stats::Counters;

/// The first byte: the protocol version.
const VERSION: u8 = 2;
/// Header: version, sender id, nonce.
const HEADER: usize = 1 + 8 + 8;
/// A liveness datagram's length.
pub(crate) const LEN: usize = HEADER + 1 + TAG;
/// The plaintext of a probe: the receiver answers it.
const PROBE: u8 = 1;
/// The plaintext of an answer.
const ANSWER: u8 = 2;

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Not 34 bytes, or not version 2.
    Malformed,
    /// No session with the id it names.
    UnknownSender,
    /// It did not authenticate under that session's keys (forged,
    /// tampered, or of an earlier session), or carried an unknown kind.
    Unauthenticated,
    /// Its nonce is not above every nonce accepted before (replayed, or
    /// overtaken by a later one).
    Replayed,
}

/// One session's datagram side: its keys, where the peer takes datagrams,
/// and what was heard. Shared by the connection (which probes) and the
/// node's datagram task (which receives and answers).
pub(crate) struct Link {
    /// The session's split keys. A cipher is keyed from them per datagram
    /// (a 32-byte copy for ChaCha20, an AES key expansion of about 0.2 µs
    /// for AES-GCM; datagrams flow only while the stream is quiet), so that
    /// an AES session does not hold a second pair of prepared ciphers
    /// (1 KiB) for them.
    keys: Box<SplitKeys>,
    /// Our id, the header of what we send.
    local: PeerId,
    /// The peer's id: what its datagrams must name.
    peer: PeerId,
    /// The peer's datagram address: its session address with the port of
    /// its hello.
    to: SocketAddr,
    socket: Arc<UdpSocket>,
    /// The nonce of our next datagram.
    next_nonce: AtomicU64,
    /// The highest nonce accepted from the peer (0: none yet).
    highest: AtomicU64,
    /// When the last datagram was accepted, in nanoseconds after `epoch`
    /// (0: never).
    heard: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl Link {
    pub(crate) fn new(
        keys: Box<SplitKeys>,
        local: PeerId,
        peer: PeerId,
        to: SocketAddr,
        socket: Arc<UdpSocket>,
    ) -> Link {
        Link {
            keys,
            local,
            peer,
            to,
            socket,
            next_nonce: AtomicU64::new(DATAGRAM_NONCES),
            highest: AtomicU64::new(0),
            heard: AtomicU64::new(0),
            epoch: clock::now(),
        }
    }

    /// Seals a datagram of `kind` under the next nonce; `None` once the
    /// nonces are used up (2^63 datagrams: never).
    fn seal(&self, kind: u8) -> Option<[u8; LEN]> {
        let nonce = self.next_nonce.fetch_add(1, Relaxed);
        if nonce == u64::MAX {
            return None;
        }
        let mut d = [0; LEN];
        d[0] = VERSION;
        d[1..9].copy_from_slice(&self.local.as_u64().to_be_bytes());
        d[9..HEADER].copy_from_slice(&nonce.to_be_bytes());
        self.keys
            .sealer()?
            .seal(nonce, &[kind], &mut d[HEADER..])
            .ok()?;
        Some(d)
    }

    /// Sends a probe to the peer (the peer answers it). A datagram the
    /// socket cannot take now is not sent: it is a heartbeat, the next
    /// one follows.
    pub(crate) fn probe(&self, counters: &Counters) {
        if let Some(d) = self.seal(PROBE) {
            match self.socket.try_send_to(&d, self.to) {
                Ok(_) => Counters::bump(&counters.liveness_probes_sent),
                Err(e) => {
                    trace!(to = %self.to, error = %e, "liveness probe not sent");
                    Counters::bump(&counters.datagram_send_errors);
                }
            }
        }
    }

    /// When a datagram from the peer was last accepted.
    pub(crate) fn heard(&self) -> Option<Instant> {
        match self.heard.load(Relaxed) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n)),
        }
    }

    /// Checks a datagram that names this link's peer; on success records
    /// it as heard at `now` and returns its kind.
    fn accept(&self, d: &[u8; LEN], now: Instant) -> Result<u8, Rejected> {
        let nonce = u64::from_be_bytes(d[9..HEADER].try_into().expect("8 bytes"));
        if nonce < DATAGRAM_NONCES {
            return Err(Rejected::Unauthenticated);
        }
        let mut kind = [0; 1 + TAG];
        let opened = match self.keys.opener() {
            Some(c) => c.open(nonce, &d[HEADER..], &mut kind),
            None => return Err(Rejected::Unauthenticated),
        };
        match opened {
            Ok(1) if matches!(kind[0], PROBE | ANSWER) => {}
            _ => return Err(Rejected::Unauthenticated),
        }
        // Authentic: only now may it move the window (a forged nonce
        // must not).
        if self.highest.fetch_max(nonce, Ordering::AcqRel) >= nonce {
            return Err(Rejected::Replayed);
        }
        let at = now.saturating_duration_since(self.epoch).as_nanos();
        self.heard
            .fetch_max(u64::try_from(at).unwrap_or(u64::MAX).max(1), Relaxed);
        Ok(kind[0])
    }
}

/// The links of a node's sessions, by peer id (one session per peer).
#[derive(Debug, Default)]
pub(crate) struct Links {
    map: Mutex<HashMap<PeerId, Arc<Link>>>,
}

impl Links {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Arc<Link>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `link` the one datagrams naming its peer are checked against.
    pub(crate) fn insert(&self, link: Arc<Link>) {
        self.lock().insert(link.peer, link);
    }

    /// Forgets `link` (if a newer one did not take its place).
    pub(crate) fn remove(&self, link: &Arc<Link>) {
        let mut map = self.lock();
        if map.get(&link.peer).is_some_and(|l| Arc::ptr_eq(l, link)) {
            map.remove(&link.peer);
        }
    }

    fn get(&self, peer: PeerId) -> Option<Arc<Link>> {
        self.lock().get(&peer).cloned()
    }

    /// Checks one received datagram; returns the link it proved alive and
    /// whether it asks for an answer.
    pub(crate) fn receive(&self, d: &[u8], now: Instant) -> Result<(Arc<Link>, bool), Rejected> {
        let d: &[u8; LEN] = d.try_into().map_err(|_| Rejected::Malformed)?;
        if d[0] != VERSION {
            return Err(Rejected::Malformed);
        }
        let id = PeerId::from_u64(u64::from_be_bytes(d[1..9].try_into().expect("8 bytes")));
        let link = self.get(id).ok_or(Rejected::UnknownSender)?;
        let kind = link.accept(d, now)?;
        Ok((link, kind == PROBE))
    }
}

/// A node's liveness sockets (one port number for both families) and its
/// sessions' links.
#[derive(Debug)]
pub(crate) struct Sockets {
    v4: Arc<UdpSocket>,
    v6: Option<Arc<UdpSocket>>,
    pub(crate) links: Arc<Links>,
    /// The port, for our hellos.
    pub(crate) port: u16,
}

impl Sockets {
    pub(crate) fn new(v4: UdpSocket, v6: Option<UdpSocket>) -> std::io::Result<Sockets> {
        Ok(Sockets {
            port: v4.local_addr()?.port(),
            v4: Arc::new(v4),
            v6: v6.map(Arc::new),
            links: Arc::default(),
        })
    }

    /// The socket that reaches `to`, if the node has one of its family.
    pub(crate) fn for_addr(&self, to: &SocketAddr) -> Option<&Arc<UdpSocket>> {
        match to {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    /// The tasks that serve the sockets.
    pub(crate) fn tasks(
        &self,
        counters: &Arc<Counters>,
    ) -> impl Iterator<Item = impl std::future::Future<Output = ()> + Send + 'static> {
        let (links, counters) = (self.links.clone(), counters.clone());
        [Some(&self.v4), self.v6.as_ref()]
            .into_iter()
            .flatten()
            .map(move |s| serve(s.clone(), links.clone(), counters.clone()))
    }
}

/// The node's datagram task for one socket: receives, checks, answers
/// probes. Runs until aborted with the node.
pub(crate) async fn serve(socket: Arc<UdpSocket>, links: Arc<Links>, counters: Arc<Counters>) {
    // One byte more than a datagram tells a longer one apart.
    let mut buf = [0u8; LEN + 1];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors of earlier sends surface here (port
                // unreachable): not fatal.
                trace!(error = %e, "liveness socket error");
                continue;
            }
        };
        match links.receive(&buf[..n], clock::now()) {
            Ok((link, probe)) => {
                Counters::bump(&counters.liveness_received);
                if probe && let Some(d) = link.seal(ANSWER) {
                    // To where the probe came from: it is authentic and
                    // fresh, so that is the peer now.
                    if socket.try_send_to(&d, from).is_err() {
                        Counters::bump(&counters.datagram_send_errors);
                    }
                }
            }
            Err(Rejected::Replayed) => {
                debug!(%from, "liveness datagram replayed; dropped");
                Counters::bump(&counters.liveness_replayed);
            }
            Err(why) => {
                debug!(%from, ?why, "liveness datagram dropped");
                Counters::bump(&counters.liveness_dropped);
            }
        }
    }
}

/// The fuzz driver of `fuzzing::liveness`: made-up datagrams (even first
/// byte) are never accepted and prove nothing; genuine ones (odd), taken
/// in an order the bytes give, repeated and altered as they say, are
/// accepted exactly when unaltered and above every nonce accepted before.
#[cfg(any(test, fuzzing))]
pub(crate) fn fuzz(data: &[u8]) {
    use std::net::Ipv4Addr;
    use std::sync::OnceLock;
    static SOCKET: OnceLock<(tokio::runtime::Runtime, Arc<UdpSocket>)> = OnceLock::new();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (_, socket) = SOCKET.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a runtime");
        let s = rt
            .block_on(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("a socket");
        (rt, Arc::new(s))
    });
    let (a_id, b_id) = (PeerId::from_u64(0xa), PeerId::from_u64(0xb));
    let (i, r) = super::noise::transport_pair();
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    let a = Arc::new(Link::new(Box::new(i), a_id, b_id, to, socket.clone()));
    let b = Link::new(Box::new(r), b_id, a_id, to, socket.clone());
    let at_a = Links::default();
    at_a.insert(a.clone());
    let now = clock::now();
    if mode % 2 == 0 {
        for chunk in rest.chunks(1 + usize::from(mode) % 40) {
            let mut d = chunk.to_vec();
            // Half of them dressed as B's: version, B's id.
            if mode & 2 != 0 && d.len() >= 9 {
                d[0] = VERSION;
                d[1..9].copy_from_slice(&b_id.as_u64().to_be_bytes());
            }
            assert!(at_a.receive(&d, now).is_err(), "a made-up datagram passed");
        }
        assert_eq!(a.heard(), None);
        return;
    }
    let sealed: Vec<[u8; LEN]> = (0..rest.len().clamp(1, 64))
        .map(|_| b.seal(PROBE).expect("sealed"))
        .collect();
    let mut highest = None;
    for step in rest.chunks(2) {
        let k = usize::from(step[0]) % sealed.len();
        let mut d = sealed[k];
        let alter = step.get(1).copied().unwrap_or(0);
        let altered = alter & 1 == 1;
        if altered {
            let at = usize::from(alter >> 1) % LEN;
            d[at] ^= 1 << (at % 8);
        }
        let fresh = highest.is_none_or(|h| k > h);
        let accepted = at_a.receive(&d, now).is_ok();
        assert_eq!(
            accepted,
            !altered && fresh,
            "datagram {k}, altered {altered}"
        );
        if accepted {
            highest = Some(k);
        }
    }
    assert_eq!(a.heard().is_some(), highest.is_some());
}

#[cfg(test)]
mod tests;
