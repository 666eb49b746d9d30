//! The running phase of a connection: one hand-written loop that moves
//! bytes between the socket and the [`Session`] machine, messages from the
//! outbox to the socket, and received messages and round-trip samples to
//! the application's event stream, until the handshake completes or the
//! session ends.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tracing::{debug, trace, warn};

use super::datagram::Link;
use super::machine::{Session, SessionEvent};
use super::mailbox::Mailbox;
use super::stream::{Stream, TAG, violation_of};
use super::supervision::{ConnectionParams, NewConnection, NodeContext};
use crate::clock;
use crate::event::{DownReason, Event, ReplyTo};
use crate::node::EventQueue;
use crate::peer::PeerId;
use crate::stats::Counters;
use crate::wire::frame::{
    Frame, Frames, Hello, MAX_FIXED, Outgoing, encode_data_header, frame_len,
};

/// Why the loop of [`Connection::poll_session`] stopped: the task moves to
/// its next phase.
pub(super) enum LoopExit {
    /// The handshake completed: the supervisor is to approve it.
    Handshaken(Box<Hello>),
    /// The session is over.
    Closed(DownReason),
}

/// Stop taking messages from the outbox while this much waits to be written.
/// Small enough that the write buffer (this plus one message of up to
/// 64 KiB) stays below glibc's 128 KiB mmap threshold: a freed and
/// reallocated buffer then costs no page faults.
const WRITE_HIGH_WATER: usize = 32 * 1024;
/// Messages at least this large are sealed from their own buffer on a
/// Noise stream, not copied to the write buffer: the copy saved outweighs
/// the record of their own (one more cipher call) their frame header and
/// what preceded it take.
const SEAL_DIRECT: usize = 8 * 1024;
/// Room a Noise reader keeps for a small record ahead of those of a large
/// message (its frame header and the acks before it).
const LEADING_RECORD: usize = 64;
/// Read buffer sizes: an idle session reads into a small buffer (a ping is
/// 13 bytes); one whose reads fill the buffer gets a bigger one next time,
/// up to 64 KiB. Not more: received messages keep their read buffer alive
/// (they are slices of it), so each read allocates afresh, and glibc serves
/// blocks from 128 KiB up with fresh mmap'd pages (a page fault per 4 KiB).
const READ_MIN: usize = 1 << READ_MIN_SHIFT;
const READ_MIN_SHIFT: u8 = 8;
const READ_MAX: usize = 64 * 1024;
/// Messages decoded per batch before they are handed to the event queue.
const DELIVER_BATCH: usize = 1024;
/// Passes of one poll before the task yields to the others.
const MAX_PASSES: usize = 16;
/// Reads per pass (each read is followed by decoding what it brought).
const MAX_READS: usize = 2;

/// A connection's state, kept across polls, and the loop that moves bytes
/// and events through it.
// In declaration order: what an idle heartbeat touches is together, the
// session machine's hot fields (its first) right after these (checked in
// `layout` below).
#[repr(C)]
pub(super) struct Connection {
    /// The time, read once per pass (a clock read per step would cost a few
    /// percent of an idle session's wake-up).
    pub(super) now: Instant,
    /// The read size is `1 << read_shift` bytes.
    pub(super) read_shift: u8,
    /// Sealed records wait in the stream to be written (Noise): a flush is
    /// due, and counts as a write waiting.
    pub(super) unflushed: bool,
    /// Data, request or reply frames were handled since a read last found
    /// nothing more (an ack may be due then: `Session::handle_drained`).
    pub(super) data_read: bool,
    /// Messages moved since the session's deadline last came: its buffers
    /// (and its outbox's) are kept until then, so a busy session does not
    /// allocate them afresh per message; an idle one holds none.
    pub(super) busy: bool,
    pub(super) max_frame: u32,
    /// What the connection buffers; `None` while it buffers nothing (an
    /// idle session's heartbeat then checks one word, not three buffers).
    pub(super) bufs: Option<Box<Buffers>>,
    /// Set when the supervisor approved the session.
    pub(super) peer: Option<PeerId>,
    pub(super) mailbox: Arc<Mailbox>,
    /// The event stream, the node's timer (which keeps the deadline in
    /// `mailbox`) and the counters.
    pub(super) node: Arc<NodeContext>,
    pub(super) session: Session,
    /// When a write last made progress, or the write buffer last filled
    /// from empty: a write stalled since then for `write_timeout` closes
    /// the session.
    pub(super) last_write: Instant,
    pub(super) params: ConnectionParams,
    /// The session's liveness datagrams, when both sides take them.
    pub(super) link: Option<Arc<Link>>,
}

