//! The sans-IO session: handshake, heartbeat, RTT, acknowledgements and the
//! timeout decision.
//!
//! It owns no socket and never reads the clock. The driver calls, in any
//! order: [`Session::handle_frame`] for each decoded frame,
//! [`Session::handle_timeout`] when [`Session::poll_timeout`] has passed,
//! [`Session::record_sent`] for the application messages it writes; and
//! after each call drains [`Session::poll_transmit`] (frames to write) and
//! [`Session::poll_event`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::FrameError;
use crate::event::{DownReason, ProtocolViolation};
use crate::peer::PeerId;
use crate::wire::frame::{Frame, GoodbyeBody, Hello, MAX_HELLO_NAME, MIN_MAX_FRAME_SIZE, Outgoing};

/// Acknowledge at the latest after this many data frames...
const ACK_EVERY: u64 = 32;
/// ...or once they carry this many bytes of body, while more keeps
/// arriving: a receiver of 64 KiB messages writes an ack per four of them,
/// not one per message (each ack is a write, which on a fast link cost a
/// receiver of large messages a fifth of its time). A sender's window on a
/// LAN opens to `max_unacked_bytes` (8 MiB by default), far above this; a
/// window smaller than twice this runs dry between acks, and the rule
/// below acknowledges it when it does...
const ACK_BYTES: usize = 256 * 1024;
/// ...or once they carry this many and the receiver has read all that
/// arrived (see [`Session::handle_drained`]): a sender whose in-flight
/// window holds fewer than [`ACK_EVERY`] large messages, as while its
/// window opens, stops when it is full, so it hears back a round trip
/// later, not [`ACK_DELAY`] later. At most the smallest window. A trickle
/// of small messages is acknowledged by the other rules, not one ack per
/// message...
const ACK_BYTES_DRAINED: usize = 4 * 1024;
/// ...or this long after the first unacknowledged one.
const ACK_DELAY: Duration = Duration::from_millis(10);
/// Outstanding pings remembered for RTT.
const MAX_PINGS: usize = 8;
/// A passive side (see [`Session`]) whose peer does not report its round
/// trip in its pings still pings this often, in send intervals, to measure
/// it itself.
const RTT_REFRESH: u32 = 8;

/// Settings of one session.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Our handshake.
    pub hello: Hello,
    /// Our heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Our heartbeat timeout.
    pub heartbeat_timeout: Duration,
    /// Handshake must complete within this.
    pub handshake_timeout: Duration,
    /// Unacknowledged messages kept at most.
    pub max_unacked: usize,
    /// Unacknowledged bytes kept at most (one message may pass it).
    pub max_unacked_bytes: usize,
    /// Close with `write_timeout` when messages are in flight and none was
    /// acknowledged for this long: the peer stopped consuming.
    pub write_timeout: Duration,
    /// With liveness datagrams, close with `stream_stalled` when the
    /// stream brought nothing for this long while datagrams proved the
    /// peer alive.
    pub stall_timeout: Duration,
    /// How long a cut session is held for resumption (zero: never). An
    /// accepting side that resumes sends its hello only once the
    /// supervisor approved the dialer's: the hello says whether the
    /// session resumes.
    pub resume_grace: Duration,
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The handshake completed; this is the peer's.
    Established(Box<Hello>),
    /// A heartbeat round trip.
    Rtt(Duration),
    /// The session is over; write what `poll_transmit` still gives, then
    /// close the socket.
    Closed(DownReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Established,
    Closed,
}

