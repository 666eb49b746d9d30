//! The bounded queue behind each session's outbox and behind the event
//! stream.
//!
//! Why not a channel crate: a session must close its outbox and take what is
//! left in one step (so that no message slips in between and is lost); both
//! ends move items in batches (one lock per batch, not per message); and an
//! idle queue must cost no heap memory (10 000 idle sessions). tokio's mpsc
//! allocates a block of 32 slots per channel up front and takes a semaphore
//! operation per item; flume cannot close and drain atomically. This is a
//! `VecDeque` behind a mutex, the single consumer's `Waker` kept under the
//! same lock (a push wakes it only if it last found the queue empty, so a
//! busy consumer is not woken per item; a session also uses it to be woken
//! for a close request), and a `Notify` for producers waiting for room.
//!
//! What holds the items is a [`Store`]: a `VecDeque` for events, and for a
//! session's outbox one that encodes small messages as they arrive (see
//! `session::outbox`).

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::task::Waker;

use tokio::sync::Notify;

use crate::sync::{AtomicBool, Mutex, MutexGuard};

/// Why an item was not queued; it is handed back.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    Full(T),
    Closed(T),
}

/// What a [`Queue`] keeps its items in.
pub(crate) trait Store: Default {
    type Item;
    /// Items held.
    fn len(&self) -> usize;
    fn push(&mut self, item: Self::Item);
    /// Moves the first `n` of `items` in. The default pushes one by one.
    fn push_from(&mut self, items: &mut VecDeque<Self::Item>, n: usize) {
        for item in items.drain(..n) {
            self.push(item);
        }
    }
    /// Whether it takes no more items: at `capacity` items, or at a bound
    /// of its own (the event store's bytes).
    fn is_full(&self, capacity: usize) -> bool {
        self.len() >= capacity
    }
    /// How many of the first of `items` it takes now.
    fn fitting(&self, items: &VecDeque<Self::Item>, capacity: usize) -> usize {
        items.len().min(capacity.saturating_sub(self.len()))
    }
    /// Takes everything, oldest first.
    #[cfg(test)]
    fn take_all(&mut self) -> Vec<Self::Item>;
}

impl<T> Store for VecDeque<T> {
    type Item = T;

    fn len(&self) -> usize {
        VecDeque::len(self)
    }

    fn push(&mut self, item: T) {
        self.push_back(item);
    }

    fn push_from(&mut self, items: &mut VecDeque<T>, n: usize) {
        if self.is_empty() && n == items.len() {
            // The whole batch moves as one buffer (the caller gets the
            // queue's empty one back): no item is copied.
            std::mem::swap(self, items);
        } else {
            self.extend(items.drain(..n));
        }
    }

    #[cfg(test)]
    fn take_all(&mut self) -> Vec<T> {
        std::mem::take(self).into()
    }
}

#[derive(Debug)]
struct Inner<S> {
    items: S,
    /// No more pushes.
    closed: bool,
    /// The consumer is gone: pushes are accepted and dropped.
    discard: bool,
    /// The consumer's waker, registered by `consume` or `register`.
    consumer: Option<Waker>,
    /// The consumer found the queue empty: the next push wakes it.
    waiting: bool,
    /// A quiet push left the waiting consumer asleep: it is owed a
    /// wake-up (see [`Queue::try_push_quiet`]).
    owed: bool,
}

/// A bounded multi-producer, single-consumer queue of the items of store
/// `S` (a `VecDeque<T>` for a plain queue of `T`).
// `idle` first: an idle consumer reads only it (see `session::mailbox`).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Queue<S> {
    /// The consumer found the queue empty and registered its waker, and
    /// nothing was pushed nor was it woken since (see [`Queue::is_idle`]).
    /// Written under the lock; read without it.
    idle: AtomicBool,
    capacity: usize,
    inner: Mutex<Inner<S>>,
    /// Producers waiting for room.
    room: Notify,
}

#[cfg(not(all(test, lanbeat_shuttle)))]
impl<S> Queue<S> {
    /// Where the idle flag ends, from the start of the queue: a consumer
    /// that checks only it reads this many bytes (see
    /// `session::mailbox`, which keeps them in its first cache line).
    // Used only by compile-time layout checks, which rustc before 1.89
    // does not count as a use.
    #[allow(dead_code)]
    pub(crate) const IDLE_END: usize = std::mem::offset_of!(Self, idle) + size_of::<AtomicBool>();
}

impl<S: Store> Queue<S> {
    /// An empty queue that holds up to `capacity` items.
    pub(crate) fn new(capacity: usize) -> Self {
        Self::with_store(capacity, S::default())
    }

