//! The tokio task of one TCP connection: it moves bytes between the socket
//! and the [`Session`] machine, between the outbox and the socket, and
//! between the machine and the application's event stream.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Sleep;
use tracing::{debug, info, trace, warn};

use super::machine::{Session, SessionConfig, SessionEvent};
use super::outbox::Outbox;
use crate::clock;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::node::Shared;
use crate::peer::PeerId;
use crate::queue::Queue;
use crate::stats::Counters;
use crate::wire::frame::{Frame, Frames, Hello, MAX_FIXED, frame_len};

/// What a connection shares with the node: its outbox (published to
/// senders once the session is up), the supervisor's close request, and its
/// latest round-trip time. One allocation, which the task touches on every
/// wake-up anyway: with 10 000 sessions every other per-session object read
/// per wake-up is a cache miss.
#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: Queue<Outbox>,
    /// Close with a goodbye, for this reason.
    close: OnceLock<DownReason>,
    /// Nanoseconds; 0 until the first sample.
    rtt_ns: AtomicU64,
}

impl Mailbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Mailbox {
            queue: Queue::new(capacity),
            close: OnceLock::new(),
            rtt_ns: AtomicU64::new(0),
        }
    }

    /// Asks the connection to close with a goodbye (the first request
    /// counts).
    pub(crate) fn request_close(&self, reason: DownReason) {
        let _ = self.close.set(reason);
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
/// The timer is moved later only when the deadline moved by more than this
/// (moving it on every frame costs more than one early wake-up).
const TIMER_SLACK: Duration = Duration::from_millis(20);
/// Where the timer waits when nothing is due.
const FAR: Duration = Duration::from_secs(3600);
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

/// Everything a connection task needs.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) session: Arc<SessionConfig>,
    pub(crate) expected: Option<PeerId>,
    pub(crate) outbound: bool,
    pub(crate) max_frame: u32,
    pub(crate) write_timeout: Duration,
    pub(crate) events: Arc<Queue<VecDeque<Event>>>,
    pub(crate) notes: mpsc::UnboundedSender<Note>,
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) shared: Arc<Shared>,
}

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

/// What the poll loop hands to the async part of the task.
enum Step {
    /// The handshake completed: ask the supervisor.
    Approve(Box<Hello>),
    /// The session is over.
    Closed(DownReason),
}

/// A running connection: everything the poll loop works on, kept across
/// the awaits for approval and for the goodbye.
// In declaration order: what an idle heartbeat touches is together, the
// session machine's hot fields (its first) right after the link's.
#[repr(C)]
struct Link {
    /// The time, read once per pass (a clock read per step would cost a few
    /// percent of an idle session's wake-up).
    now: Instant,
    /// When the timer is set to fire.
    armed: Instant,
    last_write: Instant,
    stream: TcpStream,
    read_size: usize,
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
    /// Set when the supervisor approved the session.
    peer: Option<PeerId>,
    session: Session,
}

impl Link {
    /// An idle session holds no buffers: 10 000 of them must fit in a few
    /// KiB each.
    fn release_idle_buffers(&mut self, mailbox: &Mailbox) {
        if self.rbuf.is_empty() && self.read_size == READ_MIN && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        // Batches of received messages move to the event queue by swapping
        // buffers: an idle session gives back the one it was left with.
        if self.pending.is_empty() && self.read_size == READ_MIN && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        if self.wbuf.is_empty()
            && self.wbuf.capacity() > 0
            && (self.wbuf.capacity() <= 4096 || mailbox.is_empty())
        {
            self.wbuf = BytesMut::new();
        }
    }

    /// Grows the read size for a busy peer (a read filled it), shrinks it
    /// back for an idle one.
    fn adapt_read_size(&mut self, n: usize) {
        if n >= self.read_size && self.read_size < READ_MAX {
            self.read_size *= 2;
        } else if n < READ_MIN && self.read_size > READ_MIN {
            self.read_size = READ_MIN;
        }
    }

    /// Whether the handshake completed and the supervisor has not answered.
    fn awaiting_approval(&self) -> bool {
        self.peer.is_none() && self.session.is_established()
    }
}