/// The buffers of a connection that has something to buffer.
#[derive(Default)]
pub(super) struct Buffers {
    rbuf: BytesMut,
    /// Complete frames taken off `rbuf`, not yet decoded.
    frames: Frames,
    pub(super) wbuf: BytesMut,
    /// Received messages the event queue has no room for yet. While any
    /// wait, the task reads nothing more and the heartbeat timeout is
    /// suspended (the silence is ours).
    pub(super) pending: VecDeque<Event>,
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

/// A read or write failed: a broken record is a protocol violation, the
/// rest socket errors.
fn failed(session: &mut Session, e: std::io::Error) {
    match violation_of(&e) {
        Some(v) => session.handle_violation(v),
        None => session.handle_io_error(e.kind()),
    }
}

/// Whether the handshake completed and the supervisor has not answered.
fn awaiting_approval(peer: Option<PeerId>, session: &Session) -> bool {
    peer.is_none() && session.is_established()
}

/// Writes from `buf` until the socket takes no more (or the session
/// closes on an error). Returns how many bytes were written.
fn write_some(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    session: &mut Session,
    buf: &[u8],
) -> usize {
    let mut at = 0;
    while at < buf.len() && !session.is_closed() {
        match Pin::new(&mut *stream).poll_write(cx, &buf[at..]) {
            Poll::Pending => break,
            Poll::Ready(Ok(0)) => session.handle_io_error(std::io::ErrorKind::WriteZero),
            Poll::Ready(Ok(n)) => at += n,
            Poll::Ready(Err(e)) => failed(session, e),
        }
    }
    at
}

impl Connection {
    pub(super) fn new(now: Instant, new: NewConnection) -> Connection {
        let mut session = Session::new(now, new.params.session.clone(), new.params.expected);
        // The token of a new session, should we accept one that resumes
        // nothing.
        session.set_fresh_token(rand::random::<u64>() | 1);
        Connection {
            now,
            read_shift: READ_MIN_SHIFT,
            max_frame: new.max_frame,
            unflushed: false,
            data_read: false,
            busy: false,
            bufs: None,
            peer: None,
            mailbox: new.mailbox,
            node: new.node,
            session,
            last_write: now,
            params: new.params,
            link: None,
        }
    }

    /// An idle session holds no buffers: 10 000 of them must fit in a few
    /// KiB each. Called when a poll finds nothing more to do; a busy
    /// session keeps its buffers until its next deadline.
    fn release_idle_buffers(&mut self, stream: &mut Stream) {
        if self.busy {
            return;
        }
        stream.release_idle();
        let Some(b) = self.bufs.as_mut() else {
            return;
        };
        let idle_reads = self.read_shift == READ_MIN_SHIFT;
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
            && (b.wbuf.capacity() <= 4096 || self.mailbox.outbox().is_empty())
        {
            b.wbuf = BytesMut::new();
        }
        if b.unused() {
            self.bufs = None;
        }
    }

    /// The buffers, made when first needed.
    pub(super) fn bufs(&mut self) -> &mut Buffers {
        self.bufs.get_or_insert_with(Box::default)
    }

    /// Whether nothing waits to be written.
    fn wbuf_empty(&self) -> bool {
        !self.unflushed && self.bufs.as_ref().is_none_or(|b| b.wbuf.is_empty())
    }

    fn read_size(&self) -> usize {
        1 << self.read_shift
    }