/// One session's protocol state.
#[derive(Debug)]
// Laid out in declaration order, what an idle heartbeat touches first: three
// cache lines instead of fields spread over the whole struct. The frame and
// event queues are behind flags for the same reason (their emptiness is
// checked on every heartbeat).
#[repr(C)]
pub struct Session {
    state: State,
    paused: bool,
    /// The dialer pings every send interval; the acceptor is passive: the
    /// dialer's pings, answered by its pongs, keep both sides alive, and
    /// carry the dialer's round-trip sample, so it pings only when they stop
    /// coming (or, if they carry no sample, every `RTT_REFRESH` intervals).
    /// One ping and one pong per interval instead of two of each.
    active: bool,
    /// The peer's pings carry its round-trip samples.
    peer_reports_rtt: bool,
    /// A pong for `pong_seq` is the first frame to send. An idle session's
    /// only transmit (and its round-trip sample, below) are kept out of the
    /// queues.
    pong_due: bool,
    /// `transmits` is not empty.
    has_transmits: bool,
    /// `events` is not empty.
    has_events: bool,
    /// Our hello waits for the supervisor's approval (see
    /// `resume::defers_hello`).
    hello_owed: bool,
    pong_seq: u64,
    last_rx: Instant,
    /// When the peer's last ping arrived.
    last_ping_rx: Option<Instant>,
    last_ping_or_data: Instant,
    send_interval: Duration,
    /// 1.5 send intervals: how long a passive side waits for the peer's
    /// pings before it pings itself.
    takeover: Duration,
    /// The latest round-trip sample not reported yet (samples that arrive
    /// together are reported as the latest).
    unreported_rtt: Option<Duration>,
    ack_deadline: Option<Instant>,
    /// Messages in `unacked`, less `front_acked`.
    unacked_count: usize,
    /// Wire bytes in `unacked` (a piece counts until wholly acknowledged).
    unacked_bytes: usize,
    cfg: std::sync::Arc<SessionConfig>,
    /// The session token of our hello, once sent; before, as an acceptor
    /// that resumes, the token a new session gets (see `resume.rs`).
    token: u64,
    /// When we last pinged.
    last_own_ping: Instant,
    transmits: VecDeque<Frame>,
    events: VecDeque<SessionEvent>,
    expected: Option<PeerId>,
    /// The id the peer's key proved, with Noise.
    proven: Option<PeerId>,
    /// The peer's id, once established (its whole handshake goes to the
    /// driver in `Established`; keeping a copy would cost every session).
    peer: Option<PeerId>,
    handshake_deadline: Instant,
    /// Our latest round-trip sample, sent with our pings.
    last_rtt: Option<Duration>,
    ping_seq: u64,
    pings: VecDeque<(u64, Instant)>,
    rx_data: u64,
    rx_acked: u64,
    /// Body bytes of the frames counted since `rx_acked`.
    rx_unacked_bytes: usize,
    /// Sequence (0-based) of the oldest unacknowledged message.
    tx_base: u64,
    /// Messages written and not yet acknowledged, in the pieces they were
    /// written in; the first `front_acked` of the front piece are
    /// acknowledged.
    unacked: VecDeque<Outgoing>,
    front_acked: usize,
    /// When the oldest message in flight was sent, or the last ack advanced
    /// (whichever is later).
    ack_progress: Instant,
    /// Liveness datagrams, once the driver enabled them.
    datagrams: Option<Datagrams>,
    /// The in-flight window: unacknowledged bytes allowed now.
    window: Window,
}

mod liveness;
mod resume;
mod window;

use liveness::Datagrams;
pub use resume::Held;
use window::Window;

impl Session {
    /// Starts a session at `now` and queues our handshake. `expected` is the
    /// id discovery announced, when we dialed.
    pub fn new(
        now: Instant,
        cfg: impl Into<std::sync::Arc<SessionConfig>>,
        expected: Option<PeerId>,
    ) -> Self {
        let cfg = cfg.into();
        let mut s = Session {
            handshake_deadline: now + cfg.handshake_timeout,
            send_interval: cfg.heartbeat_interval,
            takeover: takeover(cfg.heartbeat_interval),
            window: Window::new(cfg.max_unacked_bytes),
            cfg,
            state: State::Handshake,
            expected,
            proven: None,
            peer: None,
            last_rx: now,
            last_ping_or_data: now,
            last_ping_rx: None,
            last_own_ping: now,
            active: expected.is_some(),
            peer_reports_rtt: false,
            last_rtt: None,
            paused: false,
            ping_seq: 0,
            pings: VecDeque::new(),
            rx_data: 0,
            rx_acked: 0,
            rx_unacked_bytes: 0,
            ack_deadline: None,
            tx_base: 0,
            unacked: VecDeque::new(),
            front_acked: 0,
            unacked_count: 0,
            unacked_bytes: 0,
            ack_progress: now,
            datagrams: None,
            pong_due: false,
            pong_seq: 0,
            has_transmits: false,
            has_events: false,
            hello_owed: false,
            token: 0,
            transmits: VecDeque::new(),
            unreported_rtt: None,
            events: VecDeque::new(),
        };
        if s.defers_hello() {
            s.hello_owed = true;
        } else {
            let hello = Box::new(s.cfg.hello.clone());
            s.push_transmit(Frame::Hello(Ok(hello)));
        }
        s
    }

