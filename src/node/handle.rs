//! The [`Node`] handle: starts a node and is how the application sends,
//! looks at peers and shuts down.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug_span, info, warn};

use super::events::{EventQueue, EventStore, Events};
use super::sender::{PeerSender, Push, check_size};
use super::shared::{Command, Shared, lock};
use super::supervisor::{Parts, Supervisor, V6};
#[cfg(doc)]
use crate::Event;
use crate::config::{Config, Security};
use crate::discovery::machine::{Discovery, DiscoveryConfig};
use crate::discovery::socket;
use crate::error::Error;
use crate::identity::Identity;
use crate::peer::{PeerId, PeerStatus};
use crate::session::machine::SessionConfig;
use crate::session::noise::NoiseKeys;
use crate::stats::Stats;
use crate::wire::frame::{DATA_OVERHEAD, Hello, LEN_PREFIX};

/// Who this node is, as it tells peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LocalInfo {
    /// This node's id.
    pub id: PeerId,
    /// This run's instance number.
    #[serde(serialize_with = "hex")]
    pub instance: u64,
    /// This node's name.
    pub name: String,
    /// The TCP port sessions are accepted on (0 for a controller).
    pub tcp_port: u16,
    /// The UDP discovery port.
    pub discovery_port: u16,
    /// The fingerprint of this node's identity, if it has one (see
    /// [`Identity::fingerprint`](crate::Identity::fingerprint)).
    pub fingerprint: Option<String>,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:016x}"))
}

#[derive(Debug)]
pub(super) struct Inner {
    commands: mpsc::Sender<Command>,
    done: watch::Receiver<bool>,
    /// `shutdown` was called: sends fail with `Error::Shutdown`.
    closing: std::sync::atomic::AtomicBool,
    pub(super) shared: Arc<Shared>,
    local: LocalInfo,
    pub(super) max_message: usize,
}

/// A running lanbeat node: a clonable handle.
///
/// [`Node::start`] binds the sockets and spawns the node's task on the
/// current tokio runtime; events arrive on the returned [`Events`]. The node
/// runs until [`Node::shutdown`] or until the last handle is dropped; both
/// say goodbye to every peer.
#[derive(Debug, Clone)]
pub struct Node {
    pub(super) inner: Arc<Inner>,
}

