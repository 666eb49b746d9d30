//! The supervisor: the node's task, which ties discovery, dialing,
//! sessions and rediscovery together.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, debug_span, info, trace, warn};

use super::EventQueue;
use super::events::CloseOnDrop;
use super::shared::{Command, Published, Shared, lock};
use crate::clock;
use crate::config::Config;
use crate::discovery::machine::{Discovery, DiscoveryEvent, Target};
use crate::discovery::socket;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::peer::{PeerId, PeerInfo, PeerMap};
use crate::session::lifecycle;
use crate::session::machine::SessionConfig;
use crate::session::mailbox::Mailbox;
use crate::session::noise::{Cipher, NoiseKeys};
use crate::session::resume::{self, Suspended};
use crate::session::supervision::{
    Approval, ConnectFuture, ConnectionParams, NewConnection, NodeContext, Report, Terms,
};
use crate::session::task::ConnectionTask;
use crate::session::timer::Timer;
use crate::stats::Counters;
use crate::trust::{Gate, TrustRequest};
use crate::wire::frame::{DATA_OVERHEAD, Hello, LEN_PREFIX};

/// What the supervisor keeps of each connection.
struct ConnEntry {
    /// Shared with the connection: close requests, and its outbox.
    mailbox: Arc<Mailbox>,
    outbound: bool,
    /// The peer a dial was for.
    expected: Option<PeerId>,
    /// Peer and instance once the session is up.
    up: Option<(PeerId, u64)>,
    /// The dial's offer to resume a held session (its token, and what we
    /// received of it).
    offer: Option<(u64, u64)>,
}

/// A handshake that waits for the peer's previous session to end.
struct Waiting {
    conn: u64,
    hello: Box<Hello>,
    addr: SocketAddr,
    approve: oneshot::Sender<Approval>,
}

/// The node's task: it owns discovery and its sockets, accepts and dials
/// connections, approves their handshakes (one session per peer), and
/// tells discovery when sessions come and go.
pub(crate) struct Supervisor {
    config: Config,
    id: PeerId,
    disc: Discovery,
    /// Who may hold a session (`Config::trust`).
    gate: Gate,
    session: Arc<SessionConfig>,
    shared: Arc<Shared>,
    shared_sock: UdpSocket,
    unicast: UdpSocket,
    listener: Option<TcpListener>,
    /// IPv6 discovery and sessions, where the host has IPv6.
    v6: Option<V6>,
    /// The interfaces whose IPv6 discovery group the shared IPv6 socket
    /// joined.
    joined: std::collections::HashSet<u32>,
    commands: mpsc::Receiver<Command>,
    /// Given to each connection, to report to us.
    reports_tx: mpsc::UnboundedSender<Report>,
    reports_rx: mpsc::UnboundedReceiver<Report>,
    events: Arc<EventQueue>,
    conns: HashMap<u64, ConnEntry>,
    /// The connection of each session that is up.
    sessions: PeerMap<u64>,
    waiting: PeerMap<Waiting>,
    tasks: JoinSet<()>,
    /// Which connection each task runs.
    task_conn: HashMap<tokio::task::Id, u64>,
    next_conn: u64,
    /// Connections not yet approved as sessions (dialing or in handshake).
    handshaking: usize,
    /// The event stream, the timer and the counters, for the connections.
    node: Arc<NodeContext>,
    /// Sessions cut and held for their peers to resume them.
    held: PeerMap<Box<Suspended>>,
    /// Events for the application from the supervisor's own decisions
    /// (held sessions handed back), pushed in order by `flush`.
    owed: Vec<Event>,
}

/// What [`Node::start`](crate::Node::start) made for the supervisor.
pub(crate) struct Parts {
    pub(crate) config: Config,
    pub(crate) id: PeerId,
    /// The Noise keys, unless sessions are plaintext.
    pub(crate) noise: Option<NoiseKeys>,
    pub(crate) discovery: Discovery,
    pub(crate) session: SessionConfig,
    pub(crate) shared: Arc<Shared>,
    /// The discovery port's socket (probes and announces by broadcast).
    pub(crate) shared_sock: UdpSocket,
    /// Our own port: what we send, and the unicast answers to it.
    pub(crate) unicast: UdpSocket,
    pub(crate) listener: Option<TcpListener>,
    pub(crate) v6: Option<V6>,
    /// The liveness datagrams' sockets (Noise sessions only).
    pub(crate) datagrams: Option<crate::session::datagram::Sockets>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) events: Arc<EventQueue>,
}