    /// A queue of up to `capacity` items in `items` (empty), which may
    /// bound them further (see [`Store::is_full`]).
    pub(crate) fn with_store(capacity: usize, items: S) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                items,
                closed: false,
                discard: false,
                consumer: None,
                waiting: false,
                owed: false,
            }),
            idle: AtomicBool::new(false),
            capacity,
            room: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` if there is room.
    // Always inlined (into `send`, itself inlined into the caller's loop):
    // returned through memory, the `Result` cost a store-forwarding stall
    // per message.
    #[inline(always)]
    pub(crate) fn try_push(&self, item: S::Item) -> Result<(), PushError<S::Item>> {
        self.try_push_with(item, S::push)
    }

    /// Queues `item` if there is room, like [`Queue::try_push`], but
    /// leaves a waiting consumer asleep: for items that can wait a little
    /// (a round-trip sample). The next ordinary push wakes it, or
    /// [`Queue::wake_owed`]. Returns true when the consumer waits and this
    /// is the first item since that it was not woken for: the caller must
    /// then see that `wake_owed` is called soon.
    ///
    /// Why: with many sessions, a sample arrives every few hundred
    /// microseconds, and waking the application once per scheduler round
    /// for them cost more than the samples themselves.
    pub(crate) fn try_push_quiet(&self, item: S::Item) -> Result<bool, PushError<S::Item>> {
        let mut q = self.lock();
        if !self.admit(&mut q, item)? || !q.waiting {
            return Ok(false);
        }
        // A look would find something now.
        self.idle.store(false, Ordering::Release);
        Ok(!std::mem::replace(&mut q.owed, true))
    }

    /// Wakes the consumer if a quiet push left it asleep.
    pub(crate) fn wake_owed(&self) {
        let mut q = self.lock();
        if !std::mem::take(&mut q.owed) {
            return;
        }
        let consumer = self.take_waiting(&mut q);
        drop(q);
        if let Some(w) = consumer {
            w.wake();
        }
    }

    /// Stores `item` if the queue takes it (under the lock). Returns false
    /// when it was dropped because the consumer is gone.
    #[inline(always)]
    fn admit(&self, q: &mut Inner<S>, item: S::Item) -> Result<bool, PushError<S::Item>> {
        self.admit_with(q, item, S::push)
    }

    /// [`Queue::admit`] for an item the store takes with `put`.
    #[inline(always)]
    fn admit_with<I>(
        &self,
        q: &mut Inner<S>,
        item: I,
        put: impl FnOnce(&mut S, I),
    ) -> Result<bool, PushError<I>> {
        if q.discard {
            return Ok(false);
        }
        if q.closed {
            return Err(PushError::Closed(item));
        }
        if q.items.is_full(self.capacity) {
            return Err(PushError::Full(item));
        }
        put(&mut q.items, item);
        Ok(true)
    }

    /// Queues `item` (of some other kind than the store's items, taken by
    /// `put`) if there is room, like [`Queue::try_push`]. `put` is a
    /// function item, so this is monomorphised and inlined: no indirect
    /// call on the message path.
    #[inline(always)]
    pub(crate) fn try_push_with<I>(
        &self,
        item: I,
        put: impl FnOnce(&mut S, I),
    ) -> Result<(), PushError<I>> {
        let mut q = self.lock();
        if !self.admit_with(&mut q, item, put)? {
            return Ok(());
        }
        let consumer = self.take_waiting(&mut q);
        drop(q);
        if let Some(w) = consumer {
            w.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room; hands it back if the queue closes.
    pub(crate) async fn push(&self, item: S::Item) -> Result<(), S::Item> {
        self.push_with(item, S::push).await
    }

    /// [`Queue::push`] for an item the store takes with `put`.
    pub(crate) async fn push_with<I>(
        &self,
        mut item: I,
        put: impl Fn(&mut S, I) + Copy,
    ) -> Result<(), I> {
        loop {
            match self.try_push_with(item, put) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(x)) => return Err(x),
                Err(PushError::Full(x)) => item = x,
            }
            // Register interest, then look again, so a wake-up between the
            // look and the wait is not lost.
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push_with(item, put) {
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
    pub(crate) fn push_many(&self, items: &mut VecDeque<S::Item>) -> bool {
        let mut q = self.lock();
        if q.discard {
            items.clear();
            return false;
        }
        if q.closed {
            return !items.is_empty();
        }
        let n = q.items.fitting(items, self.capacity);
        q.items.push_from(items, n);
        let consumer = if n > 0 {
            self.take_waiting(&mut q)
        } else {
            None
        };
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
            if !q.items.is_full(self.capacity) || q.closed || q.discard {
                return;
            }
        }
        room.await;
    }

    /// The consumer's side: `f` takes what it wants from the store. Returns
    /// its result and whether the queue is closed with nothing left (then
    /// nothing more will come). With a `waker`, registers it (see
    /// [`Queue::register`]); when `f` leaves the queue empty and open, the
    /// next push wakes it.
    pub(crate) fn consume<R>(
        &self,
        waker: Option<&Waker>,
        f: impl FnOnce(&mut S) -> R,
    ) -> (R, bool) {
        let mut q = self.lock();
        let (before, was_full) = (q.items.len(), q.items.is_full(self.capacity));
        let r = f(&mut q.items);
        let left = q.items.len();
        let closed = q.closed && left == 0;
        if left == 0 {
            // It saw what quiet pushes left.
            q.owed = false;
        }
        if let Some(w) = waker {
            q.waiting = left == 0 && !q.closed;
            q.set_consumer(w);
            self.idle.store(q.waiting, Ordering::Release);
        }
        drop(q);
        if was_full && left < before {
            self.room.notify_waiters();
        }
        (r, closed)
    }

    /// Registers the consumer's waker, for [`Queue::wake_consumer`] (and, if
    /// it last found the queue empty, for the next push).
    pub(crate) fn register(&self, waker: &Waker) {
        self.lock().set_consumer(waker);
    }

    /// Whether looking would find nothing: the consumer found the queue
    /// empty (registering its waker with [`Queue::consume`]) and nothing
    /// was pushed since, nor was it woken. Lock-free, for a consumer that
    /// looks on every wake-up (an idle session). Valid only for a consumer
    /// that always polls with the same waker (one task), or that checks
    /// its waker is the one it registered (`Events`): when this says idle,
    /// that waker is registered and the next push wakes it.
    pub(crate) fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Acquire)
    }

    /// The consumer's waker, if it waits for an item (it is woken, and the
    /// queue is no longer idle).
    fn take_waiting(&self, q: &mut Inner<S>) -> Option<Waker> {
        q.owed = false;
        if std::mem::take(&mut q.waiting) {
            self.idle.store(false, Ordering::Release);
            q.consumer.take()
        } else {
            None
        }
    }

    /// Wakes the consumer if it registered since it was last woken.
    pub(crate) fn wake_consumer(&self) {
        let mut q = self.lock();
        self.idle.store(false, Ordering::Release);
        let consumer = q.consumer.take();
        drop(q);
        if let Some(w) = consumer {
            w.wake();
        }
    }

    /// Runs `f` on the store under the lock, taking nothing and waking no
    /// one: to give back the memory of an empty store.
    pub(crate) fn tidy(&self, f: impl FnOnce(&mut S)) {
        f(&mut self.lock().items);
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().items.len() == 0
    }

    /// Closes the queue and returns what was left in it. Later pushes fail
    /// and hand their item back.
    #[cfg(test)]
    pub(crate) fn close_and_take(&self) -> Vec<S::Item> {
        self.close_and_take_with(S::take_all)
    }

    /// [`Queue::close_and_take`], the store emptied by `take`.
    pub(crate) fn close_and_take_with<R>(&self, take: impl FnOnce(&mut S) -> R) -> R {
        let mut q = self.lock();
        q.closed = true;
        let left = take(&mut q.items);
        q.consumer = None;
        self.idle.store(false, Ordering::Release);
        drop(q);
        self.room.notify_waiters();
        left
    }

    /// Closes the queue for producers; the consumer still gets what is in it.
    pub(crate) fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        let consumer = q.consumer.take();
        self.idle.store(false, Ordering::Release);
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
        q.items = S::default();
        q.consumer = None;
        self.idle.store(false, Ordering::Release);
        drop(q);
        self.room.notify_waiters();
    }
}

/// A store whose items can all move to a `VecDeque` at once (the event
/// queue's).
pub(crate) trait TakeAll: Store {
    /// Moves every item to the back of `into`, oldest first.
    fn take_into(&mut self, into: &mut VecDeque<Self::Item>);
}

impl<T> TakeAll for VecDeque<T> {
    fn take_into(&mut self, into: &mut VecDeque<T>) {
        if into.is_empty() {
            // No item is copied.
            std::mem::swap(self, into);
        } else {
            into.extend(self.drain(..));
        }
    }
}

impl<S: TakeAll> Queue<S> {
    /// Moves everything queued to the back of `into` (swapping buffers when
    /// `into` is empty, so no item is copied) and returns whether the queue
    /// is closed (then nothing more will come). With a `waker`, registers it
    /// as [`Queue::consume`] does.
    pub(crate) fn take_all(&self, into: &mut VecDeque<S::Item>, waker: Option<&Waker>) -> bool {
        self.consume(waker, |items| items.take_into(into)).1
    }
}

impl<T> Queue<VecDeque<T>> {
    /// Moves up to `max` items to `f`, oldest first. Returns how many, and
    /// whether the queue is closed (then nothing more will come).
    #[cfg(test)]
    pub(crate) fn pop_batch(&self, max: usize, f: impl FnMut(T)) -> (usize, bool) {
        self.consume(None, |items| {
            let n = max.min(items.len());
            items.drain(..n).for_each(f);
            n
        })
    }
}

impl<S> Inner<S> {
    fn set_consumer(&mut self, waker: &Waker) {
        match &mut self.consumer {
            Some(old) => old.clone_from(waker),
            none => *none = Some(waker.clone()),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(all(test, lanbeat_shuttle))]
mod model;
