//! The in-flight window: how many bytes of messages may await
//! acknowledgement, adapted to how fast the path drains them.
//!
//! Everything written and not yet acknowledged sits in some queue: the
//! socket's send buffer, a slow link's queue (a router's, the Wi-Fi
//! driver's), the peer's receive buffer. A heartbeat written behind it
//! waits for all of it. On a fast LAN acks come back in a millisecond and
//! the window opens to `max_unacked_bytes`; on a 64 kbit/s link with a
//! deep queue a fixed 8 MiB of data would hold each ping for minutes. So
//! the window follows the time data waits for its ack: above the target
//! (a send interval) it halves, at most once per such wait; below an
//! eighth of the target, while the window was the limit, it doubles, and
//! below half the target it grows by a quarter. The queue then
//! holds about a target's worth of data, and a heartbeat behind it arrives
//! well within the peer's timeout (the send interval is at most a third of
//! it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The smallest window: a few frames always fit.
pub(super) const MIN_WINDOW: usize = 4 * 1024;
/// The first window, before any ack said how fast the path is: 1 s of a
/// 64 kbit/s link, a millisecond of a LAN (where it doubles per ack).
const INITIAL_WINDOW: usize = 8 * 1024;
/// Write times are sampled at most this often (one mark per burst).
const MARK_EVERY: Duration = Duration::from_millis(5);
/// Marks kept at most (older ones are dropped: only the latest matter).
const MAX_MARKS: usize = 64;

#[derive(Debug)]
pub(super) struct Window {
    /// Bytes that may await acknowledgement now.
    bytes: usize,
    /// The configured most.
    max: usize,
    /// When messages were written: the message count after the group, the
    /// time its first was written, and whether the window was the limit
    /// then (half of it or more in flight).
    marks: VecDeque<(u64, Instant, bool)>,
    /// The window shrinks again no earlier than this.
    next_cut: Option<Instant>,
}

impl Window {
    pub(super) fn new(max: usize) -> Window {
        Window {
            bytes: INITIAL_WINDOW.clamp(MIN_WINDOW.min(max), max),
            max,
            marks: VecDeque::new(),
            next_cut: None,
        }
    }

    /// Bytes that may await acknowledgement now.
    #[inline]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages up to count `end` (exclusive) were written at `now`,
    /// leaving `in_flight` bytes unacknowledged.
    pub(super) fn sent(&mut self, end: u64, in_flight: usize, now: Instant) {
        let limited = in_flight * 2 >= self.bytes;
        match self.marks.back_mut() {
            Some((e, t, l)) if now < *t + MARK_EVERY => {
                *e = end;
                *l |= limited;
            }
            _ => {
                if self.marks.len() == MAX_MARKS {
                    self.marks.pop_front();
                }
                self.marks.push_back((end, now, limited));
            }
        }
    }

    /// The peer acknowledged messages up to count `acked`; `target` is how
    /// long data may wait for its ack.
    pub(super) fn acked(&mut self, acked: u64, now: Instant, target: Duration) {
        let mut sample = None;
        while let Some(&(end, t, limited)) = self.marks.front() {
            if end > acked {
                break;
            }
            self.marks.pop_front();
            sample = Some((now.saturating_duration_since(t), limited));
        }
        let Some((waited, limited)) = sample else {
            return;
        };
        if waited > target {
            if self.next_cut.is_none_or(|c| now >= c) {
                self.bytes = (self.bytes / 2).max(MIN_WINDOW).min(self.max);
                // The data written before the cut still arrives late:
                // one cut per wait.
                self.next_cut = Some(now + waited);
            }
        } else if waited < target / 8 && limited {
            // A fast path (a LAN): open up quickly.
            self.bytes = self.bytes.saturating_mul(2).min(self.max);
        } else if waited < target / 2 && limited {
            // Near the target: a quarter at a time, so the queue grows by
            // little before the acks say so.
            self.bytes = (self.bytes + self.bytes / 4).min(self.max);
        }
    }

    /// Everything in flight is gone (the session ended).
    pub(super) fn clear(&mut self) {
        self.marks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn fast_acks_open_the_window_to_the_most() {
        let now = Instant::now();
        let mut w = Window::new(8 << 20);
        let mut n = 0;
        for k in 0..20 {
            let t = now + 10 * k * MS;
            n += 10;
            w.sent(n, w.bytes(), t);
            w.acked(n, t + MS, 100 * MS);
        }
        assert_eq!(w.bytes(), 8 << 20);
    }

    #[test]
    fn slow_acks_close_it_once_per_wait_down_to_the_least() {
        let now = Instant::now();
        let mut w = Window::new(8 << 20);
        w.sent(10, 16 << 10, now);
        w.sent(20, 16 << 10, now + 10 * MS);
        // Both groups wait 2 s: one cut, not two.
        w.acked(10, now + 2000 * MS, 500 * MS);
        w.acked(20, now + 2010 * MS, 500 * MS);
        assert_eq!(w.bytes(), INITIAL_WINDOW / 2);
        for k in 1..10u32 {
            let t = now + 5000 * k * MS;
            w.sent(20 + u64::from(k), 4 << 10, t);
            w.acked(20 + u64::from(k), t + 1000 * MS, 500 * MS);
        }
        assert_eq!(w.bytes(), MIN_WINDOW);
    }

    #[test]
    fn an_application_that_sends_little_does_not_open_it() {
        let now = Instant::now();
        let mut w = Window::new(8 << 20);
        for k in 1..100u32 {
            let t = now + 100 * k * MS;
            // 100 bytes in flight of an 8 KiB window: not the limit.
            w.sent(k.into(), 100, t);
            w.acked(k.into(), t + MS, 100 * MS);
        }
        assert_eq!(w.bytes(), INITIAL_WINDOW);
    }

    #[test]
    fn a_small_maximum_is_the_window() {
        assert_eq!(Window::new(1024).bytes(), 1024);
    }
}
