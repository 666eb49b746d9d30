//! The tokio task of one TCP connection: it moves bytes between the socket
//! and the [`Session`] machine, between the outbox and the socket, and
//! between the machine and the application's event stream.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{Span, debug, info, trace, warn};

use super::machine::{Session, SessionConfig, SessionEvent};
use super::outbox::Outbox;
use super::timer::{Deadline, Timed, Timer};
use crate::clock;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::node::Shared;
use crate::peer::PeerId;
use crate::queue::Queue;
use crate::stats::Counters;
use crate::wire::frame::{Frame, Frames, Hello, MAX_FIXED, frame_len};

/// What a connection shares with the node: its outbox (published to
/// senders once the session is up), the supervisor's close request, and its
/// latest round-trip time. One allocation, what a heartbeat touches in its
/// first cache line: with 10 000 sessions every line read per wake-up is a
/// cache miss.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Mailbox {
    /// A close was requested (the reason is in `close`).
    closing: AtomicBool,
    /// Nanoseconds; 0 until the first sample.
    rtt_ns: AtomicU64,
    /// The connection's next deadline, for the node's timer.
    deadline: Deadline,
    queue: Queue<Outbox>,
    /// Close with a goodbye, for this reason.
    close: OnceLock<DownReason>,
}

impl Mailbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Mailbox {
            closing: AtomicBool::new(false),
            rtt_ns: AtomicU64::new(0),
            deadline: Deadline::default(),
            queue: Queue::new(capacity),
            close: OnceLock::new(),
        }
    }

    /// Asks the connection to close with a goodbye (the first request
    /// counts).
    pub(crate) fn request_close(&self, reason: DownReason) {
        let _ = self.close.set(reason);
        self.closing.store(true, Ordering::Release);
        self.queue.wake_consumer();
    }

    fn record_rtt(&self, rtt: Duration) {
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.rtt_ns.store(ns, Ordering::Relaxed);
    }

    /// The latest round-trip time of the session, if one was measured.
    pub(crate) fn last_rtt(&self) -> Option<Duration> {
        match self.rtt_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

impl Timed for Mailbox {
    fn deadline(&self) -> &Deadline {
        &self.deadline
    }

    /// The connection task waits on its outbox (its waker is registered
    /// there on every pass): a deadline wakes it the way a close request
    /// does.
    fn wake(&self) {
        self.queue.wake_consumer();
    }
}

impl std::ops::Deref for Mailbox {
    type Target = Queue<Outbox>;

    fn deref(&self) -> &Queue<Outbox> {
        &self.queue
    }
}

/// Stop taking messages from the outbox while this much waits to be written.
/// Small enough that the write buffer (this plus one message of up to
/// 64 KiB) stays below glibc's 128 KiB mmap threshold: a freed and
/// reallocated buffer then costs no page faults.
const WRITE_HIGH_WATER: usize = 32 * 1024;
/// How long a closing session may spend flushing its goodbye.
const GOODBYE_FLUSH: Duration = Duration::from_millis(500);
/// Read buffer sizes: an idle session reads into a small buffer (a ping is
/// 13 bytes); one whose reads fill the buffer gets a bigger one next time,
/// up to 64 KiB. Not more: received messages keep their read buffer alive
/// (they are slices of it), so each read allocates afresh, and glibc serves
/// blocks from 128 KiB up with fresh mmap'd pages (a page fault per 4 KiB).
/// With 256 KiB reads, 64 KiB throughput fell to 0.5x raw in half the runs.
const READ_MIN: usize = 256;
const READ_MAX: usize = 64 * 1024;
/// Messages decoded per batch before they are handed to the event queue.
const DELIVER_BATCH: usize = 1024;
/// Passes of one poll before the task yields to the others.
const MAX_PASSES: usize = 16;
/// Reads per pass (each read is followed by decoding what it brought).
const MAX_READS: usize = 2;

/// The supervisor's answer to a completed handshake.
#[derive(Debug)]
pub(crate) enum Approval {
    Accept,
    Reject(ProtocolViolation),
    /// The node is shutting down.
    Shutdown,
}

/// From a connection to the supervisor.
#[derive(Debug)]
pub(crate) enum Note {
    Handshaken {
        conn: u64,
        hello: Box<Hello>,
        addr: SocketAddr,
        approve: oneshot::Sender<Approval>,
    },
    Ended {
        conn: u64,
        /// The peer, if the session was up.
        peer: Option<PeerId>,
        reason: DownReason,
    },
}

/// What a connection task is given.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) session: Arc<SessionConfig>,
    pub(crate) expected: Option<PeerId>,
    pub(crate) outbound: bool,
    pub(crate) max_frame: u32,
    pub(crate) write_timeout: Duration,
    pub(crate) hub: Arc<Hub>,
    pub(crate) notes: mpsc::UnboundedSender<Note>,
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) shared: Arc<Shared>,
}