    /// Sets the id the peer proved in the Noise handshake: a hello that
    /// claims another is refused.
    pub fn set_proven(&mut self, id: PeerId) {
        self.proven = Some(id);
    }

    /// The peer broke the protocol below the frames (in the encrypted
    /// records): the session closes.
    pub fn handle_violation(&mut self, v: ProtocolViolation) {
        self.violation(v);
    }

    /// The peer's id, once established.
    pub fn peer(&self) -> Option<PeerId> {
        self.peer
    }

    /// Whether the handshake completed and the session is not closed.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// How often we send when idle: ours, or faster if the peer's timeout
    /// needs it.
    pub fn send_interval(&self) -> Duration {
        self.send_interval
    }

    /// Whether another application message may be written now.
    pub fn can_send(&self) -> bool {
        self.sendable() > 0
    }

    /// How many more application messages may be written now.
    pub fn sendable(&self) -> usize {
        if self.state == State::Established && self.unacked_bytes < self.window.bytes() {
            self.cfg.max_unacked.saturating_sub(self.unacked_count)
        } else {
            0
        }
    }

    /// Whether acks come back fast enough that the in-flight window opened
    /// to 256 KiB or more: a large record then crosses in a fraction of a
    /// send interval.
    pub fn fast_path(&self) -> bool {
        self.window.bytes() >= 256 * 1024
    }

    /// How many more bytes of messages the in-flight window takes now (a
    /// message larger than that still goes alone, when
    /// [`Session::sendable`] allows one).
    pub fn sendable_bytes(&self) -> usize {
        self.window.bytes().saturating_sub(self.unacked_bytes)
    }

