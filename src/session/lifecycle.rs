//! What runs once per connection, as futures of their own (boxed by the
//! task, so that they take no room in an idle session's memory): the dial,
//! the wait for the supervisor's approval of a handshake, and the end (the
//! goodbye, the last events, the report to the supervisor).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::connection::Connection;
use super::resume::{self, Suspended};
use super::stream::Stream;
use super::supervision::{Approval, ConnectFuture, ConnectionParams, Report, Terms};
use crate::event::{DownReason, Event};
use crate::node::EventQueue;
use crate::peer::PeerId;
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

/// A handshake the supervisor approved.
pub(super) struct Approved {
    pub(super) peer: PeerId,
    /// The peer's instance and its grace.
    pub(super) instance: u64,
    pub(super) grace: Duration,
    pub(super) terms: Box<Terms>,
}

/// Asks the supervisor to approve a completed handshake; once it did, the
/// application learns that the session is up (after what an earlier held
/// session handed back, if the approval says so).
pub(super) fn approve(
    params: &ConnectionParams,
    hello: Box<Hello>,
    events: Arc<EventQueue>,
) -> impl Future<Output = Result<Approved, DownReason>> + Send + 'static {
    let (tx, rx) = oneshot::channel();
    let (peer, addr, outbound) = (hello.id, params.addr, params.outbound);
    let (name, role) = (hello.name.clone(), hello.role);
    let (instance, grace) = (hello.instance, Duration::from_millis(hello.grace_ms));
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
            Ok(Approval::Accept {
                metadata,
                mut terms,
            }) => {
                let resumed = terms.resume.is_some();
                info!(%peer, %addr, resumed, "session up");
                for e in std::mem::take(&mut terms.handed_back) {
                    let _ = events.push(e).await;
                }
                let up = Event::SessionUp {
                    peer,
                    name,
                    addr,
                    outbound,
                    role,
                    metadata: Box::new(metadata),
                    resumed,
                };
                let _ = events.push(up).await;
                Ok(Approved {
                    peer,
                    instance,
                    grace,
                    terms,
                })
            }
            Ok(Approval::Reject(v)) => Err(DownReason::ProtocolError(v)),
            Ok(Approval::Shutdown) | Err(_) => Err(DownReason::Shutdown),
        }
    }
}

impl Connection {
    /// The supervisor approved the session: the acceptor sends its hello
    /// (it says whether the session resumes); a resumed session takes over
    /// the held one's mailbox and writes first what the peer had not
    /// received of it.
    pub(super) fn approved(&mut self, cx: &mut std::task::Context<'_>, a: Approved) {
        let now = crate::clock::now();
        self.peer = Some(a.peer);
        let Terms { token, resume, .. } = *a.terms;
        let params = &mut self.params;
        params.token = token;
        params.peer_instance = a.instance;
        params.grace = a.grace.min(params.session.resume_grace);
        let Some((held, peer_received)) = resume else {
            // An acceptor whose hello went out already (the dialer offered
            // no resumption) keeps the token it named.
            self.session.send_hello(now, token, 0);
            if !params.outbound {
                params.token = self.session.hello_token();
            }
            return;
        };
        let Suspended {
            lineage,
            held,
            mailbox,
            ..
        } = *held;
        self.session.send_hello(now, token, held.received);
        params.lineage = lineage;
        // The held session's mailbox, with what senders queued meanwhile,
        // is this connection's from now on; the one it started with is
        // dropped.
        self.node.timer.set(&self.mailbox, None);
        self.mailbox = mailbox;
        self.mailbox.reopen();
        self.mailbox.outbox().register(cx.waker());
        let Some(resent) = self.session.resume(now, held, peer_received) else {
            Counters::bump(&self.node.counters.resumptions_refused);
            return;
        };
        // The hellos and the ping go first, then what is sent again.
        let mut wbuf = std::mem::take(&mut self.bufs().wbuf);
        while let Some(f) = self.session.poll_transmit() {
            f.encode(&mut wbuf);
        }
        for piece in self.session.unacked_pieces() {
            piece.encode(&mut wbuf);
        }
        self.bufs().wbuf = wbuf;
        self.last_write = now;
        let counters = &self.node.counters;
        Counters::bump(&counters.sessions_resumed);
        Counters::add(&counters.messages_resent, resent as u64);
        Counters::add(&counters.messages_sent, resent as u64);
        info!(peer = %a.peer, resent, "session resumed");
    }

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
        // Messages already received (and maybe acknowledged) are delivered.
        // A cut session is held for the peer to resume it; otherwise what
        // was written and not acknowledged (fate unknown) and what was
        // never written (not delivered) are handed back.
        let (mut handed_back, mut held) = (Vec::new(), None);
        if let Some(p) = peer {
            let h = self.session.hold();
            let params = &self.params;
            if params.token != 0 && !params.grace.is_zero() && resume::resumable(&reason) {
                Counters::bump(&counters.sessions_suspended);
                held = Some(Box::new(Suspended {
                    token: params.token,
                    instance: params.peer_instance,
                    grace: params.grace,
                    lineage: params.lineage,
                    held: h,
                    mailbox: self.mailbox.clone(),
                    until: None,
                }));
            } else {
                let requests = &self.node.requests;
                handed_back = resume::hand_back(
                    p,
                    params.lineage,
                    h.unacked,
                    &self.mailbox,
                    requests,
                    counters,
                );
            }
        }
        let (requests, counters) = (self.node.requests.clone(), self.node.counters.clone());
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
                    let (unconfirmed, undelivered) = resume::counts(&handed_back);
                    info!(
                        peer = %p,
                        %reason,
                        held = held.is_some(),
                        unconfirmed,
                        undelivered,
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
                    for e in handed_back {
                        let _ = events.push(e).await;
                    }
                }
            }
            let report = Report::Ended {
                conn,
                peer,
                reason,
                held,
            };
            // A node that is gone takes nothing to hold: hand it back.
            if let Err(e) = reports.send(report)
                && let Report::Ended {
                    peer: Some(p),
                    held: Some(h),
                    ..
                } = e.0
            {
                for e in h.hand_back(p, &requests, &counters) {
                    let _ = events.push(e).await;
                }
            }
        }
    }
}