/// What all the connections of a node use on every heartbeat: one pointer
/// in each connection's hot state instead of two.
pub(crate) struct Hub {
    /// The application's event stream.
    pub(crate) events: Arc<Queue<VecDeque<Event>>>,
    /// The connections' deadlines.
    pub(crate) timer: Arc<Timer<Mailbox>>,
}

/// A connection being made (when we dial).
pub(crate) type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// TCP options derived from the heartbeat: no Nagle delay for heartbeats,
/// and a limit on how long written data may stay unacknowledged, a little
/// beyond our own timeout (the heartbeat decides first).
///
/// No TCP keepalive: it probes only a connection that received nothing
/// for a while, which the heartbeat never lets happen, and a dead peer
/// fails the heartbeat first. It would decide nothing and cost a kernel
/// timer per connection.
pub(crate) fn tune(stream: &TcpStream, timeout: Duration) {
    let sock = SockRef::from(stream);
    let results = [
        sock.set_tcp_nodelay(true),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        sock.set_tcp_user_timeout(Some(timeout * 2)),
    ];
    for r in results {
        if let Err(e) = r {
            debug!(error = %e, "cannot set a TCP option");
        }
    }
}

/// What the poll loop hands to the task.
enum Step {
    /// The handshake completed: ask the supervisor.
    Approve(Box<Hello>),
    /// The session is over.
    Closed(DownReason),
}

/// Where a connection is in its life. What runs once per connection (the
/// dial, the approval, the end) is a boxed future; what runs per frame is
/// the hand-written loop of [`Link::poll_link`].
/// The supervisor's decision, once the application was told.
type Decision = Pin<Box<dyn Future<Output = Result<PeerId, DownReason>> + Send>>;

enum Phase {
    Connecting(ConnectFuture),
    Running(TcpStream),
    /// The supervisor decides on the handshake; the loop waits. (Boxed
    /// with the stream: no variant is bigger than `Running`'s, so the
    /// phase takes half a cache line.)
    Approving(Box<(TcpStream, Decision)>),
    /// The goodbye, the last events, the report to the supervisor.
    Ending(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

/// The task of one TCP connection, written out as a future rather than as
/// an `async fn`: the state an idle heartbeat touches is then laid out
/// together at the start of the task (nested `async` state machines
/// scattered it, and its state tags, over the task's memory: with 10 000
/// sessions, every line touched per heartbeat is a cache miss).
// In declaration order: the hot fields first.
#[repr(C)]
pub(crate) struct ConnTask {
    phase: Phase,
    /// The connection's span, when a subscriber takes it (entered on each
    /// poll).
    span: Option<Box<Span>>,
    link: Link,
}

impl ConnTask {
    /// A task for an accepted connection (`Ok`) or one to dial.
    pub(crate) fn new(
        conn: Conn,
        stream: Result<TcpStream, ConnectFuture>,
        addr: SocketAddr,
        span: Span,
    ) -> ConnTask {
        let phase = match stream {
            Ok(s) => {
                tune(&s, conn.session.heartbeat_timeout);
                Phase::Running(s)
            }
            Err(connect) => Phase::Connecting(connect),
        };
        ConnTask {
            phase,
            span: (!span.is_disabled()).then(|| Box::new(span)),
            link: Link::new(clock::now(), conn, addr),
        }
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let _entered = this.span.as_ref().map(|s| s.enter());
        let l = &mut this.link;
        loop {
            // Each arm puts back the phase it leaves, or the next one.
            this.phase = match std::mem::replace(&mut this.phase, Phase::Done) {
                Phase::Running(mut stream) => match l.poll_link(cx, &mut stream) {
                    Poll::Pending => {
                        this.phase = Phase::Running(stream);
                        return Poll::Pending;
                    }
                    Poll::Ready(Step::Approve(hello)) => {
                        let approval = approve(&l.cold, hello, l.hub.events.clone());
                        Phase::Approving(Box::new((stream, Box::pin(approval))))
                    }
                    Poll::Ready(Step::Closed(reason)) => {
                        Phase::Ending(Box::pin(l.end(stream, reason)))
                    }
                },
                Phase::Approving(mut waiting) => match waiting.1.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Approving(waiting);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(p)) => {
                        l.peer = Some(p);
                        Phase::Running(waiting.0)
                    }
                    // The peer may already count the session as up (it has
                    // our hello): a node shutting down says goodbye.
                    Poll::Ready(Err(r)) => {
                        let goodbye = r == DownReason::Shutdown;
                        l.session.close(r, goodbye);
                        Phase::Running(waiting.0)
                    }
                },
                Phase::Connecting(mut connect) => match connect.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Connecting(connect);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(stream)) => {
                        tune(&stream, l.cold.session.heartbeat_timeout);
                        // The handshake has its time from now on.
                        l.session =
                            Session::new(clock::now(), l.cold.session.clone(), l.cold.expected);
                        Phase::Running(stream)
                    }
                    Poll::Ready(Err(e)) => {
                        debug!(error = %e, "connect failed");
                        let _ = l.cold.notes.send(Note::Ended {
                            conn: l.cold.id,
                            peer: None,
                            reason: DownReason::Io(e.kind()),
                        });
                        return Poll::Ready(());
                    }
                },
                Phase::Ending(mut end) => match end.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Ending(end);
                        return Poll::Pending;
                    }
                    Poll::Ready(()) => return Poll::Ready(()),
                },
                Phase::Done => return Poll::Ready(()),
            };
        }
    }
}

