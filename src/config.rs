//! Node configuration: documented defaults, a builder and validation.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::ConfigError;
use crate::peer::{PeerId, Role};
use crate::wire::discovery::{Announce, DatagramLimits};

/// The UDP port discovery uses unless configured otherwise.
pub const DEFAULT_DISCOVERY_PORT: u16 = 47474;

/// Which local interfaces discovery uses (IPv4 broadcast and IPv6
/// link-local multicast).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InterfaceSelection {
    /// Use only these interfaces, by name. Empty means every usable one.
    /// A loopback interface named here is used even though loopback is
    /// otherwise skipped; tests name `lo`.
    pub include: Vec<String>,
    /// Never use these interfaces, by name.
    pub exclude: Vec<String>,
    /// Use loopback interfaces even when `include` is empty. Off by default:
    /// discovery over loopback finds only nodes on this host.
    pub loopback: bool,
    /// Use the loopback interfaces only, whatever their name (`lo` on
    /// Linux, `lo0` on macOS): recognised by their flag. Off by default.
    pub loopback_only: bool,
}

impl InterfaceSelection {
    /// Whether the node is confined to the interfaces chosen: named ones,
    /// or loopback only. Then its sockets are bound to the interface if
    /// there is one, and connections from elsewhere are refused.
    pub fn is_restricted(&self) -> bool {
        self.loopback_only || !self.include.is_empty()
    }
}

/// How a node's sessions are protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Security {
    /// Protocol 2: every session starts with a Noise handshake
    /// (`Noise_XX_25519_ChaChaPoly_BLAKE2s`) that proves both sides' ids,
    /// and runs encrypted and authenticated. Needs no setup: a node without
    /// a configured [`Identity`](crate::Identity) makes one at start.
    #[default]
    Noise,
    /// Protocol 1: sessions in plaintext, ids unproven. Any host on the LAN
    /// can read them, inject messages, and take a session over by claiming
    /// a peer's id. Only for devices that cannot afford Noise, on a link
    /// nobody else can reach. Nodes of the two modes do not see each other.
    InsecurePlaintext,
}

/// Which cipher a node's Noise sessions use (PROTOCOL.md §6, "Cipher").
///
/// The two trade large-message speed against the memory a session holds:
/// an expanded AES key is about 0.5 KiB per direction, a ChaCha20 key 32
/// bytes. Their CPU for idle sessions measured the same within the
/// bench's run-to-run spread (docs/BENCHMARKS.md, nineteenth round).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionCipher {
    /// AES-256-GCM where both ends have AES instructions (several times
    /// ChaCha20's speed for large messages there), ChaCha20-Poly1305
    /// otherwise. An AES key is kept expanded, about 0.5 KiB per
    /// direction.
    #[default]
    Auto,
    /// ChaCha20-Poly1305 always: the node does not announce AES-256-GCM
    /// and does not dial with it. Each session holds about 1.1 KiB less
    /// (3.7 instead of 4.8 KiB per idle session in docs/BENCHMARKS.md),
    /// at roughly half AES-GCM's large-message throughput on CPUs with AES
    /// instructions: for a node short of memory that holds thousands of
    /// mostly idle sessions. A peer that dials with AES-256-GCM anyway
    /// (from an announce it saw before) is still accepted.
    ChaCha20Poly1305,
}

