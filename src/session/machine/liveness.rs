//! A session's liveness datagrams (PROTOCOL.md §7), as the machine sees
//! them: when to probe, and what a datagram or a stalled stream means for
//! the timeouts. The driver sends the probes and tells the machine when the
//! peer's datagrams arrived (`session::datagram`).

use std::time::{Duration, Instant};

use super::Session;

/// The liveness datagrams of a session (PROTOCOL.md §7): the driver sends
/// them and tells the machine when the peer's last one arrived.
#[derive(Debug)]
pub(super) struct Datagrams {
    /// When the peer's last datagram arrived.
    pub(super) heard: Instant,
    /// When we last probed.
    pub(super) last_probe: Option<Instant>,
    /// A probe is to be sent (see [`Session::take_probe`]).
    pub(super) probe_due: bool,
    /// The gap between probes while the peer is silent.
    pub(super) every: Duration,
}

/// Probes go out this many times per heartbeat timeout while the peer is
/// silent: under 20 % loss each round trip fails with probability 0.36,
/// all of the ten or so in a timeout with 4e-5.
const PROBES_PER_TIMEOUT: u32 = 16;

impl Session {
    /// Both sides take liveness datagrams (PROTOCOL.md §7): from now on the
    /// driver feeds [`Session::handle_datagram`] and sends a probe when
    /// [`Session::take_probe`] says so. The heartbeat timeout then counts
    /// from the later of the last frame and the last datagram, and the
    /// stall timeout bounds how long the stream itself may stay silent.
    pub fn enable_datagrams(&mut self, now: Instant) {
        let every = (self.cfg.heartbeat_timeout / PROBES_PER_TIMEOUT).max(Duration::from_millis(1));
        self.datagrams = Some(Datagrams {
            heard: now,
            last_probe: None,
            probe_due: false,
            every,
        });
    }

    /// An authentic, fresh datagram of the peer's arrived at `at`.
    pub fn handle_datagram(&mut self, at: Instant) {
        if let Some(d) = &mut self.datagrams {
            d.heard = d.heard.max(at);
        }
    }

    /// Whether a liveness probe is to be sent now (once per `true`).
    pub fn take_probe(&mut self) -> bool {
        self.datagrams
            .as_mut()
            .is_some_and(|d| std::mem::take(&mut d.probe_due))
    }

    /// A frame arrived. After a stall that datagrams rode out, the
    /// messages in flight get a fresh write timeout: their acks were held
    /// by the network, and arrive behind the frames now coming.
    #[inline(always)]
    pub(super) fn stream_moved(&mut self, now: Instant) {
        if self.datagrams.is_some() && now >= self.last_rx + self.cfg.heartbeat_timeout {
            self.ack_progress = self.ack_progress.max(now);
        }
        self.last_rx = now;
    }

    /// When the write timeout falls due: messages in flight, none
    /// acknowledged for the write timeout. With datagrams, only if that is
    /// before the stream itself went quiet for a heartbeat timeout: no
    /// acks while nothing at all arrives are the network's doing (the stall
    /// timeout judges those), not a peer that stopped reading.
    pub(super) fn write_deadline(&self) -> Option<Instant> {
        if self.unacked_count == 0 {
            return None;
        }
        let t = self.ack_progress + self.cfg.write_timeout;
        match self.datagrams {
            Some(_) if t >= self.last_rx + self.cfg.heartbeat_timeout => None,
            _ => Some(t),
        }
    }

    /// The last sign of life: the last frame, or a later datagram.
    pub(super) fn heard(&self) -> Instant {
        match &self.datagrams {
            Some(d) => self.last_rx.max(d.heard),
            None => self.last_rx,
        }
    }

    /// When the next probe is due: while nothing was heard for 1.5 send
    /// intervals, every `every`.
    pub(super) fn next_probe(&self) -> Option<Instant> {
        let d = self.datagrams.as_ref()?;
        let start = self.heard() + self.takeover;
        Some(match d.last_probe {
            Some(last) => start.max(last + d.every),
            None => start,
        })
    }
}