/// What a connection uses only now and then.
struct Cold {
    id: u64,
    session: Arc<SessionConfig>,
    expected: Option<PeerId>,
    outbound: bool,
    addr: SocketAddr,
    write_timeout: Duration,
    notes: mpsc::UnboundedSender<Note>,
    shared: Arc<Shared>,
}

/// A connection's state, kept across polls.
// In declaration order: what an idle heartbeat touches is together, the
// session machine's hot fields (its first) right after the link's.
#[repr(C)]
struct Link {
    /// The time, read once per pass (a clock read per step would cost a few
    /// percent of an idle session's wake-up).
    now: Instant,
    read_size: u32,
    max_frame: u32,
    /// What the connection buffers; `None` while it buffers nothing (an
    /// idle session's heartbeat then checks one word, not three buffers).
    bufs: Option<Box<Buffers>>,
    /// Set when the supervisor approved the session.
    peer: Option<PeerId>,
    mailbox: Arc<Mailbox>,
    /// The event stream, and the node's timer (which keeps the deadline in
    /// `mailbox`).
    hub: Arc<Hub>,
    session: Session,
    /// When a write last made progress, or the write buffer last filled
    /// from empty: a write stalled since then for `write_timeout` closes
    /// the session.
    last_write: Instant,
    cold: Cold,
}

