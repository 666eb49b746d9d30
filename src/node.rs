//! The [`Node`] handle and the supervisor task that ties discovery, dialing,
//! sessions and rediscovery together.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, debug_span, info, trace, warn};

use crate::clock;
use crate::config::Config;
use crate::discovery::machine::{Discovery, DiscoveryConfig, DiscoveryEvent};
use crate::discovery::socket;
use crate::error::Error;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::peer::{PeerId, PeerInfo, PeerMap, PeerState, PeerStatus};
use crate::queue::{PushError, Queue};
use crate::session::conn::{Approval, Conn, ConnTask, ConnectFuture, Hub, Mailbox, Note};
use crate::session::machine::SessionConfig;
use crate::session::timer::Timer;
use crate::stats::{Counters, Stats};
use crate::wire::PROTOCOL_VERSION;
use crate::wire::frame::{DATA_OVERHEAD, Hello, LEN_PREFIX};

/// State shared by the handle, the supervisor and the connection tasks.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Outbox of each session that is up, tagged with its connection.
    outboxes: Mutex<PeerMap<(u64, Arc<Mailbox>)>>,
    /// What discovery knows, refreshed by the supervisor.
    peers: Mutex<BTreeMap<PeerId, (PeerInfo, PeerState)>>,
    /// Latest RTT of peers whose session ended (a live session keeps its
    /// own in its outbox), until the peer is lost.
    rtts: Mutex<PeerMap<Duration>>,
    pub(crate) counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn outbox(&self, peer: PeerId) -> Option<Arc<Mailbox>> {
        lock(&self.outboxes).get(&peer).map(|(_, o)| o.clone())
    }
}

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
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:016x}"))
}

enum Command {
    Shutdown,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::Sender<Command>,
    done: watch::Receiver<bool>,
    shared: Arc<Shared>,
    local: LocalInfo,
    max_message: usize,
}

/// A running lanbeat node: a clonable handle.
///
/// [`Node::start`] binds the sockets and spawns the node's task on the
/// current tokio runtime; events arrive on the returned [`Events`]. The node
/// runs until [`Node::shutdown`] or until the last handle is dropped; both
/// say goodbye to every peer.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// The node's events, in order. See [`Event`].
///
/// Dropping it tells the node nobody listens: events are then discarded
/// (sessions keep running).
#[derive(Debug)]
pub struct Events {
    queue: Arc<Queue<VecDeque<Event>>>,
    /// Taken from the queue in one batch, not yet handed out.
    local: std::collections::VecDeque<Event>,
    closed: bool,
}

impl Events {
    /// The next event; `None` once the node has shut down and every event
    /// was taken. Cancel-safe: an event is taken only when it is returned.
    #[inline]
    pub fn recv(&mut self) -> impl Future<Output = Option<Event>> + Send + '_ {
        // Not an `async fn`: the compiler's future returned the event
        // through memory, which cost a stall per message; this one inlines
        // into the caller's loop.
        Recv { events: self }
    }

    /// Moves up to `limit` ready events into `buf` (waiting for the first
    /// one), and returns how many; 0 once the node has shut down and every
    /// event was taken (or when `limit` is 0). One call per burst instead of
    /// one per event, like tokio's `mpsc::Receiver::recv_many`.
    pub async fn recv_many(&mut self, buf: &mut Vec<Event>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let Some(first) = self.recv().await else {
            return 0;
        };
        buf.push(first);
        let mut n = 1;
        while n < limit {
            match self.try_recv() {
                Some(e) => buf.push(e),
                None => break,
            }
            n += 1;
        }
        n
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        if self.local.is_empty() && !self.closed {
            self.refill(None);
        }
        self.local.pop_front()
    }

    /// Polls for the next event: `Ready(None)` once the node has shut down
    /// and every event was taken. For use in hand-written futures and
    /// streams; [`Events::recv`] is this as an `async fn`.
    #[inline]
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        match self.local.pop_front() {
            Some(e) => Poll::Ready(Some(e)),
            None => self.poll_refill(cx),
        }
    }

    /// [`Events::poll_recv`] once the batch taken last is used up.
    #[inline(never)]
    fn poll_refill(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        if !self.closed {
            self.refill(Some(cx.waker()));
        }
        match self.local.pop_front() {
            Some(e) => Poll::Ready(Some(e)),
            None if self.closed => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// Takes everything queued in one batch; with a waker, registers it
    /// when nothing was there.
    fn refill(&mut self, waker: Option<&Waker>) {
        self.closed = self.queue.take_all(&mut self.local, waker);
    }
}

/// The future of [`Events::recv`].
struct Recv<'a> {
    events: &'a mut Events,
}

