//! Two live nodes with one id (a copied identity or configuration): how
//! discovery tells them from a restart, and holds the second one down.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Discovery, DiscoveryEvent};
use crate::peer::PeerId;

/// An id whose instance changes back to the one it had within this long is
/// held by two live nodes (a real restart never brings an instance back).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(60);
/// How long, once a duplicate id is detected, the other instance is
/// ignored: at most one session change per this period instead of one per
/// announce.
pub const DUPLICATE_HOLD: Duration = Duration::from_secs(60);

impl Discovery {
    /// Whether `instance` of `id`, heard from `addr`, is a second live
    /// instance to ignore. The entry's instance changing to another one and
    /// back within [`DUPLICATE_WINDOW`] means two nodes share the id: then
    /// [`DiscoveryEvent::Duplicate`] is reported, and for
    /// [`DUPLICATE_HOLD`] every other instance is ignored. A real restart
    /// (a new instance that stays) is not.
    ///
    /// The driver asks this for a handshake whose instance differs from
    /// the live session's too (and refuses it when true).
    pub fn duplicate_instance(
        &mut self,
        now: Instant,
        id: PeerId,
        instance: u64,
        addr: SocketAddr,
    ) -> bool {
        let Some(e) = self.peers.get_mut(&id) else {
            return false;
        };
        if e.info.instance == instance {
            return false;
        }
        if e.duplicate_until.is_some_and(|t| now < t) {
            return true;
        }
        if e.prev_instance
            .is_some_and(|(p, t)| p == instance && now < t + DUPLICATE_WINDOW)
        {
            e.duplicate_until = Some(now + DUPLICATE_HOLD);
            e.prev_instance = None;
            self.events.push_back(DiscoveryEvent::Duplicate {
                id,
                kept: e.info.addr,
                other: addr,
            });
            return true;
        }
        e.prev_instance = Some((e.info.instance, now));
        false
    }
}