/// Everything a [`Node`](crate::Node) needs to start.
///
/// Build one with [`Config::builder`]; every field has a default chosen for
/// Wi-Fi home networks, explained on the field. [`Config::validate`] (run by
/// [`ConfigBuilder::build`] and again by [`Node::start`](crate::Node::start))
/// rejects combinations that cannot work.
///
/// ```
/// use std::time::Duration;
/// let config = lanbeat::Config::builder("lamp-control")
///     .name("kitchen-hub")
///     .heartbeat(Duration::from_millis(200), Duration::from_millis(600))
///     .build()
///     .unwrap();
/// assert_eq!(config.heartbeat_timeout, Duration::from_millis(600));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The service name. Only nodes with the same service see each other.
    /// 1 to 64 bytes.
    pub service: String,
    /// A human-readable name for this node, sent to peers. Up to 64 bytes.
    /// Default: the host name, or `"lanbeat"`.
    pub name: String,
    /// This node's id, in [`Security::InsecurePlaintext`] mode. Default:
    /// `None`, a random id for each start (or the identity's, with
    /// [`Config::identity`]). With Noise an id must be proven by its key:
    /// keep an identity instead (an id without one is refused).
    pub id: Option<PeerId>,
    /// This node's long-term key pair; the id derives from its public key
    /// ([`Identity::peer_id`](crate::Identity::peer_id)). Keep it in a file
    /// with [`Identity::load_or_create`](crate::Identity::load_or_create) so
    /// that the node keeps its id across restarts. Default: `None`.
    pub identity: Option<crate::Identity>,
    /// How sessions are protected. Default: [`Security::Noise`], encrypted
    /// and mutually authenticated.
    pub security: Security,
    /// The cipher of Noise sessions. Default: [`SessionCipher::Auto`].
    pub session_cipher: SessionCipher,
    /// A key shared by the fleet: discovery and sessions only with nodes
    /// that hold it (see [`FleetKey`](crate::FleetKey)): datagrams carry a
    /// MAC and a sequence number, the handshake mixes the key in. Needs
    /// [`Security::Noise`]. Default: `None` (open: any node of the service
    /// may open a session, under its own proven id).
    pub fleet_key: Option<crate::FleetKey>,
    /// Which proven peers may hold a session: any (the default), a fixed
    /// set of ids, or those the application accepts when it meets them
    /// (see [`Trust`](crate::Trust)). Needs [`Security::Noise`].
    pub trust: crate::Trust,
    /// Probe/answer/dial/accept behaviour. Default: [`Role::Peer`].
    pub role: Role,
    /// Small key/values announced to peers (firmware version, room...).
    /// The announce datagram that carries them must fit in
    /// `max_datagram_size`.
    pub metadata: BTreeMap<String, String>,
    /// UDP port for probes and announces, the same on every node of a
    /// service. Default: [`DEFAULT_DISCOVERY_PORT`].
    pub discovery_port: u16,
    /// TCP port sessions are accepted on; 0 picks a free one (the announce
    /// tells peers which). Default: 0.
    pub tcp_port: u16,
    /// Which interfaces discovery uses. Default: every interface that is up
    /// and neither loopback nor point-to-point: its IPv4 subnets by directed
    /// broadcast, its IPv6 link by multicast (PROTOCOL.md §1).
    pub interfaces: InterfaceSelection,
    /// Peers by address, for networks where broadcast does not reach them
    /// (access points that drop it, other subnets, VPNs): each `IP`,
    /// `IP:port` or `host[:port]` (the port is the peer's discovery port,
    /// by default this node's) is probed by unicast and answers from any
    /// subnet. One side naming the other is enough. Host names are resolved
    /// at start (an IPv4 address preferred). IPv6: `ADDR` or `[ADDR]:port`.
    /// Default: none.
    pub peers: Vec<String>,
    /// How often interfaces are listed again, so that an address that appears
    /// later (Wi-Fi reconnect, VPN, DHCP) or a link that comes back is used
    /// without a restart. Default: 500 ms (one `getifaddrs` call: cheap).
    pub interface_rescan: Duration,
    /// Send a heartbeat when nothing else was sent for this long.
    /// Default: 1 s.
    pub heartbeat_interval: Duration,
    /// Close a session with `heartbeat_timeout` when nothing was received for
    /// this long. Must exceed `heartbeat_interval`; three intervals ride out
    /// two lost heartbeats. Default: 3 s.
    pub heartbeat_timeout: Duration,
    /// A connection that has not completed the handshake by then is closed.
    /// Default: 2 s.
    pub handshake_timeout: Duration,
    /// Give up on a TCP connect after this long. Default: 2 s.
    pub connect_timeout: Duration,
    /// Close a session whose peer stops taking data for this long: its TCP
    /// window stays full, or it acknowledges none of the messages in flight.
    /// Default: 3 s.
    pub write_timeout: Duration,
    /// How long an encrypted session's stream may bring nothing while the
    /// peer proves itself alive by liveness datagrams (PROTOCOL.md §7);
    /// then the session ends with `stream_stalled`. Under heavy loss TCP's
    /// retransmissions back off for seconds with the peer alive: this is
    /// how long such a stall is ridden out. Must exceed
    /// `heartbeat_timeout`. Default: 30 s.
    pub stall_timeout: Duration,
    /// How long a session cut by a timeout or a network error is held for
    /// its peer to come back: messages not yet acknowledged, and those sent
    /// meanwhile (up to `outbox_capacity`), wait instead of being handed
    /// back. When the same peer (same instance) is back within it, its new
    /// session resumes the old one: what the peer already received is not
    /// sent again, the rest is, so each message is delivered once, in
    /// order (PROTOCOL.md "Resuming a session"). When the peer does not
    /// come back in time, or comes back restarted, the held messages are
    /// handed back (`Event::Unconfirmed`, `Event::Undelivered`). Both
    /// sides hold the state for the shorter of their two graces. Long
    /// enough to ride out a Wi-Fi roam; 0 turns resumption off (every
    /// cut hands back at once). At most one hour. Default: 30 s.
    pub resume_grace: Duration,
    /// The first gap between probes; it doubles (with ±25 % jitter) up to a
    /// cap. Default: 100 ms.
    pub probe_initial: Duration,
    /// The probe cap while every known peer has a session (or none is
    /// known). New peers announce themselves (and probe), and peers with
    /// sessions do not answer these probes, so this can be slow: it is
    /// what steady-state discovery costs. Default: 30 s.
    pub probe_max: Duration,
    /// The probe cap while a peer is missing (lost without goodbye), so a
    /// returning peer is found within about a second. Default: 1 s.
    pub probe_max_missing: Duration,
    /// First delay before redialing a peer after a failed connect; doubles up
    /// to `probe_max_missing`. Default: 100 ms.
    pub redial_initial: Duration,
    /// A peer without a session that has not been heard from for this long
    /// is reported lost and forgotten. Default: 10 s.
    pub peer_expiry: Duration,
    /// Largest session frame accepted or sent (type byte plus payload);
    /// checked on the length prefix before any allocation. Default: 1 MiB.
    pub max_frame_size: u32,
    /// Largest discovery datagram accepted or sent; anything larger is
    /// dropped before parsing. Default: 1200 bytes (fits any LAN MTU).
    pub max_datagram_size: usize,
    /// Messages that may wait per session before `send` waits (or
    /// `try_send` fails). Default: 1024.
    pub outbox_capacity: usize,
    /// Messages sent but not yet acknowledged per session; past it the
    /// session stops taking messages from its outbox. They are kept so that
    /// a dying session can hand them back. Default: 4096.
    pub max_unacked: usize,
    /// The most bytes of messages sent but not yet acknowledged per
    /// session, as framed (checked before each message, or run of up to
    /// 16 KiB of small messages; one may go past it). The session's
    /// in-flight window adapts below this to how fast acks come back
    /// (starting at 8 KiB, down to 4 KiB on a slow link, up to this on a
    /// fast one), so that heartbeats are not held behind a queue longer
    /// than a send interval. Default: 8 MiB.
    pub max_unacked_bytes: usize,
    /// Events that may wait for the application. When full, sessions stop
    /// reading (TCP pushes back on the sender). Default: 4096.
    pub event_capacity: usize,
    /// Bytes of messages (message, request and handed-back bodies) that may
    /// wait for the application: the queue is full from this many on, as at
    /// `event_capacity` events, so waiting messages hold at most this plus
    /// one message. It also keeps an application that shares a
    /// current-thread runtime with its sessions from falling far behind
    /// them, and what waits small enough to stay in cache. Default: 1 MiB.
    pub event_capacity_bytes: usize,
    /// Most sessions at once; more are refused. Default: 1024.
    pub max_sessions: usize,
    /// Most connections still in their handshake; more are refused at once.
    /// Default: 64.
    pub max_handshakes: usize,
    /// Whether sessions report their round-trip samples as `Event::Rtt`
    /// (about once per heartbeat interval per session: five a second at
    /// 200 ms). Off, the latest sample is still in [`Node::peers`].
    /// Default: on.
    ///
    /// [`Node::peers`]: crate::Node::peers
    pub rtt_events: bool,
    /// Most dials started per second (a burst of as many): an announce
    /// flood naming made-up peers cannot make the node connect to the
    /// addresses it names faster than this. Peers heard twice are dialed
    /// first. Raise it for a gateway that must dial hundreds of devices at
    /// once. Default: 20.
    pub max_dials_per_sec: u32,
    /// Most peers tracked by discovery; announces of further peers are
    /// dropped and counted. Default: 1024.
    pub max_peers: usize,
    /// Announce replies per source IP per second; a burst of twice this is
    /// allowed. Stops a probe flood (or spoofed probes aimed at a victim)
    /// from turning a node into an amplifier. Default: 20.
    pub replies_per_source_per_sec: u32,
}