/// Feeds a frame other than data to the machine.
fn handle_control(l: &mut Link, f: Frame) {
    trace!(kind = f.kind(), "frame in");
    let data = l.session.handle_frame(l.now, f);
    debug_assert!(data.is_none(), "data frames are handled apart");
}

fn reject(l: &mut Link, e: crate::error::FrameError) {
    warn!(error = %e, "rejected frame; closing session");
    l.session.handle_decode_error(e);
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

impl Conn {
    /// Runs the connection to its end and reports the end to the supervisor.
    pub(crate) async fn run(mut self, stream: TcpStream, addr: SocketAddr) {
        let id = self.id;
        let notes = self.notes.clone();
        let (peer, reason) = self.drive(stream, addr).await;
        let _ = notes.send(Note::Ended {
            conn: id,
            peer,
            reason,
        });
    }

    async fn drive(&mut self, stream: TcpStream, addr: SocketAddr) -> (Option<PeerId>, DownReason) {
        let now = clock::now();
        let mut link = Link {
            stream,
            session: Session::new(now, self.session.clone(), self.expected),
            rbuf: BytesMut::new(),
            frames: Frames::default(),
            read_size: READ_MIN,
            wbuf: BytesMut::new(),
            last_write: now,
            now,
            peer: None,
            pending: VecDeque::new(),
            room: None,
            armed: now + FAR,
        };
        // One timer for the whole life of the connection, moved as needed.
        let sleep = clock::sleep_until(link.armed);
        tokio::pin!(sleep);
        let reason = loop {
            match std::future::poll_fn(|cx| self.poll_link(cx, &mut link, sleep.as_mut())).await {
                Step::Approve(hello) => match Box::pin(self.approve(hello, addr)).await {
                    Ok(p) => link.peer = Some(p),
                    // The peer may already count the session as up (it
                    // has our hello): a node shutting down says goodbye.
                    Err(r) => {
                        let goodbye = r == DownReason::Shutdown;
                        link.session.close(r, goodbye);
                    }
                },
                Step::Closed(r) => break r,
            }
        };
        Box::pin(self.finish(link, reason)).await
    }

    /// One poll of the connection: goes round (control, receive, machine,
    /// outbox, write, timer) until nothing moves, then waits for whichever
    /// registered waker fires first. Written by hand rather than as a
    /// `select!` loop: an idle session answering a ping is one pass, with no
    /// futures built and dropped per wake-up.
    fn poll_link(
        &mut self,
        cx: &mut Context<'_>,
        l: &mut Link,
        mut sleep: Pin<&mut Sleep>,
    ) -> Poll<Step> {
        for _ in 0..MAX_PASSES {
            l.now = clock::now();
            // The supervisor asked to close (say goodbye): once.
            if !l.session.is_closed()
                && let Some(r) = self.mailbox.close.get()
            {
                l.session.close(r.clone(), true);
            }
            let mut again = self.receive(cx, l);
            while let Some(ev) = l.session.poll_event() {
                match ev {
                    SessionEvent::Established(hello) => return Poll::Ready(Step::Approve(hello)),
                    SessionEvent::Rtt(rtt) => self.rtt(l, rtt),
                    SessionEvent::Closed(r) => return Poll::Ready(Step::Closed(r)),
                }
            }
            self.transmit(cx, l);
            let limited = self.take_outbox(cx, l);
            again |= self.write(cx, l) && limited;
            again |= self.poll_timer(cx, l, sleep.as_mut());
            if !again {
                l.release_idle_buffers(&self.mailbox);
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
    fn receive(&self, cx: &mut Context<'_>, l: &mut Link) -> bool {
        let mut reads = 0;
        loop {
            if !self.deliver(cx, l) || l.session.is_closed() || l.awaiting_approval() {
                return false;
            }
            let exhausted = self.decode_buffered(l);
            if !self.deliver(cx, l) || l.session.is_closed() || l.awaiting_approval() {
                return false;
            }
            if !exhausted || reads == MAX_READS {
                return true;
            }
            reads += 1;
            if self.poll_read(cx, l).is_pending() {
                return false;
            }
        }
    }

    /// Hands waiting messages to the event queue. Returns false when some
    /// must still wait (then the task is woken when there is room).
    fn deliver(&self, cx: &mut Context<'_>, l: &mut Link) -> bool {
        if l.pending.is_empty() {
            return true;
        }
        for _ in 0..4 {
            let blocked = self.events.push_many(&mut l.pending);
            l.session.set_paused(l.now, blocked);
            if !blocked {
                l.room = None;
                return true;
            }
            let room = l.room.get_or_insert_with(|| {
                let events = self.events.clone();
                Box::pin(async move { events.room().await })
            });
            if room.as_mut().poll(cx).is_pending() {
                return false;
            }
            l.room = None;
        }
        cx.waker().wake_by_ref();
        false
    }

    /// Reads what the socket has. `Pending` (waker registered) when it has
    /// nothing; an end of stream or error goes to the machine.
    fn poll_read(&self, cx: &mut Context<'_>, l: &mut Link) -> Poll<()> {
        if l.rbuf.is_empty() && l.read_size == READ_MIN {
            return self.poll_read_idle(cx, l);
        }
        match l.stream.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => {
                l.session.handle_io_error(e.kind());
                return Poll::Ready(());
            }
            Poll::Ready(Ok(())) => {}
        }
        // The buffer is allocated only now that there is data.
        if l.rbuf.capacity() - l.rbuf.len() < l.read_size / 2 {
            l.rbuf.reserve(l.read_size);
        }
        let read = std::pin::pin!(l.stream.read_buf(&mut l.rbuf)).poll(cx);
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => l.session.handle_eof(),
            Poll::Ready(Ok(n)) => l.adapt_read_size(n),
            Poll::Ready(Err(e)) => l.session.handle_io_error(e.kind()),
        }
        Poll::Ready(())
    }

    /// The read of an idle session (nothing buffered, small reads): into
    /// the stack, where the heartbeats and acks it brings are handled. Only
    /// what they cannot take (a data frame, a partial frame, what follows
    /// the handshake) is copied to the read buffer. An idle session's ping
    /// then costs no allocation.
    fn poll_read_idle(&self, cx: &mut Context<'_>, l: &mut Link) -> Poll<()> {
        let mut stack = [std::mem::MaybeUninit::uninit(); READ_MIN];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut l.stream).poll_read(cx, &mut read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => l.session.handle_io_error(e.kind()),
            Poll::Ready(Ok(())) if read.filled().is_empty() => l.session.handle_eof(),
            Poll::Ready(Ok(())) => {
                let read = read.filled();
                l.adapt_read_size(read.len());
                let taken = self.decode_control(l, read);
                if taken < read.len() {
                    l.rbuf.reserve(l.read_size.max(read.len() - taken));
                    l.rbuf.extend_from_slice(&read[taken..]);
                }
            }
        }
        Poll::Ready(())
    }

    /// Handles the complete control frames at the front of `read`, up to
    /// the first data frame or incomplete frame, or until the session
    /// closes or waits for approval. Returns how many bytes it used.
    fn decode_control(&self, l: &mut Link, read: &[u8]) -> usize {
        let mut at = 0;
        while !l.session.is_closed() && !l.awaiting_approval() {
            let rest = &read[at..];
            let total = match frame_len(rest, self.max_frame) {
                Ok(Some(total)) if total <= rest.len() => total,
                Ok(_) => break,
                Err(e) => {
                    reject(l, e);
                    break;
                }
            };
            match Frame::decode_control(&rest[..total]) {
                None => break,
                Some(Ok(f)) => handle_control(l, f),
                Some(Err(e)) => reject(l, e),
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
    fn take_outbox(&self, cx: &mut Context<'_>, l: &mut Link) -> bool {
        let o = &self.mailbox;
        let (session, wbuf, now) = (&mut l.session, &mut l.wbuf, l.now);
        if l.peer.is_none() || !session.can_send() || wbuf.len() >= WRITE_HIGH_WATER {
            o.register(cx.waker());
            return wbuf.len() >= WRITE_HIGH_WATER;
        }
        if o.is_idle() {
            // Empty, and our waker is registered for the next message (the
            // common case of an idle session's wake-up: no lock).
            return false;
        }
        let mut sent = 0;
        while wbuf.len() < WRITE_HIGH_WATER {
            // No more than the in-flight limits allow: a run of small
            // messages is split if need be.
            let room = session.sendable();
            if room == 0 {
                break;
            }
            let (Some(out), _) = o.consume(Some(cx.waker()), |b| b.pop(room)) else {
                break;
            };
            out.encode(wbuf);
            sent += out.count() as u64;
            session.record_sent(now, out);
        }
        if sent > 0 {
            Counters::add(&self.shared.counters.messages_sent, sent);
        }
        wbuf.len() >= WRITE_HIGH_WATER
    }

    /// Writes what is buffered until the socket takes no more. Returns
    /// whether anything was written.
    fn write(&self, cx: &mut Context<'_>, l: &mut Link) -> bool {
        let n = write_some(cx, &mut l.stream, &mut l.session, &l.wbuf);
        l.wbuf.advance(n);
        if n > 0 {
            l.last_write = l.now;
        }
        n > 0
    }

    /// Encodes the frames the machine wants to send. While nothing else
    /// waits to be written, heartbeats and acks are encoded on the stack
    /// and written from there: an idle session's pong costs no allocation.
    /// What the socket does not take goes to the write buffer.
    fn transmit(&self, cx: &mut Context<'_>, l: &mut Link) {
        let mut stack = [0; 4 * MAX_FIXED];
        let mut staged = 0;
        while let Some(f) = l.session.poll_transmit() {
            if l.wbuf.is_empty()
                && stack.len() - staged >= MAX_FIXED
                && let Some(n) = f.encode_fixed(&mut stack[staged..])
            {
                staged += n;
                continue;
            }
            l.wbuf.extend_from_slice(&stack[..staged]);
            staged = 0;
            f.encode(&mut l.wbuf);
        }
        if staged == 0 {
            return;
        }
        let stack = &stack[..staged];
        // Behind them, messages are about to be taken: one write for all.
        let n = if self.mailbox.is_idle() || self.mailbox.is_empty() {
            write_some(cx, &mut l.stream, &mut l.session, stack)
        } else {
            0
        };
        if n > 0 {
            l.last_write = l.now;
        }
        l.wbuf.extend_from_slice(&stack[n..]);
    }

    /// Moves the timer to the next deadline (the machine's, or the write
    /// stall's) and handles it when it fired. Returns whether it fired.
    fn poll_timer(&self, cx: &mut Context<'_>, l: &mut Link, mut sleep: Pin<&mut Sleep>) -> bool {
        let stall = (!l.wbuf.is_empty()).then(|| l.last_write + self.write_timeout);
        if let Some(deadline) = [l.session.poll_timeout(), stall]
            .into_iter()
            .flatten()
            .min()
        {
            // Moved when it must fire earlier, or much later; a timer that
            // fires a little early finds nothing due and is re-armed.
            if deadline < l.armed || deadline > l.armed + TIMER_SLACK {
                l.armed = deadline;
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
            }
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        let now = clock::now();
        if stall.is_some_and(|s| now >= s) && !l.wbuf.is_empty() {
            l.session.close(DownReason::WriteTimeout, false);
        } else if l.session.poll_timeout().is_some_and(|t| t <= now) {
            l.session.handle_timeout(now);
        }
        // Re-armed on the next pass.
        l.armed = now + FAR;
        sleep
            .as_mut()
            .reset(tokio::time::Instant::from_std(l.armed));
        true
    }

    /// A heartbeat round trip: recorded for [`Node::peers`] and reported.
    ///
    /// [`Node::peers`]: crate::Node::peers
    fn rtt(&self, l: &Link, rtt: Duration) {
        if let Some(p) = l.peer {
            self.mailbox.record_rtt(rtt);
            // A sample is skipped (and counted), never waited for: the
            // session must keep going.
            if self.events.try_push(Event::Rtt { peer: p, rtt }).is_err() {
                Counters::bump(&self.shared.counters.rtt_events_skipped);
            }
        }
    }

    /// Decodes complete frames from the read buffer into the machine,
    /// collecting the messages they carry (up to a batch). Returns whether
    /// the buffer holds no complete frame any more.
    fn decode_buffered(&self, l: &mut Link) -> bool {
        let now = l.now;
        let mut received = 0;
        let mut exhausted = false;
        while l.pending.len() < DELIVER_BATCH {
            let decoded = match l.frames.next() {
                Some(d) => d,
                None if l.frames.fill(&mut l.rbuf, self.max_frame) => continue,
                None => {
                    exhausted = true;
                    break;
                }
            };
            match decoded {
                Ok(Frame::Data(data)) => {
                    // `peer` is set whenever the machine accepts data (see
                    // below).
                    if l.session.handle_data(now)
                        && let Some(p) = l.peer
                    {
                        received += 1;
                        l.pending.push_back(Event::Message { peer: p, data });
                    }
                    if l.session.is_closed() {
                        break;
                    }
                }
                Ok(f) => {
                    handle_control(l, f);
                    if l.session.is_closed() || l.awaiting_approval() {
                        // Closed, or the handshake just completed: the
                        // frames after it wait for the approval.
                        break;
                    }
                }
                Err(e) => {
                    reject(l, e);
                    break;
                }
            }
        }
        if received > 0 {
            Counters::add(&self.shared.counters.messages_received, received);
        }
        exhausted
    }

    async fn approve(&self, hello: Box<Hello>, addr: SocketAddr) -> Result<PeerId, DownReason> {
        let (tx, rx) = oneshot::channel();
        let peer = hello.id;
        let name = hello.name.clone();
        let note = Note::Handshaken {
            conn: self.id,
            hello,
            addr,
            approve: tx,
        };
        if self.notes.send(note).is_err() {
            return Err(DownReason::Shutdown);
        }
        match rx.await {
            Ok(Approval::Accept) => {
                info!(%peer, %addr, "session up");
                let _ = self
                    .events
                    .push(Event::SessionUp {
                        peer,
                        name,
                        addr,
                        outbound: self.outbound,
                    })
                    .await;
                Ok(peer)
            }
            Ok(Approval::Reject(v)) => Err(DownReason::ProtocolError(v)),
            Ok(Approval::Shutdown) | Err(_) => Err(DownReason::Shutdown),
        }
    }

    async fn finish(&mut self, l: Link, reason: DownReason) -> (Option<PeerId>, DownReason) {
        let Link {
            mut stream,
            mut session,
            mut wbuf,
            peer,
            pending,
            ..
        } = l;
        let shared = self.shared.clone();
        let counters = &shared.counters;
        // A goodbye (or anything else the machine queued) goes out first,
        // briefly: the peer learns at once instead of by timeout.
        while let Some(f) = session.poll_transmit() {
            f.encode(&mut wbuf);
        }
        if matches!(
            reason,
            DownReason::Shutdown | DownReason::Replaced | DownReason::PeerRestarted
        ) && !wbuf.is_empty()
        {
            let _ = tokio::time::timeout(GOODBYE_FLUSH, stream.write_all(&wbuf)).await;
        }
        let _ = tokio::time::timeout(GOODBYE_FLUSH, stream.shutdown()).await;
        drop(stream);
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
        let Some(p) = peer else {
            debug!(%reason, "connection ended before its session was up");
            return (None, reason);
        };
        // Messages already received (and maybe acknowledged) are delivered.
        for e in pending {
            let _ = self.events.push(e).await;
        }
        let mut undelivered = session.take_unacked();
        undelivered.extend(self.mailbox.close_and_take());
        info!(peer = %p, %reason, undelivered = undelivered.len(), "session down");
        let _ = self
            .events
            .push(Event::SessionDown {
                peer: p,
                reason: reason.clone(),
            })
            .await;
        if !undelivered.is_empty() {
            Counters::add(&counters.messages_undelivered, undelivered.len() as u64);
            let _ = self
                .events
                .push(Event::Undelivered {
                    peer: p,
                    messages: undelivered,
                })
                .await;
        }
        (Some(p), reason)
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
            events: Arc::new(Queue::new(1)),
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
            let fut = conn.run(s, addr);
            let size = std::mem::size_of_val(&fut);
            assert!(size <= 1600, "session task future is {size} bytes");
        });
    }
}
