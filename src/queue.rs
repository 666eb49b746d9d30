//! The bounded queue behind each session's outbox and behind the event
//! stream.
//!
//! Why not a channel crate: a session must close its outbox and take what is
//! left in one step (so that no message slips in between and is lost); both
//! ends move items in batches (one lock per batch, not per message: the
//! difference between 4 and 10 million small messages a second); and an
//! idle queue must cost no heap memory (10 000 idle sessions). tokio's mpsc
//! allocates a block of 32 slots per channel up front and takes a semaphore
//! operation per item; flume cannot close and drain atomically. This is a
//! `VecDeque` behind a mutex, the single consumer's `Waker` kept under the
//! same lock (a push wakes it only if it last found the queue empty, so a
//! busy consumer is not woken per item; a session also uses it to be woken
//! for a close request), and a `Notify` for producers waiting for room.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use tokio::sync::Notify;

/// Why an item was not queued; it is handed back.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    Full(T),
    Closed(T),
}

#[derive(Debug)]
struct Inner<T> {
    items: VecDeque<T>,
    /// No more pushes.
    closed: bool,
    /// The consumer is gone: pushes are accepted and dropped.
    discard: bool,
    /// The consumer's waker, registered by `pop_while` or `register`.
    consumer: Option<Waker>,
    /// The consumer found the queue empty: the next push wakes it.
    waiting: bool,
}

/// A bounded multi-producer, single-consumer queue.
#[derive(Debug)]
pub(crate) struct Queue<T> {
    inner: Mutex<Inner<T>>,
    capacity: usize,
    /// Producers waiting for room.
    room: Notify,
}