impl Future for Recv<'_> {
    type Output = Option<Event>;

    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.queue.discard();
    }
}

/// Closes the event queue when the node's task ends, however it ends, so
/// that [`Events::recv`] returns `None` instead of waiting for ever.
struct CloseOnDrop(Arc<Queue<VecDeque<Event>>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Node {
    /// Validates `config`, binds the discovery and TCP sockets and starts
    /// the node. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, [`Error::Bind`] when
    /// a socket cannot be set up.
    pub async fn start(config: Config) -> Result<(Node, Events), Error> {
        config.validate()?;
        let bind_err = |what, addr| move |source| Error::Bind { what, addr, source };
        let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        let shared_sock = socket::bind_shared(config.discovery_port)
            .map_err(bind_err("discovery", any(config.discovery_port)))?;
        let unicast = socket::bind_unicast().map_err(bind_err("probe", any(0)))?;
        let listener = if config.role.accepts() {
            let l = TcpListener::bind(any(config.tcp_port))
                .await
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
        let id = config.id.unwrap_or_else(PeerId::random);
        let instance: u64 = rand::random();
        let local = LocalInfo {
            id,
            instance,
            name: config.name.clone(),
            tcp_port,
            discovery_port: config.discovery_port,
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
                replies_per_source_per_sec: config.replies_per_source_per_sec,
                limits: config.datagram_limits(),
            },
            rand::random(),
        );
        let session = SessionConfig {
            hello: Hello {
                protocol: PROTOCOL_VERSION,
                service: config.service.clone(),
                id,
                instance,
                name: config.name.clone(),
                role: config.role,
                port: tcp_port,
                heartbeat_interval_ms: millis(config.heartbeat_interval),
                heartbeat_timeout_ms: millis(config.heartbeat_timeout),
                max_frame_size: config.max_frame_size,
            },
            heartbeat_interval: config.heartbeat_interval,
            heartbeat_timeout: config.heartbeat_timeout,
            handshake_timeout: config.handshake_timeout,
            max_unacked: config.max_unacked,
            max_unacked_bytes: config.max_unacked_bytes,
            write_timeout: config.write_timeout,
        };
        let (commands, command_rx) = mpsc::channel(8);
        let events = Arc::new(Queue::new(config.event_capacity));
        let (notes_tx, notes_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let max_message = config.max_frame_size as usize - (DATA_OVERHEAD - LEN_PREFIX);
        let driver = Driver {
            disc,
            session: Arc::new(session),
            shared: shared.clone(),
            shared_sock,
            unicast,
            listener,
            commands: command_rx,
            notes_tx,
            notes_rx,
            events: events.clone(),
            conns: HashMap::new(),
            sessions: PeerMap::default(),
            waiting: PeerMap::default(),
            tasks: JoinSet::new(),
            task_conn: HashMap::new(),
            next_conn: 0,
            handshaking: 0,
            hub: Arc::new(Hub {
                events: events.clone(),
                timer: Arc::new(Timer::new(clock::now())),
            }),
            id,
            config,
        };
        let span = debug_span!("node", %id);
        tokio::spawn(
            async move {
                let _close = CloseOnDrop(driver.events.clone());
                driver.run().await;
                let _ = done_tx.send(true);
            }
            .instrument(span),
        );
        info!(%id, tcp_port, "node started");
        Ok((
            Node {
                inner: Arc::new(Inner {
                    commands,
                    done,
                    shared,
                    local,
                    max_message,
                }),
            },
            Events {
                queue: events.clone(),
                local: Default::default(),
                closed: false,
            },
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
    /// delivered in order, or handed back in [`Event::Undelivered`] if the
    /// session dies first.
    ///
    /// # Errors
    /// [`Error::NotConnected`] (with the message) when no session with the
    /// peer is up, [`Error::MessageTooLarge`] when it exceeds the frame
    /// limit.
    pub async fn send(&self, peer: PeerId, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = self.check_size(message.into())?;
        match self.inner.shared.outbox(peer) {
            Some(o) => Push::new(peer, &o, usize::MAX, message).await,
            None => Err(Error::NotConnected { peer, message }),
        }
    }

    /// Like [`Node::send`], but fails at once when the outbox is full.
    ///
    /// # Errors
    /// As [`Node::send`], plus [`Error::OutboxFull`].
    pub fn try_send(&self, peer: PeerId, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = self.check_size(message.into())?;
        match self.inner.shared.outbox(peer) {
            Some(o) => try_push_message(peer, &o, message),
            None => Err(Error::NotConnected { peer, message }),
        }
    }

    /// A sender bound to `peer`'s current session, for streams of messages:
    /// it skips the lookup of the peer's session that [`Node::send`] makes
    /// per message. `None` when no session with the peer is up.
    pub fn sender(&self, peer: PeerId) -> Option<PeerSender> {
        Some(PeerSender {
            peer,
            mailbox: self.inner.shared.outbox(peer)?,
            max_message: self.inner.max_message,
        })
    }

    /// Sends `value` as JSON to `peer`; see [`Node::send`].
    ///
    /// # Errors
    /// As [`Node::send`], plus [`Error::Json`].
    pub async fn send_json<T: Serialize + ?Sized>(
        &self,
        peer: PeerId,
        value: &T,
    ) -> Result<(), Error> {
        self.send(peer, serde_json::to_vec(value)?).await
    }

    /// Sends `message` to every peer with a session, waiting for room in each
    /// outbox in turn. Returns the peers it was queued for.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`].
    pub async fn send_all(&self, message: impl Into<Bytes>) -> Result<Vec<PeerId>, Error> {
        let message = self.check_size(message.into())?;
        let targets: Vec<_> = lock(&self.inner.shared.outboxes)
            .iter()
            .map(|(p, (_, o))| (*p, o.clone()))
            .collect();
        let mut sent = Vec::with_capacity(targets.len());
        for (peer, o) in targets {
            if o.push(message.clone()).await.is_ok() {
                sent.push(peer);
            }
        }
        sent.sort();
        Ok(sent)
    }

    /// Every known peer, its state and last RTT, ordered by id.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let shared = &self.inner.shared;
        // Peers with a session: their session's latest sample; others: the
        // last sample of their last session.
        let mut rtts = lock(&shared.rtts).clone();
        for (peer, (_, o)) in lock(&shared.outboxes).iter() {
            if let Some(rtt) = o.last_rtt() {
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
    pub async fn shutdown(&self) {
        let _ = self.inner.commands.send(Command::Shutdown).await;
        let mut done = self.inner.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    fn check_size(&self, message: Bytes) -> Result<Bytes, Error> {
        check_size(message, self.inner.max_message)
    }
}

/// Sends to one peer over one session, without looking the peer up per
/// message: from [`Node::sender`].
///
/// It is bound to the session that was up when it was made. Once that
/// session ends, sends fail with [`Error::NotConnected`] (the message handed
/// back); after the next [`Event::SessionUp`] with the peer, ask
/// [`Node::sender`] for a new one. Delivery is as with [`Node::send`]:
/// in order, or handed back.
#[derive(Debug, Clone)]
pub struct PeerSender {
    peer: PeerId,
    mailbox: Arc<Mailbox>,
    max_message: usize,
}

impl PeerSender {
    /// The peer it sends to.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends `message`, waiting while the outbox is full; see
    /// [`Node::send`].
    ///
    /// # Errors
    /// As [`Node::send`]; [`Error::NotConnected`] once the session ended.
    #[inline]
    pub fn send(
        &self,
        message: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Error>> + Send + '_ {
        // Not an `async fn`, to keep the future small (see `Push`).
        Push::new(self.peer, &self.mailbox, self.max_message, message.into())
    }

    /// Queues every message of `batch`, in order, waiting for room as
    /// needed: one step per run of messages that fit rather than one per
    /// message (and no copying at all when the outbox is empty). For
    /// streams of small messages. Delivery is as with [`Node::send`].
    ///
    /// On success `batch` is empty. On an error the messages not queued are
    /// handed back: in `batch`, and the first of them in the error.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] for the first message over the limit
    /// (then nothing was queued); [`Error::NotConnected`] once the session
    /// ended.
    pub async fn send_batch(&self, batch: &mut VecDeque<Bytes>) -> Result<(), Error> {
        if let Some(m) = batch.iter().find(|m| m.len() > self.max_message) {
            return Err(Error::MessageTooLarge {
                size: m.len(),
                limit: self.max_message,
            });
        }
        while self.mailbox.push_many(batch) {
            if self.mailbox.is_closed() {
                let message = batch.pop_front().unwrap_or_default();
                return Err(Error::NotConnected {
                    peer: self.peer,
                    message,
                });
            }
            self.mailbox.room().await;
        }
        Ok(())
    }

    /// Like [`PeerSender::send`], but fails at once when the outbox is full.
    ///
    /// # Errors
    /// As [`Node::try_send`].
    pub fn try_send(&self, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = check_size(message.into(), self.max_message)?;
        try_push_message(self.peer, &self.mailbox, message)
    }
}

#[inline]
fn check_size(message: Bytes, limit: usize) -> Result<Bytes, Error> {
    if message.len() > limit {
        return Err(too_large(message.len(), limit));
    }
    Ok(message)
}

#[cold]
fn too_large(size: usize, limit: usize) -> Error {
    Error::MessageTooLarge { size, limit }
}

/// Queues a message, waiting for room only when the outbox is full.
///
/// Written out rather than as an `async fn`: a stream of small messages
/// builds and moves one of these per message, and the compiler's version
/// was 128 bytes (176 inside `PeerSender::send`), whose copying took an
/// eighth of a 64-byte stream's time. This one is four words and a boxed
/// wait, built only when the outbox is full.
struct Push<'a> {
    peer: PeerId,
    o: &'a Mailbox,
    /// The largest message allowed.
    limit: usize,
    state: PushState<'a>,
}

impl<'a> Push<'a> {
    fn new(peer: PeerId, o: &'a Mailbox, limit: usize, message: Bytes) -> Self {
        Push {
            peer,
            o,
            limit,
            state: PushState::New(message),
        }
    }
}

enum PushState<'a> {
    /// Not tried yet.
    New(Bytes),
    /// The outbox was full.
    Waiting(Pin<Box<dyn Future<Output = Result<(), Bytes>> + Send + 'a>>),
    Done,
}

impl Future for Push<'_> {
    type Output = Result<(), Error>;

    // Inlined into the caller's loop: the result then stays in registers
    // instead of going through memory (a 56-byte `Result` read back
    // right after it was written stalled the load).
    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match std::mem::replace(&mut this.state, PushState::Done) {
                PushState::New(message) if message.len() > this.limit => {
                    return Poll::Ready(Err(too_large(message.len(), this.limit)));
                }
                PushState::New(message) => match try_push_message(this.peer, this.o, message) {
                    Err(Error::OutboxFull { message, .. }) => {
                        this.state = PushState::Waiting(Box::pin(this.o.push(message)));
                    }
                    done => return Poll::Ready(done),
                },
                PushState::Waiting(mut wait) => {
                    let Poll::Ready(done) = wait.as_mut().poll(cx) else {
                        this.state = PushState::Waiting(wait);
                        return Poll::Pending;
                    };
                    let peer = this.peer;
                    return Poll::Ready(
                        done.map_err(|message| Error::NotConnected { peer, message }),
                    );
                }
                // As with an `async fn`: polling a finished future is a bug
                // in the caller.
                PushState::Done => panic!("`Push` polled after completion"),
            }
        }
    }
}

#[inline]
fn try_push_message(peer: PeerId, o: &Mailbox, message: Bytes) -> Result<(), Error> {
    o.try_push(message).map_err(|e| match e {
        PushError::Full(message) => Error::OutboxFull { peer, message },
        PushError::Closed(message) => Error::NotConnected { peer, message },
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

struct ConnEntry {
    /// Shared with the connection: close requests, and its outbox.
    mailbox: Arc<Mailbox>,
    outbound: bool,
    /// The peer a dial was for.
    expected: Option<PeerId>,
    /// Peer and instance once the session is up.
    up: Option<(PeerId, u64)>,
}

/// A handshake that waits for the peer's previous session to end.
struct Waiting {
    conn: u64,
    hello: Box<Hello>,
    addr: SocketAddr,
    approve: oneshot::Sender<Approval>,
}

struct Driver {
    config: Config,
    id: PeerId,
    disc: Discovery,
    session: Arc<SessionConfig>,
    shared: Arc<Shared>,
    shared_sock: UdpSocket,
    unicast: UdpSocket,
    listener: Option<TcpListener>,
    commands: mpsc::Receiver<Command>,
    notes_tx: mpsc::UnboundedSender<Note>,
    notes_rx: mpsc::UnboundedReceiver<Note>,
    events: Arc<Queue<VecDeque<Event>>>,
    conns: HashMap<u64, ConnEntry>,
    sessions: PeerMap<u64>,
    waiting: PeerMap<Waiting>,
    tasks: JoinSet<()>,
    /// Which connection each task runs.
    task_conn: HashMap<tokio::task::Id, u64>,
    next_conn: u64,
    /// Connections not yet approved as sessions (dialing or in handshake).
    handshaking: usize,
    /// The event stream and the timer, for the connections.
    hub: Arc<Hub>,
}

impl Driver {
    async fn run(mut self) {
        // Round-trip samples wake the application through the timer (see
        // `Queue::try_push_quiet`).
        let events = self.hub.events.clone();
        self.tasks
            .spawn(self.hub.timer.clone().run(move || events.wake_owed()));
        self.rescan();
        let mut rescan = tokio::time::interval(self.config.interface_rescan);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One byte more than the limit tells an oversized datagram apart.
        let mut buf_a = vec![0u8; self.config.max_datagram_size + 1];
        let mut buf_b = vec![0u8; self.config.max_datagram_size + 1];
        loop {
            self.flush().await;
            let deadline = self.disc.poll_timeout();
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                },
                r = self.shared_sock.recv_from(&mut buf_a) => self.datagram(r, &buf_a),
                r = self.unicast.recv_from(&mut buf_b) => self.datagram(r, &buf_b),
                r = accept(&self.listener) => self.accepted(r),
                Some(note) = self.notes_rx.recv() => self.note(note),
                _ = clock::sleep_until(deadline.unwrap_or_else(|| clock::now() + Duration::from_secs(3600))) => {
                    self.disc.handle_timeout(clock::now());
                }
                _ = rescan.tick() => self.rescan(),
                Some(done) = self.tasks.join_next_with_id() => self.task_done(done),
            }
        }
        self.shutdown().await;
    }

    fn rescan(&mut self) {
        match socket::scan() {
            Ok(addrs) => {
                let targets = socket::select_targets(&addrs, &self.config.interfaces);
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
        let SocketAddr::V4(from) = from else {
            return;
        };
        if let Err(why) = self.disc.handle_datagram(clock::now(), from, &buf[..n]) {
            debug!(%from, len = n, reason = ?why, "dropped datagram");
            c.dropped(why);
        }
    }

    /// Sends what discovery queued and acts on its events.
    async fn flush(&mut self) {
        while let Some(t) = self.disc.poll_transmit() {
            match self.unicast.send_to(&t.payload, t.dst).await {
                Ok(_) => Counters::bump(&self.shared.counters.datagrams_sent),
                Err(e) => {
                    debug!(dst = %t.dst, error = %e, "cannot send datagram");
                    Counters::bump(&self.shared.counters.datagram_send_errors);
                }
            }
        }
        while let Some(ev) = self.disc.poll_event() {
            match ev {
                DiscoveryEvent::Discovered(info) => {
                    info!(peer = %info.id, addr = %info.addr, name = %info.name, "discovered");
                    let _ = self.events.push(Event::Discovered(Box::new(info))).await;
                }
                DiscoveryEvent::Restarted(info) => {
                    if let Some(&c) = self.sessions.get(&info.id) {
                        self.close_conn(c, DownReason::PeerRestarted);
                    }
                }
                DiscoveryEvent::Dial(info) => self.dial(info),
                DiscoveryEvent::Lost(peer) => {
                    info!(%peer, "peer lost");
                    lock(&self.shared.rtts).remove(&peer);
                    let _ = self.events.push(Event::PeerLost { peer }).await;
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
        let handshaking = self.handshaking;
        if handshaking >= self.config.max_handshakes
            || self.sessions.len() >= self.config.max_sessions
        {
            debug!(%addr, handshaking, sessions = self.sessions.len(), "refusing connection");
            Counters::bump(&self.shared.counters.sessions_refused);
            return;
        }
        self.spawn_conn(None, addr, Ok(stream));
    }

    fn dial(&mut self, info: PeerInfo) {
        debug!(peer = %info.id, addr = %info.addr, "dialing");
        let timeout = self.config.connect_timeout;
        let addr = info.addr;
        let connect = async move {
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(r) => r,
                Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            }
        };
        self.spawn_conn(Some(info.id), addr, Err(Box::pin(connect)));
    }

    fn spawn_conn(
        &mut self,
        expected: Option<PeerId>,
        addr: SocketAddr,
        stream: Result<TcpStream, ConnectFuture>,
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
            },
        );
        let conn = Conn {
            id,
            session: self.session.clone(),
            expected,
            outbound,
            max_frame: self.config.max_frame_size,
            write_timeout: self.config.write_timeout,
            hub: self.hub.clone(),
            notes: self.notes_tx.clone(),
            mailbox,
            shared: self.shared.clone(),
        };
        let span = match expected {
            Some(p) => debug_span!("session", peer = %p, %addr, conn = id),
            None => debug_span!("session", %addr, conn = id),
        };
        let handle = self.tasks.spawn(ConnTask::new(conn, stream, addr, span));
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
            self.ended(conn, peer, reason);
        }
    }

    /// Asks a connection to close (with a goodbye when it is a session).
    fn close_conn(&mut self, conn: u64, reason: DownReason) {
        if let Some(c) = self.conns.get(&conn) {
            c.mailbox.request_close(reason);
        }
    }

    fn note(&mut self, note: Note) {
        match note {
            Note::Handshaken {
                conn,
                hello,
                addr,
                approve,
            } => self.handshaken(conn, hello, addr, approve),
            Note::Ended { conn, peer, reason } => self.ended(conn, peer, reason),
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
        let reason = if hello.instance != old_instance {
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
        let Some(entry) = self.conns.get_mut(&conn) else {
            return;
        };
        if approve.send(Approval::Accept).is_err() {
            return;
        }
        let outbox = entry.mailbox.clone();
        entry.up = Some((peer, hello.instance));
        self.handshaking -= 1;
        let info_addr = if entry.outbound {
            addr
        } else {
            SocketAddr::new(addr.ip(), hello.port)
        };
        self.sessions.insert(peer, conn);
        lock(&self.shared.outboxes).insert(peer, (conn, outbox));
        Counters::bump(&self.shared.counters.sessions_up);
        let interface = match addr.ip() {
            std::net::IpAddr::V4(ip) => self
                .disc
                .targets()
                .iter()
                .find(|t| t.contains(ip))
                .map(|t| t.interface.clone()),
            std::net::IpAddr::V6(_) => None,
        };
        self.disc.session_up(
            clock::now(),
            PeerInfo {
                id: peer,
                instance: hello.instance,
                name: hello.name,
                addr: info_addr,
                interface,
                role: hello.role,
                metadata: BTreeMap::new(),
            },
        );
        self.publish_peers();
    }

    fn ended(&mut self, conn: u64, peer: Option<PeerId>, reason: DownReason) {
        let Some(entry) = self.conns.remove(&conn) else {
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
                    let mut outboxes = lock(&self.shared.outboxes);
                    if outboxes.get(&peer).is_some_and(|(c, _)| *c == conn)
                        && let Some((_, o)) = outboxes.remove(&peer)
                        && let Some(rtt) = o.last_rtt()
                    {
                        // Kept for `Node::peers` until the peer is lost.
                        lock(&self.shared.rtts).insert(peer, rtt);
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
                match self.notes_rx.recv().await {
                    Some(Note::Ended { conn, .. }) => {
                        self.conns.remove(&conn);
                    }
                    Some(Note::Handshaken { approve, .. }) => {
                        let _ = approve.send(Approval::Shutdown);
                    }
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        lock(&self.shared.outboxes).clear();
        self.tasks.shutdown().await;
    }
}

async fn accept(listener: &Option<TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of small messages builds and moves one send future per
    /// message: it must stay a few words (see `Push`).
    #[test]
    fn the_send_future_stays_small() {
        let to = PeerSender {
            peer: PeerId::from_u64(1),
            mailbox: Arc::new(Mailbox::new(4)),
            max_message: 10,
        };
        let fut = to.send(Bytes::new());
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 64, "PeerSender::send future is {size} bytes");
    }

    #[tokio::test]
    async fn a_send_waits_for_room_and_hands_the_message_back_if_the_session_ends() {
        let to = PeerSender {
            peer: PeerId::from_u64(7),
            mailbox: Arc::new(Mailbox::new(1)),
            max_message: 4,
        };
        match to.send("12345").await {
            Err(Error::MessageTooLarge { size: 5, limit: 4 }) => {}
            other => panic!("{other:?}"),
        }
        to.send("a").await.unwrap();
        // Full: the next send waits until the session takes a message.
        let mut second = std::pin::pin!(to.send("b"));
        assert!(poll_once(second.as_mut()).await.is_pending());
        let mut taken = Vec::new();
        let take = |taken: &mut Vec<Bytes>| {
            let (out, _) = to.mailbox.consume(None, |b| b.pop(8));
            out.expect("queued").into_messages(taken);
        };
        take(&mut taken);
        second.await.unwrap();
        take(&mut taken);
        assert_eq!(taken, ["a", "b"]);
        // A send waiting when the session ends gets its message back.
        to.send("c").await.unwrap();
        let mut third = std::pin::pin!(to.send("d"));
        assert!(poll_once(third.as_mut()).await.is_pending());
        assert_eq!(to.mailbox.close_and_take(), ["c"]);
        match third.await {
            Err(Error::NotConnected { peer, message }) => {
                assert_eq!(peer, PeerId::from_u64(7));
                assert_eq!(message, "d");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Polls `fut` once.
    async fn poll_once<F: Future + Unpin>(mut fut: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
    }
}