    /// Feeds one received frame. Returns an application message to deliver.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) -> Option<Bytes> {
        if self.state == State::Closed {
            return None;
        }
        self.stream_moved(now);
        match (self.state, frame) {
            (State::Handshake, Frame::Hello(hello)) => {
                self.handle_hello(now, hello);
                None
            }
            (State::Handshake, other) => {
                self.violation(ProtocolViolation::UnexpectedFrame(other.kind()));
                None
            }
            (_, Frame::Hello(_)) => {
                self.violation(ProtocolViolation::UnexpectedFrame("second hello"));
                None
            }
            (_, Frame::Ping { seq, rtt_us }) => {
                self.last_ping_rx = Some(now);
                // One pong per ping, and every frame in order: the slot
                // holds the oldest frame to send, if any.
                if !self.pong_due && !self.has_transmits {
                    self.pong_due = true;
                    self.pong_seq = seq;
                } else {
                    self.push_transmit(Frame::Pong(seq));
                }
                // The same round trip, measured by the side that pings: a
                // passive side reports it as its own instead of pinging.
                if let Some(us) = rtt_us
                    && !self.active
                {
                    self.peer_reports_rtt = true;
                    self.unreported_rtt = Some(Duration::from_micros(u64::from(us)));
                }
                None
            }
            (_, Frame::Pong(seq)) => {
                while let Some(&(s, sent)) = self.pings.front() {
                    if s > seq {
                        break;
                    }
                    self.pings.pop_front();
                    if s == seq {
                        let rtt = now.saturating_duration_since(sent);
                        self.last_rtt = Some(rtt);
                        self.unreported_rtt = Some(rtt);
                        break;
                    }
                }
                None
            }
            (_, Frame::Data(data)) => {
                self.count_data(now, data.len());
                Some(data)
            }
            // Acknowledged like messages; the driver handles them apart
            // (see `handle_data`).
            (_, Frame::Request { body, .. } | Frame::Reply { body, .. }) => {
                self.count_data(now, body.len());
                None
            }
            (_, Frame::Ack(count)) => {
                let sent = self.tx_base + self.unacked_count as u64;
                if count < self.tx_base || count > sent {
                    if count > sent {
                        self.violation(ProtocolViolation::BadAck);
                    }
                    return None;
                }
                let n = (count - self.tx_base) as usize;
                if n > 0 {
                    self.release_acked(n);
                    self.tx_base = count;
                    self.ack_progress = now;
                    // Data may wait for its ack up to a send interval: a
                    // ping behind it then reaches the peer well within its
                    // timeout (at least three intervals).
                    self.window.acked(count, now, self.send_interval);
                }
                None
            }
            (_, Frame::Goodbye(g)) => {
                // A peer that replaces this connection by a newer one (or
                // took it for a dead instance's) is not leaving: the
                // session ends, the peer stays known.
                let reason = match g.reason.as_str() {
                    "replaced" | "peer_restarted" => DownReason::Replaced,
                    _ => DownReason::Goodbye,
                };
                self.close(reason, false);
                None
            }
        }
    }

    /// Feeds a received data, request or reply frame whose body is `len`
    /// bytes (the common case of [`Session::handle_frame`], without moving a
    /// whole [`Frame`]): returns whether its message is to be delivered.
    pub fn handle_data(&mut self, now: Instant, len: usize) -> bool {
        match self.state {
            State::Established => {
                self.stream_moved(now);
                self.count_data(now, len);
                true
            }
            State::Handshake => {
                self.violation(ProtocolViolation::UnexpectedFrame("data"));
                false
            }
            State::Closed => false,
        }
    }

    fn count_data(&mut self, now: Instant, len: usize) {
        self.rx_data += 1;
        self.rx_unacked_bytes = self.rx_unacked_bytes.saturating_add(len);
        if self.rx_data - self.rx_acked >= ACK_EVERY || self.rx_unacked_bytes >= ACK_BYTES {
            self.queue_ack();
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + ACK_DELAY);
        }
    }

    fn handle_hello(&mut self, now: Instant, hello: Result<Box<Hello>, u8>) {
        let hello = match hello {
            Ok(h) => h,
            Err(version) => return self.violation(ProtocolViolation::UnsupportedVersion(version)),
        };
        let ours = &self.cfg.hello;
        let violation = if hello.protocol != ours.protocol {
            Some(ProtocolViolation::UnsupportedVersion(hello.protocol))
        } else if let Some(proven) = self.proven.filter(|p| *p != hello.id) {
            Some(ProtocolViolation::Unauthenticated {
                claimed: hello.id,
                proven,
            })
        } else if hello.service != ours.service {
            Some(ProtocolViolation::ServiceMismatch)
        } else if hello.id == ours.id {
            Some(ProtocolViolation::SelfConnection)
        } else if self.expected.is_some_and(|e| e != hello.id) {
            Some(ProtocolViolation::UnexpectedPeer {
                expected: self.expected.unwrap_or(hello.id),
                got: hello.id,
            })
        } else if hello.heartbeat_interval_ms == 0
            || hello.heartbeat_timeout_ms <= hello.heartbeat_interval_ms
            || hello.heartbeat_timeout_ms > 3_600_000
        {
            Some(ProtocolViolation::BadHeartbeat)
        } else if hello.name.len() > MAX_HELLO_NAME {
            Some(ProtocolViolation::BadHello("name longer than 64 bytes"))
        } else if hello.max_frame_size < MIN_MAX_FRAME_SIZE {
            Some(ProtocolViolation::BadHello("max_frame_size below 1024"))
        } else {
            None
        };
        if let Some(v) = violation {
            return self.violation(v);
        }
        // Send often enough for the peer's timeout too: at its own interval
        // if that is faster, and at least three times per peer timeout.
        let peer_interval = Duration::from_millis(hello.heartbeat_interval_ms);
        let peer_timeout = Duration::from_millis(hello.heartbeat_timeout_ms);
        self.send_interval = self
            .cfg
            .heartbeat_interval
            .min(peer_interval)
            .min(peer_timeout / 3);
        self.takeover = takeover(self.send_interval);
        self.state = State::Established;
        self.last_ping_or_data = now;
        self.peer = Some(hello.id);
        let (offer, peer_grace) = (hello.resume, hello.grace_ms);
        self.push_event(SessionEvent::Established(hello));
        // Ping at once: the first RTT sample, and proof of life (after our
        // hello, if it waits for the approval).
        if self.hello_owed {
            self.answer_fresh(now, offer, peer_grace);
        } else {
            self.send_ping(now);
        }
    }

    /// Part of a frame arrived (with Noise: a whole record, so
    /// authenticated): the peer is alive and its stream moving, though the
    /// frame is large or the link slow. Counts for the heartbeat timeout
    /// like a frame.
    pub fn handle_progress(&mut self, now: Instant) {
        if self.state == State::Established {
            self.stream_moved(now);
        }
    }

    /// The connection read all that had arrived (a read would wait): an
    /// ack is due if the frames not yet acknowledged carry 4 KiB of body
    /// or more, since a sender held by its in-flight window waits for it.
    pub fn handle_drained(&mut self) {
        if self.state == State::Established && self.rx_unacked_bytes >= ACK_BYTES_DRAINED {
            self.queue_ack();
        }
    }

    /// A frame could not be decoded: the session closes.
    pub fn handle_decode_error(&mut self, err: FrameError) {
        self.violation(ProtocolViolation::Frame(err));
    }

    /// The peer closed its side.
    pub fn handle_eof(&mut self) {
        self.close(DownReason::Closed, false);
    }

    /// Reading or writing failed. A reset or broken pipe is the peer's
    /// kernel closing the socket (the process died): reported as
    /// [`DownReason::Closed`], like an orderly close without goodbye.
    pub fn handle_io_error(&mut self, kind: std::io::ErrorKind) {
        use std::io::ErrorKind as K;
        let reason = match kind {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                DownReason::Closed
            }
            other => DownReason::Io(other),
        };
        self.close(reason, false);
    }

    /// Timers: handshake deadline, heartbeat timeout, ping, delayed ack.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Handshake => {
                if now >= self.handshake_deadline {
                    self.close(DownReason::HandshakeTimeout, false);
                }
            }
            State::Established => {
                if !self.paused && now >= self.heard() + self.cfg.heartbeat_timeout {
                    self.close(DownReason::HeartbeatTimeout, false);
                    return;
                }
                // The peer proves itself alive by datagram, the stream
                // delivers nothing.
                if self.datagrams.is_some()
                    && !self.paused
                    && now >= self.last_rx + self.cfg.stall_timeout
                {
                    self.close(DownReason::StreamStalled, false);
                    return;
                }
                // No acks while the stream itself is stalled are the
                // network's doing, not a peer that stopped consuming: the
                // stall timeout judges those.
                if let Some(t) = self.write_deadline()
                    && now >= t
                {
                    self.close(DownReason::WriteTimeout, false);
                    return;
                }
                if let Some(t) = self.next_probe()
                    && now >= t
                    && let Some(d) = &mut self.datagrams
                {
                    d.last_probe = Some(now);
                    d.probe_due = true;
                }
                if now >= self.next_ping() {
                    self.send_ping(now);
                }
                if self.ack_deadline.is_some_and(|d| now >= d) {
                    self.queue_ack();
                }
            }
        }
    }

    /// The earliest instant at which [`Session::handle_timeout`] has work.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::Handshake => Some(self.handshake_deadline),
            State::Established => {
                let mut t = self.next_ping();
                if !self.paused {
                    t = t.min(self.heard() + self.cfg.heartbeat_timeout);
                }
                if let Some(p) = self.next_probe() {
                    t = t.min(p);
                    if !self.paused {
                        t = t.min(self.last_rx + self.cfg.stall_timeout);
                    }
                }
                if let Some(a) = self.ack_deadline {
                    t = t.min(a);
                }
                if let Some(w) = self.write_deadline() {
                    t = t.min(w);
                }
                Some(t)
            }
        }
    }

    /// The next protocol frame to write.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        // Nothing before our hello.
        if self.hello_owed {
            return None;
        }
        if self.pong_due {
            self.pong_due = false;
            return Some(Frame::Pong(self.pong_seq));
        }
        if !self.has_transmits {
            return None;
        }
        self.pop_transmit()
    }

    #[inline(never)]
    fn pop_transmit(&mut self) -> Option<Frame> {
        let f = self.transmits.pop_front();
        self.has_transmits = !self.transmits.is_empty();
        f
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        if !self.has_events {
            return self.unreported_rtt.take().map(SessionEvent::Rtt);
        }
        self.poll_queued_event()
    }

    // Apart, so that the common case (nothing queued) loads nothing from
    // the queue.
    #[inline(never)]
    fn poll_queued_event(&mut self) -> Option<SessionEvent> {
        // In order: the handshake, the sample, then a close.
        if !matches!(self.events.front(), Some(SessionEvent::Established(_)))
            && let Some(rtt) = self.unreported_rtt.take()
        {
            return Some(SessionEvent::Rtt(rtt));
        }
        let e = self.events.pop_front();
        self.has_events = !self.events.is_empty();
        e
    }

    /// The driver wrote an application message. It is kept until the peer
    /// acknowledges it. Call only when [`Session::can_send`].
    pub fn record_data_sent(&mut self, now: Instant, message: Bytes) {
        self.record_sent(now, Outgoing::Message(message));
    }

    /// The driver wrote application messages (at most
    /// [`Session::sendable`]). They are kept until the peer acknowledges
    /// them.
    pub fn record_sent(&mut self, now: Instant, sent: Outgoing) {
        debug_assert!(sent.count() <= self.sendable());
        if sent.count() == 0 {
            return;
        }
        if self.unacked_count == 0 {
            self.ack_progress = now;
        }
        self.unacked_count += sent.count();
        self.unacked_bytes += sent.wire_len();
        let end = self.tx_base + self.unacked_count as u64;
        self.window.sent(end, self.unacked_bytes, now);
        self.unacked.push_back(sent);
        self.last_ping_or_data = now;
    }

    /// The peer acknowledged the oldest `n` unacknowledged messages (no more
    /// than there are).
    fn release_acked(&mut self, mut n: usize) {
        self.unacked_count -= n;
        while let Some(front) = self.unacked.front() {
            let left = front.count() - self.front_acked;
            if n < left {
                self.front_acked += n;
                return;
            }
            n -= left;
            self.front_acked = 0;
            self.unacked_bytes -= front.wire_len();
            self.unacked.pop_front();
        }
    }

    /// While the application is not taking messages, the driver stops reading
    /// and the timeout is suspended: the silence is ours, not the peer's.
    pub fn set_paused(&mut self, now: Instant, paused: bool) {
        if self.paused && !paused {
            self.last_rx = self.last_rx.max(now);
        }
        self.paused = paused;
    }

    /// Closes the session from our side; with `goodbye`, a goodbye frame is
    /// queued first (for shutdown or replacement).
    pub fn close(&mut self, reason: DownReason, goodbye: bool) {
        if self.state == State::Closed {
            return;
        }
        if goodbye {
            self.push_transmit(Frame::Goodbye(GoodbyeBody {
                reason: reason.as_str().to_owned(),
            }));
        }
        self.state = State::Closed;
        self.push_event(SessionEvent::Closed(reason));
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacked_len(&self) -> usize {
        self.unacked_count
    }

    /// Messages received so far.
    pub fn received(&self) -> u64 {
        self.rx_data
    }

    fn violation(&mut self, v: ProtocolViolation) {
        self.pong_due = false;
        self.transmits.clear();
        self.has_transmits = false;
        self.close(DownReason::ProtocolError(v), false);
    }

    /// When the next ping is due.
    fn next_ping(&self) -> Instant {
        let due = self.last_ping_or_data + self.send_interval;
        match self.last_ping_rx {
            Some(rx) if !self.active => {
                let takeover = rx + self.takeover;
                if self.peer_reports_rtt {
                    due.max(takeover)
                } else {
                    due.max(takeover.min(self.last_own_ping + self.send_interval * RTT_REFRESH))
                }
            }
            _ => due,
        }
    }

    fn send_ping(&mut self, now: Instant) {
        self.last_own_ping = now;
        self.ping_seq += 1;
        if self.pings.len() == MAX_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back((self.ping_seq, now));
        // At least 1 µs: a sample, however fast, is not "no sample".
        let rtt_us = self
            .last_rtt
            .map(|r| u32::try_from(r.as_micros()).unwrap_or(u32::MAX).max(1));
        self.push_transmit(Frame::Ping {
            seq: self.ping_seq,
            rtt_us,
        });
        self.last_ping_or_data = now;
        if self.rx_data > self.rx_acked {
            self.queue_ack();
        }
    }

    fn queue_ack(&mut self) {
        self.rx_acked = self.rx_data;
        self.rx_unacked_bytes = 0;
        self.ack_deadline = None;
        // An ack still waiting to be written is cumulative: update it
        // rather than queue another.
        if let Some(Frame::Ack(n)) = self.transmits.back_mut() {
            *n = self.rx_data;
        } else {
            self.push_transmit(Frame::Ack(self.rx_data));
        }
    }

    fn push_transmit(&mut self, f: Frame) {
        self.transmits.push_back(f);
        self.has_transmits = true;
    }

    fn push_event(&mut self, e: SessionEvent) {
        self.events.push_back(e);
        self.has_events = true;
    }
}

/// 1.5 send intervals.
fn takeover(send_interval: Duration) -> Duration {
    send_interval + send_interval / 2
}

/// The layout an idle heartbeat relies on: the fields it touches (state
/// and flags, the ping and pong bookkeeping, the timers, the in-flight
/// counts) in the first three cache lines, in declaration order.
mod layout {
    use std::mem::offset_of;

    use super::Session;

    const _: () = assert!(offset_of!(Session, state) == 0);
    const _: () = assert!(offset_of!(Session, unacked_bytes) + size_of::<usize>() <= 3 * 64);
}

#[cfg(test)]
mod tests;