/// The buffers of a connection that has something to buffer.
#[derive(Default)]
struct Buffers {
    rbuf: BytesMut,
    /// Complete frames taken off `rbuf`, not yet decoded.
    frames: Frames,
    wbuf: BytesMut,
    /// Received messages the event queue has no room for yet. While any
    /// wait, the task reads nothing more and the heartbeat timeout is
    /// suspended (the silence is ours).
    pending: VecDeque<Event>,
    /// Waits for room in the event queue (only while `pending` waits).
    room: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Buffers {
    /// Whether all of them are empty and hold no memory.
    fn unused(&self) -> bool {
        self.rbuf.capacity() == 0
            && self.wbuf.capacity() == 0
            && self.pending.capacity() == 0
            && self.frames.is_drained()
            && self.room.is_none()
    }
}

/// Feeds a frame other than data to the machine.
fn handle_control(session: &mut Session, now: Instant, f: Frame) {
    trace!(kind = f.kind(), "frame in");
    let data = session.handle_frame(now, f);
    debug_assert!(data.is_none(), "data frames are handled apart");
}

fn reject(session: &mut Session, e: crate::error::FrameError) {
    warn!(error = %e, "rejected frame; closing session");
    session.handle_decode_error(e);
}

/// Whether the handshake completed and the supervisor has not answered.
fn awaiting_approval(peer: Option<PeerId>, session: &Session) -> bool {
    peer.is_none() && session.is_established()
}

/// Writes from `buf` until the socket takes no more (or the session
/// closes on an error). Returns how many bytes were written.
fn write_some(
    cx: &mut Context<'_>,
    stream: &mut TcpStream,
    session: &mut Session,
    buf: &[u8],
) -> usize {
    let mut at = 0;
    while at < buf.len() && !session.is_closed() {
        match Pin::new(&mut *stream).poll_write(cx, &buf[at..]) {
            Poll::Pending => break,
            Poll::Ready(Ok(0)) => session.handle_io_error(std::io::ErrorKind::WriteZero),
            Poll::Ready(Ok(n)) => at += n,
            Poll::Ready(Err(e)) => session.handle_io_error(e.kind()),
        }
    }
    at
}

/// Asks the supervisor to approve a completed handshake; once it did, the
/// application learns that the session is up.
fn approve(
    cold: &Cold,
    hello: Box<Hello>,
    events: Arc<Queue<VecDeque<Event>>>,
) -> impl Future<Output = Result<PeerId, DownReason>> + Send + 'static {
    let (tx, rx) = oneshot::channel();
    let (peer, addr, outbound) = (hello.id, cold.addr, cold.outbound);
    let name = hello.name.clone();
    let note = Note::Handshaken {
        conn: cold.id,
        hello,
        addr,
        approve: tx,
    };
    let sent = cold.notes.send(note).is_ok();
    async move {
        if !sent {
            return Err(DownReason::Shutdown);
        }
        match rx.await {
            Ok(Approval::Accept) => {
                info!(%peer, %addr, "session up");
                let up = Event::SessionUp {
                    peer,
                    name,
                    addr,
                    outbound,
                };
                let _ = events.push(up).await;
                Ok(peer)
            }
            Ok(Approval::Reject(v)) => Err(DownReason::ProtocolError(v)),
            Ok(Approval::Shutdown) | Err(_) => Err(DownReason::Shutdown),
        }
    }
}

impl Link {
    fn new(now: Instant, conn: Conn, addr: SocketAddr) -> Link {
        Link {
            now,
            read_size: READ_MIN as u32,
            max_frame: conn.max_frame,
            bufs: None,
            peer: None,
            mailbox: conn.mailbox,
            hub: conn.hub,
            session: Session::new(now, conn.session.clone(), conn.expected),
            last_write: now,
            cold: Cold {
                id: conn.id,
                session: conn.session,
                expected: conn.expected,
                outbound: conn.outbound,
                addr,
                write_timeout: conn.write_timeout,
                notes: conn.notes,
                shared: conn.shared,
            },
        }
    }

    /// An idle session holds no buffers: 10 000 of them must fit in a few
    /// KiB each.
    fn release_idle_buffers(&mut self) {
        let Some(b) = self.bufs.as_mut() else {
            return;
        };
        let idle_reads = self.read_size == READ_MIN as u32;
        if b.rbuf.is_empty() && idle_reads && b.rbuf.capacity() > 0 {
            b.rbuf = BytesMut::new();
        }
        // Batches of received messages move to the event queue by swapping
        // buffers: an idle session gives back the one it was left with.
        if b.pending.is_empty() && idle_reads && b.pending.capacity() > 0 {
            b.pending = VecDeque::new();
        }
        if b.wbuf.is_empty()
            && b.wbuf.capacity() > 0
            && (b.wbuf.capacity() <= 4096 || self.mailbox.is_empty())
        {
            b.wbuf = BytesMut::new();
        }
        if b.unused() {
            self.bufs = None;
        }
    }

    /// The buffers, made when first needed.
    fn bufs(&mut self) -> &mut Buffers {
        self.bufs.get_or_insert_with(Box::default)
    }

    /// Whether nothing waits to be written.
    fn wbuf_empty(&self) -> bool {
        self.bufs.as_ref().is_none_or(|b| b.wbuf.is_empty())
    }

