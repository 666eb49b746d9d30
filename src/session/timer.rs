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
mod tests;

#[cfg(all(test, lanbeat_shuttle))]
mod model;
