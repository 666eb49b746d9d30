//! Sending: [`PeerSender`], bound to one session, and the send future
//! that [`Node::send`](crate::Node::send) shares with it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::error::Error;
use crate::peer::PeerId;
use crate::queue::PushError;
use crate::session::mailbox::Mailbox;
#[cfg(doc)]
use crate::{Event, Node};

/// Sends to one peer over one session, without looking the peer up per
/// message: from [`Node::sender`].
///
/// It is bound to the session that was up when it was made. Once that
/// session ends, sends fail with [`Error::NotConnected`] (the message handed
/// back); after the next [`Event::SessionUp`] with the peer, ask
/// [`Node::sender`] for a new one. Delivery is as with [`Node::send`]:
/// in order, or handed back.
#[derive(Debug, Clone)]
pub struct PeerSender {
    pub(crate) peer: PeerId,
    pub(crate) mailbox: Arc<Mailbox>,
    /// The largest message the peer takes.
    pub(crate) max_message: usize,
}

impl PeerSender {
    /// The peer it sends to.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends `message`, waiting while the outbox is full; see
    /// [`Node::send`].
    ///
    /// # Errors
    /// As [`Node::send`]; [`Error::NotConnected`] once the session ended.
    ///
    /// # Cancel safety
    /// As [`Node::send`]: a message is accepted only when the future
    /// returns `Ok`.
    #[inline]
    pub fn send(
        &self,
        message: impl Into<Bytes>,
    ) -> impl Future<Output = Result<(), Error>> + Send + '_ {
        // Not an `async fn`, to keep the future small (see `Push`).
        Push::new(self.peer, &self.mailbox, self.max_message, message.into())
    }

    /// Queues every message of `batch`, in order, waiting for room as
    /// needed: one step per run of messages that fit rather than one per
    /// message (and no copying at all when the outbox is empty). For
    /// streams of small messages. Delivery is as with [`Node::send`].
    ///
    /// On success `batch` is empty. On an error the messages not queued are
    /// handed back: in `batch`, and the first of them in the error.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] for the first message over the limit
    /// (then nothing was queued); [`Error::NotConnected`] once the session
    /// ended.
    ///
    /// # Cancel safety
    /// Cancel-safe: what was queued before the future was dropped is
    /// queued (delivered or handed back as usual) and gone from `batch`;
    /// the rest is still in `batch`.
    pub async fn send_batch(&self, batch: &mut VecDeque<Bytes>) -> Result<(), Error> {
        if let Some(m) = batch.iter().find(|m| m.len() > self.max_message) {
            return Err(Error::MessageTooLarge {
                size: m.len(),
                limit: self.max_message,
            });
        }
        let outbox = self.mailbox.outbox();
        while outbox.push_many(batch) {
            if outbox.is_closed() {
                let message = batch.pop_front().unwrap_or_default();
                return Err(Error::NotConnected {
                    peer: self.peer,
                    message,
                });
            }
            outbox.room().await;
        }
        Ok(())
    }

    /// Like [`PeerSender::send`], but fails at once when the outbox is full.
    ///
    /// # Errors
    /// As [`Node::try_send`].
    pub fn try_send(&self, message: impl Into<Bytes>) -> Result<(), Error> {
        let message = check_size(message.into(), self.max_message)?;
        try_push_message(self.peer, &self.mailbox, message)
    }
}

/// `message`, if it is within `limit`.
#[inline]
pub(crate) fn check_size(message: Bytes, limit: usize) -> Result<Bytes, Error> {
    if message.len() > limit {
        return Err(too_large(message.len(), limit));
    }
    Ok(message)
}

#[cold]
pub(crate) fn too_large(size: usize, limit: usize) -> Error {
    Error::MessageTooLarge { size, limit }
}

/// Queues a message, waiting for room only when the outbox is full.
///
/// Written out rather than as an `async fn`: a stream of small messages
/// builds and moves one of these per message, so its size is copying per
/// message (the compiler's version was several times bigger). This one is
/// four words and a boxed wait, built only when the outbox is full.
pub(crate) struct Push<'a> {
    peer: PeerId,
    mailbox: &'a Mailbox,
    /// The largest message allowed.
    limit: usize,
    state: PushState<'a>,
}

impl<'a> Push<'a> {
    /// Sends `message` (if within `limit`) to `peer` through `mailbox`.
    pub(crate) fn new(peer: PeerId, mailbox: &'a Mailbox, limit: usize, message: Bytes) -> Self {
        Push {
            peer,
            mailbox,
            limit,
            state: PushState::New(message),
        }
    }
}

enum PushState<'a> {
    /// Not tried yet.
    New(Bytes),
    /// The outbox was full.
    Waiting(Pin<Box<dyn Future<Output = Result<(), Bytes>> + Send + 'a>>),
    Done,
}

