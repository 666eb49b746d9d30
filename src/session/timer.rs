//! One timer for all the sessions of a node.
//!
//! A session has one deadline at a time: its machine's next timeout, or a
//! stalled write's, and every heartbeat moves it on. Why not a tokio
//! `Sleep` per session: each reset touches the timer entry, and tokio's
//! wheel later moves the entry (touching it and its neighbours in the
//! slot's list) to where it belongs, level by level; with thousands of
//! sessions those are cache misses on every heartbeat (docs/BENCHMARKS.md
//! has the figures).
//!
//! Here a session only stores its deadline, as a tick, in a [`Deadline`]
//! kept in the cache line of its mailbox that a heartbeat reads anyway. One
//! task per node keeps the sessions in a hashed wheel of [`TICK`]-long
//! slots, each filed under the deadline it had when filed. When a slot comes
//! due, the task wakes the sessions whose deadline has come and files the
//! others again under their current deadline: an idle session is looked at
//! about once per heartbeat interval, one cache line. A deadline that moves
//! earlier than where its session is filed is filed again at once (by the
//! session, under the wheel's lock), so no wake-up is ever late by more than
//! a tick; one that moves later costs nothing until the old slot comes due.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::clock;
use crate::sync::{AtomicBool, AtomicU64, Mutex, MutexGuard};

/// The wheel's resolution: a session is woken at most this long after its
/// deadline (plus scheduling). With 10 000 sessions some deadline falls in
/// every tick, so the task wakes once per tick: 125 times a second.
pub(crate) const TICK: Duration = Duration::from_millis(8);
const TICK_NS: u64 = TICK.as_nanos() as u64;
/// Slots in the wheel: deadlines up to about 4 s ahead are filed where they
/// fall due; later ones come round once per 4 s until they do.
const SLOTS: usize = 512;
/// No deadline, or not filed.
const NONE: u64 = u64::MAX;

/// A session's deadline, as the timer sees it.
#[derive(Debug)]
pub(crate) struct Deadline {
    /// The tick at which the session wants to be woken (`NONE`: never).
    /// Written only by the session.
    at: AtomicU64,
    /// The tick under which the session is filed (`NONE`: it is not).
    /// Written under the wheel's lock.
    filed: AtomicU64,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline {
            at: AtomicU64::new(NONE),
            filed: AtomicU64::new(NONE),
        }
    }
}

/// What the timer keeps and wakes.
pub(crate) trait Timed: Send + Sync {
    fn deadline(&self) -> &Deadline;
    /// Wakes the task the deadline is for.
    fn wake(&self);
}

/// The timer of a node's sessions; its task is [`Timer::run`].
pub(crate) struct Timer<T> {
    /// Tick 0.
    start: Instant,
    wheel: Mutex<Wheel<T>>,
    /// Tells the task that something was filed before the tick it sleeps
    /// until (or that it was nudged).
    refiled: Notify,
    /// The task is to call its `on_nudge` when it next looks.
    nudged: AtomicBool,
}

struct Wheel<T> {
    /// What is filed, by tick modulo `SLOTS`, with the tick it is filed
    /// under.
    slots: Vec<Vec<(Arc<T>, u64)>>,
    /// Which slots hold anything.
    occupied: [u64; SLOTS / 64],
    /// The first tick not processed yet.
    next: u64,
    /// The tick the task sleeps until (`NONE`: until told).
    wake_at: u64,
    /// A slot's entries while they are processed (kept for its capacity).
    scratch: Vec<(Arc<T>, u64)>,
}

impl<T> Wheel<T> {
    fn file(&mut self, who: Arc<T>, tick: u64) {
        let slot = (tick % SLOTS as u64) as usize;
        self.slots[slot].push((who, tick));
        self.occupied[slot / 64] |= 1 << (slot % 64);
    }

    /// The first tick from `self.next` on whose slot holds anything.
    fn next_occupied(&self) -> u64 {
        let from = (self.next % SLOTS as u64) as usize;
        (0..SLOTS)
            .find(|k| {
                let slot = (from + k) % SLOTS;
                self.occupied[slot / 64] & (1 << (slot % 64)) != 0
            })
            .map_or(NONE, |k| self.next + k as u64)
    }
}

