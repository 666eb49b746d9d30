//! Unit tests of the queue: bounds, order, close without loss, batches, wake-ups, the idle flag.

use super::*;
use std::sync::Arc;

#[tokio::test]
async fn bounded_ordered_and_closes_without_loss() {
    let o = Arc::new(Queue::<VecDeque<u32>>::new(2));
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
    let o = Arc::new(Queue::<VecDeque<u32>>::new(1));
    o.try_push(1).unwrap();
    let o2 = o.clone();
    let waiter = tokio::spawn(async move { o2.push(2).await });
    tokio::task::yield_now().await;
    assert_eq!(o.close_and_take(), vec![1]);
    assert_eq!(waiter.await.unwrap(), Err(2));
}

#[tokio::test]
async fn batches_fill_what_fits_and_wait_for_room() {
    let o = Arc::new(Queue::<VecDeque<u32>>::new(3));
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
    let o = Arc::new(Queue::<VecDeque<u32>>::new(4));
    o.try_push(1).unwrap();
    o.close();
    let mut got = Vec::new();
    assert_eq!(o.pop_batch(10, |m| got.push(m)), (1, true));
    let d = Queue::<VecDeque<u32>>::new(1);
    d.try_push(1).unwrap();
    d.discard();
    d.try_push(2).unwrap();
    d.push(3).await.unwrap();
    assert_eq!(d.pop_batch(10, drop), (0, false));
}

#[tokio::test]
async fn consumer_wakes_on_first_item() {
    let o = Arc::new(Queue::<VecDeque<u32>>::new(4));
    let o2 = o.clone();
    let consumer = tokio::spawn(async move {
        let mut got = VecDeque::new();
        std::future::poll_fn(|cx| {
            o2.take_all(&mut got, Some(cx.waker()));
            match got.len() {
                0 => std::task::Poll::Pending,
                n => std::task::Poll::Ready(n),
            }
        })
        .await
    });
    tokio::task::yield_now().await;
    o.try_push(1).unwrap();
    assert_eq!(consumer.await.unwrap(), 1);
}

/// A waker that counts its wake-ups.
struct Count(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Count {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Waker, Arc<Count>) {
    let count = Arc::new(Count(Default::default()));
    (Waker::from(count.clone()), count)
}

#[test]
fn quiet_pushes_leave_the_consumer_asleep_until_its_owed_wake() {
    let (waker, count) = counting_waker();
    let woken = || count.0.load(Ordering::SeqCst);
    let o = Queue::<VecDeque<u32>>::new(4);
    // Not waiting: nothing is owed.
    assert!(!o.try_push_quiet(1).unwrap());
    let mut got = VecDeque::new();
    o.take_all(&mut got, Some(&waker));
    assert!(o.is_idle());
    // Waiting: the first quiet push asks for a wake-up, the next does
    // not (one is owed already), and neither wakes.
    assert!(o.try_push_quiet(2).unwrap());
    assert!(!o.try_push_quiet(3).unwrap());
    assert_eq!(woken(), 0);
    assert!(!o.is_idle(), "a look would find items");
    o.wake_owed();
    assert_eq!(woken(), 1);
    o.wake_owed();
    assert_eq!(woken(), 1, "owed once");
    o.take_all(&mut got, Some(&waker));
    // An ordinary push wakes at once and settles what was owed.
    assert!(o.try_push_quiet(4).unwrap());
    o.try_push(5).unwrap();
    assert_eq!(woken(), 2);
    o.wake_owed();
    assert_eq!(woken(), 2);
    // A look that takes everything settles it too.
    o.take_all(&mut got, Some(&waker));
    assert!(o.try_push_quiet(6).unwrap());
    o.take_all(&mut got, None);
    o.wake_owed();
    assert_eq!(woken(), 2);
    // Full and closed queues refuse quiet pushes like others.
    let f = Queue::<VecDeque<u32>>::new(1);
    f.try_push(1).unwrap();
    assert!(matches!(f.try_push_quiet(2), Err(PushError::Full(2))));
    f.close();
    assert!(matches!(f.try_push_quiet(3), Err(PushError::Closed(3))));
    assert_eq!(got, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn idle_only_while_a_look_would_find_nothing() {
    let (waker, count) = counting_waker();
    let woken = || count.0.load(Ordering::SeqCst);
    let o = Queue::<VecDeque<u32>>::new(4);
    assert!(!o.is_idle(), "the consumer never looked");
    o.try_push(1).unwrap();
    let mut got = VecDeque::new();
    o.take_all(&mut got, Some(&waker));
    assert!(o.is_idle(), "emptied with a waker registered");
    // A push ends it, and wakes the consumer.
    o.try_push(2).unwrap();
    assert!(!o.is_idle());
    assert_eq!(woken(), 1);
    // Looking without registering a waker does not make it idle.
    o.take_all(&mut got, None);
    assert!(!o.is_idle());
    o.take_all(&mut got, Some(&waker));
    assert!(o.is_idle());
    // Batches, a wake-up (a close request) and closing end it too.
    assert!(!o.push_many(&mut VecDeque::from([3])));
    assert!(!o.is_idle());
    assert_eq!(woken(), 2);
    o.take_all(&mut got, Some(&waker));
    o.wake_consumer();
    assert!(!o.is_idle());
    assert_eq!(woken(), 3);
    o.take_all(&mut got, Some(&waker));
    o.close();
    assert!(!o.is_idle());
    assert_eq!(got, [1, 2, 3]);
}