impl<T> Queue<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                closed: false,
                discard: false,
                consumer: None,
                waiting: false,
            }),
            capacity,
            room: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` if there is room.
    pub(crate) fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut q = self.lock();
        if q.discard {
            return Ok(());
        }
        if q.closed {
            return Err(PushError::Closed(item));
        }
        if q.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        q.items.push_back(item);
        let consumer = q.take_waiting();
        drop(q);
        if let Some(w) = consumer {
            w.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room; hands it back if the queue closes.
    pub(crate) async fn push(&self, mut item: T) -> Result<(), T> {
        loop {
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(x)) => return Err(x),
                Err(PushError::Full(x)) => item = x,
            }
            // Register interest, then look again, so a wake-up between the
            // look and the wait is not lost.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(x)) => return Err(x),
                Err(PushError::Full(x)) => {
                    item = x;
                    room.await;
                }
            }
        }
    }

    /// Moves as many of `items` (from the front) as fit; returns whether any
    /// are left. A closed queue takes nothing.
    pub(crate) fn push_many(&self, items: &mut VecDeque<T>) -> bool {
        let mut q = self.lock();
        if q.discard {
            items.clear();
            return false;
        }
        if q.closed {
            return !items.is_empty();
        }
        let n = items.len().min(self.capacity.saturating_sub(q.items.len()));
        if q.items.is_empty() && n == items.len() {
            // The whole batch moves as one buffer (the caller gets the
            // queue's empty one back): no item is copied.
            std::mem::swap(&mut q.items, items);
        } else {
            q.items.extend(items.drain(..n));
        }
        let consumer = if n > 0 { q.take_waiting() } else { None };
        drop(q);
        if let Some(w) = consumer {
            w.wake();
        }
        !items.is_empty()
    }

    /// Whether the queue was closed (producers are refused).
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits until there may be room (after a `push_many` that left items).
    pub(crate) async fn room(&self) {
        let room = self.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        {
            let q = self.lock();
            if q.items.len() < self.capacity || q.closed || q.discard {
                return;
            }
        }
        room.await;
    }

    /// Moves up to `max` items to `f`, oldest first. Returns how many, and
    /// whether the queue is closed (then nothing more will come).
    #[cfg(test)]
    pub(crate) fn pop_batch(&self, max: usize, mut f: impl FnMut(T)) -> (usize, bool) {
        self.pop_while(None, max, |item| {
            f(item);
            true
        })
    }

    /// Moves up to `max` items to `f`, oldest first, stopping after an item
    /// for which `f` returns false (that item is taken). Returns how many,
    /// and whether the queue is closed (then nothing more will come). With a
    /// `waker`, registers it (see [`Queue::register`]); when it leaves the
    /// queue empty and open, the next push wakes it.
    pub(crate) fn pop_while(
        &self,
        waker: Option<&Waker>,
        max: usize,
        mut f: impl FnMut(T) -> bool,
    ) -> (usize, bool) {
        let mut q = self.lock();
        let was_full = q.items.len() >= self.capacity;
        let mut n = 0;
        while n < max {
            let Some(item) = q.items.pop_front() else {
                break;
            };
            n += 1;
            if !f(item) {
                break;
            }
        }
        if q.items.is_empty() && q.items.capacity() > 64 {
            // A burst is over: give the memory back.
            q.items = VecDeque::new();
        }
        let closed = q.closed && q.items.is_empty();
        if let Some(w) = waker {
            q.waiting = q.items.is_empty() && !q.closed;
            q.set_consumer(w);
        }
        drop(q);
        if was_full && n > 0 {
            self.room.notify_waiters();
        }
        (n, closed)
    }

    /// Moves everything queued to the back of `into` (swapping buffers when
    /// `into` is empty, so no item is copied) and returns whether the queue
    /// is closed (then nothing more will come). With a `waker`, registers it
    /// as [`Queue::pop_while`] does.
    pub(crate) fn take_all(&self, into: &mut VecDeque<T>, waker: Option<&Waker>) -> bool {
        let mut q = self.lock();
        let was_full = q.items.len() >= self.capacity;
        let n = q.items.len();
        if into.is_empty() {
            std::mem::swap(&mut q.items, into);
        } else {
            into.extend(q.items.drain(..));
        }
        let closed = q.closed;
        if let Some(w) = waker {
            q.waiting = !q.closed;
            q.set_consumer(w);
        }
        drop(q);
        if was_full && n > 0 {
            self.room.notify_waiters();
        }
        closed
    }

    /// Registers the consumer's waker, for [`Queue::wake_consumer`] (and, if
    /// it last found the queue empty, for the next push).
    pub(crate) fn register(&self, waker: &Waker) {
        self.lock().set_consumer(waker);
    }

    /// Wakes the consumer if it registered since it was last woken.
    pub(crate) fn wake_consumer(&self) {
        let consumer = self.lock().consumer.take();
        if let Some(w) = consumer {
            w.wake();
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Closes the queue and returns what was left in it. Later pushes fail
    /// and hand their item back.
    pub(crate) fn close_and_take(&self) -> Vec<T> {
        let mut q = self.lock();
        q.closed = true;
        let left = std::mem::take(&mut q.items).into();
        q.consumer = None;
        drop(q);
        self.room.notify_waiters();
        left
    }

    /// Closes the queue for producers; the consumer still gets what is in it.
    pub(crate) fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        let consumer = q.consumer.take();
        drop(q);
        self.room.notify_waiters();
        if let Some(w) = consumer {
            w.wake();
        }
    }

    /// The consumer is gone: drop what is queued and everything pushed
    /// later (no producer may wait for room that never comes).
    pub(crate) fn discard(&self) {
        let mut q = self.lock();
        q.discard = true;
        q.items = VecDeque::new();
        q.consumer = None;
        drop(q);
        self.room.notify_waiters();
    }
}

impl<T> Inner<T> {
    fn set_consumer(&mut self, waker: &Waker) {
        match &mut self.consumer {
            Some(old) => old.clone_from(waker),
            none => *none = Some(waker.clone()),
        }
    }

    /// The consumer's waker, if it waits for an item.
    fn take_waiting(&mut self) -> Option<Waker> {
        if std::mem::take(&mut self.waiting) {
            self.consumer.take()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn bounded_ordered_and_closes_without_loss() {
        let o = Arc::new(Queue::new(2));
        o.try_push(1).unwrap();
        o.try_push(2).unwrap();
        assert!(matches!(o.try_push(3), Err(PushError::Full(3))));
        // A waiting producer gets in once there is room.
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(3).await });
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        assert_eq!(o.pop_batch(1, |m| got.push(m)), (1, false));
        waiter.await.unwrap().unwrap();
        o.pop_batch(10, |m| got.push(m));
        assert_eq!(got, [1, 2, 3]);
        o.try_push(4).unwrap();
        assert_eq!(o.close_and_take(), vec![4]);
        assert!(matches!(o.try_push(5), Err(PushError::Closed(5))));
        assert_eq!(o.push(6).await, Err(6));
    }

    #[tokio::test]
    async fn a_producer_blocked_on_a_full_queue_is_released_by_close() {
        let o = Arc::new(Queue::new(1));
        o.try_push(1).unwrap();
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(2).await });
        tokio::task::yield_now().await;
        assert_eq!(o.close_and_take(), vec![1]);
        assert_eq!(waiter.await.unwrap(), Err(2));
    }

    #[tokio::test]
    async fn batches_fill_what_fits_and_wait_for_room() {
        let o = Arc::new(Queue::new(3));
        let mut items: VecDeque<u32> = (0..5).collect();
        assert!(o.push_many(&mut items), "two left over");
        assert_eq!(items, [3, 4]);
        let o2 = o.clone();
        let rest = tokio::spawn(async move {
            o2.room().await;
            o2.push_many(&mut items);
            items
        });
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        o.pop_batch(2, |m| got.push(m));
        assert!(rest.await.unwrap().is_empty());
        o.pop_batch(10, |m| got.push(m));
        assert_eq!(got, [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn consumer_sees_close_after_the_last_item_and_discard_drops() {
        let o = Arc::new(Queue::new(4));
        o.try_push(1).unwrap();
        o.close();
        let mut got = Vec::new();
        assert_eq!(o.pop_batch(10, |m| got.push(m)), (1, true));
        let d = Queue::new(1);
        d.try_push(1).unwrap();
        d.discard();
        d.try_push(2).unwrap();
        d.push(3).await.unwrap();
        assert_eq!(d.pop_batch(10, drop), (0, false));
    }

    #[tokio::test]
    async fn consumer_wakes_on_first_item() {
        let o = Arc::new(Queue::new(4));
        let o2 = o.clone();
        let consumer = tokio::spawn(async move {
            std::future::poll_fn(|cx| match o2.pop_while(Some(cx.waker()), 10, |_| true) {
                (0, _) => std::task::Poll::Pending,
                (n, _) => std::task::Poll::Ready(n),
            })
            .await
        });
        tokio::task::yield_now().await;
        o.try_push(1).unwrap();
        assert_eq!(consumer.await.unwrap(), 1);
    }
}
