//! What runs once per connection, as futures of their own (boxed by the
//! task, so that they take no room in an idle session's memory): the dial,
//! the wait for the supervisor's approval of a handshake, and the end (the
//! goodbye, the last events, the report to the supervisor).

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::connection::Connection;
use super::outbox::Outbox;
use super::stream::Stream;
use super::supervision::{Approval, ConnectFuture, ConnectionParams, Report};
use crate::event::{DownReason, Event};
use crate::peer::PeerId;
use crate::queue::Queue;
use crate::stats::Counters;
use crate::wire::frame::Hello;

/// How long a closing session may spend flushing its goodbye.
const GOODBYE_FLUSH: Duration = Duration::from_millis(500);

/// Connects to `addr`, giving up after `timeout`.
pub(crate) fn connect(addr: SocketAddr, timeout: Duration) -> ConnectFuture {
    Box::pin(async move {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    })
}

/// Asks the supervisor to approve a completed handshake; once it did, the
/// application learns that the session is up.
pub(super) fn approve(
    params: &ConnectionParams,
    hello: Box<Hello>,
    events: Arc<Queue<VecDeque<Event>>>,
) -> impl Future<Output = Result<PeerId, DownReason>> + Send + 'static {
    let (tx, rx) = oneshot::channel();
    let (peer, addr, outbound) = (hello.id, params.addr, params.outbound);
    let (name, role) = (hello.name.clone(), hello.role);
    let report = Report::Handshaken {
        conn: params.id,
        hello,
        addr,
        key: params.proven_key,
        approve: tx,
    };
    let sent = params.reports.send(report).is_ok();
    async move {
        if !sent {
            return Err(DownReason::Shutdown);
        }
        match rx.await {
            Ok(Approval::Accept { metadata }) => {
                info!(%peer, %addr, "session up");
                let up = Event::SessionUp {
                    peer,
                    name,
                    addr,
                    outbound,
                    role,
                    metadata: Box::new(metadata),
                };
                let _ = events.push(up).await;
                Ok(peer)
            }
            Ok(Approval::Reject(v)) => Err(DownReason::ProtocolError(v)),
            Ok(Approval::Shutdown) | Err(_) => Err(DownReason::Shutdown),
        }
    }
}

impl Connection {
    /// The end of the connection, once the loop is over: what it must do
    /// at once (the counters, the outbox closed to senders), and the rest
    /// as a future: the goodbye flushed (briefly: the peer learns at once
    /// instead of by timeout), the messages already received delivered,
    /// then `SessionDown` and what was not delivered, and the report to the
    /// supervisor.
    pub(super) fn end(
        &mut self,
        stream: Option<Stream>,
        reason: DownReason,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.node.timer.set(&self.mailbox, None);
        if let (Some(link), Some(d)) = (self.link.take(), &self.node.datagrams) {
            d.links.remove(&link);
        }
        let (mut wbuf, pending) = match self.bufs.take() {
            Some(b) => (b.wbuf, b.pending),
            None => Default::default(),
        };
        while let Some(f) = self.session.poll_transmit() {
            f.encode(&mut wbuf);
        }
        let flush = matches!(
            reason,
            DownReason::Shutdown | DownReason::Replaced | DownReason::PeerRestarted
        ) && !wbuf.is_empty();
        let peer = self.peer;
        let counters = &self.node.counters;
        match &reason {
            DownReason::HeartbeatTimeout => Counters::bump(&counters.heartbeat_timeouts),
            DownReason::WriteTimeout => Counters::bump(&counters.write_timeouts),
            DownReason::StreamStalled => Counters::bump(&counters.stream_stalls),
            DownReason::ProtocolError(_) if peer.is_some() => {
                Counters::bump(&counters.protocol_errors)
            }
            DownReason::HandshakeTimeout => Counters::bump(&counters.handshake_timeouts),
            DownReason::Shutdown => {}
            _ if peer.is_none() => Counters::bump(&counters.handshake_failures),
            _ => {}
        }
        // Messages already received (and maybe acknowledged) are delivered;
        // those sent and not acknowledged, or never sent, are handed back.
        // Written and not acknowledged: fate unknown. Never written: not
        // delivered.
        let (mut unconfirmed, mut undelivered) = (Vec::new(), Vec::new());
        if peer.is_some() {
            let (written, unwritten);
            (unconfirmed, written) = self.session.take_unacked_parts();
            (undelivered, unwritten) = self
                .mailbox
                .outbox()
                .close_and_take_with(Outbox::take_parts);
            let requests = &self.node.requests;
            requests.session_ended(self.params.id, &written, &unwritten, counters);
            Counters::add(&counters.messages_unconfirmed, unconfirmed.len() as u64);
            Counters::add(&counters.messages_undelivered, undelivered.len() as u64);
        }
        let events = self.node.events.clone();
        let (reports, conn) = (self.params.reports.clone(), self.params.id);
        async move {
            if let Some(stream) = &stream
                && matches!(
                    reason,
                    DownReason::HeartbeatTimeout
                        | DownReason::WriteTimeout
                        | DownReason::StreamStalled
                )
            {
                // The peer may hear us while we cannot hear it: a reset
                // reaches it at once, a FIN would wait behind what it never
                // acknowledged.
                stream.reset_on_drop();
            } else if let Some(mut stream) = stream {
                if flush {
                    let _ = tokio::time::timeout(GOODBYE_FLUSH, stream.write_all(&wbuf)).await;
                }
                let _ = tokio::time::timeout(GOODBYE_FLUSH, stream.shutdown()).await;
            }
            match peer {
                None => debug!(%reason, "connection ended before its session was up"),
                Some(p) => {
                    info!(
                        peer = %p,
                        %reason,
                        unconfirmed = unconfirmed.len(),
                        undelivered = undelivered.len(),
                        "session down"
                    );
                    for e in pending {
                        let _ = events.push(e).await;
                    }
                    let down = Event::SessionDown {
                        peer: p,
                        reason: reason.clone(),
                    };
                    let _ = events.push(down).await;
                    if !unconfirmed.is_empty() {
                        let messages = unconfirmed;
                        let _ = events.push(Event::Unconfirmed { peer: p, messages }).await;
                    }
                    if !undelivered.is_empty() {
                        let messages = undelivered;
                        let _ = events.push(Event::Undelivered { peer: p, messages }).await;
                    }
                }
            }
            let _ = reports.send(Report::Ended { conn, peer, reason });
        }
    }
}
