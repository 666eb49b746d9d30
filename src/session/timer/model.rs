//! Model-checked tests of the timer's lock-free protocol: a session moves
//! its deadline while the timer's task files or wakes it. shuttle's
//! depth-first scheduler runs each test under every interleaving of its
//! threads' synchronisation steps, and fails if one breaks the assertions.
//!
//! Run with `RUSTFLAGS="--cfg lanbeat_shuttle" cargo test --release --lib model::`
//! (docs/TESTING.md; CI does).
//!
//! Why shuttle and not loom: loom 0.7 lets a plain store fall between the
//! read and the write of a concurrent swap (tokio-rs/loom#254), which
//! fails the nudge test below on a history no CPU can produce. shuttle
//! explores sequentially consistent interleavings, which is what these
//! protocols (SeqCst atomics, or flags written under a lock) rely on.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use shuttle::thread;

use super::tests::Probe;
use super::*;

const MS: Duration = Duration::from_millis(1);

/// Advances the timer from `now` the way its task does, until nothing is
/// filed; returns when `p` was woken (each wake-up at most once).
fn run_until_idle(timer: &Timer<Probe>, p: &Probe, mut now: Instant) -> Vec<Instant> {
    let mut woken = Vec::new();
    let mut seen = p.woken.load(SeqCst);
    for _ in 0..10_000 {
        let next = timer.advance(now);
        let count = p.woken.load(SeqCst);
        if count > seen {
            assert_eq!(count, seen + 1, "woken twice at once");
            woken.push(now);
            seen = count;
        }
        match next {
            Some(n) => {
                assert!(n > now, "the timer must move on");
                now = n;
            }
            None => return woken,
        }
    }
    panic!("the timer never went idle");
}

/// One race: the session's deadlines `before` (ms after t0, set in
/// order), then the session sets `during` on its own thread while the task
/// advances to `task_at`. Returns when the session was woken from then on,
/// as offsets from t0, and the probe.
fn race(before: &[u64], during: Option<u64>, task_at: u64) -> (Vec<Duration>, Arc<Probe>) {
    let t0 = Instant::now();
    let timer = Arc::new(Timer::new(t0));
    let p = Arc::new(Probe::default());
    for ms in before {
        timer.set(&p, Some(t0 + Duration::from_millis(*ms)));
    }
    let session = {
        let (timer, p) = (timer.clone(), p.clone());
        thread::spawn(move || timer.set(&p, during.map(|ms| t0 + Duration::from_millis(ms))))
    };
    let now = t0 + Duration::from_millis(task_at);
    timer.advance(now);
    session.join().unwrap();
    let woken = run_until_idle(&timer, &p, now);
    (woken.into_iter().map(|w| w - t0).collect(), p)
}

/// Woken exactly once, at `due_ms` or within a tick after.
fn woken_once_at(woken: &[Duration], due_ms: u64) {
    let due = Duration::from_millis(due_ms);
    assert_eq!(woken.len(), 1, "woken once: {woken:?}");
    assert!(
        woken[0] >= due && woken[0] < due + TICK,
        "woken at {:?}",
        woken[0]
    );
}

/// The race the timer's design is about: the task finds the session filed
/// under a tick whose deadline has moved later (filed at 100 ms, moved to
/// 1 s), and files it again under the later one, while the session moves
/// its deadline earlier than that (500 ms). Whatever the order, the
/// session is woken once, at its new deadline (within a tick), and not
/// before.
#[test]
fn a_deadline_moved_earlier_while_the_task_refiles_it_is_never_missed() {
    shuttle::check_dfs(
        || woken_once_at(&race(&[100, 1000], Some(500), 104).0, 500),
        None,
    );
}

/// The session clears its deadline (it closed) while the task is at its
/// slot: it is never woken, and the timer lets go of it.
#[test]
fn a_deadline_cleared_while_the_task_looks_is_dropped() {
    shuttle::check_dfs(
        || {
            let (woken, p) = race(&[100, 200], None, 104);
            assert!(woken.is_empty(), "woken at {woken:?}");
            assert_eq!(Arc::strong_count(&p), 1, "the timer let go of it");
        },
        None,
    );
}

/// A deadline moved earlier (100 ms to 50 ms) while the task looks at the
/// wheel: the earlier one is honoured, and the session is woken once for
/// it.
#[test]
fn a_deadline_set_while_the_task_wakes_its_slot_is_woken_once() {
    shuttle::check_dfs(|| woken_once_at(&race(&[100], Some(50), 10).0, 50), None);
}

/// A nudge racing the task going to sleep: either the task sees the flag
/// when it looks, or the nudge sees where the task sleeps and brings that
/// forward to the next tick.
#[test]
fn a_nudge_is_never_slept_through() {
    shuttle::check_dfs(
        || {
            let t0 = Instant::now();
            let timer = Arc::new(Timer::<Probe>::new(t0));
            let nudger = {
                let timer = timer.clone();
                thread::spawn(move || timer.nudge(t0 + 20 * MS))
            };
            // One turn of the task's loop: look, then check the flag.
            timer.advance(t0 + 20 * MS);
            let seen = timer.nudged.swap(false, SeqCst);
            nudger.join().unwrap();
            let nudge_tick = (20 * MS).as_nanos() as u64 / TICK_NS + 1;
            let wake_at = timer.lock().wake_at;
            assert!(
                seen || timer.nudged.load(SeqCst) && wake_at <= nudge_tick,
                "seen {seen}, wake_at {wake_at}, nudged {}",
                timer.nudged.load(SeqCst)
            );
        },
        None,
    );
}
