//! Model-checked tests of the queue's lock-free idle flag: a session that
//! finds its outbox idle does not take the lock, so a push, a quiet push or
//! a close request racing that look must still reach it (as a wake-up, or
//! as a look that finds the item). shuttle's depth-first scheduler
//! runs each test under every interleaving of its threads.
//!
//! Run with `RUSTFLAGS="--cfg lanbeat_shuttle" cargo test --release --lib model::`
//! (docs/TESTING.md; CI does).
//!
//! Why shuttle and not loom: see `session::timer::model`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::task::{Wake, Waker};

use shuttle::thread;

use super::*;

struct Count(AtomicUsize);

impl Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, SeqCst);
    }
}

/// A queue whose consumer emptied it and waits (idle), and its waker.
fn idle_queue() -> (Arc<Queue<VecDeque<u32>>>, Waker, Arc<Count>) {
    let q = Arc::new(Queue::new(4));
    let count = Arc::new(Count(AtomicUsize::new(0)));
    let waker = Waker::from(count.clone());
    q.take_all(&mut VecDeque::new(), Some(&waker));
    assert!(q.is_idle());
    (q, waker, count)
}

/// One pass of the consumer as a session makes it: look without the lock,
/// take (registering the waker again) only if not idle.
fn consumer_pass(q: &Queue<VecDeque<u32>>, waker: &Waker, got: &mut VecDeque<u32>) {
    if !q.is_idle() {
        q.take_all(got, Some(waker));
    }
}

/// After both threads: the item was taken, or the consumer was woken to
/// take it (and then finds it).
fn reached(q: &Queue<VecDeque<u32>>, waker: &Waker, count: &Count, mut got: VecDeque<u32>) {
    if got.is_empty() {
        assert!(
            count.0.load(SeqCst) >= 1,
            "the item waits and nobody woke the consumer"
        );
        q.take_all(&mut got, Some(waker));
    }
    assert_eq!(got, [1]);
}

/// One race: `producer` on its own thread against one pass of the
/// consumer, which found the queue empty and waits; then the item must
/// have reached the consumer.
fn race(producer: fn(&Queue<VecDeque<u32>>)) {
    shuttle::check_dfs(
        move || {
            let (q, waker, count) = idle_queue();
            let side = {
                let q = q.clone();
                thread::spawn(move || producer(&q))
            };
            let mut got = VecDeque::new();
            consumer_pass(&q, &waker, &mut got);
            side.join().unwrap();
            reached(&q, &waker, &count, got);
        },
        None,
    );
}

#[test]
fn a_push_racing_an_idle_look_wakes_the_consumer_or_is_taken() {
    race(|q| q.try_push(1).unwrap());
}

#[test]
fn a_batch_racing_an_idle_look_wakes_the_consumer_or_is_taken() {
    race(|q| assert!(!q.push_many(&mut VecDeque::from([1]))));
}

/// A quiet push leaves the consumer asleep but owes it a wake-up, which
/// the producer's side pays with `wake_owed` (the node's timer does).
#[test]
fn a_quiet_push_and_its_owed_wake_reach_the_consumer() {
    race(|q| {
        if q.try_push_quiet(1).unwrap() {
            q.wake_owed();
        }
    });
}

/// A close request (the supervisor's `wake_consumer`) racing an idle look:
/// the consumer looks again, or is woken.
#[test]
fn a_wake_racing_an_idle_look_is_not_lost() {
    shuttle::check_dfs(
        || {
            let (q, waker, count) = idle_queue();
            let waker_side = {
                let q = q.clone();
                thread::spawn(move || q.wake_consumer())
            };
            let looked = !q.is_idle();
            if looked {
                q.take_all(&mut VecDeque::new(), Some(&waker));
            }
            waker_side.join().unwrap();
            assert!(looked || count.0.load(SeqCst) >= 1, "the wake-up was lost");
        },
        None,
    );
}