    /// Grows the read size for a busy peer (a read filled it), shrinks it
    /// back for an idle one.
    fn adapt_read_size(&mut self, n: usize) {
        let size = self.read_size as usize;
        if n >= size && size < READ_MAX {
            self.read_size *= 2;
        } else if n < READ_MIN && size > READ_MIN {
            self.read_size = READ_MIN as u32;
        }
    }

    /// Whether the handshake completed and the supervisor has not answered.
    fn awaiting_approval(&self) -> bool {
        awaiting_approval(self.peer, &self.session)
    }

    /// The write buffer, to append to; a stall is timed from when it
    /// fills.
    fn wbuf(&mut self) -> &mut BytesMut {
        if self.wbuf_empty() {
            self.last_write = self.now;
        }
        &mut self.bufs().wbuf
    }

    /// One poll of the connection: goes round (control, receive, machine,
    /// outbox, write, timer) until nothing moves, then waits for whichever
    /// registered waker fires first. Written by hand rather than as a
    /// `select!` loop: an idle session answering a ping is one pass, with no
    /// futures built and dropped per wake-up.
    fn poll_link(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<Step> {
        for _ in 0..MAX_PASSES {
            self.now = clock::now();
            // The supervisor asked to close (say goodbye): once.
            if self.mailbox.closing.load(Ordering::Acquire)
                && !self.session.is_closed()
                && let Some(r) = self.mailbox.close.get()
            {
                self.session.close(r.clone(), true);
            }
            let mut again = self.receive(cx, stream);
            while let Some(ev) = self.session.poll_event() {
                match ev {
                    SessionEvent::Established(hello) => return Poll::Ready(Step::Approve(hello)),
                    SessionEvent::Rtt(rtt) => self.rtt(rtt),
                    SessionEvent::Closed(r) => return Poll::Ready(Step::Closed(r)),
                }
            }
            self.transmit(cx, stream);
            let limited = self.take_outbox(cx);
            again |= self.write(cx, stream) && limited;
            again |= self.poll_timer();
            if !again {
                self.release_idle_buffers();
                return Poll::Pending;
            }
        }
        // Busy: let the other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Delivers waiting messages, decodes buffered frames, reads. Returns
    /// whether there is more to do without waiting (a full batch decoded);
    /// otherwise a waker is registered (socket or event-queue room), or the
    /// session is closed or waits for approval.
    fn receive(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> bool {
        let mut reads = 0;
        loop {
            if !self.deliver(cx) || self.session.is_closed() || self.awaiting_approval() {
                return false;
            }
            let exhausted = self.decode_buffered();
            if !self.deliver(cx) || self.session.is_closed() || self.awaiting_approval() {
                return false;
            }
            if !exhausted || reads == MAX_READS {
                return true;
            }
            reads += 1;
            if self.poll_read(cx, stream).is_pending() {
                return false;
            }
        }
    }

    /// Hands waiting messages to the event queue. Returns false when some
    /// must still wait (then the task is woken when there is room).
    #[inline(always)]
    fn deliver(&mut self, cx: &mut Context<'_>) -> bool {
        match self.bufs.as_mut() {
            Some(b) if !b.pending.is_empty() => {
                Self::deliver_pending(cx, b, &self.hub.events, &mut self.session, self.now)
            }
            _ => true,
        }
    }

    fn deliver_pending(
        cx: &mut Context<'_>,
        b: &mut Buffers,
        events: &Arc<Queue<VecDeque<Event>>>,
        session: &mut Session,
        now: Instant,
    ) -> bool {
        for _ in 0..4 {
            let blocked = events.push_many(&mut b.pending);
            session.set_paused(now, blocked);
            if !blocked {
                b.room = None;
                return true;
            }
            let room = b.room.get_or_insert_with(|| {
                let events = events.clone();
                Box::pin(async move { events.room().await })
            });
            if room.as_mut().poll(cx).is_pending() {
                return false;
            }
            b.room = None;
        }
        cx.waker().wake_by_ref();
        false
    }

    /// Reads what the socket has. `Pending` (waker registered) when it has
    /// nothing; an end of stream or error goes to the machine.
    fn poll_read(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<()> {
        let rbuf_empty = self.bufs.as_ref().is_none_or(|b| b.rbuf.is_empty());
        if rbuf_empty && self.read_size == READ_MIN as u32 {
            return self.poll_read_idle(cx, stream);
        }
        match stream.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => {
                self.session.handle_io_error(e.kind());
                return Poll::Ready(());
            }
            Poll::Ready(Ok(())) => {}
        }
        // The buffer is allocated only now that there is data.
        let size = self.read_size as usize;
        let rbuf = &mut self.bufs().rbuf;
        if rbuf.capacity() - rbuf.len() < size / 2 {
            rbuf.reserve(size);
        }
        let read = std::pin::pin!(stream.read_buf(rbuf)).poll(cx);
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => self.session.handle_eof(),
            Poll::Ready(Ok(n)) => self.adapt_read_size(n),
            Poll::Ready(Err(e)) => self.session.handle_io_error(e.kind()),
        }
        Poll::Ready(())
    }

    /// The read of an idle session (nothing buffered, small reads): into
    /// the stack, where the heartbeats and acks it brings are handled. Only
    /// what they cannot take (a data frame, a partial frame, what follows
    /// the handshake) is copied to the read buffer. An idle session's ping
    /// then costs no allocation.
    fn poll_read_idle(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> Poll<()> {
        let mut stack = [std::mem::MaybeUninit::uninit(); READ_MIN];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(stream).poll_read(cx, &mut read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => self.session.handle_io_error(e.kind()),
            Poll::Ready(Ok(())) if read.filled().is_empty() => self.session.handle_eof(),
            Poll::Ready(Ok(())) => {
                let read = read.filled();
                self.adapt_read_size(read.len());
                let taken = self.decode_control(read);
                if taken < read.len() {
                    let size = (self.read_size as usize).max(read.len() - taken);
                    let rbuf = &mut self.bufs().rbuf;
                    rbuf.reserve(size);
                    rbuf.extend_from_slice(&read[taken..]);
                }
            }
        }
        Poll::Ready(())
    }

    /// Handles the complete control frames at the front of `read`, up to
    /// the first data frame or incomplete frame, or until the session
    /// closes or waits for approval. Returns how many bytes it used.
    fn decode_control(&mut self, read: &[u8]) -> usize {
        let mut at = 0;
        while !self.session.is_closed() && !self.awaiting_approval() {
            let rest = &read[at..];
            let total = match frame_len(rest, self.max_frame) {
                Ok(Some(total)) if total <= rest.len() => total,
                Ok(_) => break,
                Err(e) => {
                    reject(&mut self.session, e);
                    break;
                }
            };
            match Frame::decode_control(&rest[..total]) {
                None => break,
                Some(Ok(f)) => handle_control(&mut self.session, self.now, f),
                Some(Err(e)) => reject(&mut self.session, e),
            }
            at += total;
        }
        at
    }

    /// Takes messages from the outbox while the peer keeps up. Returns
    /// whether it stopped because the write buffer is full (then a write
    /// makes room for more). Registers the task's waker with the mailbox
    /// either way (for a close request, and, when it empties the outbox,
    /// for the next message).
    fn take_outbox(&mut self, cx: &mut Context<'_>) -> bool {
        let full = |l: &Link| {
            l.bufs
                .as_ref()
                .is_some_and(|b| b.wbuf.len() >= WRITE_HIGH_WATER)
        };
        if self.mailbox.is_idle() {
            // Empty, and our waker is registered for the next message (the
            // common case of an idle session's wake-up: no lock).
            return full(self);
        }
        if full(self) || self.peer.is_none() || !self.session.can_send() {
            self.mailbox.register(cx.waker());
            return full(self);
        }
        let mut sent = 0;
        while !full(self) {
            // No more than the in-flight limits allow: a run of small
            // messages is split if need be.
            let room = self.session.sendable();
            if room == 0 {
                break;
            }
            let (Some(out), _) = self.mailbox.consume(Some(cx.waker()), |b| b.pop(room)) else {
                break;
            };
            out.encode(self.wbuf());
            sent += out.count() as u64;
            self.session.record_sent(self.now, out);
        }
        if sent > 0 {
            Counters::add(&self.cold.shared.counters.messages_sent, sent);
        }
        full(self)
    }

    /// Writes what is buffered until the socket takes no more. Returns
    /// whether anything was written.
    fn write(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) -> bool {
        let Some(b) = self.bufs.as_mut().filter(|b| !b.wbuf.is_empty()) else {
            return false;
        };
        let n = write_some(cx, stream, &mut self.session, &b.wbuf);
        b.wbuf.advance(n);
        if n > 0 {
            self.last_write = self.now;
        }
        n > 0
    }

    /// Encodes the frames the machine wants to send. While nothing else
    /// waits to be written, heartbeats and acks are encoded on the stack
    /// and written from there: an idle session's pong costs no allocation.
    /// What the socket does not take goes to the write buffer.
    fn transmit(&mut self, cx: &mut Context<'_>, stream: &mut TcpStream) {
        let mut stack = [0; 4 * MAX_FIXED];
        let mut staged = 0;
        while let Some(f) = self.session.poll_transmit() {
            if self.wbuf_empty()
                && stack.len() - staged >= MAX_FIXED
                && let Some(n) = f.encode_fixed(&mut stack[staged..])
            {
                staged += n;
                continue;
            }
            let wbuf = self.wbuf();
            wbuf.extend_from_slice(&stack[..staged]);
            staged = 0;
            f.encode(wbuf);
        }
        if staged == 0 {
            return;
        }
        let stack = &stack[..staged];
        // Behind them, messages are about to be taken: one write for all.
        let n = if self.mailbox.is_idle() || self.mailbox.is_empty() {
            write_some(cx, stream, &mut self.session, stack)
        } else {
            0
        };
        if n < stack.len() {
            self.wbuf().extend_from_slice(&stack[n..]);
        }
    }

    /// Handles the next deadline (the machine's, or a stalled write's)
    /// if it has come, and returns true; otherwise leaves it with the
    /// node's timer (which wakes the task then) and returns false.
    fn poll_timer(&mut self) -> bool {
        let stall = (!self.wbuf_empty()).then(|| self.last_write + self.cold.write_timeout);
        let deadline = [self.session.poll_timeout(), stall]
            .into_iter()
            .flatten()
            .min();
        match deadline {
            Some(d) if d <= self.now => {
                if stall.is_some_and(|s| s <= self.now) {
                    self.session.close(DownReason::WriteTimeout, false);
                } else {
                    self.session.handle_timeout(self.now);
                }
                true
            }
            _ => {
                self.hub.timer.set(&self.mailbox, deadline);
                false
            }
        }
    }

    /// A heartbeat round trip: recorded for [`Node::peers`] and reported.
    ///
    /// [`Node::peers`]: crate::Node::peers
    fn rtt(&self, rtt: Duration) {
        if let Some(p) = self.peer {
            self.mailbox.record_rtt(rtt);
            // A sample is skipped (and counted), never waited for: the
            // session must keep going. It does not wake the application
            // either: the next event does, or the node's timer by its next
            // tick (once for the samples of many sessions).
            match self.hub.events.try_push_quiet(Event::Rtt { peer: p, rtt }) {
                Ok(false) => {}
                Ok(true) => self.hub.timer.nudge(self.now),
                Err(_) => Counters::bump(&self.cold.shared.counters.rtt_events_skipped),
            }
        }
    }

    /// Decodes complete frames from the read buffer into the machine,
    /// collecting the messages they carry (up to a batch). Returns whether
    /// the buffer holds no complete frame any more.
    fn decode_buffered(&mut self) -> bool {
        let Some(b) = self.bufs.as_mut() else {
            return true;
        };
        let (now, session) = (self.now, &mut self.session);
        let mut received = 0;
        let mut exhausted = false;
        while b.pending.len() < DELIVER_BATCH {
            let decoded = match b.frames.next() {
                Some(d) => d,
                None if b.frames.fill(&mut b.rbuf, self.max_frame) => continue,
                None => {
                    exhausted = true;
                    break;
                }
            };
            match decoded {
                Ok(Frame::Data(data)) => {
                    // `peer` is set whenever the machine accepts data (see
                    // below).
                    if session.handle_data(now)
                        && let Some(p) = self.peer
                    {
                        received += 1;
                        b.pending.push_back(Event::Message { peer: p, data });
                    }
                    if session.is_closed() {
                        break;
                    }
                }
                Ok(f) => {
                    handle_control(session, now, f);
                    if session.is_closed() || awaiting_approval(self.peer, session) {
                        // Closed, or the handshake just completed: the
                        // frames after it wait for the approval.
                        break;
                    }
                }
                Err(e) => {
                    reject(session, e);
                    break;
                }
            }
        }
        if received > 0 {
            Counters::add(&self.cold.shared.counters.messages_received, received);
        }
        exhausted
    }

    /// The end of the connection, once the loop is over: what it must do
    /// at once (the counters, the outbox closed to senders), and the rest
    /// as a future: the goodbye flushed (briefly: the peer learns at once
    /// instead of by timeout), the messages already received delivered,
    /// then `SessionDown` and what was not delivered, and the report to the
    /// supervisor.
    fn end(
        &mut self,
        mut stream: TcpStream,
        reason: DownReason,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.hub.timer.set(&self.mailbox, None);
        let (mut wbuf, pending) = match self.bufs.take() {
            Some(b) => (b.wbuf, b.pending),
            None => Default::default(),
        };
        while let Some(f) = self.session.poll_transmit() {
            f.encode(&mut wbuf);
        }
        let flush = matches!(
            reason,
            DownReason::Shutdown | DownReason::Replaced | DownReason::PeerRestarted
        ) && !wbuf.is_empty();
        let peer = self.peer;
        let counters = &self.cold.shared.counters;
        match &reason {
            DownReason::HeartbeatTimeout => Counters::bump(&counters.heartbeat_timeouts),
            DownReason::WriteTimeout => Counters::bump(&counters.write_timeouts),
            DownReason::ProtocolError(_) if peer.is_some() => {
                Counters::bump(&counters.protocol_errors)
            }
            DownReason::HandshakeTimeout => Counters::bump(&counters.handshake_timeouts),
            DownReason::Shutdown => {}
            _ if peer.is_none() => Counters::bump(&counters.handshake_failures),
            _ => {}
        }
        // Messages already received (and maybe acknowledged) are delivered;
        // those sent and not acknowledged, or never sent, are handed back.
        let mut undelivered = Vec::new();
        if peer.is_some() {
            undelivered = self.session.take_unacked();
            undelivered.extend(self.mailbox.close_and_take());
            if !undelivered.is_empty() {
                Counters::add(&counters.messages_undelivered, undelivered.len() as u64);
            }
        }
        let events = self.hub.events.clone();
        let (notes, conn) = (self.cold.notes.clone(), self.cold.id);
        async move {
            if flush {
                let _ = tokio::time::timeout(GOODBYE_FLUSH, stream.write_all(&wbuf)).await;
            }
            let _ = tokio::time::timeout(GOODBYE_FLUSH, stream.shutdown()).await;
            drop(stream);
            match peer {
                None => debug!(%reason, "connection ended before its session was up"),
                Some(p) => {
                    info!(peer = %p, %reason, undelivered = undelivered.len(), "session down");
                    for e in pending {
                        let _ = events.push(e).await;
                    }
                    let down = Event::SessionDown {
                        peer: p,
                        reason: reason.clone(),
                    };
                    let _ = events.push(down).await;
                    if !undelivered.is_empty() {
                        let messages = undelivered;
                        let _ = events.push(Event::Undelivered { peer: p, messages }).await;
                    }
                }
            }
            let _ = notes.send(Note::Ended { conn, peer, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Every idle session holds its task's future: keep it small (the
    /// 10 000-session memory budget is 4 KiB per session, all included).
    #[test]
    fn the_session_task_stays_small() {
        let (notes, _nrx) = mpsc::unbounded_channel();
        let conn = Conn {
            id: 0,
            session: Arc::new(crate::fuzzing_session_config()),
            expected: None,
            outbound: false,
            max_frame: 1024,
            write_timeout: Duration::from_secs(1),
            hub: Arc::new(Hub {
                events: Arc::new(Queue::new(1)),
                timer: Arc::new(Timer::new(clock::now())),
            }),
            notes,
            mailbox: Arc::new(Mailbox::new(4)),
            shared: Default::default(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let addr = s.peer_addr().unwrap();
            let task = ConnTask::new(conn, Ok(s), addr, Span::none());
            let size = std::mem::size_of_val(&task);
            assert!(size <= 1024, "session task is {size} bytes");
        });
    }
}