    /// Grows the read size for a busy peer (a read filled it), shrinks it
    /// back for an idle one: a small read that did not continue a frame
    /// (one that did is the end of a large message, split across Noise
    /// records or TCP segments).
    fn adapt_read_size(&mut self, n: usize, continued: bool) {
        let size = self.read_size();
        if n >= size && size < READ_MAX {
            self.read_shift += 1;
        } else if n < READ_MIN && size > READ_MIN && !continued {
            self.read_shift = READ_MIN_SHIFT;
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
    pub(super) fn poll_session(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut Stream,
    ) -> Poll<LoopExit> {
        for _ in 0..MAX_PASSES {
            self.now = clock::now();
            // The supervisor asked to close (say goodbye): once.
            if let Some(r) = self.mailbox.close_requested()
                && !self.session.is_closed()
            {
                self.session.close(r, true);
            }
            let mut again = self.receive(cx, stream);
            while let Some(ev) = self.session.poll_event() {
                match ev {
                    SessionEvent::Established(hello) => {
                        return Poll::Ready(LoopExit::Handshaken(hello));
                    }
                    SessionEvent::Rtt(rtt) => self.rtt(rtt),
                    SessionEvent::Closed(r) => return Poll::Ready(LoopExit::Closed(r)),
                }
            }
            self.transmit(cx, stream);
            let limited = self.take_outbox(cx, stream);
            again |= self.write(cx, stream) && limited;
            again |= self.poll_timer();
            if !again {
                self.release_idle_buffers(stream);
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
    fn receive(&mut self, cx: &mut Context<'_>, stream: &mut Stream) -> bool {
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
                // All that arrived is read and handled. (The flag spares
                // an idle session's heartbeat a visit to the machine.)
                if std::mem::take(&mut self.data_read) {
                    self.session.handle_drained();
                }
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
                Self::deliver_pending(cx, b, &self.node.events, &mut self.session, self.now)
            }
            _ => true,
        }
    }

    fn deliver_pending(
        cx: &mut Context<'_>,
        b: &mut Buffers,
        events: &Arc<EventQueue>,
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
    fn poll_read(&mut self, cx: &mut Context<'_>, stream: &mut Stream) -> Poll<()> {
        let rbuf_empty = self.bufs.as_ref().is_none_or(|b| b.rbuf.is_empty());
        if rbuf_empty && self.read_shift == READ_MIN_SHIFT {
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
        // The buffer is allocated only now that there is data. Under
        // Noise, with room for records of the read size and a small one
        // before them (a large message's frame header is a record of its
        // own, with the acks sent before it), and the last one's tag (a
        // record opens in place with room for its tag; one that does not
        // fit waits for the next read, or is opened aside and copied).
        let size = self.read_size();
        let least = match stream {
            Stream::Noise(_) => size + LEADING_RECORD + TAG,
            Stream::Plain(_) => size / 2,
        };
        let rbuf = &mut self.bufs().rbuf;
        let continued = !rbuf.is_empty();
        if rbuf.capacity() - rbuf.len() < least {
            rbuf.reserve(size.max(least));
        }
        let read = std::pin::pin!(stream.read_buf(rbuf)).poll(cx);
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => self.session.handle_eof(),
            Poll::Ready(Ok(n)) => {
                self.busy = true;
                // A read that ended inside a record (a large message's
                // frame header, its body on the way) is not an idle one.
                self.adapt_read_size(n, continued || stream.inside_record());
                self.session.handle_progress(self.now);
            }
            Poll::Ready(Err(e)) => failed(&mut self.session, e),
        }
        Poll::Ready(())
    }

    /// The read of an idle session (nothing buffered, small reads): into
    /// the stack, where the heartbeats and acks it brings are handled. Only
    /// what they cannot take (a data frame, a partial frame, what follows
    /// the handshake) is copied to the read buffer. An idle session's ping
    /// then costs no allocation.
    fn poll_read_idle(&mut self, cx: &mut Context<'_>, stream: &mut Stream) -> Poll<()> {
        let mut stack = [std::mem::MaybeUninit::uninit(); READ_MIN];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(stream).poll_read(cx, &mut read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => failed(&mut self.session, e),
            Poll::Ready(Ok(())) if read.filled().is_empty() => self.session.handle_eof(),
            Poll::Ready(Ok(())) => {
                let read = read.filled();
                self.adapt_read_size(read.len(), false);
                let taken = self.decode_control(read);
                if taken < read.len() {
                    // The start of a frame: progress too.
                    self.session.handle_progress(self.now);
                    let size = self.read_size().max(read.len() - taken);
                    self.busy = true;
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
    fn take_outbox(&mut self, cx: &mut Context<'_>, stream: &mut Stream) -> bool {
        let full = |l: &Connection, stream: &Stream| {
            let sealed = stream.unwritten();
            sealed >= WRITE_HIGH_WATER
                || l.bufs
                    .as_ref()
                    .is_some_and(|b| b.wbuf.len() + sealed >= WRITE_HIGH_WATER)
        };
        if self.mailbox.outbox().is_idle() {
            // Empty, and our waker is registered for the next message (the
            // common case of an idle session's wake-up: no lock).
            return full(self, stream);
        }
        if full(self, stream) || self.peer.is_none() || !self.session.can_send() {
            self.mailbox.outbox().register(cx.waker());
            return full(self, stream);
        }
        let mut sent = 0;
        while !full(self, stream) {
            // No more than the in-flight limits allow: a run of small
            // messages is split if need be.
            let room = self.session.sendable();
            if room == 0 {
                break;
            }
            let bytes = self.session.sendable_bytes();
            let (Some(out), _) = self
                .mailbox
                .outbox()
                .consume(Some(cx.waker()), |b| b.pop(room, bytes))
            else {
                break;
            };
            self.encode(stream, &out);
            sent += out.count() as u64;
            self.session.record_sent(self.now, out);
        }
        if sent > 0 {
            self.busy = true;
            Counters::add(&self.node.counters.messages_sent, sent);
        }
        full(self, stream)
    }

    /// Appends `out`'s frames to what waits to be written. A large message
    /// on a Noise stream is sealed from its own buffer, behind what the
    /// write buffer holds (see [`Stream::seal_frame`]); the rest goes to
    /// the write buffer.
    fn encode(&mut self, stream: &mut Stream, out: &Outgoing) {
        if let Outgoing::Message(m) = out
            && m.len() >= SEAL_DIRECT
            && stream.is_noise()
        {
            if self.wbuf_empty() && stream.unwritten() == 0 {
                self.last_write = self.now;
            }
            stream.set_large_records(self.session.fast_path());
            let wbuf = &mut self.bufs.get_or_insert_with(Box::default).wbuf;
            encode_data_header(m.len(), wbuf);
            match stream.seal_frame(wbuf, m) {
                Ok(_) => wbuf.clear(),
                Err(e) => failed(&mut self.session, e),
            }
            return;
        }
        out.encode(self.wbuf());
    }

    /// Writes what is buffered until the socket takes no more. Returns
    /// whether anything was written.
    fn write(&mut self, cx: &mut Context<'_>, stream: &mut Stream) -> bool {
        let mut n = 0;
        if let Some(b) = self.bufs.as_mut().filter(|b| !b.wbuf.is_empty()) {
            stream.set_large_records(self.session.fast_path());
            n = write_some(cx, stream, &mut self.session, &b.wbuf);
            b.wbuf.advance(n);
        }
        // Sealed records the socket did not take yet (Noise).
        let sealed = stream.unwritten();
        if sealed > 0 && !self.session.is_closed() {
            if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
                failed(&mut self.session, e);
            }
            n += sealed - stream.unwritten().min(sealed);
        }
        self.unflushed = stream.unwritten() > 0;
        if n > 0 {
            self.last_write = self.now;
        }
        n > 0
    }

    /// Encodes the frames the machine wants to send. While nothing else
    /// waits to be written, heartbeats and acks are encoded on the stack
    /// and written from there: an idle session's pong costs no allocation.
    /// What the socket does not take goes to the write buffer.
    fn transmit(&mut self, cx: &mut Context<'_>, stream: &mut Stream) {
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
        let n = if self.mailbox.outbox().is_idle() || self.mailbox.outbox().is_empty() {
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
        let stall = (!self.wbuf_empty()).then(|| self.last_write + self.params.write_timeout);
        let deadline = [self.session.poll_timeout(), stall]
            .into_iter()
            .flatten()
            .min();
        match deadline {
            Some(d) if d <= self.now => {
                if std::mem::take(&mut self.busy) {
                    // Idle from here on, unless messages move before the
                    // poll ends.
                    self.mailbox.outbox().tidy(|o| o.release_idle());
                }
                if stall.is_some_and(|s| s <= self.now) {
                    self.session.close(DownReason::WriteTimeout, false);
                } else {
                    // What the datagram task heard since, first.
                    if let Some(heard) = self.link.as_ref().and_then(|l| l.heard()) {
                        self.session.handle_datagram(heard);
                    }
                    self.session.handle_timeout(self.now);
                    if self.session.take_probe()
                        && let Some(l) = &self.link
                    {
                        l.probe(&self.node.counters);
                    }
                }
                true
            }
            _ => {
                self.node.timer.set(&self.mailbox, deadline);
                false
            }
        }
    }

    /// Starts the session's liveness datagrams (PROTOCOL.md §7) once it is
    /// approved: when it is encrypted, the node has a socket of the peer's
    /// family, and the peer's hello named a port (`port`). The stream
    /// gives up the handshake's keys either way.
    pub(super) fn attach_link(&mut self, stream: &mut Stream, port: u16) {
        let keys = match stream {
            Stream::Noise(noise) => noise.take_split(),
            Stream::Plain(_) => None,
        };
        let (Some(keys), Some(sockets), Some(peer)) = (keys, &self.node.datagrams, self.peer)
        else {
            return;
        };
        let mut to = self.params.addr;
        to.set_port(port);
        let Some(socket) = sockets.for_addr(&to).filter(|_| port != 0) else {
            return;
        };
        let local = self.params.session.hello.id;
        let link = Arc::new(Link::new(keys, local, peer, to, socket.clone()));
        sockets.links.insert(link.clone());
        self.session.enable_datagrams(self.now);
        // The kernel must not give up on a stream the stall timeout still
        // rides out.
        let cfg = &self.params.session;
        stream.set_user_timeout(cfg.stall_timeout + cfg.heartbeat_timeout);
        self.link = Some(link);
    }

    /// A heartbeat round trip: recorded for [`Node::peers`] and reported.
    ///
    /// [`Node::peers`]: crate::Node::peers
    fn rtt(&self, rtt: Duration) {
        if let Some(p) = self.peer {
            self.mailbox.record_rtt(rtt);
            if !self.node.rtt_events {
                return;
            }
            // A sample is skipped (and counted), never waited for: the
            // session must keep going. It does not wake the application
            // either: the next event does, or the node's timer by its next
            // tick (once for the samples of many sessions).
            match self.node.events.try_push_quiet(Event::Rtt { peer: p, rtt }) {
                Ok(false) => {}
                Ok(true) => self.node.timer.nudge(self.now),
                Err(_) => Counters::bump(&self.node.counters.rtt_events_skipped),
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
        let mut data_frames = false;
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
                    data_frames = true;
                    // `peer` is set whenever the machine accepts data (see
                    // below).
                    if session.handle_data(now, data.len())
                        && let Some(p) = self.peer
                    {
                        received += 1;
                        b.pending.push_back(Event::Message { peer: p, data });
                    }
                    if session.is_closed() {
                        break;
                    }
                }
                Ok(Frame::Request { id, body }) => {
                    data_frames = true;
                    if session.handle_data(now, body.len())
                        && let Some(p) = self.peer
                    {
                        Counters::bump(&self.node.counters.requests_received);
                        let reply = ReplyTo {
                            peer: p,
                            conn: self.params.lineage,
                            id,
                        };
                        b.pending.push_back(Event::Request {
                            peer: p,
                            body,
                            reply,
                        });
                    }
                    if session.is_closed() {
                        break;
                    }
                }
                Ok(Frame::Reply { id, body }) => {
                    data_frames = true;
                    if session.handle_data(now, body.len())
                        && let Some(p) = self.peer
                        && !self.node.requests.answer(p, self.params.lineage, id, body)
                    {
                        debug!(peer = %p, id, "reply that no request waits for; dropped");
                        Counters::bump(&self.node.counters.replies_unmatched);
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
            Counters::add(&self.node.counters.messages_received, received);
        }
        self.data_read |= data_frames;
        exhausted
    }
}

/// The layout the heartbeat path relies on: the fields an idle heartbeat
/// reads come first, and the session machine's hot fields right after.
mod layout {
    use std::mem::offset_of;

    use super::Connection;

    const _: () = assert!(offset_of!(Connection, now) == 0);
    const _: () = assert!(offset_of!(Connection, session) <= 64);
    const _: () = assert!(offset_of!(Connection, params) > offset_of!(Connection, last_write));
}
