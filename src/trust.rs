//! Who may hold a session with this node, once the Noise handshake proved
//! who they are: anyone (open membership), a fixed set of ids, or whoever
//! the application accepts when it first meets them (trust on first use,
//! pairing). The check runs when a handshake completes, before the
//! application hears of the session.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::peer::PeerId;

/// What the application is asked about a peer it has not decided on (see
/// [`Trust::Decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TrustRequest {
    /// The peer's id, proven by its key.
    pub id: PeerId,
    /// The peer's static public key, proven in the handshake.
    pub public_key: [u8; 32],
    /// The key's fingerprint, for people to compare
    /// ([`identity::fingerprint`](crate::identity::fingerprint)).
    pub fingerprint: String,
    /// The name the peer gave (not proven: anyone may choose any name).
    pub name: String,
    /// Where the connection comes from.
    pub addr: SocketAddr,
}

/// The application's decision on a [`TrustRequest`]: `true` lets the
/// session up. Called on the node's task: it must return at once (look the
/// id up in the application's store; ask the user elsewhere and refuse
/// for now: a refusal is remembered for a minute, then the peer is asked
/// about again).
pub type TrustFn = Arc<dyn Fn(&TrustRequest) -> bool + Send + Sync>;

/// Which proven peers may hold a session. Needs Noise sessions: in insecure
/// plaintext mode an id proves nothing.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Trust {
    /// Any node of the service, under the id its key proves (the default).
    #[default]
    Any,
    /// Only these ids; others are not dialed and their connections are
    /// refused after the handshake.
    Only(BTreeSet<PeerId>),
    /// The application decides per peer, when it completes a handshake.
    Decide(TrustFn),
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Any => f.write_str("Any"),
            Trust::Only(ids) => f.debug_tuple("Only").field(ids).finish(),
            Trust::Decide(_) => f.write_str("Decide(..)"),
        }
    }
}

/// How long a refused peer is refused without asking again.
const REMEMBER_REFUSAL: Duration = Duration::from_secs(60);
/// Most refusals remembered.
const MAX_REFUSALS: usize = 1024;

/// The node's side of [`Trust`]: the policy, and the refusals it remembers
/// so that an untrusted peer is not dialed (nor the application asked)
/// again and again.
pub(crate) struct Gate {
    trust: Trust,
    refused: HashMap<PeerId, Instant>,
}

impl Gate {
    pub(crate) fn new(trust: Trust) -> Gate {
        Gate {
            trust,
            refused: HashMap::new(),
        }
    }

    /// Whether dialing `id` may lead to a session (before its key is
    /// known).
    pub(crate) fn may_dial(&mut self, now: Instant, id: PeerId) -> bool {
        match &self.trust {
            Trust::Any => true,
            Trust::Only(ids) => ids.contains(&id),
            Trust::Decide(_) => !self.recently_refused(now, id),
        }
    }

    fn recently_refused(&mut self, now: Instant, id: PeerId) -> bool {
        match self.refused.get(&id) {
            Some(t) if now.duration_since(*t) < REMEMBER_REFUSAL => true,
            Some(_) => {
                self.refused.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Whether the peer that proved `request.public_key` may have its
    /// session.
    pub(crate) fn admits(&mut self, now: Instant, request: &TrustRequest) -> bool {
        let refused = self.recently_refused(now, request.id);
        let ok = match &self.trust {
            Trust::Any => true,
            Trust::Only(ids) => ids.contains(&request.id),
            Trust::Decide(decide) => !refused && decide(request),
        };
        if !ok && !refused && matches!(self.trust, Trust::Decide(_)) {
            if self.refused.len() >= MAX_REFUSALS {
                self.refused
                    .retain(|_, t| now.duration_since(*t) < REMEMBER_REFUSAL);
            }
            if self.refused.len() < MAX_REFUSALS {
                self.refused.insert(request.id, now);
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn request(id: u64) -> TrustRequest {
        TrustRequest {
            id: PeerId::from_u64(id),
            public_key: [id as u8; 32],
            fingerprint: String::new(),
            name: "n".into(),
            addr: "10.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn only_the_listed_ids_are_dialed_and_admitted() {
        let now = Instant::now();
        let mut g = Gate::new(Trust::Only([PeerId::from_u64(1)].into()));
        assert!(g.may_dial(now, PeerId::from_u64(1)));
        assert!(!g.may_dial(now, PeerId::from_u64(2)));
        assert!(g.admits(now, &request(1)));
        assert!(!g.admits(now, &request(2)));
        let mut any = Gate::new(Trust::Any);
        assert!(any.may_dial(now, PeerId::from_u64(2)) && any.admits(now, &request(2)));
    }

    #[test]
    fn a_refusal_is_remembered_for_a_minute_then_asked_again() {
        let now = Instant::now();
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let mut g = Gate::new(Trust::Decide(Arc::new(move |r: &TrustRequest| {
            counter.fetch_add(1, Ordering::Relaxed);
            r.id == PeerId::from_u64(1)
        })));
        assert!(g.admits(now, &request(1)));
        assert!(!g.admits(now, &request(2)));
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        // Refused: not dialed, not asked about again within the minute.
        assert!(!g.may_dial(now + Duration::from_secs(59), PeerId::from_u64(2)));
        assert!(!g.admits(now + Duration::from_secs(59), &request(2)));
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        // After it: asked again.
        let later = now + Duration::from_secs(61);
        assert!(g.may_dial(later, PeerId::from_u64(2)));
        assert!(!g.admits(later, &request(2)));
        assert_eq!(asked.load(Ordering::Relaxed), 3);
        // The ones it accepted are dialed.
        assert!(g.may_dial(later, PeerId::from_u64(1)));
    }
}
