//! The application's side of the event stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::event::Event;
use crate::queue::{Queue, Store, TakeAll};

/// The node's event queue: bounded in events (`Config::event_capacity`)
/// and in the bytes of the messages they carry
/// (`Config::event_capacity_bytes`).
pub(crate) type EventQueue = Queue<EventStore>;

/// The events waiting for the application, and the message bytes among
/// them.
///
/// Why bytes too: a count alone let 4096 messages of a megabyte wait (4
/// GiB); and a session that can always deliver never waits, so on a
/// current-thread runtime the application's task (polled between batches
/// of ready tasks) fell 128 MB behind and got nothing for 80–170 ms at a
/// time. At the byte bound a session stops reading
/// and waits for room (TCP pushes back on the sender), and the application
/// runs.
#[derive(Debug)]
pub(crate) struct EventStore {
    items: VecDeque<Event>,
    /// Message bytes in `items` (see [`weight`]).
    bytes: usize,
    /// Full at this many bytes or more (so a single larger message still
    /// gets in when the queue is below it).
    max_bytes: usize,
}

impl EventStore {
    /// An empty store, full from `max_bytes` of messages on.
    pub(crate) fn new(max_bytes: usize) -> EventStore {
        EventStore {
            items: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }
}

impl Default for EventStore {
    /// Bounded in events only.
    fn default() -> Self {
        EventStore::new(usize::MAX)
    }
}

/// The message bytes an event holds.
fn weight(e: &Event) -> usize {
    match e {
        Event::Message { data, .. } => data.len(),
        Event::Request { body, .. } => body.len(),
        Event::Unconfirmed { messages, .. } | Event::Undelivered { messages, .. } => {
            messages.iter().map(|m| m.len()).sum()
        }
        _ => 0,
    }
}

impl Store for EventStore {
    type Item = Event;

    fn len(&self) -> usize {
        self.items.len()
    }

    fn push(&mut self, item: Event) {
        self.bytes += weight(&item);
        self.items.push_back(item);
    }

    fn push_from(&mut self, items: &mut VecDeque<Event>, n: usize) {
        self.bytes += items.iter().take(n).map(weight).sum::<usize>();
        self.items.push_from(items, n);
    }

    fn is_full(&self, capacity: usize) -> bool {
        self.items.len() >= capacity || self.bytes >= self.max_bytes
    }

    fn fitting(&self, items: &VecDeque<Event>, capacity: usize) -> usize {
        let (mut n, mut bytes) = (0, self.bytes);
        let most = capacity.saturating_sub(self.items.len()).min(items.len());
        while n < most && bytes < self.max_bytes {
            bytes += weight(&items[n]);
            n += 1;
        }
        n
    }

