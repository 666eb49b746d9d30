//! The one place the clock is read. Going through tokio's clock means paused
//! tokio time (in tests) reaches the sans-IO machines too.

use std::time::Instant;

/// Now, as the machines see it.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A sleep until a machine deadline (can be `reset`).
pub(crate) fn sleep_until(deadline: Instant) -> tokio::time::Sleep {
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline))
}