impl Supervisor {
    pub(crate) fn new(p: Parts) -> Supervisor {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let node = Arc::new(NodeContext {
            events: p.events.clone(),
            timer: Arc::new(Timer::new(clock::now())),
            counters: p.shared.counters.clone(),
            rtt_events: p.config.rtt_events,
            noise: p.noise,
            datagrams: p.datagrams,
            requests: p.shared.requests.clone(),
        });
        Supervisor {
            gate: Gate::new(p.config.trust.clone()),
            config: p.config,
            id: p.id,
            disc: p.discovery,
            session: Arc::new(p.session),
            shared: p.shared,
            shared_sock: p.shared_sock,
            unicast: p.unicast,
            listener: p.listener,
            v6: p.v6,
            joined: Default::default(),
            commands: p.commands,
            reports_tx,
            reports_rx,
            events: p.events,
            conns: HashMap::new(),
            sessions: PeerMap::default(),
            waiting: PeerMap::default(),
            tasks: JoinSet::new(),
            task_conn: HashMap::new(),
            next_conn: 0,
            handshaking: 0,
            node,
            held: PeerMap::default(),
            owed: Vec::new(),
        }
    }

    /// Runs the node until shutdown, then tells `done`. However the task
    /// ends, the event queue is closed, so that [`Events::recv`] returns
    /// `None` instead of waiting for ever.
    ///
    /// [`Events::recv`]: crate::Events::recv
    pub(crate) async fn run(self, done: watch::Sender<bool>) {
        let _close = CloseOnDrop(self.events.clone());
        self.serve().await;
        let _ = done.send(true);
    }