impl Config {
    /// Whether this node announces AES-256-GCM sessions and dials with
    /// them (where the peer announces them too): protocol 2, the `Auto`
    /// cipher, and AES instructions here.
    pub(crate) fn offers_aes_gcm(&self) -> bool {
        self.security == Security::Noise
            && self.session_cipher == SessionCipher::Auto
            && crate::session::noise::has_aes_hardware()
    }

    /// A builder with every default, for the given service name.
    pub fn builder(service: impl Into<String>) -> ConfigBuilder {
        ConfigBuilder {
            config: Config::new(service),
        }
    }

    /// The defaults, for the given service name (not validated).
    pub fn new(service: impl Into<String>) -> Self {
        Config {
            service: service.into(),
            name: default_name(),
            id: None,
            identity: None,
            security: Security::Noise,
            session_cipher: SessionCipher::Auto,
            fleet_key: None,
            trust: crate::Trust::Any,
            role: Role::Peer,
            metadata: BTreeMap::new(),
            discovery_port: DEFAULT_DISCOVERY_PORT,
            tcp_port: 0,
            interfaces: InterfaceSelection::default(),
            peers: Vec::new(),
            interface_rescan: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(30),
            resume_grace: Duration::from_secs(30),
            probe_initial: Duration::from_millis(100),
            probe_max: Duration::from_secs(30),
            probe_max_missing: Duration::from_secs(1),
            redial_initial: Duration::from_millis(100),
            peer_expiry: Duration::from_secs(10),
            max_frame_size: 1 << 20,
            max_datagram_size: 1200,
            outbox_capacity: 1024,
            max_unacked: 4096,
            max_unacked_bytes: 8 << 20,
            event_capacity: 4096,
            event_capacity_bytes: 1 << 20,
            max_sessions: 1024,
            max_handshakes: 64,
            max_dials_per_sec: 20,
            rtt_events: true,
            max_peers: 1024,
            replies_per_source_per_sec: 20,
        }
    }