impl Future for Push<'_> {
    type Output = Result<(), Error>;

    // Inlined into the caller's loop: the result then stays in registers
    // instead of going through memory (a 56-byte `Result` read back
    // right after it was written stalled the load).
    #[inline(always)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            match std::mem::replace(&mut this.state, PushState::Done) {
                PushState::New(message) if message.len() > this.limit => {
                    return Poll::Ready(Err(too_large(message.len(), this.limit)));
                }
                PushState::New(message) => match try_push_message(this.peer, this.mailbox, message)
                {
                    Err(Error::OutboxFull { message, .. }) => {
                        this.state =
                            PushState::Waiting(Box::pin(this.mailbox.outbox().push(message)));
                    }
                    done => return Poll::Ready(done),
                },
                PushState::Waiting(mut wait) => {
                    let Poll::Ready(done) = wait.as_mut().poll(cx) else {
                        this.state = PushState::Waiting(wait);
                        return Poll::Pending;
                    };
                    let peer = this.peer;
                    return Poll::Ready(
                        done.map_err(|message| Error::NotConnected { peer, message }),
                    );
                }
                // As with an `async fn`: polling a finished future is a bug
                // in the caller.
                PushState::Done => panic!("`Push` polled after completion"),
            }
        }
    }
}

/// Queues `message` for `peer` if its outbox has room.
#[inline]
pub(crate) fn try_push_message(
    peer: PeerId,
    mailbox: &Mailbox,
    message: Bytes,
) -> Result<(), Error> {
    mailbox.outbox().try_push(message).map_err(|e| match e {
        PushError::Full(message) => Error::OutboxFull { peer, message },
        PushError::Closed(message) => Error::NotConnected { peer, message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender to peer `id` over an outbox of `capacity`, taking messages
    /// up to `max_message` bytes.
    fn sender(id: u64, capacity: usize, max_message: usize) -> PeerSender {
        PeerSender {
            peer: PeerId::from_u64(id),
            mailbox: Arc::new(Mailbox::new(capacity)),
            max_message,
        }
    }

    /// A stream of small messages builds and moves one send future per
    /// message: it must stay a few words (see `Push`).
    #[test]
    fn the_send_future_stays_small() {
        let to = sender(1, 4, 10);
        let fut = to.send(Bytes::new());
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 64, "PeerSender::send future is {size} bytes");
    }

    #[tokio::test]
    async fn a_send_waits_for_room_and_hands_the_message_back_if_the_session_ends() {
        let to = sender(7, 1, 4);
        match to.send("12345").await {
            Err(Error::MessageTooLarge { size: 5, limit: 4 }) => {}
            other => panic!("{other:?}"),
        }
        to.send("a").await.unwrap();
        // Full: the next send waits until the session takes a message.
        let mut second = std::pin::pin!(to.send("b"));
        assert!(poll_once(second.as_mut()).await.is_pending());
        let mut taken = Vec::new();
        let take = |taken: &mut Vec<Bytes>| {
            let (out, _) = to.mailbox.outbox().consume(None, |b| b.pop(8, usize::MAX));
            out.expect("queued").into_messages(taken, &mut Vec::new());
        };
        take(&mut taken);
        second.await.unwrap();
        take(&mut taken);
        assert_eq!(taken, ["a", "b"]);
        // A send waiting when the session ends gets its message back.
        to.send("c").await.unwrap();
        let mut third = std::pin::pin!(to.send("d"));
        assert!(poll_once(third.as_mut()).await.is_pending());
        assert_eq!(to.mailbox.outbox().close_and_take(), ["c"]);
        match third.await {
            Err(Error::NotConnected { peer, message }) => {
                assert_eq!(peer, PeerId::from_u64(7));
                assert_eq!(message, "d");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A send dropped while it waits for room was never queued: the
    /// outbox holds only what completed (the documented cancel safety).
    #[tokio::test]
    async fn a_cancelled_send_queued_nothing() {
        let to = sender(8, 1, 16);
        to.send("kept").await.unwrap();
        {
            let mut waiting = std::pin::pin!(to.send("cancelled"));
            assert!(poll_once(waiting.as_mut()).await.is_pending());
        }
        let (out, _) = to.mailbox.outbox().consume(None, |b| b.pop(8, usize::MAX));
        let mut taken = Vec::new();
        out.expect("queued")
            .into_messages(&mut taken, &mut Vec::new());
        assert_eq!(taken, ["kept"]);
        assert!(
            to.mailbox.outbox().is_empty(),
            "the cancelled one never arrives"
        );
    }

    /// Polls `fut` once.
    async fn poll_once<F: Future + Unpin>(mut fut: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
    }
}
