//! Entering new peers into the table, and making room in a full one (the
//! rate of new ids is limited before this, in `discovery::admission`).

use std::time::Instant;

use super::{Discovery, DiscoveryEvent, Dropped, Entry, SessionState};
use crate::peer::PeerInfo;

impl Discovery {
    /// Enters a new peer into the table (making room if it is full: see
    /// [`Discovery::make_room`]) and schedules a dial if we dial it.
    pub(super) fn admit(
        &mut self,
        now: Instant,
        info: PeerInfo,
        verified: bool,
    ) -> Result<(), Dropped> {
        if self.peers.len() >= self.cfg.max_peers && !self.make_room() {
            return Err(Dropped::TableFull);
        }
        let id = info.id;
        let we_dial = self.we_dial(&info);
        self.unconnected.insert(id);
        self.changed.push(id);
        let mut e = Entry::new(
            info.clone(),
            now,
            SessionState::None,
            self.cfg.redial_initial,
        );
        e.next_dial = we_dial.then_some(now);
        e.verified = verified;
        self.peers.insert(id, e);
        self.events.push_back(DiscoveryEvent::Discovered(info));
        Ok(())
    }

    /// Forgets the peer least worth keeping, to make room for a new one:
    /// one heard only once, without a session or dial, the longest ago
    /// (then one heard twice). Peers with a session or a dial under way
    /// are never dropped. Returns whether room was made.
    fn make_room(&mut self) -> bool {
        let victim = self
            .unconnected
            .iter()
            .filter_map(|id| self.peers.get(id).map(|e| (id, e)))
            .filter(|(_, e)| e.session == SessionState::None)
            .min_by_key(|(_, e)| (e.verified, e.last_heard))
            .map(|(id, _)| *id);
        let Some(id) = victim else {
            return false;
        };
        self.forget(id);
        self.changed.push(id);
        self.events.push_back(DiscoveryEvent::Lost(id));
        true
    }
}