    /// Checks that the configuration can work.
    ///
    /// # Errors
    /// The first problem found, as a [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let (Some(id), Some(identity)) = (self.id, &self.identity)
            && id != identity.peer_id()
        {
            return Err(ConfigError::IdAndIdentity {
                id,
                identity: identity.peer_id(),
            });
        }
        if self.security == Security::Noise && self.id.is_some() && self.identity.is_none() {
            return Err(ConfigError::IdWithoutIdentity);
        }
        if let Some(bad) = self.peers.iter().find(|p| split_peer(p).is_none()) {
            return Err(ConfigError::PeerAddress(bad.clone()));
        }
        if self.security == Security::InsecurePlaintext && self.fleet_key.is_some() {
            return Err(ConfigError::FleetKeyWithoutNoise);
        }
        if self.security == Security::InsecurePlaintext && !matches!(self.trust, crate::Trust::Any)
        {
            return Err(ConfigError::TrustWithoutNoise);
        }
        let limits = self.datagram_limits();
        if self.service.is_empty() || self.service.len() > limits.max_text_len {
            return Err(ConfigError::Service(self.service.len()));
        }
        if self.name.len() > limits.max_text_len {
            return Err(ConfigError::Name(self.name.len()));
        }
        nonzero("heartbeat_interval", self.heartbeat_interval)?;
        nonzero("handshake_timeout", self.handshake_timeout)?;
        nonzero("connect_timeout", self.connect_timeout)?;
        nonzero("write_timeout", self.write_timeout)?;
        nonzero("probe_initial", self.probe_initial)?;
        nonzero("redial_initial", self.redial_initial)?;
        nonzero("interface_rescan", self.interface_rescan)?;
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(ConfigError::HeartbeatTimeoutTooShort {
                interval: self.heartbeat_interval,
                timeout: self.heartbeat_timeout,
            });
        }
        if self.heartbeat_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::TooLong("heartbeat_timeout"));
        }
        if self.stall_timeout <= self.heartbeat_timeout {
            return Err(ConfigError::Order {
                smaller: "heartbeat_timeout",
                larger: "stall_timeout",
            });
        }
        if self.resume_grace > Duration::from_secs(3600) {
            return Err(ConfigError::TooLong("resume_grace"));
        }
        if self.probe_max_missing < self.probe_initial {
            return Err(ConfigError::Order {
                smaller: "probe_initial",
                larger: "probe_max_missing",
            });
        }
        if self.probe_max < self.probe_max_missing {
            return Err(ConfigError::Order {
                smaller: "probe_max_missing",
                larger: "probe_max",
            });
        }
        // Peers without a session are refreshed by probes at least three
        // times per expiry (see `discovery::machine`), never slower than
        // `probe_max_missing`.
        if self.peer_expiry <= self.probe_max_missing * 2 {
            return Err(ConfigError::Order {
                smaller: "2 × probe_max_missing",
                larger: "peer_expiry",
            });
        }
        if self.max_frame_size < crate::wire::frame::MIN_MAX_FRAME_SIZE {
            return Err(ConfigError::MaxFrameSize(self.max_frame_size));
        }
        if !(256..=65_507).contains(&self.max_datagram_size) {
            return Err(ConfigError::MaxDatagramSize(self.max_datagram_size));
        }
        for (field, value) in [
            ("outbox_capacity", self.outbox_capacity),
            ("max_unacked", self.max_unacked),
            ("max_unacked_bytes", self.max_unacked_bytes),
            ("event_capacity", self.event_capacity),
            ("event_capacity_bytes", self.event_capacity_bytes),
            ("max_sessions", self.max_sessions),
            ("max_handshakes", self.max_handshakes),
            ("max_dials_per_sec", self.max_dials_per_sec as usize),
            ("max_peers", self.max_peers),
            (
                "replies_per_source_per_sec",
                self.replies_per_source_per_sec as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(field));
            }
        }
        // What every receiver checks, checked here first: a node whose
        // announce breaks a limit would start and never be discovered.
        if self.metadata.len() > limits.max_meta_entries {
            return Err(ConfigError::MetadataEntries {
                count: self.metadata.len(),
                limit: limits.max_meta_entries,
            });
        }
        for (key, value) in &self.metadata {
            if key.len() > limits.max_meta_key {
                return Err(ConfigError::MetadataKey {
                    key: key.clone(),
                    len: key.len(),
                    limit: limits.max_meta_key,
                });
            }
            if value.len() > limits.max_meta_value {
                return Err(ConfigError::MetadataValue {
                    key: key.clone(),
                    len: value.len(),
                    limit: limits.max_meta_value,
                });
            }
        }
        // The announce must fit the datagram limit with the longest values.
        let probe = Announce {
            service: self.service.clone(),
            id: PeerId::from_u64(u64::MAX),
            instance: u64::MAX,
            role: self.role,
            name: self.name.clone(),
            port: u16::MAX,
            metadata: self.metadata.clone(),
            aes_gcm: self.offers_aes_gcm(),
        };
        // A fleet key adds a sequence number and a MAC to each datagram.
        let trailer = if self.fleet_key.is_some() {
            crate::discovery::auth::TRAILER
        } else {
            0
        };
        let size = probe.encoded_len() + trailer;
        if size > self.max_datagram_size {
            return Err(ConfigError::AnnounceTooLarge {
                size,
                limit: self.max_datagram_size,
            });
        }
        Ok(())
    }

    /// The protocol version the node speaks.
    pub(crate) fn protocol(&self) -> u8 {
        match self.security {
            Security::Noise => crate::wire::PROTOCOL_VERSION,
            Security::InsecurePlaintext => crate::wire::PLAINTEXT_PROTOCOL_VERSION,
        }
    }

    pub(crate) fn datagram_limits(&self) -> DatagramLimits {
        DatagramLimits {
            max_size: self.max_datagram_size,
            protocol: self.protocol(),
            ..DatagramLimits::default()
        }
    }
}