    async fn serve(mut self) {
        // Round-trip samples wake the application through the timer (see
        // `Queue::try_push_quiet`).
        let events = self.node.events.clone();
        self.tasks
            .spawn(self.node.timer.clone().run(move || events.wake_owed()));
        if let Some(d) = &self.node.datagrams {
            for task in d.tasks(&self.node.counters) {
                self.tasks.spawn(task);
            }
        }
        self.rescan();
        let mut rescan = tokio::time::interval(self.config.interface_rescan);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The OS's notifications, where it has them: a change is acted on
        // at once, not at the next tick.
        let mut watch = crate::discovery::watch::Watch::new();
        // One byte more than the limit tells an oversized datagram apart.
        let mut buf_a = vec![0u8; self.config.max_datagram_size + 1];
        let mut buf_b = vec![0u8; self.config.max_datagram_size + 1];
        let (mut buf_c, mut buf_d) = match &self.v6 {
            Some(_) => (buf_a.clone(), buf_a.clone()),
            None => (Vec::new(), Vec::new()),
        };
        loop {
            self.flush().await;
            let mut deadline = self.disc.poll_timeout();
            // Work already due (a dial scheduled for now by the datagram
            // just handled) is done at once: a timer for it would fire only
            // at the runtime's next millisecond tick, up to 1 ms later.
            // Once per turn, so a deadline that stays due cannot spin.
            let now = clock::now();
            if deadline.is_some_and(|d| d <= now) {
                self.disc.handle_timeout(now);
                self.flush().await;
                deadline = self.disc.poll_timeout();
            }
            let expiry = self.held.values().filter_map(|h| h.until).min();
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(Command::SetMetadata(metadata, done)) => {
                        let _ = done.send(self.set_metadata(metadata));
                    }
                },
                r = self.shared_sock.recv_from(&mut buf_a) => self.datagram(r, &buf_a),
                r = self.unicast.recv_from(&mut buf_b) => self.datagram(r, &buf_b),
                r = recv6(self.v6.as_ref().map(|v| &v.shared), &mut buf_c) => self.datagram(r, &buf_c),
                r = recv6(self.v6.as_ref().map(|v| &v.unicast), &mut buf_d) => self.datagram(r, &buf_d),
                r = accept(self.listener.as_ref()) => self.accepted(r),
                r = accept(self.v6.as_ref().and_then(|v| v.listener.as_ref())) => self.accepted(r),
                Some(report) = self.reports_rx.recv() => self.report(report),
                _ = clock::sleep_until(deadline.unwrap_or_else(|| clock::now() + Duration::from_secs(3600))) => {
                    self.disc.handle_timeout(clock::now());
                }
                _ = clock::sleep_until(expiry.unwrap_or_else(|| clock::now() + Duration::from_secs(3600))), if expiry.is_some() => {
                    self.expire_held(clock::now());
                }
                _ = rescan.tick() => self.rescan(),
                _ = watch.changed() => self.rescan(),
                Some(done) = self.tasks.join_next_with_id() => self.task_done(done),
            }
        }
        self.shutdown().await;
    }

    fn rescan(&mut self) {
        match socket::scan() {
            Ok(addrs) => {
                let mut targets = socket::select_targets(&addrs, &self.config.interfaces);
                self.join_groups(&mut targets);
                if self.disc.set_targets(clock::now(), targets) {
                    let names: Vec<_> = self
                        .disc
                        .targets()
                        .iter()
                        .map(|t| format!("{}={}", t.interface, t.broadcast))
                        .collect();
                    info!(targets = ?names, "discovery interfaces changed");
                }
            }
            Err(e) => warn!(error = %e, "cannot list interfaces"),
        }
    }

    /// Joins the IPv6 discovery group on every interface with an IPv6
    /// target (once each), and drops the IPv6 targets it cannot use (no
    /// IPv6 sockets, or the join failed: nothing would be heard there).
    fn join_groups(&mut self, targets: &mut Vec<Target>) {
        let Some(v6) = &self.v6 else {
            targets.retain(|t| t.addr.is_ipv4());
            return;
        };
        let scopes: std::collections::HashSet<u32> = targets
            .iter()
            .filter(|t| t.addr.is_ipv6())
            .map(|t| t.scope)
            .collect();
        self.joined.retain(|i| scopes.contains(i));
        for &scope in &scopes {
            if self.joined.contains(&scope) {
                continue;
            }
            match socket::join_group(&v6.shared, scope) {
                Ok(()) => {
                    self.joined.insert(scope);
                }
                Err(e) => debug!(scope, error = %e, "cannot join the IPv6 discovery group"),
            }
        }
        let joined = &self.joined;
        targets.retain(|t| t.addr.is_ipv4() || joined.contains(&t.scope));
    }

    fn datagram(&mut self, r: std::io::Result<(usize, SocketAddr)>, buf: &[u8]) {
        let (n, from) = match r {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors surface here on Linux; they concern one send.
                trace!(error = %e, "udp receive error");
                return;
            }
        };
        let c = &self.shared.counters;
        Counters::bump(&c.datagrams_received);
        if let Err(why) = self.disc.handle_datagram(clock::now(), from, &buf[..n]) {
            debug!(%from, len = n, reason = ?why, "dropped datagram");
            c.dropped(why);
        }
    }

    /// Sends what discovery queued and acts on its events.
    async fn flush(&mut self) {
        while let Some(t) = self.disc.poll_transmit() {
            let sent = match (t.dst, &self.v6) {
                (SocketAddr::V4(_), _) => self.unicast.send_to(&t.payload, t.dst).await,
                (SocketAddr::V6(_), Some(v6)) => v6.unicast.send_to(&t.payload, t.dst).await,
                (SocketAddr::V6(_), None) => Err(std::io::ErrorKind::Unsupported.into()),
            };
            match sent {
                Ok(_) => Counters::bump(&self.shared.counters.datagrams_sent),
                Err(e) => {
                    debug!(dst = %t.dst, error = %e, "cannot send datagram");
                    Counters::bump(&self.shared.counters.datagram_send_errors);
                }
            }
        }
        for e in std::mem::take(&mut self.owed) {
            let _ = self.events.push(e).await;
        }
        while let Some(ev) = self.disc.poll_event() {
            match ev {
                DiscoveryEvent::Discovered(info) => {
                    info!(peer = %info.id, addr = %info.addr, name = %info.name, "discovered");
                    let _ = self.events.push(Event::Discovered(Box::new(info))).await;
                }
                DiscoveryEvent::Dial(info) => self.dial(info),
                DiscoveryEvent::MetadataChanged(info) => {
                    debug!(peer = %info.id, "metadata changed");
                    // `Node::peers` shows the new values before the event
                    // says so.
                    self.publish_peers();
                    let e = Event::Metadata {
                        peer: info.id,
                        metadata: Box::new(info.metadata),
                    };
                    let _ = self.events.push(e).await;
                }
                DiscoveryEvent::Lost(peer) => {
                    info!(%peer, "peer lost");
                    lock(&self.shared.rtts).remove(&peer);
                    let _ = self.events.push(Event::PeerLost { peer }).await;
                }
                DiscoveryEvent::Duplicate { id, kept, other } => {
                    warn!(peer = %id, %kept, %other, "two nodes share one id; the second is ignored for a while");
                    Counters::bump(&self.shared.counters.duplicate_ids);
                    let e = Event::DuplicateId {
                        peer: id,
                        kept,
                        other,
                    };
                    let _ = self.events.push(e).await;
                }
            }
        }
        self.publish_peers();
    }

    /// Mirrors the peers discovery changed into the shared table that
    /// `Node::peers` reads: only what changed, so 10 000 sessions coming up
    /// cost 10 000 updates, not 10 000 table copies.
    fn publish_peers(&mut self) {
        let changed = self.disc.poll_changed();
        if changed.is_empty() {
            return;
        }
        let mut table = lock(&self.shared.peers);
        for id in changed {
            match self.disc.peer(id) {
                Some((info, state)) => {
                    table.insert(id, (info.clone(), state));
                }
                None => {
                    table.remove(&id);
                }
            }
        }
    }

    fn accepted(&mut self, r: std::io::Result<(TcpStream, SocketAddr)>) {
        let (stream, addr) = match r {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                return;
            }
        };
        // Named interfaces: only their subnets may connect (one named
        // interface is enforced by the kernel already: the listener is
        // bound to it).
        if self.config.interfaces.is_restricted() && !from_selected(self.disc.targets(), addr) {
            debug!(%addr, "refusing a connection from outside the selected interfaces");
            Counters::bump(&self.shared.counters.refused_foreign_interface);
            return;
        }
        let handshaking = self.handshaking;
        if handshaking >= self.config.max_handshakes
            || self.sessions.len() >= self.config.max_sessions
        {
            debug!(%addr, handshaking, sessions = self.sessions.len(), "refusing connection");
            Counters::bump(&self.shared.counters.sessions_refused);
            return;
        }
        // The cipher is the dialer's choice.
        self.spawn_conn(None, addr, Ok(stream), (None, Cipher::ChaChaPoly));
    }

    /// Announces `metadata` from now on, if it fits an announce.
    fn set_metadata(
        &mut self,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<(), crate::error::ConfigError> {
        let mut checked = self.config.clone();
        checked.metadata = metadata.clone();
        checked.validate()?;
        self.config.metadata = metadata.clone();
        self.disc.set_metadata(metadata);
        Ok(())
    }

    /// Whether the trust policy lets the peer that proved `key` have its
    /// session (counted and logged when not).
    fn trusted(&mut self, hello: &Hello, addr: SocketAddr, key: [u8; 32]) -> bool {
        let request = TrustRequest {
            id: hello.id,
            public_key: key,
            fingerprint: crate::identity::fingerprint(&key),
            name: hello.name.clone(),
            addr,
        };
        let ok = self.gate.admits(clock::now(), &request);
        if !ok {
            info!(peer = %hello.id, %addr, "refusing a peer the trust policy does not admit");
            Counters::bump(&self.shared.counters.sessions_untrusted);
        }
        ok
    }

    fn dial(&mut self, info: PeerInfo) {
        if !self.gate.may_dial(clock::now(), info.id) {
            // Not trusted (or refused a minute ago): no connect.
            self.disc.dial_failed(clock::now(), info.id);
            return;
        }
        debug!(peer = %info.id, addr = %info.addr, "dialing");
        // A held session is offered to the same instance; a restarted
        // peer cannot have it.
        if self
            .held
            .get(&info.id)
            .is_some_and(|h| h.instance != info.instance)
        {
            self.give_up_held(info.id);
        }
        let offer = self.held.get(&info.id).map(|h| (h.token, h.held.received));
        let cipher = dial_cipher(info.aes_gcm, &self.config);
        let connect = lifecycle::connect(info.addr, self.config.connect_timeout);
        self.spawn_conn(Some(info.id), info.addr, Err(connect), (offer, cipher));
    }

    fn spawn_conn(
        &mut self,
        expected: Option<PeerId>,
        addr: SocketAddr,
        stream: Result<TcpStream, ConnectFuture>,
        (offer, cipher): (Option<(u64, u64)>, Cipher),
    ) {
        self.next_conn += 1;
        self.handshaking += 1;
        let id = self.next_conn;
        let mailbox = Arc::new(Mailbox::new(self.config.outbox_capacity));
        let outbound = expected.is_some();
        self.conns.insert(
            id,
            ConnEntry {
                mailbox: mailbox.clone(),
                outbound,
                expected,
                up: None,
                offer,
            },
        );
        let new = NewConnection {
            params: ConnectionParams {
                id,
                session: self.session.clone(),
                expected,
                outbound,
                addr,
                write_timeout: self.config.write_timeout,
                proven_key: None,
                reports: self.reports_tx.clone(),
                lineage: id,
                offer,
                cipher,
                token: 0,
                peer_instance: 0,
                grace: Duration::ZERO,
            },
            max_frame: self.config.max_frame_size,
            node: self.node.clone(),
            mailbox,
        };
        let span = match expected {
            Some(p) => debug_span!("session", peer = %p, %addr, conn = id),
            None => debug_span!("session", %addr, conn = id),
        };
        let handle = self.tasks.spawn(ConnectionTask::new(new, stream, span));
        self.task_conn.insert(handle.id(), id);
    }

    /// A connection task ended. Normally it reported its end already; if it
    /// panicked (a bug), report the end for it so that the peer is looked
    /// for again instead of being taken for connected for ever.
    fn task_done(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some(conn) = self.task_conn.remove(&id) else {
            return;
        };
        if let Err(e) = done
            && self.conns.contains_key(&conn)
        {
            warn!(conn, error = %e, "session task failed");
            let peer = self.conns[&conn].up.map(|(p, _)| p);
            let reason = DownReason::Io(std::io::ErrorKind::Other);
            if let Some(p) = peer {
                let events = self.events.clone();
                let r = reason.clone();
                // Keep the application's view whole: the session is down.
                self.tasks.spawn(async move {
                    let _ = events.push(Event::SessionDown { peer: p, reason: r }).await;
                });
            }
            self.ended(conn, peer, reason, None);
        }
    }

    /// Asks a connection to close (with a goodbye when it is a session).
    fn close_conn(&mut self, conn: u64, reason: DownReason) {
        if let Some(c) = self.conns.get(&conn) {
            c.mailbox.request_close(reason);
        }
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::Handshaken {
                conn,
                hello,
                addr,
                key,
                approve,
            } => {
                if let Some(key) = key
                    && !self.trusted(&hello, addr, key)
                {
                    let _ =
                        approve.send(Approval::Reject(ProtocolViolation::Refused("not trusted")));
                    return;
                }
                self.handshaken(conn, hello, addr, approve)
            }
            Report::Ended {
                conn,
                peer,
                reason,
                held,
            } => self.ended(conn, peer, reason, held),
        }
    }

    fn handshaken(
        &mut self,
        conn: u64,
        hello: Box<Hello>,
        addr: SocketAddr,
        approve: oneshot::Sender<Approval>,
    ) {
        let peer = hello.id;
        let Some(entry) = self.conns.get(&conn) else {
            return;
        };
        let new_dialer = if entry.outbound { self.id } else { peer };
        let Some(&old) = self.sessions.get(&peer) else {
            if self.sessions.len() >= self.config.max_sessions {
                Counters::bump(&self.shared.counters.sessions_refused);
                let _ = approve.send(Approval::Reject(ProtocolViolation::Refused(
                    "too many sessions",
                )));
                return;
            }
            self.approve(conn, *hello, addr, approve);
            return;
        };
        // A session with this peer exists. Newer beats stale: a restarted
        // peer, or the same dialer dialing again (it gave up on the old
        // one). Two dialers at once: the smaller dialer id wins.
        let old_entry = &self.conns[&old];
        let (_, old_instance) = old_entry
            .up
            .expect("sessions holds only sessions that are up");
        let old_dialer = if old_entry.outbound { self.id } else { peer };
        let reason = if hello.instance != old_instance
            && self
                .disc
                .duplicate_instance(clock::now(), peer, hello.instance, addr)
        {
            // A second live node with this id, not a restart: the session
            // stays, the newcomer is refused (see `DiscoveryEvent::Duplicate`).
            debug!(%peer, %addr, "refusing a second instance of a duplicated id");
            let _ = approve.send(Approval::Reject(ProtocolViolation::Refused("duplicate id")));
            return;
        } else if hello.instance != old_instance {
            DownReason::PeerRestarted
        } else if new_dialer <= old_dialer {
            // Equal: the same dialer dialed again. Smaller: tie-break win.
            DownReason::Replaced
        } else {
            debug!(%peer, "duplicate session lost the tie-break");
            let _ = approve.send(Approval::Reject(ProtocolViolation::Refused(
                "duplicate session",
            )));
            return;
        };
        debug!(%peer, %reason, "replacing session");
        self.close_conn(old, reason);
        if let Some(prev) = self.waiting.insert(
            peer,
            Waiting {
                conn,
                hello,
                addr,
                approve,
            },
        ) {
            let _ = prev
                .approve
                .send(Approval::Reject(ProtocolViolation::Refused(
                    "duplicate session",
                )));
        }
    }

    fn approve(
        &mut self,
        conn: u64,
        hello: Hello,
        addr: SocketAddr,
        approve: oneshot::Sender<Approval>,
    ) {
        let peer = hello.id;
        let Some(entry) = self.conns.get(&conn) else {
            return;
        };
        let (outbound, offer) = (entry.outbound, entry.offer);
        let terms = match self.terms(&hello, outbound, offer) {
            Ok(terms) => terms,
            Err(v) => {
                let _ = approve.send(Approval::Reject(v));
                return;
            }
        };
        let metadata = self
            .disc
            .peer(peer)
            .map(|(info, _)| info.metadata.clone())
            .unwrap_or_default();
        // A resumed session goes on with the held one's mailbox and number.
        let (lineage, mailbox) = match &terms.resume {
            Some((h, _)) => (h.lineage, Some(h.mailbox.clone())),
            None => (conn, None),
        };
        let resumed = mailbox.is_some();
        let entry = self.conns.get_mut(&conn).expect("checked above");
        if let Some(m) = mailbox {
            entry.mailbox = m;
        }
        let mailbox = entry.mailbox.clone();
        let info_addr = if outbound {
            addr
        } else {
            SocketAddr::new(addr.ip(), hello.port)
        };
        let interface = self
            .disc
            .targets()
            .iter()
            .find(|t| t.contains(from_mapped(addr)))
            .map(|t| t.interface.clone());
        let aes_gcm = self.disc.peer(peer).is_some_and(|(i, _)| i.aes_gcm);
        let info = PeerInfo {
            id: peer,
            instance: hello.instance,
            name: hello.name.clone(),
            addr: info_addr,
            interface,
            role: hello.role,
            metadata: metadata.clone(),
            aes_gcm,
        };
        let max_message =
            (hello.max_frame_size as usize).saturating_sub(DATA_OVERHEAD - LEN_PREFIX);
        let published = Published {
            conn,
            lineage,
            mailbox,
            max_message,
        };
        // Published before the connection is told: once the application
        // has its `SessionUp` (pushed by the connection, on any thread),
        // `Node::send` finds the session and `Node::peers` says Connected.
        let before_mailbox = lock(&self.shared.mailboxes).insert(peer, published);
        let before_peer =
            lock(&self.shared.peers).insert(peer, (info.clone(), crate::PeerState::Connected));
        let accept = Approval::Accept { metadata, terms };
        if let Err(Approval::Accept { mut terms, .. }) = approve.send(accept) {
            // The connection is gone: the published view goes back; what it
            // was to resume is held again, what it was to hand back goes
            // out from here.
            let mut mailboxes = lock(&self.shared.mailboxes);
            match before_mailbox {
                Some(m) => mailboxes.insert(peer, m),
                None => mailboxes.remove(&peer),
            };
            drop(mailboxes);
            let mut peers = lock(&self.shared.peers);
            match before_peer {
                Some(p) => peers.insert(peer, p),
                None => peers.remove(&peer),
            };
            drop(peers);
            self.owed.append(&mut terms.handed_back);
            if let Some((h, _)) = terms.resume {
                self.held.insert(peer, h);
            }
            return;
        }
        let entry = self.conns.get_mut(&conn).expect("checked above");
        entry.up = Some((peer, hello.instance));
        self.handshaking -= 1;
        self.sessions.insert(peer, conn);
        Counters::bump(&self.shared.counters.sessions_up);
        if resumed {
            debug!(%peer, "resuming the held session");
        }
        self.disc.session_up(clock::now(), info);
        self.publish_peers();
    }

    /// Whether a session whose handshake is `hello` resumes the session
    /// held for its peer (PROTOCOL.md "Resuming a session"), and its
    /// token. A held session it does not resume is handed back (the events
    /// go before its `SessionUp`). As the dialer (`outbound`) we offered
    /// `offer`; the acceptor's hello says whether it took it. As the
    /// acceptor we decide, and our hello will say so.
    fn terms(
        &mut self,
        hello: &Hello,
        outbound: bool,
        offer: Option<(u64, u64)>,
    ) -> Result<Box<Terms>, ProtocolViolation> {
        let peer = hello.id;
        let both = !self.config.resume_grace.is_zero() && hello.grace_ms > 0;
        let held = self.held.remove(&peer);
        let mut terms = Box::<Terms>::default();
        let fits = |h: &Suspended, token: u64| {
            both && token != 0 && h.token == token && h.instance == hello.instance
        };
        if outbound {
            match (offer, held) {
                (Some((token, received)), Some(h))
                    if hello.resume == token && fits(&h, token) && h.held.received == received =>
                {
                    terms.token = token;
                    terms.resume = Some((h, hello.received));
                    return Ok(terms);
                }
                // The acceptor resumed what we offered, but we no longer
                // hold it as offered (it was handed back, or resumed by
                // another connection since): refused, and what we hold
                // waits for the next connection.
                (Some((token, _)), h) if both && hello.resume == token => {
                    if let Some(h) = h {
                        self.held.insert(peer, h);
                    }
                    Counters::bump(&self.shared.counters.resumptions_refused);
                    return Err(ProtocolViolation::BadResume);
                }
                (_, h) => {
                    terms.token = if both { hello.resume } else { 0 };
                    if let Some(h) = h {
                        terms.handed_back = self.hand_back(peer, *h);
                    }
                }
            }
        } else {
            match held {
                Some(h) if fits(&h, hello.resume) => {
                    terms.token = h.token;
                    terms.resume = Some((h, hello.received));
                    return Ok(terms);
                }
                h => {
                    // A new session: a new token (never 0).
                    terms.token = if both { rand::random::<u64>() | 1 } else { 0 };
                    if let Some(h) = h {
                        terms.handed_back = self.hand_back(peer, *h);
                    }
                }
            }
        }
        Ok(terms)
    }

    /// What a held session holds, as events for the application; its
    /// mailbox is withdrawn from senders.
    fn hand_back(&mut self, peer: PeerId, h: Suspended) -> Vec<Event> {
        {
            let mut mailboxes = lock(&self.shared.mailboxes);
            if mailboxes
                .get(&peer)
                .is_some_and(|p| Arc::ptr_eq(&p.mailbox, &h.mailbox))
            {
                mailboxes.remove(&peer);
            }
        }
        let events = h.hand_back(peer, &self.shared.requests, &self.shared.counters);
        let (unconfirmed, undelivered) = resume::counts(&events);
        info!(%peer, unconfirmed, undelivered, "held session given up");
        events
    }

    /// Gives up the session held for `peer` now: its events follow.
    fn give_up_held(&mut self, peer: PeerId) {
        if let Some(h) = self.held.remove(&peer) {
            self.owe_hand_back(peer, *h);
        }
    }

    /// Hands back what `h` holds, its events pushed by the next `flush`.
    fn owe_hand_back(&mut self, peer: PeerId, h: Suspended) {
        let events = self.hand_back(peer, h);
        self.owed.extend(events);
    }

    /// Gives up the held sessions whose grace ran out by `now`.
    fn expire_held(&mut self, now: std::time::Instant) {
        let expired: Vec<PeerId> = self
            .held
            .iter()
            .filter(|(_, h)| h.until.is_some_and(|u| u <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            // A connection about to resume it keeps it.
            let dialing = self
                .conns
                .values()
                .any(|c| c.up.is_none() && c.expected == Some(peer) && c.offer.is_some());
            if dialing {
                if let Some(h) = self.held.get_mut(&peer) {
                    h.until = Some(now + self.config.handshake_timeout);
                }
                continue;
            }
            debug!(%peer, "grace over");
            self.give_up_held(peer);
        }
    }

    fn ended(
        &mut self,
        conn: u64,
        peer: Option<PeerId>,
        reason: DownReason,
        held: Option<Box<Suspended>>,
    ) {
        let Some(entry) = self.conns.remove(&conn) else {
            if let (Some(p), Some(h)) = (peer, held) {
                self.owe_hand_back(p, *h);
            }
            return;
        };
        if entry.up.is_none() {
            self.handshaking -= 1;
        }
        let now = clock::now();
        match (peer, entry.up) {
            (Some(peer), Some(_)) => {
                if self.sessions.get(&peer) == Some(&conn) {
                    self.sessions.remove(&peer);
                }
                {
                    let mut mailboxes = lock(&self.shared.mailboxes);
                    if let Some(p) = mailboxes.get(&peer).filter(|p| p.conn == conn)
                        && let Some(rtt) = p.mailbox.last_rtt()
                    {
                        // Kept for `Node::peers` until the peer is lost.
                        lock(&self.shared.rtts).insert(peer, rtt);
                    }
                    // A held session's mailbox stays with senders: what
                    // they send waits for the peer to come back.
                    if held.is_none() && mailboxes.get(&peer).is_some_and(|p| p.conn == conn) {
                        mailboxes.remove(&peer);
                    }
                }
                if let Some(mut h) = held {
                    h.until = Some(now + h.grace);
                    debug!(%peer, grace = ?h.grace, "holding the session for the peer to resume");
                    if let Some(old) = self.held.insert(peer, h) {
                        self.owe_hand_back(peer, *old);
                    }
                }
                if let Some(w) = self.waiting.remove(&peer) {
                    self.approve(w.conn, *w.hello, w.addr, w.approve);
                } else {
                    self.disc.session_down(now, peer, &reason);
                }
            }
            _ => {
                if let Some(p) = entry.expected {
                    debug!(peer = %p, %reason, "dial failed");
                    Counters::bump(&self.shared.counters.dials_failed);
                    self.disc.dial_failed(now, p);
                }
            }
        }
        self.publish_peers();
    }

    async fn shutdown(mut self) {
        info!("shutting down");
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for c in ids {
            self.close_conn(c, DownReason::Shutdown);
        }
        self.disc.shutdown();
        self.flush().await;
        for (_, w) in self.waiting.drain() {
            let _ = w.approve.send(Approval::Shutdown);
        }
        // Connections say goodbye and hand back undelivered messages; give
        // them a moment, then abort what is left.
        let drain = async {
            while !self.conns.is_empty() {
                match self.reports_rx.recv().await {
                    Some(Report::Ended {
                        conn, peer, held, ..
                    }) => {
                        self.conns.remove(&conn);
                        // Cut just now: not resumed any more.
                        if let (Some(p), Some(h)) = (peer, held) {
                            self.owe_hand_back(p, *h);
                        }
                    }
                    Some(Report::Handshaken { approve, .. }) => {
                        let _ = approve.send(Approval::Shutdown);
                    }
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        // Held sessions will not be resumed now.
        let held: Vec<PeerId> = self.held.keys().copied().collect();
        for peer in held {
            self.give_up_held(peer);
        }
        let owed = std::mem::take(&mut self.owed);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for e in owed {
                let _ = self.events.push(e).await;
            }
        })
        .await;
        lock(&self.shared.mailboxes).clear();
        self.tasks.shutdown().await;
    }
}

/// Whether `addr` is on the link of one of `targets` (the selected
/// interfaces' addresses).
fn from_selected(targets: &[Target], addr: SocketAddr) -> bool {
    let addr = from_mapped(addr);
    targets.iter().any(|t| t.contains(addr))
}

/// `addr`, as IPv4 if it is an IPv4-mapped IPv6 address.
fn from_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// IPv6 discovery and sessions: the shared socket on the discovery port,
/// our own, and the IPv6 listener on the TCP port (none for a controller,
/// or when that port is taken for IPv6).
#[derive(Debug)]
pub(crate) struct V6 {
    pub(crate) shared: UdpSocket,
    pub(crate) unicast: UdpSocket,
    pub(crate) listener: Option<TcpListener>,
}

/// The next datagram of an IPv6 socket; never, without one.
async fn recv6(socket: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// The next connection of `listener`; never, without one (a controller).
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The cipher a dial uses (PROTOCOL.md §6, "Cipher"): AES-256-GCM when the
/// peer announced it (`peer_offers`) and this node offers it too (AES
/// instructions, [`SessionCipher::Auto`](crate::SessionCipher::Auto)),
/// else ChaCha20-Poly1305.
fn dial_cipher(peer_offers: bool, config: &Config) -> Cipher {
    if peer_offers && config.offers_aes_gcm() {
        Cipher::AesGcm
    } else {
        Cipher::ChaChaPoly
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// A node dials with AES-256-GCM only when the peer announced it, this
    /// CPU has AES instructions and the node did not choose ChaCha20; a
    /// ChaCha20 node neither announces AES nor dials with it.
    #[test]
    fn the_dial_cipher_follows_both_ends_and_the_choice() {
        use crate::SessionCipher;
        let auto = Config::builder("dial-cipher").build().unwrap();
        let chacha = Config::builder("dial-cipher")
            .session_cipher(SessionCipher::ChaCha20Poly1305)
            .build()
            .unwrap();
        let plain = Config::builder("dial-cipher")
            .insecure_plaintext()
            .build()
            .unwrap();
        let aes = crate::session::noise::has_aes_hardware();
        assert_eq!(auto.offers_aes_gcm(), aes);
        assert!(!chacha.offers_aes_gcm());
        assert!(!plain.offers_aes_gcm());
        let expect_aes = if aes {
            Cipher::AesGcm
        } else {
            Cipher::ChaChaPoly
        };
        assert_eq!(dial_cipher(true, &auto), expect_aes);
        assert_eq!(dial_cipher(false, &auto), Cipher::ChaChaPoly);
        assert_eq!(dial_cipher(true, &chacha), Cipher::ChaChaPoly);
        assert_eq!(dial_cipher(false, &chacha), Cipher::ChaChaPoly);
    }

    fn target(addr: [u8; 4], prefix_len: u8) -> Target {
        Target::v4(
            "eth0",
            Ipv4Addr::from(addr),
            prefix_len,
            Ipv4Addr::BROADCAST,
        )
    }

    #[test]
    fn only_the_selected_subnets_may_connect() {
        let targets = [target([127, 0, 0, 1], 8), target([10, 77, 0, 1], 24)];
        for (ip, ok) in [
            ("127.0.0.1", true),
            ("127.9.9.9", true),
            ("10.77.0.200", true),
            ("10.77.1.2", false),
            ("192.168.1.5", false),
            ("::ffff:10.77.0.9", true),
            ("::1", false),
        ] {
            let addr = SocketAddr::new(ip.parse().unwrap(), 1);
            assert_eq!(from_selected(&targets, addr), ok, "{ip}");
        }
        assert!(!from_selected(&[], "127.0.0.1:1".parse().unwrap()));
        // IPv6 link-local: by the interface it came on, not the address.
        let link = [Target::v6("eth0", "fe80::1".parse().unwrap(), 3)];
        assert!(from_selected(&link, "[fe80::9%3]:1".parse().unwrap()));
        assert!(!from_selected(&link, "[fe80::9%4]:1".parse().unwrap()));
        assert!(!from_selected(&link, "[2001:db8::9]:1".parse().unwrap()));
    }
}
