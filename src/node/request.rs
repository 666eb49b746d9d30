//! Requests and replies: [`Node::request`] sends a request frame and
//! waits for the reply frame with its id; the peer's application gets an
//! [`Event::Request`] and answers with [`Node::reply`].
//!
//! Both travel in the session's outbox, in order with the messages and
//! under the same limits: a full outbox makes them wait, a session's end
//! settles them (see `session::requests`).

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::handle::Node;
use super::sender::too_large;
use crate::error::Error;
#[cfg(doc)]
use crate::event::Event;
use crate::event::ReplyTo;
use crate::peer::PeerId;
use crate::session::outbox::Outbox;
use crate::session::requests::{Unanswered, Waiting};
use crate::wire::frame::{DATA_OVERHEAD, EXCHANGE_OVERHEAD, reply_frame, request_frame};

/// What a request or reply adds to a message: its 8-byte id.
const ID_LEN: usize = EXCHANGE_OVERHEAD - DATA_OVERHEAD;

impl Node {
    /// Sends `body` to `peer` as a request and waits, at most `timeout`, for
    /// its reply (the peer's application answers the [`Event::Request`] it
    /// gets with [`Node::reply`]).
    ///
    /// The request goes in order with the messages sent to the peer and,
    /// like them, waits while the outbox is full (within the timeout).
    /// Replies do not go through the event stream: a reply completes this
    /// future as soon as its frame is read.
    ///
    /// # Errors
    /// What the application may conclude from each:
    /// - [`Error::RequestNotSent`] (the body handed back) and
    ///   [`Error::NotConnected`] (no session when called): certainly not
    ///   processed.
    /// - [`Error::RequestLost`]: the session ended after the request was
    ///   written: it may have been processed.
    /// - [`Error::RequestTimedOut`]: no reply in time: it may have been
    ///   processed, or be processed later.
    /// - [`Error::MessageTooLarge`] when the body and its 8-byte id do not
    ///   fit our or the peer's frame limit (the limit named is the largest
    ///   body), [`Error::Shutdown`] once the node shut down.
    ///
    /// # Cancel safety
    /// Dropped before it completes, the request was either not queued
    /// (still waiting for room: then it is never sent) or is sent and its
    /// reply, when it comes, is dropped (counted in
    /// [`Stats::replies_unmatched`](crate::Stats::replies_unmatched)).
    pub async fn request(
        &self,
        peer: PeerId,
        body: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let (body, mailbox, conn) = self.exchange_session(peer, None, body.into())?;
        let deadline = tokio::time::Instant::now() + timeout.min(FAR);
        let requests = &self.inner.shared.requests;
        let (id, reply) = requests.register(peer, conn);
        // Whatever happens from here, the table forgets the request.
        let _waiting = Waiting { requests, id };
        let queued = mailbox
            .outbox()
            .push_with(request_frame(id, &body), Outbox::push_exchange);
        match tokio::time::timeout_at(deadline, queued).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                return Err(Error::RequestNotSent {
                    peer,
                    request: body,
                });
            }
        }
        drop(mailbox);
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(Unanswered::NotSent))) => Err(Error::RequestNotSent {
                peer,
                request: body,
            }),
            // The table drops a waiting request only when the node is gone.
            Ok(Ok(Err(Unanswered::Lost)) | Err(_)) => Err(Error::RequestLost { peer }),
            Err(_) => Err(Error::RequestTimedOut { peer, timeout }),
        }
    }

    /// Sends `value` as a JSON request and decodes the reply as `R`; see
    /// [`Node::request`].
    ///
    /// # Errors
    /// As [`Node::request`], plus [`Error::Json`] when `value` does not
    /// encode or the reply does not decode as `R`.
    ///
    /// # Cancel safety
    /// As [`Node::request`].
    pub async fn request_json<Q: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        peer: PeerId,
        value: &Q,
        timeout: Duration,
    ) -> Result<R, Error> {
        let reply = self
            .request(peer, serde_json::to_vec(value)?, timeout)
            .await?;
        Ok(serde_json::from_slice(&reply)?)
    }

    /// Answers a request (from [`Event::Request`]) with `body`, waiting
    /// while the outbox is full. Only the first reply to a request counts;
    /// the requester drops any later one.
    ///
    /// A reply the peer had not acknowledged when the session ended is not
    /// handed back: the requester was told its request was lost (counted
    /// in [`Stats::replies_unconfirmed`](crate::Stats::replies_unconfirmed)).
    ///
    /// # Errors
    /// [`Error::NotConnected`] (the body handed back) when the session the
    /// request came on has ended (even if a new one with the peer is up:
    /// the requester has already been told), [`Error::MessageTooLarge`]
    /// when the body and its 8-byte id do not fit the frame limits,
    /// [`Error::Shutdown`] once the node shut down.
    ///
    /// # Cancel safety
    /// As [`Node::send`]: the reply is queued only when the future returns
    /// `Ok`.
    pub async fn reply(&self, to: &ReplyTo, body: impl Into<Bytes>) -> Result<(), Error> {
        let peer = to.peer;
        let (body, mailbox, _) = self.exchange_session(peer, Some(to.conn), body.into())?;
        let frame = reply_frame(to.id, &body);
        match mailbox
            .outbox()
            .push_with(frame, Outbox::push_exchange)
            .await
        {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::NotConnected {
                peer,
                message: body,
            }),
        }
    }

    /// Answers a request with `value` as JSON; see [`Node::reply`].
    ///
    /// # Errors
    /// As [`Node::reply`], plus [`Error::Json`].
    ///
    /// # Cancel safety
    /// As [`Node::reply`].
    pub async fn reply_json<T: Serialize + ?Sized>(
        &self,
        to: &ReplyTo,
        value: &T,
    ) -> Result<(), Error> {
        self.reply(to, serde_json::to_vec(value)?).await
    }
}

impl Node {
    /// The mailbox and connection number of `peer`'s session (of
    /// connection `conn`, if given) for a request or reply carrying
    /// `body`, checked: the node runs, a session is up, the body and its
    /// id fit both frame limits.
    fn exchange_session(
        &self,
        peer: PeerId,
        conn: Option<u64>,
        body: Bytes,
    ) -> Result<(Bytes, std::sync::Arc<crate::session::mailbox::Mailbox>, u64), Error> {
        let body = self.check_size(body)?;
        let session = self.inner.shared.session(peer);
        let Some((mailbox, limit, conn)) = session.filter(|s| conn.is_none_or(|c| c == s.2)) else {
            return Err(Error::NotConnected {
                peer,
                message: body,
            });
        };
        let limit = limit.min(self.inner.max_message).saturating_sub(ID_LEN);
        if body.len() > limit {
            return Err(too_large(body.len(), limit));
        }
        Ok((body, mailbox, conn))
    }
}

/// The longest timeout taken as given (about 30 years); longer ones are
/// cut to it, so that the deadline cannot overflow.
const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
