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
use crate::wire::frame::{Frame, GoodbyeBody, Hello, Outgoing};

/// Acknowledge at the latest after this many data frames...
const ACK_EVERY: u64 = 32;
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
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// When we last pinged.
    last_own_ping: Instant,
    transmits: VecDeque<Frame>,
    events: VecDeque<SessionEvent>,
    expected: Option<PeerId>,
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
}

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
            cfg,
            state: State::Handshake,
            expected,
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
            ack_deadline: None,
            tx_base: 0,
            unacked: VecDeque::new(),
            front_acked: 0,
            unacked_count: 0,
            unacked_bytes: 0,
            ack_progress: now,
            pong_due: false,
            pong_seq: 0,
            has_transmits: false,
            has_events: false,
            transmits: VecDeque::new(),
            unreported_rtt: None,
            events: VecDeque::new(),
        };
        let hello = Box::new(s.cfg.hello.clone());
        s.push_transmit(Frame::Hello(Ok(hello)));
        s
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
        if self.state == State::Established && self.unacked_bytes < self.cfg.max_unacked_bytes {
            self.cfg.max_unacked.saturating_sub(self.unacked_count)
        } else {
            0
        }
    }

    /// Feeds one received frame. Returns an application message to deliver.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) -> Option<Bytes> {
        if self.state == State::Closed {
            return None;
        }
        self.last_rx = now;
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
                self.count_data(now);
                Some(data)
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
                }
                None
            }
            (_, Frame::Goodbye(_)) => {
                self.close(DownReason::Goodbye, false);
                None
            }
        }
    }

    /// Feeds a received data frame (the common case of
    /// [`Session::handle_frame`], without moving a whole [`Frame`]): returns
    /// whether its message is to be delivered.
    pub fn handle_data(&mut self, now: Instant) -> bool {
        match self.state {
            State::Established => {
                self.last_rx = now;
                self.count_data(now);
                true
            }
            State::Handshake => {
                self.violation(ProtocolViolation::UnexpectedFrame("data"));
                false
            }
            State::Closed => false,
        }
    }

    fn count_data(&mut self, now: Instant) {
        self.rx_data += 1;
        if self.rx_data - self.rx_acked >= ACK_EVERY {
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
        let violation = if hello.service != ours.service {
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
        self.push_event(SessionEvent::Established(hello));
        // Ping at once: the first RTT sample, and proof of life.
        self.send_ping(now);
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
                if !self.paused && now >= self.last_rx + self.cfg.heartbeat_timeout {
                    self.close(DownReason::HeartbeatTimeout, false);
                    return;
                }
                if self.unacked_count > 0 && now >= self.ack_progress + self.cfg.write_timeout {
                    self.close(DownReason::WriteTimeout, false);
                    return;
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
                    t = t.min(self.last_rx + self.cfg.heartbeat_timeout);
                }
                if let Some(a) = self.ack_deadline {
                    t = t.min(a);
                }
                if self.unacked_count > 0 {
                    t = t.min(self.ack_progress + self.cfg.write_timeout);
                }
                Some(t)
            }
        }
    }

    /// The next protocol frame to write.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
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

    /// Messages written but never acknowledged, oldest first.
    pub fn take_unacked(&mut self) -> Vec<Bytes> {
        self.tx_base += self.unacked_count as u64;
        let mut out = Vec::with_capacity(self.unacked_count);
        let skip = std::mem::take(&mut self.front_acked);
        for (i, mut sent) in self.unacked.drain(..).enumerate() {
            if i == 0 {
                sent.split_to(skip);
            }
            sent.into_messages(&mut out);
        }
        self.unacked_count = 0;
        self.unacked_bytes = 0;
        out
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

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::peer::Role;
    use crate::wire::frame;

    const MS: Duration = Duration::from_millis(1);

    fn hello(id: u64, interval_ms: u64, timeout_ms: u64) -> Hello {
        Hello {
            protocol: 1,
            service: "svc".into(),
            id: PeerId::from_u64(id),
            instance: id * 100,
            name: format!("n{id}"),
            role: Role::Peer,
            port: 1000 + id as u16,
            heartbeat_interval_ms: interval_ms,
            heartbeat_timeout_ms: timeout_ms,
            max_frame_size: 1 << 20,
        }
    }

    fn cfg(id: u64, interval_ms: u64, timeout_ms: u64) -> SessionConfig {
        SessionConfig {
            hello: hello(id, interval_ms, timeout_ms),
            heartbeat_interval: Duration::from_millis(interval_ms),
            heartbeat_timeout: Duration::from_millis(timeout_ms),
            handshake_timeout: 500 * MS,
            max_unacked: 4,
            max_unacked_bytes: 1 << 20,
            write_timeout: Duration::from_millis(timeout_ms * 10),
        }
    }

    fn drain(s: &mut Session) -> (Vec<Frame>, Vec<SessionEvent>) {
        let mut f = Vec::new();
        while let Some(x) = s.poll_transmit() {
            f.push(x);
        }
        let mut e = Vec::new();
        while let Some(x) = s.poll_event() {
            e.push(x);
        }
        (f, e)
    }

    /// Two sessions joined by an in-memory link with a fixed one-way delay;
    /// `cut` drops everything in flight and later.
    struct Pair {
        now: Instant,
        a: Session,
        b: Session,
        delay: Duration,
        to_a: VecDeque<(Instant, Frame)>,
        to_b: VecDeque<(Instant, Frame)>,
        events_a: Vec<(Instant, SessionEvent)>,
        events_b: Vec<(Instant, SessionEvent)>,
        cut: bool,
        delivered_b: Vec<Bytes>,
        /// Pings B sent.
        pings_b: usize,
        /// A's pings lose their round-trip report (a minimal peer).
        strip_rtt: bool,
    }

    impl Pair {
        fn new(a: SessionConfig, b: SessionConfig) -> Pair {
            let now = Instant::now();
            let expected = b.hello.id;
            Pair {
                now,
                a: Session::new(now, a, Some(expected)),
                b: Session::new(now, b, None),
                delay: MS,
                to_a: VecDeque::new(),
                to_b: VecDeque::new(),
                events_a: Vec::new(),
                events_b: Vec::new(),
                cut: false,
                delivered_b: Vec::new(),
                pings_b: 0,
                strip_rtt: false,
            }
        }

        fn pump(&mut self) {
            let arrive = self.now + self.delay;
            while let Some(mut f) = self.a.poll_transmit() {
                if let Frame::Ping { rtt_us, .. } = &mut f
                    && self.strip_rtt
                {
                    *rtt_us = None;
                }
                if !self.cut {
                    self.to_b.push_back((arrive, f));
                }
            }
            while let Some(f) = self.b.poll_transmit() {
                self.pings_b += usize::from(matches!(f, Frame::Ping { .. }));
                if !self.cut {
                    self.to_a.push_back((arrive, f));
                }
            }
            while let Some(e) = self.a.poll_event() {
                self.events_a.push((self.now, e));
            }
            while let Some(e) = self.b.poll_event() {
                self.events_b.push((self.now, e));
            }
        }

        /// Advances virtual time to `until`, one event at a time.
        fn run_until(&mut self, until: Instant) {
            loop {
                self.pump();
                let next = [
                    self.a.poll_timeout(),
                    self.b.poll_timeout(),
                    self.to_a.front().map(|x| x.0),
                    self.to_b.front().map(|x| x.0),
                ]
                .into_iter()
                .flatten()
                .min();
                let Some(next) = next.filter(|&t| t <= until) else {
                    self.now = until;
                    self.pump();
                    return;
                };
                self.now = self.now.max(next);
                if self.cut {
                    self.to_a.clear();
                    self.to_b.clear();
                }
                while self.to_a.front().is_some_and(|x| x.0 <= self.now) {
                    let (_, f) = self.to_a.pop_front().unwrap();
                    self.a.handle_frame(self.now, f);
                }
                while self.to_b.front().is_some_and(|x| x.0 <= self.now) {
                    let (_, f) = self.to_b.pop_front().unwrap();
                    if let Some(d) = self.b.handle_frame(self.now, f) {
                        self.delivered_b.push(d);
                    }
                }
                if self.a.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.a.handle_timeout(self.now);
                }
                if self.b.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.b.handle_timeout(self.now);
                }
            }
        }

        fn closed_at(events: &[(Instant, SessionEvent)]) -> Option<(Instant, DownReason)> {
            events.iter().find_map(|(t, e)| match e {
                SessionEvent::Closed(r) => Some((*t, r.clone())),
                _ => None,
            })
        }
    }

    #[test]
    fn handshake_establishes_both_sides_and_measures_rtt() {
        let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
        p.run_until(p.now + 50 * MS);
        assert!(p.a.is_established() && p.b.is_established());
        assert_eq!(p.a.peer(), Some(PeerId::from_u64(2)));
        let rtts: Vec<_> = p
            .events_a
            .iter()
            .filter_map(|(_, e)| match e {
                SessionEvent::Rtt(r) => Some(*r),
                _ => None,
            })
            .collect();
        assert_eq!(rtts, vec![2 * MS]);
    }

    #[test]
    fn idle_session_stays_up_for_a_long_time() {
        let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
        let start = p.now;
        p.run_until(start + Duration::from_secs(600));
        assert!(p.a.is_established() && p.b.is_established());
        // About one ping per interval each way, not more.
        let rtts = p
            .events_a
            .iter()
            .filter(|(_, e)| matches!(e, SessionEvent::Rtt(_)))
            .count();
        assert!((5900..=6001).contains(&rtts), "{rtts}");
    }

    fn rtts(e: &[(Instant, SessionEvent)]) -> Vec<Duration> {
        e.iter()
            .filter_map(|(_, e)| match e {
                SessionEvent::Rtt(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_acceptor_reports_the_dialers_rtt_and_pings_only_when_it_stops() {
        let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
        p.run_until(p.now + Duration::from_secs(60));
        // The dialer measures every interval; the acceptor reports the same
        // samples from the dialer's pings and sends only its first ping.
        let (a, b) = (rtts(&p.events_a), rtts(&p.events_b));
        assert!((590..=601).contains(&a.len()), "{}", a.len());
        assert!((589..=601).contains(&b.len()), "{}", b.len());
        assert!(b.iter().all(|r| *r == 2 * MS), "{b:?}");
        assert_eq!(p.pings_b, 1);
        // If the dialer stops pinging (here: it is cut off), the acceptor
        // still detects the silence in time.
        let cut_at = p.now;
        p.cut = true;
        p.run_until(cut_at + Duration::from_secs(1));
        let (t, r) = Pair::closed_at(&p.events_b).unwrap();
        assert_eq!(r, DownReason::HeartbeatTimeout);
        assert!(t - cut_at <= Duration::from_millis(400));
    }

    #[test]
    fn an_acceptor_measures_every_eighth_interval_if_pings_carry_no_rtt() {
        let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
        p.strip_rtt = true;
        p.run_until(p.now + Duration::from_secs(60));
        let b = rtts(&p.events_b);
        assert!((70..=80).contains(&b.len()), "{}", b.len());
        assert!((70..=80).contains(&p.pings_b), "{}", p.pings_b);
        assert!(p.a.is_established() && p.b.is_established());
    }

    #[test]
    fn silence_is_detected_within_timeout_plus_one_interval() {
        for (interval, timeout) in [(100, 300), (1000, 3000), (200, 1000)] {
            let mut p = Pair::new(cfg(1, interval, timeout), cfg(2, interval, timeout));
            p.run_until(p.now + Duration::from_millis(5 * timeout));
            let cut_at = p.now;
            p.cut = true;
            p.run_until(cut_at + Duration::from_millis(3 * timeout));
            for events in [&p.events_a, &p.events_b] {
                let (t, reason) = Pair::closed_at(events).expect("closed");
                assert_eq!(reason, DownReason::HeartbeatTimeout);
                let delay = t - cut_at;
                assert!(
                    delay <= Duration::from_millis(timeout + interval),
                    "{delay:?}"
                );
                assert!(
                    delay >= Duration::from_millis(timeout - interval),
                    "{delay:?}"
                );
            }
        }
    }

    #[test]
    fn different_settings_never_time_each_other_out() {
        // A is slow (1 s / 3 s), B is fast (100 ms / 300 ms): A must send
        // often enough for B.
        let mut p = Pair::new(cfg(1, 1000, 3000), cfg(2, 100, 300));
        p.run_until(p.now + Duration::from_secs(60));
        assert!(p.a.is_established() && p.b.is_established());
        assert_eq!(p.a.send_interval(), 100 * MS);
    }

    #[test]
    fn busy_session_needs_no_pings_but_still_gets_acks() {
        let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
        p.run_until(p.now + 10 * MS);
        let start = p.now;
        for i in 0..100u32 {
            if p.a.can_send() {
                let m = Bytes::from(i.to_be_bytes().to_vec());
                p.a.record_data_sent(p.now, m.clone());
                p.to_b.push_back((p.now + p.delay, Frame::Data(m)));
            }
            p.run_until(p.now + 20 * MS);
        }
        assert!(p.now > start + Duration::from_secs(1));
        assert_eq!(p.delivered_b.len(), 100);
        assert!(p.a.take_unacked().is_empty());
        assert!(p.a.is_established());
    }

    #[test]
    fn unacked_messages_are_handed_back_after_a_cut() {
        let mut p = Pair::new(cfg(1, 100, 300), cfg(2, 100, 300));
        p.run_until(p.now + 10 * MS);
        p.cut = true;
        for i in 0..4u8 {
            assert!(p.a.can_send());
            p.a.record_data_sent(p.now, Bytes::from(vec![i]));
        }
        assert!(!p.a.can_send(), "max_unacked bounds what is in flight");
        p.run_until(p.now + Duration::from_secs(1));
        assert_eq!(
            Pair::closed_at(&p.events_a).unwrap().1,
            DownReason::HeartbeatTimeout
        );
        let back: Vec<u8> = p.a.take_unacked().iter().map(|b| b[0]).collect();
        assert_eq!(back, vec![0, 1, 2, 3]);
    }

    #[test]
    fn handshake_timeout_closes_silent_connection() {
        let now = Instant::now();
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        let (frames, _) = drain(&mut s);
        assert!(matches!(frames[..], [Frame::Hello(Ok(_))]));
        assert_eq!(s.poll_timeout(), Some(now + 500 * MS));
        s.handle_timeout(now + 499 * MS);
        assert!(!s.is_closed());
        s.handle_timeout(now + 500 * MS);
        assert_eq!(
            drain(&mut s).1,
            vec![SessionEvent::Closed(DownReason::HandshakeTimeout)]
        );
    }

    #[test]
    fn handshake_violations_are_precise() {
        let now = Instant::now();
        let cases: Vec<(Option<u64>, Frame, ProtocolViolation)> = vec![
            (
                None,
                Frame::Hello(Err(2)),
                ProtocolViolation::UnsupportedVersion(2),
            ),
            (
                None,
                Frame::Ping {
                    seq: 1,
                    rtt_us: None,
                },
                ProtocolViolation::UnexpectedFrame("ping"),
            ),
            (
                None,
                Frame::Hello(Ok(Box::new(Hello {
                    service: "other".into(),
                    ..hello(2, 100, 300)
                }))),
                ProtocolViolation::ServiceMismatch,
            ),
            (
                None,
                Frame::Hello(Ok(Box::new(hello(1, 100, 300)))),
                ProtocolViolation::SelfConnection,
            ),
            (
                Some(3),
                Frame::Hello(Ok(Box::new(hello(2, 100, 300)))),
                ProtocolViolation::UnexpectedPeer {
                    expected: PeerId::from_u64(3),
                    got: PeerId::from_u64(2),
                },
            ),
            (
                None,
                Frame::Hello(Ok(Box::new(hello(2, 300, 300)))),
                ProtocolViolation::BadHeartbeat,
            ),
        ];
        for (expected, frame, violation) in cases {
            let mut s = Session::new(now, cfg(1, 100, 300), expected.map(PeerId::from_u64));
            drain(&mut s);
            assert_eq!(s.handle_frame(now, frame), None);
            assert_eq!(
                drain(&mut s),
                (
                    vec![],
                    vec![SessionEvent::Closed(DownReason::ProtocolError(violation))]
                )
            );
            assert!(s.is_closed());
        }
    }

    #[test]
    fn established_violations_close() {
        let now = Instant::now();
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        drain(&mut s);
        s.handle_frame(now, Frame::Ack(1));
        assert_eq!(
            drain(&mut s).1,
            vec![SessionEvent::Closed(DownReason::ProtocolError(
                ProtocolViolation::BadAck
            ))]
        );
    }

    #[test]
    fn every_ping_gets_its_pong_in_order_and_samples_precede_the_close() {
        let now = Instant::now();
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        // The handshake and a ping fed before anything is polled: the
        // handshake is reported first.
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        let ping = |seq, rtt_us| Frame::Ping { seq, rtt_us };
        s.handle_frame(now, ping(1, Some(40)));
        let (frames, events) = drain(&mut s);
        assert!(matches!(frames[0], Frame::Hello(_)), "{frames:?}");
        assert_eq!(frames.last(), Some(&Frame::Pong(1)));
        assert!(
            matches!(events[..], [SessionEvent::Established(_), SessionEvent::Rtt(r)] if r == 40 * Duration::from_micros(1))
        );
        // Three pings at once: three pongs, in order; the latest sample.
        for seq in 2..=4 {
            s.handle_frame(now, ping(seq, Some(seq as u32)));
        }
        s.handle_frame(now, Frame::Goodbye(GoodbyeBody { reason: "x".into() }));
        let (frames, events) = drain(&mut s);
        assert_eq!(frames, [Frame::Pong(2), Frame::Pong(3), Frame::Pong(4)]);
        assert_eq!(
            events,
            [
                SessionEvent::Rtt(4 * Duration::from_micros(1)),
                SessionEvent::Closed(DownReason::Goodbye)
            ]
        );
        // A violation drops what was to be sent, the pong too.
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        drain(&mut s);
        s.handle_frame(now, ping(5, None));
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        assert_eq!(drain(&mut s).0, []);
    }

    #[test]
    fn goodbye_and_pause() {
        let now = Instant::now();
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        drain(&mut s);
        s.set_paused(now, true);
        s.handle_timeout(now + Duration::from_secs(10));
        assert!(
            s.is_established(),
            "no timeout while we are the ones not reading"
        );
        s.set_paused(now + Duration::from_secs(10), false);
        s.handle_timeout(now + Duration::from_millis(10_200));
        assert!(s.is_established());
        s.handle_frame(
            now,
            Frame::Goodbye(GoodbyeBody {
                reason: "shutdown".into(),
            }),
        );
        assert!(
            drain(&mut s)
                .1
                .contains(&SessionEvent::Closed(DownReason::Goodbye))
        );
    }

    #[test]
    fn acks_can_end_inside_a_run_of_messages() {
        let now = Instant::now();
        let mut c = cfg(1, 100, 300);
        c.max_unacked = 6;
        let mut s = Session::new(now, c, None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        drain(&mut s);
        let mut wire = BytesMut::new();
        for m in ["a", "b", "c", "d"] {
            frame::encode_data(m.as_bytes(), &mut wire);
        }
        let run = Outgoing::Frames {
            wire: wire.freeze(),
            count: 4,
        };
        assert_eq!(s.sendable(), 6);
        s.record_sent(now, run);
        s.record_data_sent(now, Bytes::from_static(b"e"));
        assert_eq!((s.sendable(), s.unacked_len()), (1, 5));
        s.handle_frame(now, Frame::Ack(3));
        assert_eq!((s.sendable(), s.unacked_len()), (4, 2));
        s.handle_frame(now, Frame::Ack(4));
        assert_eq!(s.unacked_len(), 1);
        assert_eq!(s.take_unacked(), ["e"]);
        // Sequence numbers go on after messages handed back; an ack of
        // more than was sent is a violation.
        s.record_data_sent(now, Bytes::from_static(b"f"));
        s.handle_frame(now, Frame::Ack(7));
        assert!(
            drain(&mut s)
                .1
                .contains(&SessionEvent::Closed(DownReason::ProtocolError(
                    ProtocolViolation::BadAck
                )))
        );
    }

    #[test]
    fn a_peer_that_acknowledges_nothing_is_closed_after_the_write_timeout() {
        // It keeps pinging (so it is alive) but never consumes our messages.
        let now = Instant::now();
        let mut c = cfg(1, 100, 300);
        c.write_timeout = Duration::from_millis(1000);
        let mut s = Session::new(now, c, None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        drain(&mut s);
        s.record_data_sent(now, Bytes::from_static(b"x"));
        let mut t = now;
        while t < now + Duration::from_millis(1500) && !s.is_closed() {
            t += Duration::from_millis(50);
            s.handle_frame(
                t,
                Frame::Ping {
                    seq: 1,
                    rtt_us: None,
                },
            );
            if s.poll_timeout().is_some_and(|d| d <= t) {
                s.handle_timeout(t);
            }
        }
        assert!(s.is_closed());
        assert!(t >= now + Duration::from_millis(1000) && t <= now + Duration::from_millis(1050));
        let (_, e) = drain(&mut s);
        assert!(e.contains(&SessionEvent::Closed(DownReason::WriteTimeout)));
        assert_eq!(s.take_unacked(), vec![Bytes::from_static(b"x")]);
    }

    #[test]
    fn unacked_bytes_bound_what_is_in_flight() {
        let now = Instant::now();
        let mut c = cfg(1, 100, 300);
        c.max_unacked = 100;
        c.max_unacked_bytes = 1000;
        let mut s = Session::new(now, c, None);
        s.handle_frame(now, Frame::Hello(Ok(Box::new(hello(2, 100, 300)))));
        s.record_data_sent(now, Bytes::from(vec![0; 600]));
        assert!(s.can_send());
        s.record_data_sent(now, Bytes::from(vec![0; 600]));
        assert!(!s.can_send());
        s.handle_frame(now, Frame::Ack(1));
        assert!(s.can_send());
    }

    #[test]
    fn resets_are_closes_other_errors_are_io() {
        let now = Instant::now();
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        s.handle_io_error(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            drain(&mut s).1,
            vec![SessionEvent::Closed(DownReason::Closed)]
        );
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        s.handle_io_error(std::io::ErrorKind::TimedOut);
        assert_eq!(
            drain(&mut s).1,
            vec![SessionEvent::Closed(DownReason::Io(
                std::io::ErrorKind::TimedOut
            ))]
        );
    }

    #[test]
    fn local_close_sends_goodbye() {
        let now = Instant::now();
        let mut s = Session::new(now, cfg(1, 100, 300), None);
        drain(&mut s);
        s.close(DownReason::Shutdown, true);
        let (f, e) = drain(&mut s);
        assert_eq!(
            f,
            vec![Frame::Goodbye(GoodbyeBody {
                reason: "shutdown".into()
            })]
        );
        assert_eq!(e, vec![SessionEvent::Closed(DownReason::Shutdown)]);
    }
}
