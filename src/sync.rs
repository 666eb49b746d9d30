//! The synchronisation primitives of the two lock-free protocols that the
//! model-checked tests cover (the timer's deadlines, the queue's idle
//! flag): std's, or shuttle's when the tests are built with
//! `--cfg lanbeat_shuttle` (see docs/TESTING.md), so that shuttle explores
//! the interleavings of the real code rather than of a copy.

#[cfg(all(test, lanbeat_shuttle))]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(all(test, lanbeat_shuttle))]
pub(crate) use shuttle::sync::{Mutex, MutexGuard};
#[cfg(not(all(test, lanbeat_shuttle)))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};
#[cfg(not(all(test, lanbeat_shuttle)))]
pub(crate) use std::sync::{Mutex, MutexGuard};
