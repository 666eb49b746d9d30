//! What a session's outbox keeps its messages in.
//!
//! A stream of small messages is where per-message work shows: each one
//! used to be queued, taken, encoded into the write buffer and kept for
//! acknowledgement one by one. Here a small message is encoded the moment it
//! is sent, appended to a run of frames that then moves to the socket and is
//! kept until acknowledged as one piece. Large messages stay as the
//! application gave them (no copy before the write buffer).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::queue::Store;
use crate::wire::frame::{self, DATA_OVERHEAD, Outgoing};

/// Messages up to this size are encoded when sent; larger ones are not.
const SMALL: usize = 1024;
/// A run of small messages is closed at this size (half the write
/// high-water mark).
const RUN: usize = 16 * 1024;

/// The store behind a session's outbox.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Closed runs and large messages, oldest first.
    sealed: VecDeque<Outgoing>,
    /// The newest run of small messages, still growing.
    open: BytesMut,
    open_count: usize,
    /// Messages held.
    len: usize,
    /// Size of the last run: the next one starts with that much room, so
    /// that a stream does not regrow its buffer for every run and an idle
    /// session's occasional message does not get 16 KiB.
    hint: usize,
}

impl Outbox {
    /// Closes the open run.
    fn seal(&mut self) {
        if self.open_count > 0 {
            self.hint = self.open.len().min(RUN);
            self.sealed.push_back(Outgoing::Frames {
                wire: std::mem::take(&mut self.open).freeze(),
                count: std::mem::take(&mut self.open_count),
            });
        }
    }

    /// Encodes a small message into the open run.
    fn append(&mut self, message: &[u8]) {
        if self.open.capacity() == 0 {
            self.open
                .reserve(self.hint.max(2 * (DATA_OVERHEAD + message.len())));
        }
        frame::encode_data(message, &mut self.open);
        self.open_count += 1;
        if self.open.len() >= RUN {
            self.seal();
        }
    }

    /// Takes up to `max` messages and `bytes` on the wire (at least one
    /// message), oldest first, in one piece: a run carrying more is split.
    pub(crate) fn pop(&mut self, max: usize, bytes: usize) -> Option<Outgoing> {
        if max == 0 {
            return None;
        }
        if self.sealed.is_empty() {
            self.seal();
        }
        let front = self.sealed.front_mut()?;
        let max = max.min(front.count_within(bytes));
        let out = if front.count() > max {
            front.split_to(max)
        } else {
            self.sealed.pop_front()?
        };
        self.len -= out.count();
        Some(out)
    }

    /// Gives back the memory of an empty queue (an idle session holds
    /// none); the session calls it once it is idle, not per message.
    pub(crate) fn release_idle(&mut self) {
        if self.len == 0 {
            self.sealed = VecDeque::new();
        }
    }
}

impl Outbox {
    /// Queues an encoded request or reply frame, in order with the
    /// messages (see [`frame::request_frame`]).
    pub(crate) fn push_exchange(&mut self, frame: Bytes) {
        self.len += 1;
        self.seal();
        self.sealed.push_back(Outgoing::Exchange(frame));
    }

    /// Takes everything, oldest first: the messages, and apart the
    /// encoded request and reply frames.
    pub(crate) fn take_parts(&mut self) -> (Vec<Bytes>, Vec<Bytes>) {
        self.seal();
        let (mut out, mut exchanges) = (Vec::with_capacity(self.len), Vec::new());
        for o in self.sealed.drain(..) {
            o.into_messages(&mut out, &mut exchanges);
        }
        self.len = 0;
        (out, exchanges)
    }
}

