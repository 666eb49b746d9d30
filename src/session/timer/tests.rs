//! Unit tests of the timer wheel on made-up times, and of its task on the real clock.

use std::sync::atomic::AtomicUsize;

use super::*;

/// A session as the timer sees it: a deadline, and a count of wake-ups
/// (shared with the model tests).
#[derive(Default)]
pub(super) struct Probe {
    pub(super) deadline: Deadline,
    pub(super) woken: AtomicUsize,
}

impl Timed for Probe {
    fn deadline(&self) -> &Deadline {
        &self.deadline
    }
    fn wake(&self) {
        self.woken.fetch_add(1, SeqCst);
    }
}

fn woken(p: &Probe) -> usize {
    p.woken.load(SeqCst)
}

const MS: Duration = Duration::from_millis(1);

/// `ms` after `t0`, rounded up to the wheel's tick.
fn tick(t0: Instant, ms: u64) -> Instant {
    let tick = TICK.as_millis() as u64;
    t0 + Duration::from_millis(ms.div_ceil(tick) * tick)
}

#[test]
fn wakes_at_the_deadline_never_before_and_at_most_a_tick_after() {
    let t0 = Instant::now();
    let timer = Timer::new(t0);
    let p = Arc::new(Probe::default());
    timer.set(&p, Some(t0 + 101 * MS));
    // Looks next at the deadline's tick.
    assert_eq!(timer.advance(t0 + 50 * MS), Some(tick(t0, 101)));
    assert_eq!(timer.advance(t0 + 100 * MS), Some(tick(t0, 101)));
    assert_eq!(woken(&p), 0);
    assert_eq!(timer.advance(tick(t0, 101)), None);
    assert_eq!(woken(&p), 1);
    // Nothing filed any more: no second wake-up.
    assert_eq!(timer.advance(t0 + 500 * MS), None);
    assert_eq!(woken(&p), 1);
}

#[test]
fn a_later_deadline_is_filed_again_an_earlier_one_at_once() {
    let t0 = Instant::now();
    let timer = Timer::new(t0);
    let p = Arc::new(Probe::default());
    timer.set(&p, Some(t0 + 1500 * MS));
    // Moved later (a heartbeat came): nothing happens at 1.5 s...
    timer.set(&p, Some(t0 + 2500 * MS));
    assert_eq!(timer.advance(tick(t0, 1500)), Some(tick(t0, 2500)));
    assert_eq!(woken(&p), 0);
    // ...moved earlier: looked at then.
    timer.set(&p, Some(t0 + 1600 * MS));
    assert_eq!(timer.advance(t0 + 1550 * MS), Some(tick(t0, 1600)));
    assert_eq!(timer.advance(tick(t0, 1600)), Some(tick(t0, 2500)));
    assert_eq!(woken(&p), 1);
    // The stale filing at 2.5 s wakes nothing.
    assert_eq!(timer.advance(t0 + 2600 * MS), None);
    assert_eq!(woken(&p), 1);
    // Once woken, the same deadline set again is filed again.
    timer.set(&p, Some(t0 + 3000 * MS));
    assert_eq!(timer.advance(t0 + 3000 * MS), None);
    assert_eq!(woken(&p), 2);
}

#[test]
fn far_deadlines_come_round_and_cleared_ones_are_dropped() {
    let t0 = Instant::now();
    let timer = Timer::new(t0);
    let far = Arc::new(Probe::default());
    let gone = Arc::new(Probe::default());
    // 10 s: more than two rounds of the wheel (4.096 s).
    timer.set(&far, Some(t0 + 10_000 * MS));
    timer.set(&gone, Some(t0 + 1000 * MS));
    timer.set(&gone, None);
    let mut now = t0;
    while let Some(next) = timer.advance(now) {
        assert!(next > now, "the timer must move on");
        now = next;
        if woken(&far) == 1 {
            break;
        }
    }
    assert_eq!(woken(&far), 1);
    assert!(now >= t0 + 10_000 * MS && now < t0 + 10_000 * MS + TICK);
    assert_eq!(woken(&gone), 0);
    assert_eq!(Arc::strong_count(&gone), 1, "the timer let go of it");
    // A late look (the task was held up for 30 s) wakes what is due.
    timer.set(&far, Some(now + 5 * MS));
    assert_eq!(timer.advance(now + 30_000 * MS), None);
    assert_eq!(woken(&far), 2);
}

#[test]
fn many_sessions_each_woken_once_in_time() {
    let t0 = Instant::now();
    let timer = Timer::new(t0);
    let probes: Vec<Arc<Probe>> = (0..2000).map(|_| Arc::default()).collect();
    for (i, p) in probes.iter().enumerate() {
        timer.set(p, Some(t0 + (i as u32 % 5000) * MS + 3 * MS));
    }
    let mut now = t0;
    let mut was_woken = vec![false; probes.len()];
    loop {
        let next = timer.advance(now);
        for (i, p) in probes.iter().enumerate() {
            let due = t0 + (i as u32 % 5000) * MS + 3 * MS;
            // Woken once due, never before, and within a tick.
            assert_eq!(woken(p), usize::from(now >= due), "probe {i} at {now:?}");
            if woken(p) == 1 && !was_woken[i] {
                assert!(now < due + TICK, "probe {i} woken late");
                was_woken[i] = true;
            }
        }
        match next {
            Some(n) => now = n,
            None => break,
        }
    }
    assert!(probes.iter().all(|p| woken(p) == 1));
}

#[tokio::test]
async fn a_nudge_reaches_the_task_by_the_next_tick_however_long_it_sleeps() {
    let timer = Arc::new(Timer::<Probe>::new(clock::now()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn(timer.clone().run(move || {
        let _ = tx.send(clock::now());
    }));
    let p = Arc::new(Probe::default());
    // Sleeping until told (nothing filed), then until a deadline 10 s
    // away: each nudge is answered long before.
    for filed in [None, Some(10_000 * MS)] {
        tokio::time::sleep(20 * MS).await;
        if let Some(d) = filed {
            timer.set(&p, Some(clock::now() + d));
            tokio::time::sleep(20 * MS).await;
        }
        let t = clock::now();
        timer.nudge(t);
        let called = tokio::time::timeout(5_000 * MS, rx.recv()).await;
        let called = called.expect("on_nudge not called").unwrap();
        assert!(called >= t);
        assert!(rx.try_recv().is_err(), "called once per nudge");
    }
    assert_eq!(woken(&p), 0);
    run.abort();
}

#[tokio::test]
async fn the_task_wakes_a_session_filed_while_it_sleeps() {
    struct Task {
        deadline: Deadline,
        tx: tokio::sync::mpsc::UnboundedSender<Instant>,
    }
    impl Timed for Task {
        fn deadline(&self) -> &Deadline {
            &self.deadline
        }
        fn wake(&self) {
            let _ = self.tx.send(clock::now());
        }
    }
    let timer = Arc::new(Timer::new(clock::now()));
    let run = tokio::spawn(timer.clone().run(|| {}));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Arc::new(Task {
        deadline: Deadline::default(),
        tx,
    });
    // The task sleeps with nothing filed; this must wake it.
    tokio::time::sleep(20 * MS).await;
    let due = clock::now() + 30 * MS;
    timer.set(&t, Some(due));
    let woken = rx.recv().await.unwrap();
    assert!(woken >= due, "woken {:?} early", due - woken);
    run.abort();
}
