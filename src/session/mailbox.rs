//! The mailbox: what a connection shares with the rest of its node.
//!
//! Senders put messages into its outbox (once the session is up, the
//! supervisor publishes the mailbox to them); the supervisor asks the
//! connection to close through it; the connection leaves its latest
//! round-trip time in it for `Node::peers`, and its next deadline for the
//! node's timer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::outbox::Outbox;
use super::timer::{Deadline, Timed};
use crate::event::DownReason;
use crate::queue::Queue;

/// What a connection shares with the node, in one allocation.
///
/// What a heartbeat touches (the close flag, the round-trip time, the
/// deadline and the outbox's idle flag) is its first cache line: with
/// 10 000 sessions every line read per wake-up is a cache miss. The layout
/// is `repr(C)` and checked at compile time (module `layout` below).
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Mailbox {
    /// A close was requested (the reason is in `close`).
    closing: AtomicBool,
    /// Nanoseconds; 0 until the first sample.
    rtt_ns: AtomicU64,
    /// The connection's next deadline, for the node's timer.
    deadline: Deadline,
    /// The messages senders queued for the session.
    outbox: Queue<Outbox>,
    /// Close with a goodbye, for this reason (the first request counts).
    close: Mutex<Option<DownReason>>,
}

impl Mailbox {
    /// An empty mailbox whose outbox holds up to `capacity` messages.
    pub(crate) fn new(capacity: usize) -> Self {
        Mailbox {
            closing: AtomicBool::new(false),
            rtt_ns: AtomicU64::new(0),
            deadline: Deadline::default(),
            outbox: Queue::new(capacity),
            close: Mutex::new(None),
        }
    }

    /// The messages queued for the session: senders push, the connection
    /// consumes.
    #[inline(always)]
    pub(crate) fn outbox(&self) -> &Queue<Outbox> {
        &self.outbox
    }

    /// Asks the connection to close with a goodbye (the first request
    /// counts).
    pub(crate) fn request_close(&self, reason: DownReason) {
        self.close_reason().get_or_insert(reason);
        self.closing.store(true, Ordering::Release);
        self.outbox.wake_consumer();
    }

    /// The reason of a requested close, if one was requested. One atomic
    /// load while none was.
    #[inline(always)]
    pub(crate) fn close_requested(&self) -> Option<DownReason> {
        if self.closing.load(Ordering::Acquire) {
            self.close_reason().clone()
        } else {
            None
        }
    }

    /// A held session's mailbox taken over by the connection that resumes
    /// it: the close asked of the connection that was cut is forgotten.
    pub(crate) fn reopen(&self) {
        self.closing.store(false, Ordering::Release);
        *self.close_reason() = None;
    }

    fn close_reason(&self) -> std::sync::MutexGuard<'_, Option<DownReason>> {
        self.close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the session's latest round-trip sample.
    pub(crate) fn record_rtt(&self, rtt: Duration) {
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
        self.outbox.wake_consumer();
    }
}

/// The layout the heartbeat path relies on, checked at compile time: the
/// hot fields, and the outbox's idle flag, within the first cache line.
#[cfg(not(all(test, lanbeat_shuttle)))]
mod layout {
    use std::mem::offset_of;

    use super::Mailbox;
    use crate::queue::Queue;
    use crate::session::outbox::Outbox;

    // One cache line: 64 bytes.
    const _: () = assert!(align_of::<Mailbox>() == 64);
    const _: () = assert!(offset_of!(Mailbox, closing) < 64);
    const _: () = assert!(offset_of!(Mailbox, rtt_ns) + 8 <= 64);
    const _: () =
        assert!(offset_of!(Mailbox, deadline) + size_of::<crate::session::timer::Deadline>() <= 64);
    const _: () = assert!(offset_of!(Mailbox, outbox) + Queue::<Outbox>::IDLE_END <= 64);
    // Four lines in all: what an idle session pays for it.
    const _: () = assert!(size_of::<Mailbox>() <= 4 * 64);
}