/// A static peer address as host and port (`None` for the port when it
/// is not given), or `None` when it is not one.
pub(crate) fn split_peer(addr: &str) -> Option<(&str, Option<u16>)> {
    if addr.parse::<std::net::IpAddr>().is_ok() {
        return Some((addr, None));
    }
    // `[IPv6]:port`.
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        return Some((host, Some(port.parse::<u16>().ok().filter(|p| *p != 0)?)));
    }
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)),
        None => (addr, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    (host_ok || host.parse::<std::net::Ipv4Addr>().is_ok()).then_some((host, port))
}

fn nonzero(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(ConfigError::Zero(field))
    } else {
        Ok(())
    }
}

/// The host's name (from the operating system, on every platform), or
/// `"lanbeat"` if it has none that fits the name limit.
fn default_name() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.len() <= 64)
        .unwrap_or_else(|| "lanbeat".to_owned())
}

/// Builds a [`Config`]; see the fields of [`Config`] for each default.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    config: Config,
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        }
    };
}

impl ConfigBuilder {
    /// Sets [`Config::name`].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Sets [`Config::id`].
    pub fn id(mut self, id: PeerId) -> Self {
        self.config.id = Some(id);
        self
    }

    /// Sets [`Config::identity`]: the node's id becomes the identity's.
    ///
    /// ```
    /// let identity = lanbeat::Identity::generate();
    /// let config = lanbeat::Config::builder("lamps").identity(identity.clone()).build().unwrap();
    /// assert_eq!(config.identity.unwrap().peer_id(), identity.peer_id());
    /// ```
    pub fn identity(mut self, identity: crate::Identity) -> Self {
        self.config.identity = Some(identity);
        self
    }