impl Store for Outbox {
    type Item = Bytes;

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, message: Bytes) {
        self.len += 1;
        if message.len() > SMALL {
            self.seal();
            self.sealed.push_back(Outgoing::Message(message));
            return;
        }
        if self.open_count == 0 {
            // A lone small message stays as it is (a request/response
            // session gains nothing from encoding it here, and a run would
            // cost it an allocation); the second in a row starts a run.
            match self.sealed.back() {
                Some(Outgoing::Message(last)) if last.len() <= SMALL => {}
                _ => {
                    self.sealed.push_back(Outgoing::Message(message));
                    return;
                }
            }
            if let Some(Outgoing::Message(last)) = self.sealed.pop_back() {
                self.append(&last);
            }
        }
        self.append(&message);
    }

    /// The messages only: a session takes its outbox with
    /// [`Outbox::take_parts`], which keeps the requests and replies too.
    #[cfg(test)]
    fn take_all(&mut self) -> Vec<Bytes> {
        self.take_parts().0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::frame::Frame;

    /// The frames `out` puts on the wire, decoded.
    fn on_the_wire(out: &Outgoing) -> Vec<Bytes> {
        let mut wire = BytesMut::new();
        out.encode(&mut wire);
        assert_eq!(wire.len(), out.wire_len());
        let mut got = Vec::new();
        while let Some(f) = Frame::decode(&mut wire, 1 << 20).unwrap() {
            let Frame::Data(m) = f else { panic!("{f:?}") };
            got.push(m);
        }
        assert!(wire.is_empty());
        got
    }

    #[test]
    fn small_messages_share_runs_and_large_ones_keep_their_place() {
        let mut o = Outbox::default();
        let big = Bytes::from(vec![9u8; SMALL + 1]);
        for m in [&b"a"[..], b"bc", &big, b"d"] {
            o.push(Bytes::copy_from_slice(m));
        }
        assert_eq!(o.len(), 4);
        let first = o.pop(10, usize::MAX).unwrap();
        assert!(matches!(first, Outgoing::Frames { count: 2, .. }));
        assert_eq!(on_the_wire(&first), ["a", "bc"]);
        assert_eq!(o.pop(10, usize::MAX), Some(Outgoing::Message(big)));
        assert_eq!(o.pop(0, usize::MAX), None, "nothing when nothing may go");
        // A lone small message is not copied.
        assert_eq!(o.pop(10, usize::MAX), Some(Outgoing::Message("d".into())));
        assert_eq!((o.len(), o.pop(10, usize::MAX)), (0, None));
        // The queue's memory stays until the session is idle, then goes.
        assert_eq!(o.open.capacity(), 0);
        assert!(o.sealed.capacity() > 0);
        o.release_idle();
        assert_eq!(o.sealed.capacity(), 0);
    }

    proptest! {
        /// Whatever goes in comes out once, in order, on the wire and when
        /// handed back, in pieces of no more than asked for.
        #[test]
        fn every_message_comes_out_once_in_order(
            ops in proptest::collection::vec((0usize..1500, 0usize..300), 1..300),
            split in 0usize..8,
        ) {
            let mut o = Outbox::default();
            let (mut sent, mut wire, mut back) = (Vec::new(), Vec::new(), Vec::new());
            for (i, (size, take)) in ops.into_iter().enumerate() {
                // Mostly small messages, some of them large.
                let size = if size % 7 == 0 { size } else { size % 80 };
                let m = Bytes::from(vec![i as u8; size]);
                o.push(m.clone());
                sent.push(m);
                // Now and then the session takes up to `take / 10` messages and
                // `take * 7` bytes.
                if take % 3 == 0 {
                    let (max, bytes) = (take / 10, take * 7);
                    while let Some(mut out) = o.pop(max, bytes) {
                        prop_assert!(out.count() >= 1 && out.count() <= max);
                        // Within the bytes, unless it is one message.
                        prop_assert!(out.wire_len() <= bytes || out.count() == 1);
                        wire.extend(on_the_wire(&out));
                        let head = out.split_to(split);
                        head.into_messages(&mut back, &mut Vec::new());
                        out.into_messages(&mut back, &mut Vec::new());
                    }
                }
                prop_assert_eq!(o.len(), sent.len() - back.len());
            }
            back.extend(o.take_all());
            prop_assert_eq!(o.len(), 0);
            prop_assert_eq!(&wire[..], &sent[..wire.len()]);
            prop_assert_eq!(back, sent);
        }
    }
}