impl<T: Timed> Timer<T> {
    pub(crate) fn new(start: Instant) -> Self {
        Timer {
            start,
            wheel: Mutex::new(Wheel {
                slots: (0..SLOTS).map(|_| Vec::new()).collect(),
                occupied: [0; SLOTS / 64],
                next: 0,
                wake_at: NONE,
                scratch: Vec::new(),
            }),
            refiled: Notify::new(),
            nudged: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Wheel<T>> {
        self.wheel.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nanoseconds from tick 0 to `t` (0 before it).
    fn nanos(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.start);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    /// The first tick at or after `t`.
    fn tick_at_or_after(&self, t: Instant) -> u64 {
        self.nanos(t).div_ceil(TICK_NS)
    }

    /// Sets `who`'s deadline (`None`: none). Called by the task the
    /// deadline is for; cheap when the deadline moved later or not at all.
    pub(crate) fn set(&self, who: &Arc<T>, at: Option<Instant>) {
        let tick = at.map_or(NONE, |t| self.tick_at_or_after(t));
        let d = who.deadline();
        if d.at.load(SeqCst) != tick {
            d.at.store(tick, SeqCst);
        }
        // Filed later than now needed (or not at all): file it now. The
        // task may be looking at the old filing right now: it reads `at`
        // again after it files, and one of us sees the other's write.
        if tick < d.filed.load(SeqCst) {
            let mut w = self.lock();
            if tick < d.filed.load(SeqCst) {
                w.file(who.clone(), tick);
                d.filed.store(tick, SeqCst);
                if tick < w.wake_at {
                    w.wake_at = tick;
                    drop(w);
                    self.refiled.notify_one();
                }
            }
        }
    }

    /// Has the task call its `on_nudge` by the tick after `now`'s (at
    /// once if it sleeps longer than that). For work that may wait a few
    /// milliseconds and is cheaper done once for many: with many sessions
    /// the task wakes every tick anyway.
    pub(crate) fn nudge(&self, now: Instant) {
        self.nudged.store(true, SeqCst);
        // The task sets `wake_at` under the lock before it looks at
        // `nudged`: either it sees the flag, or we see where it sleeps.
        let tick = self.nanos(now) / TICK_NS + 1;
        let mut w = self.lock();
        if w.wake_at > tick {
            w.wake_at = tick;
            drop(w);
            self.refiled.notify_one();
        }
    }

    /// Wakes what is due at `now` and files the rest again; returns when
    /// to look next (`None`: when told).
    fn advance(&self, now: Instant) -> Option<Instant> {
        let now_tick = self.nanos(now) / TICK_NS;
        let mut woken = Vec::new();
        let mut guard = self.lock();
        let w = &mut *guard;
        if now_tick >= w.next {
            // Past one round, every slot has been due once.
            let ticks = (now_tick - w.next + 1).min(SLOTS as u64);
            for tick in w.next..w.next + ticks {
                let slot = (tick % SLOTS as u64) as usize;
                if w.occupied[slot / 64] & (1 << (slot % 64)) == 0 {
                    continue;
                }
                w.occupied[slot / 64] &= !(1 << (slot % 64));
                let mut entries = std::mem::take(&mut w.scratch);
                std::mem::swap(&mut entries, &mut w.slots[slot]);
                for (who, filed) in entries.drain(..) {
                    let d = who.deadline();
                    if d.filed.load(SeqCst) != filed {
                        // Filed again since, earlier.
                        continue;
                    }
                    if filed > now_tick {
                        // Due in a later round.
                        w.file(who, filed);
                        continue;
                    }
                    let mut at = d.at.load(SeqCst);
                    loop {
                        if at <= now_tick {
                            d.filed.store(NONE, SeqCst);
                            woken.push(who);
                            break;
                        }
                        if at == NONE {
                            d.filed.store(NONE, SeqCst);
                            break;
                        }
                        // (Pushed below, still under the lock: a session
                        // that finds it filed too late waits for the lock.)
                        d.filed.store(at, SeqCst);
                        // The session may have moved its deadline earlier
                        // since, and seen the filing that was: look again.
                        let again = d.at.load(SeqCst);
                        if again >= at {
                            // Moved, not cloned: the reference count is
                            // another cache line.
                            w.file(who, at);
                            break;
                        }
                        at = again;
                    }
                }
                w.scratch = entries;
            }
            w.next = now_tick + 1;
        }
        w.wake_at = w.next_occupied();
        let wake_at = w.wake_at;
        drop(guard);
        for who in woken {
            who.wake();
        }
        (wake_at != NONE)
            .then(|| self.start + Duration::from_nanos(wake_at.saturating_mul(TICK_NS)))
    }

    /// The timer's task: runs until aborted (with the node). Calls
    /// `on_nudge` when it finds itself nudged.
    pub(crate) async fn run(self: Arc<Self>, on_nudge: impl Fn() + Send) {
        let sleep = clock::sleep_until(self.start);
        tokio::pin!(sleep);
        loop {
            let refiled = self.refiled.notified();
            tokio::pin!(refiled);
            // Told of what is filed from here on, before looking.
            refiled.as_mut().enable();
            let next = self.advance(clock::now());
            if self.nudged.swap(false, SeqCst) {
                on_nudge();
            }
            match next {
                Some(at) => {
                    sleep.as_mut().reset(tokio::time::Instant::from_std(at));
                    tokio::select! {
                        _ = sleep.as_mut() => {}
                        _ = refiled => {}
                    }
                }
                None => refiled.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Default)]
    struct Probe {
        deadline: Deadline,
        woken: AtomicUsize,
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
}

#[cfg(all(test, lanbeat_shuttle))]
mod model;