    #[cfg(test)]
    fn take_all(&mut self) -> Vec<Event> {
        self.bytes = 0;
        std::mem::take(&mut self.items).into()
    }
}

impl TakeAll for EventStore {
    fn take_into(&mut self, into: &mut VecDeque<Event>) {
        self.bytes = 0;
        self.items.take_into(into);
    }
}

/// The node's events, in order. See [`Event`].
///
/// Dropping it tells the node nobody listens: events are then discarded
/// (sessions keep running).
///
/// Events are pushed by the sessions' tasks, which wake the task that
/// waits here. Where latency matters on a current-thread runtime, wait in
/// a spawned task rather than in `block_on`: tokio polls its I/O driver
/// before it polls a woken `block_on` future, which adds a system call to
/// every event (docs/DESIGN.md, "Tuning").
#[derive(Debug)]
pub struct Events {
    queue: Arc<EventQueue>,
    /// Taken from the queue in one batch, not yet handed out.
    local: VecDeque<Event>,
    closed: bool,
    /// The waker registered with the queue at the last look that found it
    /// empty (see `poll_refill`).
    registered: Option<Waker>,
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
    ///
    /// # Cancel safety
    /// Cancel-safe: events are moved into `buf` only when it returns.
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
            // Nothing was pushed since the last look found the queue empty,
            // and the waker it registered is this one: the next push wakes
            // it. No lock (the application's loop comes here once per
            // event, after taking it).
            if self.queue.is_idle()
                && self
                    .registered
                    .as_ref()
                    .is_some_and(|r| r.will_wake(cx.waker()))
            {
                return Poll::Pending;
            }
            self.refill(Some(cx.waker()));
            match &mut self.registered {
                Some(r) => r.clone_from(cx.waker()),
                none => *none = Some(cx.waker().clone()),
            }
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

/// The events as a stream (with the `stream` feature): the same as
/// [`Events::poll_recv`], ending once the node has shut down and every
/// event was taken. Cancel safe, as `recv`.
#[cfg(feature = "stream")]
impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_recv(cx)
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
pub(crate) struct CloseOnDrop(pub(crate) Arc<EventQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Events {
    /// The application's end of `queue`.
    pub(crate) fn new(queue: Arc<EventQueue>) -> Events {
        Events {
            queue,
            local: VecDeque::new(),
            closed: false,
            registered: None,
        }
    }
}

#[cfg(all(test, feature = "stream"))]
mod stream_tests {
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use futures_core::Stream;

    use super::{EventQueue, Events};
    use crate::event::Event;
    use crate::peer::PeerId;
    use crate::queue::Queue;

    #[test]
    fn events_are_a_stream_that_ends_with_the_node() {
        let queue: Arc<EventQueue> = Arc::new(Queue::new(8));
        let mut events = Events::new(queue.clone());
        let mut cx = Context::from_waker(Waker::noop());
        let mut next = |e: &mut Events| std::pin::Pin::new(e).poll_next(&mut cx);
        assert_eq!(next(&mut events), Poll::Pending);
        let lost = |n| Event::PeerLost {
            peer: PeerId::from_u64(n),
        };
        queue.try_push(lost(1)).unwrap();
        queue.try_push(lost(2)).unwrap();
        queue.close();
        assert_eq!(next(&mut events), Poll::Ready(Some(lost(1))));
        assert_eq!(next(&mut events), Poll::Ready(Some(lost(2))));
        assert_eq!(next(&mut events), Poll::Ready(None));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    use super::{EventQueue, EventStore};
    use crate::event::Event;
    use crate::peer::PeerId;
    use crate::queue::PushError;

    fn message(len: usize) -> Event {
        Event::Message {
            peer: PeerId::from_u64(1),
            data: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn the_queue_is_full_at_its_bytes_as_at_its_count() {
        let q = EventQueue::with_store(100, EventStore::new(1000));
        // 0, 400 and 800 bytes are below the bound: three get in.
        let mut batch: VecDeque<Event> = (0..5).map(|_| message(400)).collect();
        assert!(q.push_many(&mut batch), "two are left");
        assert_eq!(batch.len(), 2);
        assert!(matches!(q.try_push(message(1)), Err(PushError::Full(_))));
        // Events without message bytes are still bounded by the count.
        let lost = Event::PeerLost {
            peer: PeerId::from_u64(2),
        };
        assert!(matches!(q.try_push(lost), Err(PushError::Full(_))));
        let mut got = VecDeque::new();
        q.take_all(&mut got, None);
        assert_eq!(got.len(), 3);
        // Emptied, it takes the rest, and then one message larger than the
        // whole bound.
        assert!(!q.push_many(&mut batch));
        q.take_all(&mut got, None);
        q.try_push(message(5000)).unwrap();
        assert!(matches!(q.try_push(message(1)), Err(PushError::Full(_))));
    }

    #[test]
    fn count_bound_alone_by_default() {
        let q = EventQueue::new(3);
        let mut batch: VecDeque<Event> = (0..4).map(|_| message(1 << 20)).collect();
        assert!(q.push_many(&mut batch));
        assert_eq!(batch.len(), 1);
    }

    /// Counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A look that finds the queue idle skips the lock only for the waker
    /// it registered: polled by another task (the `Events` moved), the
    /// new waker is registered and the next push wakes it, not the old one.
    #[test]
    fn the_lock_free_look_is_for_the_registered_waker_only() {
        use std::sync::Arc;
        use std::sync::atomic::Ordering::SeqCst;
        use std::task::{Context, Poll, Waker};

        let q = Arc::new(EventQueue::new(8));
        let mut events = super::Events::new(q.clone());
        let (a, b) = (
            Arc::new(Count(Default::default())),
            Arc::new(Count(Default::default())),
        );
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        let mut poll = |w: &Waker| events.poll_recv(&mut Context::from_waker(w));
        assert!(poll(&wa).is_pending());
        assert!(poll(&wa).is_pending(), "idle: the same waker, no lock");
        assert!(poll(&wb).is_pending(), "another waker looks and registers");
        q.try_push(message(1)).unwrap();
        assert_eq!((a.0.load(SeqCst), b.0.load(SeqCst)), (0, 1));
        assert!(matches!(
            poll(&wb),
            Poll::Ready(Some(Event::Message { .. }))
        ));
        // Back to the first waker: it is registered again.
        assert!(poll(&wa).is_pending());
        q.try_push(message(1)).unwrap();
        assert_eq!((a.0.load(SeqCst), b.0.load(SeqCst)), (1, 1));
    }

    #[tokio::test]
    async fn a_producer_waiting_for_room_is_woken_when_bytes_leave() {
        let q = std::sync::Arc::new(EventQueue::with_store(100, EventStore::new(1000)));
        q.try_push(message(1000)).unwrap();
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.push(message(10)).await.is_ok() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let mut got = VecDeque::new();
        q.take_all(&mut got, None);
        assert!(waiter.await.unwrap());
    }
}
