//! The bounded queue between `Node::send` and a session's task.
//!
//! Why not a channel crate: a session must close its queue and take what is
//! left in one step (so that no message slips in between and is lost), its
//! task takes messages in batches (one lock per batch, not per message), and
//! an idle session's queue must cost no heap memory (10 000 idle sessions).
//! tokio's mpsc allocates a block of 32 slots per channel up front and takes
//! one semaphore operation per message; flume cannot close and drain
//! atomically. This is a `VecDeque` behind a mutex plus two `Notify`s.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

/// Why a message was not queued; it is handed back.
#[derive(Debug)]
pub(crate) enum PushError {
    Full(Bytes),
    Closed(Bytes),
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Bytes>,
    closed: bool,
}

/// A bounded multi-producer, single-consumer queue of messages.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
    capacity: usize,
    /// Senders waiting for room.
    room: Notify,
    /// The consumer waiting for a message.
    filled: Notify,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Outbox {
            queue: Mutex::new(Queue::default()),
            capacity,
            room: Notify::new(),
            filled: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `m` if there is room.
    pub(crate) fn try_push(&self, m: Bytes) -> Result<(), PushError> {
        let mut q = self.lock();
        if q.closed {
            return Err(PushError::Closed(m));
        }
        if q.items.len() >= self.capacity {
            return Err(PushError::Full(m));
        }
        let was_empty = q.items.is_empty();
        q.items.push_back(m);
        drop(q);
        if was_empty {
            self.filled.notify_one();
        }
        Ok(())
    }

    /// Queues `m`, waiting for room; hands it back if the queue closes.
    pub(crate) async fn push(&self, mut m: Bytes) -> Result<(), Bytes> {
        loop {
            // Register interest before looking, so a wake-up between the
            // look and the wait is not lost.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(m) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(x)) => return Err(x),
                Err(PushError::Full(x)) => {
                    m = x;
                    room.await;
                }
            }
        }
    }

    /// Moves up to `max` messages to `f`, oldest first; returns how many.
    pub(crate) fn pop_batch(&self, max: usize, mut f: impl FnMut(Bytes)) -> usize {
        let mut q = self.lock();
        let was_full = q.items.len() >= self.capacity;
        let n = max.min(q.items.len());
        for m in q.items.drain(..n) {
            f(m);
        }
        if q.items.is_empty() && q.items.capacity() > 64 {
            // A burst is over: give the memory back.
            q.items = VecDeque::new();
        }
        drop(q);
        if was_full && n > 0 {
            self.room.notify_waiters();
        }
        n
    }

    /// Waits until a message may have arrived.
    pub(crate) async fn filled(&self) {
        self.filled.notified().await;
    }

    /// Closes the queue and returns what was left in it. Later pushes fail
    /// and hand their message back.
    pub(crate) fn close(&self) -> Vec<Bytes> {
        let mut q = self.lock();
        q.closed = true;
        let left = std::mem::take(&mut q.items).into();
        drop(q);
        self.room.notify_waiters();
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn bounded_ordered_and_closes_without_loss() {
        let o = Arc::new(Outbox::new(2));
        o.try_push(Bytes::from_static(b"a")).unwrap();
        o.try_push(Bytes::from_static(b"b")).unwrap();
        assert!(matches!(
            o.try_push(Bytes::from_static(b"c")),
            Err(PushError::Full(_))
        ));
        // A waiting sender gets in once there is room.
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(Bytes::from_static(b"c")).await });
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        assert_eq!(o.pop_batch(1, |m| got.push(m)), 1);
        waiter.await.unwrap().unwrap();
        o.pop_batch(10, |m| got.push(m));
        assert_eq!(got, [&b"a"[..], b"b", b"c"]);
        o.try_push(Bytes::from_static(b"d")).unwrap();
        assert_eq!(o.close(), vec![Bytes::from_static(b"d")]);
        assert!(matches!(
            o.try_push(Bytes::from_static(b"e")),
            Err(PushError::Closed(_))
        ));
        assert_eq!(
            o.push(Bytes::from_static(b"f")).await,
            Err(Bytes::from_static(b"f"))
        );
    }

    #[tokio::test]
    async fn a_sender_blocked_on_a_full_queue_is_released_by_close() {
        let o = Arc::new(Outbox::new(1));
        o.try_push(Bytes::from_static(b"a")).unwrap();
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.push(Bytes::from_static(b"b")).await });
        tokio::task::yield_now().await;
        assert_eq!(o.close(), vec![Bytes::from_static(b"a")]);
        assert_eq!(waiter.await.unwrap(), Err(Bytes::from_static(b"b")));
    }

    #[tokio::test]
    async fn consumer_wakes_on_first_message() {
        let o = Arc::new(Outbox::new(4));
        let o2 = o.clone();
        let consumer = tokio::spawn(async move {
            o2.filled().await;
            let mut n = 0;
            o2.pop_batch(10, |_| n += 1);
            n
        });
        tokio::task::yield_now().await;
        o.try_push(Bytes::from_static(b"x")).unwrap();
        assert_eq!(consumer.await.unwrap(), 1);
    }
}
