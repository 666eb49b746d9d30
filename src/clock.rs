//! The one place the clock is read. The sans-IO machines never read it:
//! the drivers pass them the time from here. It is tokio's clock, so the
//! machines, the node's timer and tokio's sleeps all see the same time.

use std::time::Instant;

/// Now, as the machines see it.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A sleep until a machine deadline (can be `reset`).
pub(crate) fn sleep_until(deadline: Instant) -> tokio::time::Sleep {
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline))
}