impl Node {
    /// Validates `config`, binds the discovery and TCP sockets and starts
    /// the node. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, [`Error::Interface`]
    /// when the one interface the configuration names does not exist (or
    /// sockets may not be bound to it), [`Error::Bind`] when a socket cannot
    /// be set up.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes leaves no node running (the
    /// sockets bound so far are closed).
    pub async fn start(config: Config) -> Result<(Node, Events), Error> {
        config.validate()?;
        let bind_err = |what, addr| move |source| Error::Bind { what, addr, source };
        let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        // One named interface: every socket is bound to it, so nothing from
        // another interface reaches the node.
        let scanned = socket::scan().unwrap_or_default();
        let device = socket::bound_device(&config.interfaces, &scanned);
        let mut device = device.as_deref();
        // Several named interfaces: no socket can be bound to all of them,
        // but each must exist (where the platform can tell).
        if device.is_none() && cfg!(any(target_os = "linux", target_os = "android")) {
            for name in &config.interfaces.include {
                match socket::check_device(name) {
                    Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => {
                        return Err(Error::Interface {
                            name: name.clone(),
                            source: e,
                        });
                    }
                    _ => {}
                }
            }
        }
        if let Some(name) = device {
            match socket::check_device(name) {
                Ok(()) => {}
                // Linux before 5.7 (older Android among them) lets only
                // privileged processes bind to a device: the node still
                // refuses connections and datagrams from outside the
                // interface's subnet, it just cannot have the kernel do it.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    warn!(interface = name, error = %e, "cannot bind to the interface; filtering by subnet instead");
                    device = None;
                }
                Err(source) => {
                    return Err(Error::Interface {
                        name: name.to_owned(),
                        source,
                    });
                }
            }
        }
        let shared_sock = socket::bind_shared(config.discovery_port, device)
            .map_err(bind_err("discovery", any(config.discovery_port)))?;
        let unicast = socket::bind_unicast(device).map_err(bind_err("probe", any(0)))?;
        let listener = if config.role.accepts() {
            let l = socket::bind_listener(config.tcp_port, device)
                .map_err(bind_err("tcp listener", any(config.tcp_port)))?;
            Some(l)
        } else {
            None
        };
        let tcp_port = match &listener {
            Some(l) => l
                .local_addr()
                .map_err(bind_err("tcp listener", any(config.tcp_port)))?
                .port(),
            None => 0,
        };
        let v6 = bind_v6(&config, device, listener.is_some().then_some(tcp_port));
        // With Noise every node has a key pair: one made now if none is
        // configured (the id then changes with each start, as a random id
        // would).
        let identity = match (config.security, &config.identity) {
            (Security::Noise, None) => Some(Identity::generate()),
            (_, identity) => identity.clone(),
        };
        let static_peers = resolve_peers(&config).await?;
        let id = match &identity {
            Some(identity) => identity.peer_id(),
            None => config.id.unwrap_or_else(PeerId::random),
        };
        let noise = match (config.security, &identity) {
            (Security::Noise, Some(i)) => {
                let psk = config.fleet_key.as_ref().map(|k| k.to_bytes());
                Some(NoiseKeys::new(i.secret_key(), psk, &config.service))
            }
            _ => None,
        };
        // Liveness datagrams need the session's keys: Noise only.
        let datagrams = match noise {
            Some(_) => {
                let (four, six) = socket::bind_liveness(device, v6.is_some())
                    .map_err(bind_err("liveness", any(0)))?;
                Some(
                    crate::session::datagram::Sockets::new(four, six)
                        .map_err(bind_err("liveness", any(0)))?,
                )
            }
            None => None,
        };
        let instance: u64 = rand::random();
        let local = LocalInfo {
            id,
            instance,
            name: config.name.clone(),
            tcp_port,
            discovery_port: config.discovery_port,
            fingerprint: identity.as_ref().map(|i| i.fingerprint()),
        };
        let disc = Discovery::new(
            DiscoveryConfig {
                service: config.service.clone(),
                id,
                instance,
                name: config.name.clone(),
                role: config.role,
                tcp_port,
                metadata: config.metadata.clone(),
                discovery_port: config.discovery_port,
                probe_initial: config.probe_initial,
                probe_max: config.probe_max,
                probe_max_missing: config.probe_max_missing,
                redial_initial: config.redial_initial,
                peer_expiry: config.peer_expiry,
                max_peers: config.max_peers,
                dials_per_sec: config.max_dials_per_sec,
                replies_per_source_per_sec: config.replies_per_source_per_sec,
                limits: config.datagram_limits(),
                fleet_key: config.fleet_key.clone(),
                aes_gcm: config.offers_aes_gcm(),
                static_peers,
                accept_routed_probes: !config.interfaces.is_restricted(),
                first_seq: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
            },
            rand::random(),
        );
        let session = SessionConfig {
            hello: Hello {
                protocol: config.protocol(),
                service: config.service.clone(),
                id,
                instance,
                name: config.name.clone(),
                role: config.role,
                port: tcp_port,
                heartbeat_interval_ms: millis(config.heartbeat_interval),
                heartbeat_timeout_ms: millis(config.heartbeat_timeout),
                max_frame_size: config.max_frame_size,
                datagram_port: datagrams.as_ref().map_or(0, |d| d.port),
                // Zero stays zero: no resumption.
                grace_ms: u64::try_from(config.resume_grace.as_millis()).unwrap_or(u64::MAX),
                resume: 0,
                received: 0,
            },
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            handshake_timeout: config.handshake_timeout,
            max_unacked: config.max_unacked,
            max_unacked_bytes: config.max_unacked_bytes,
            write_timeout: config.write_timeout,
            stall_timeout: config.stall_timeout,
            resume_grace: config.resume_grace,
        };
        let (commands, command_rx) = mpsc::channel(8);
        let events = Arc::new(EventQueue::with_store(
            config.event_capacity,
            EventStore::new(config.event_capacity_bytes),
        ));
        let (done_tx, done) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let max_message = config.max_frame_size as usize - (DATA_OVERHEAD - LEN_PREFIX);
        let supervisor = Supervisor::new(Parts {
            config,
            id,
            noise,
            discovery: disc,
            session,
            shared: shared.clone(),
            shared_sock,
            unicast,
            listener,
            v6,
            datagrams,
            commands: command_rx,
            events: events.clone(),
        });
        tokio::spawn(supervisor.run(done_tx).instrument(debug_span!("node", %id)));
        info!(%id, tcp_port, "node started");
        Ok((
            Node {
                inner: Arc::new(Inner {
                    commands,
                    done,
                    closing: Default::default(),
                    shared,
                    local,
                    max_message,
                }),
            },
            Events::new(events),
        ))
    }

    /// Who this node is.
    pub fn local(&self) -> &LocalInfo {
        &self.inner.local
    }

    /// This node's id.
    pub fn id(&self) -> PeerId {
        self.inner.local.id
    }

    /// Sends `message` to `peer`, waiting while its outbox is full.
    ///
    /// Returning `Ok` means the message is queued: it is then either
    /// delivered in order, exactly once (across a cut the peer comes back
    /// from within [`Config::resume_grace`](crate::Config::resume_grace)
    /// too), or, if the session ends for good first, handed back in
    /// [`Event::Undelivered`] (never written: certainly not delivered) or
    /// [`Event::Unconfirmed`] (written, not acknowledged: it may have
    /// arrived).
    ///
    /// # Errors
    /// [`Error::NotConnected`] (with the message) when no session with the
    /// peer is up or held for it to resume, [`Error::MessageTooLarge`] when it exceeds our frame
    /// limit or the one the peer advertised in its handshake (the error
    /// names the smaller), [`Error::Shutdown`] once [`Node::shutdown`] was
    /// called (the node sends nothing more).
    ///
    /// # Cancel safety
    /// Dropping the future before it completes (a `select!` with a
    /// timeout) means the message was not queued: it is neither sent nor
    /// handed back, and goes with the future. Keep a clone (a `Bytes` clone
    /// is a reference count) to send it again. A message is accepted only
    /// when the future returns `Ok`.
    pub async fn send(&self, peer: PeerId, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = self.check_size(message.into())?;
        let message = match self.inner.shared.try_push(peer, message) {
            Err(Error::OutboxFull { message, .. }) => message,
            done => return done,
        };
        // The outbox is full: wait for room.
        match self.inner.shared.mailbox(peer) {
            Some((m, limit)) => Push::new(peer, &m, limit, message).await,
            None => Err(Error::NotConnected { peer, message }),
        }
    }

    /// Like [`Node::send`], but fails at once when the outbox is full.
    ///
    /// # Errors
    /// As [`Node::send`], plus [`Error::OutboxFull`].
    pub fn try_send(&self, peer: PeerId, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = self.check_size(message.into())?;
        self.inner.shared.try_push(peer, message)
    }

    /// A sender bound to `peer`'s current session, for streams of messages:
    /// it skips the lookup of the peer's session that [`Node::send`] makes
    /// per message. `None` when no session with the peer is up.
    pub fn sender(&self, peer: PeerId) -> Option<PeerSender> {
        let (mailbox, limit) = self.inner.shared.mailbox(peer)?;
        Some(PeerSender {
            peer,
            max_message: self.inner.max_message.min(limit),
            mailbox,
        })
    }

    /// Sends `value` as JSON to `peer`; see [`Node::send`].
    ///
    /// # Errors
    /// As [`Node::send`], plus [`Error::Json`].
    ///
    /// # Cancel safety
    /// As [`Node::send`].
    pub async fn send_json<T: Serialize + ?Sized>(
        &self,
        peer: PeerId,
        value: &T,
    ) -> Result<(), Error> {
        self.send(peer, serde_json::to_vec(value)?).await
    }

    /// Sends `value` as JSON to every peer with a session; see
    /// [`Node::send_all`].
    ///
    /// # Errors
    /// As [`Node::send_all`], plus [`Error::Json`].
    ///
    /// # Cancel safety
    /// As [`Node::send_all`].
    pub async fn send_all_json<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<Vec<PeerId>, Error> {
        self.send_all(serde_json::to_vec(value)?).await
    }

    /// Sends `message` to every peer with a session (peers whose cut session
    /// is held for resumption included: it waits for them), waiting for
    /// room in each outbox in turn. Returns the peers it was queued for (not those whose
    /// frame limit is below the message's size).
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`].
    ///
    /// # Cancel safety
    /// Not cancel-safe as a whole: dropped midway, the message was queued
    /// for the peers before the one whose outbox it waited for (and is
    /// delivered or handed back to those as usual), not for the others, and
    /// which ones is not reported.
    pub async fn send_all(&self, message: impl Into<Bytes>) -> Result<Vec<PeerId>, Error> {
        let message = self.check_size(message.into())?;
        let targets: Vec<_> = lock(&self.inner.shared.mailboxes)
            .iter()
            .map(|(peer, p)| (*peer, p.mailbox.clone(), p.max_message))
            .collect();
        let mut sent = Vec::with_capacity(targets.len());
        for (peer, m, limit) in targets {
            // A peer that takes no message this large is left out.
            if message.len() <= limit && m.outbox().push(message.clone()).await.is_ok() {
                sent.push(peer);
            }
        }
        sent.sort();
        Ok(sent)
    }

    /// Replaces this node's metadata: announced at once on every interface
    /// (and to static peers), then in every announce; peers get
    /// [`Event::Metadata`] with the new values.
    ///
    /// # Errors
    /// [`Error::Config`] with the limit it breaks (as at `build()`), the
    /// metadata unchanged; [`Error::Shutdown`] once the node shut down.
    ///
    /// # Cancel safety
    /// Cancelled, the change may or may not have been made.
    pub async fn set_metadata(
        &self,
        metadata: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), Error> {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Error::Shutdown);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cmd = Command::SetMetadata(metadata.into_iter().collect(), tx);
        if self.inner.commands.send(cmd).await.is_err() {
            return Err(Error::Shutdown);
        }
        match rx.await {
            Ok(r) => r.map_err(Error::Config),
            Err(_) => Err(Error::Shutdown),
        }
    }

    /// The known peers that call themselves `name`, the connected ones
    /// first, then by id. Names are chosen by each node and need not be
    /// unique (two "kitchen" lamps are two entries); address peers by id,
    /// and keep a node's id across restarts with an identity file
    /// ([`Identity::load_or_create`](crate::Identity::load_or_create)), so
    /// that a restart updates its one entry instead of adding another.
    pub fn peers_named(&self, name: &str) -> Vec<PeerStatus> {
        let mut found: Vec<PeerStatus> = self
            .peers()
            .into_iter()
            .filter(|p| p.info.name == name)
            .collect();
        found.sort_by_key(|p| (p.state != crate::PeerState::Connected, p.info.id));
        found
    }

    /// Every known peer, its state and last RTT, ordered by id.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let shared = &self.inner.shared;
        // Peers with a session: their session's latest sample; others: the
        // last sample of their last session.
        let mut rtts = lock(&shared.rtts).clone();
        for (peer, p) in lock(&shared.mailboxes).iter() {
            if let Some(rtt) = p.mailbox.last_rtt() {
                rtts.insert(*peer, rtt);
            }
        }
        lock(&shared.peers)
            .values()
            .map(|(info, state)| PeerStatus {
                info: info.clone(),
                state: *state,
                last_rtt: rtts.get(&info.id).copied(),
            })
            .collect()
    }

    /// The node's counters.
    pub fn stats(&self) -> Stats {
        self.inner.shared.counters.snapshot()
    }

    /// Says goodbye to every peer (TCP and UDP), closes all sessions and
    /// waits for the node's task to end. Idempotent.
    ///
    /// # Cancel safety
    /// Once the future has been polled and the node's task took the
    /// command, the shutdown goes on without it; dropped before that, the
    /// node keeps running (call it again).
    pub async fn shutdown(&self) {
        self.inner
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.inner.commands.send(Command::Shutdown).await;
        let mut done = self.inner.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    /// `message`, if the node runs and it is within our frame limit.
    pub(super) fn check_size(&self, message: Bytes) -> Result<Bytes, Error> {
        if self
            .inner
            .closing
            .load(std::sync::atomic::Ordering::Relaxed)
            // The node's task ended: it sent its one `true` (or is gone).
            // An atomic load, where `borrow` takes a lock per message.
            || !matches!(self.inner.done.has_changed(), Ok(false))
        {
            return Err(Error::Shutdown);
        }
        check_size(message, self.inner.max_message)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The IPv6 sockets, unless the node is confined to loopback (which has
/// no link-local multicast) or the host has no IPv6: then the node runs on
/// IPv4 alone, and says why.
fn bind_v6(config: &Config, device: Option<&str>, tcp_port: Option<u16>) -> Option<V6> {
    if config.interfaces.loopback_only {
        return None;
    }
    let (shared, unicast) = match socket::bind_udp6(config.discovery_port, device) {
        Ok(s) => s,
        Err(e) => {
            info!(error = %e, "no IPv6 discovery");
            return None;
        }
    };
    let listener = tcp_port.and_then(|port| match socket::bind_listener6(port, device) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(port, error = %e, "no IPv6 sessions: the TCP port is taken for IPv6");
            None
        }
    });
    Some(V6 {
        shared,
        unicast,
        listener,
    })
}

/// The static peers' addresses (`Config::peers`), resolved: the first
/// address of each (IPv4 first), with the node's discovery port unless one
/// is given.
async fn resolve_peers(config: &Config) -> Result<Vec<SocketAddr>, Error> {
    let mut out = Vec::new();
    for addr in &config.peers {
        let fail = |reason: String| Error::PeerAddress {
            addr: addr.clone(),
            reason,
        };
        let (host, port) =
            crate::config::split_peer(addr).ok_or_else(|| fail("not an address".into()))?;
        let port = port.unwrap_or(config.discovery_port);
        let mut found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| fail(e.to_string()))?
            .collect();
        found.sort_by_key(|a| a.is_ipv6());
        let found = *found.first().ok_or_else(|| fail("no address".into()))?;
        out.push(found);
    }
    Ok(out)
}
