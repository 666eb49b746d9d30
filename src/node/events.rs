//! The application's side of the event stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::event::Event;
use crate::queue::Queue;

/// The node's events, in order. See [`Event`].
///
/// Dropping it tells the node nobody listens: events are then discarded
/// (sessions keep running).
#[derive(Debug)]
pub struct Events {
    queue: Arc<Queue<VecDeque<Event>>>,
    /// Taken from the queue in one batch, not yet handed out.
    local: VecDeque<Event>,
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
pub(crate) struct CloseOnDrop(pub(crate) Arc<Queue<VecDeque<Event>>>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Events {
    /// The application's end of `queue`.
    pub(crate) fn new(queue: Arc<Queue<VecDeque<Event>>>) -> Events {
        Events {
            queue,
            local: VecDeque::new(),
            closed: false,
        }
    }
}

#[cfg(all(test, feature = "stream"))]
mod stream_tests {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use futures_core::Stream;

    use super::Events;
    use crate::event::Event;
    use crate::peer::PeerId;
    use crate::queue::Queue;

    #[test]
    fn events_are_a_stream_that_ends_with_the_node() {
        let queue: Arc<Queue<VecDeque<Event>>> = Arc::new(Queue::new(8));
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