    /// Adds one [`Config::metadata`] entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets [`Config::heartbeat_interval`] and [`Config::heartbeat_timeout`].
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self.config.heartbeat_timeout = timeout;
        self
    }

    /// Restricts discovery to one more named interface (see
    /// [`InterfaceSelection::include`]).
    pub fn interface(mut self, name: impl Into<String>) -> Self {
        self.config.interfaces.include.push(name.into());
        self
    }

    /// Adds a peer by address ([`Config::peers`]): `IP`, `IP:port`, `host`
    /// or `host:port`.
    pub fn peer(mut self, addr: impl Into<String>) -> Self {
        self.config.peers.push(addr.into());
        self
    }

    /// Never uses the named interface.
    pub fn exclude_interface(mut self, name: impl Into<String>) -> Self {
        self.config.interfaces.exclude.push(name.into());
        self
    }

    /// Discovery on the loopback interface only (found by its flag, so
    /// `lo` on Linux and `lo0` on macOS alike): every node on this host,
    /// nothing beyond it, and the node unreachable from other hosts. What
    /// tests and the local demo use.
    pub fn loopback_only(mut self) -> Self {
        self.config.interfaces = InterfaceSelection {
            include: Vec::new(),
            exclude: Vec::new(),
            loopback: true,
            loopback_only: true,
        };
        self
    }

    /// Sets [`Config::fleet_key`]: sessions only with holders of `key`.
    pub fn fleet_key(mut self, key: crate::FleetKey) -> Self {
        self.config.fleet_key = Some(key);
        self
    }

    /// Sessions only with these ids ([`Trust::Only`](crate::Trust::Only)):
    /// others are not dialed, and refused after the handshake.
    pub fn trust_only(mut self, ids: impl IntoIterator<Item = PeerId>) -> Self {
        self.config.trust = crate::Trust::Only(ids.into_iter().collect());
        self
    }

    /// The application decides on each peer when it first completes a
    /// handshake ([`Trust::Decide`](crate::Trust::Decide)): trust on first
    /// use, pairing.
    pub fn trust_with(
        mut self,
        decide: impl Fn(&crate::TrustRequest) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config.trust = crate::Trust::Decide(std::sync::Arc::new(decide));
        self
    }

    /// Sessions in plaintext, ids unproven: [`Security::InsecurePlaintext`]
    /// (read its warning).
    pub fn insecure_plaintext(mut self) -> Self {
        self.config.security = Security::InsecurePlaintext;
        self
    }

    setter!(
        /// Sets [`Config::session_cipher`].
        session_cipher: SessionCipher
    );
    setter!(
        /// Sets [`Config::role`].
        role: Role
    );
    setter!(
        /// Sets [`Config::discovery_port`].
        discovery_port: u16
    );
    setter!(
        /// Sets [`Config::tcp_port`].
        tcp_port: u16
    );
    setter!(
        /// Sets [`Config::interfaces`].
        interfaces: InterfaceSelection
    );
    setter!(
        /// Sets [`Config::interface_rescan`].
        interface_rescan: Duration
    );
    setter!(
        /// Sets [`Config::handshake_timeout`].
        handshake_timeout: Duration
    );
    setter!(
        /// Sets [`Config::connect_timeout`].
        connect_timeout: Duration
    );
    setter!(
        /// Sets [`Config::write_timeout`].
        write_timeout: Duration
    );
    setter!(
        /// Sets [`Config::stall_timeout`].
        stall_timeout: Duration
    );
    setter!(
        /// Sets [`Config::resume_grace`] (zero: no resumption).
        resume_grace: Duration
    );
    setter!(
        /// Sets [`Config::probe_initial`].
        probe_initial: Duration
    );
    setter!(
        /// Sets [`Config::probe_max`].
        probe_max: Duration
    );
    setter!(
        /// Sets [`Config::probe_max_missing`].
        probe_max_missing: Duration
    );
    setter!(
        /// Sets [`Config::redial_initial`].
        redial_initial: Duration
    );
    setter!(
        /// Sets [`Config::peer_expiry`].
        peer_expiry: Duration
    );
    setter!(
        /// Sets [`Config::max_frame_size`].
        max_frame_size: u32
    );
    setter!(
        /// Sets [`Config::max_datagram_size`].
        max_datagram_size: usize
    );
    setter!(
        /// Sets [`Config::outbox_capacity`].
        outbox_capacity: usize
    );
    setter!(
        /// Sets [`Config::max_unacked`].
        max_unacked: usize
    );
    setter!(
        /// Sets [`Config::max_unacked_bytes`].
        max_unacked_bytes: usize
    );
    setter!(
        /// Sets [`Config::event_capacity`].
        event_capacity: usize
    );
    setter!(
        /// Sets [`Config::event_capacity_bytes`].
        event_capacity_bytes: usize
    );
    setter!(
        /// Sets [`Config::max_sessions`].
        max_sessions: usize
    );
    setter!(
        /// Sets [`Config::max_handshakes`].
        max_handshakes: usize
    );
    setter!(
        /// Sets [`Config::max_dials_per_sec`].
        max_dials_per_sec: u32
    );
    setter!(
        /// Sets [`Config::rtt_events`].
        rtt_events: bool
    );
    setter!(
        /// Sets [`Config::max_peers`].
        max_peers: usize
    );
    setter!(
        /// Sets [`Config::replies_per_source_per_sec`].
        replies_per_source_per_sec: u32
    );

    /// Validates and returns the configuration.
    ///
    /// # Errors
    /// See [`Config::validate`].
    pub fn build(self) -> Result<Config, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::new("svc").validate().unwrap();
    }

    #[test]
    fn rejects_timeout_not_above_interval() {
        let err = Config::builder("svc")
            .heartbeat(Duration::from_millis(300), Duration::from_millis(300))
            .build()
            .unwrap_err();
        assert!(matches!(err, ConfigError::HeartbeatTimeoutTooShort { .. }));
        Config::builder("svc")
            .heartbeat(Duration::from_millis(100), Duration::from_millis(300))
            .build()
            .unwrap();
    }

    #[test]
    fn rejects_bad_fields() {
        assert!(matches!(
            Config::builder("").build(),
            Err(ConfigError::Service(0))
        ));
        assert!(matches!(
            Config::builder("s").name("n".repeat(65)).build(),
            Err(ConfigError::Name(65))
        ));
        assert!(matches!(
            Config::builder("s").outbox_capacity(0).build(),
            Err(ConfigError::Zero("outbox_capacity"))
        ));
        assert!(matches!(
            Config::builder("s").event_capacity_bytes(0).build(),
            Err(ConfigError::Zero("event_capacity_bytes"))
        ));
        assert!(matches!(
            Config::builder("s")
                .heartbeat(Duration::ZERO, Duration::from_secs(1))
                .build(),
            Err(ConfigError::Zero("heartbeat_interval"))
        ));
        assert!(matches!(
            Config::builder("s").max_frame_size(10).build(),
            Err(ConfigError::MaxFrameSize(10))
        ));
        // An id and an identity that disagree: which one is meant?
        let identity = crate::Identity::generate();
        match Config::builder("s")
            .id(PeerId::from_u64(1))
            .identity(identity.clone())
            .build()
        {
            Err(ConfigError::IdAndIdentity { id, identity: i }) => {
                assert_eq!((id, i), (PeerId::from_u64(1), identity.peer_id()));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Config::builder("s")
                .id(identity.peer_id())
                .identity(identity)
                .build()
                .is_ok()
        );
        assert!(matches!(
            Config::builder("s")
                .peer_expiry(Duration::from_secs(1))
                .build(),
            Err(ConfigError::Order { .. })
        ));
        // A stall must outlast the heartbeat timeout it stretches.
        assert_eq!(
            Config::builder("s")
                .stall_timeout(Duration::from_secs(3))
                .build()
                .unwrap_err(),
            ConfigError::Order {
                smaller: "heartbeat_timeout",
                larger: "stall_timeout",
            }
        );
        // Within each limit, but together too large for a datagram.
        let mut big = Config::builder("s");
        for i in 0..10 {
            big = big.metadata(format!("key{i}"), "x".repeat(200));
        }
        assert!(matches!(
            big.build(),
            Err(ConfigError::AnnounceTooLarge { .. })
        ));
        // Each limit receivers check, with its own error (issue 17: these
        // built and started, and the node was never discovered).
        let mut many = Config::builder("s");
        for i in 0..17 {
            many = many.metadata(format!("k{i}"), "v");
        }
        assert!(matches!(
            many.build(),
            Err(ConfigError::MetadataEntries {
                count: 17,
                limit: 16
            })
        ));
        match Config::builder("s").metadata("k".repeat(65), "v").build() {
            Err(ConfigError::MetadataKey {
                len: 65, limit: 64, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        match Config::builder("s").metadata("fw", "v".repeat(257)).build() {
            Err(
                e @ ConfigError::MetadataValue {
                    len: 257,
                    limit: 256,
                    ..
                },
            ) => {
                assert!(e.to_string().contains("\"fw\""), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // At the limits, it builds.
        let mut full = Config::builder("s");
        for i in 0..16 {
            full = full.metadata(format!("{i:0>64}"), "v");
        }
        assert!(
            full.build().is_err(),
            "16 keys of 64 bytes do not fit a 1200-byte announce"
        );
        assert!(
            Config::builder("s")
                .metadata("k".repeat(64), "v".repeat(256))
                .build()
                .is_ok()
        );
    }

    #[test]
    fn peer_addresses_are_checked_at_build() {
        for good in [
            "10.0.0.5",
            "10.0.0.5:47474",
            "lamp.local",
            "lamp-2.lan:4000",
            "::1",
            "[fd00::2]:4000",
        ] {
            assert!(Config::builder("s").peer(good).build().is_ok(), "{good}");
        }
        for bad in [
            "",
            "10.0.0.5:",
            "10.0.0.5:0",
            "10.0.0.5:99999",
            "lamp local",
            "a:b:c",
            "[::1]",
            "[::1]:0",
            "[lamp]:80",
        ] {
            assert!(
                matches!(
                    Config::builder("s").peer(bad).build(),
                    Err(ConfigError::PeerAddress(a)) if a == bad
                ),
                "{bad}"
            );
        }
    }
}
