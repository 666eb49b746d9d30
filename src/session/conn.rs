//! The tokio task of one TCP connection: it moves bytes between the socket
//! and the [`Session`] machine, between the outbox and the socket, and
//! between the machine and the application's event stream.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use super::machine::{Session, SessionConfig, SessionEvent};
use crate::clock;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::node::Shared;
use crate::peer::PeerId;
use crate::queue::Queue;
use crate::stats::Counters;
use crate::wire::frame::{self, Frame, Hello};

/// A session's outbox.
pub(crate) type Outbox = Queue<Bytes>;

/// Stop taking messages from the outbox while this much waits to be written.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// How long a closing session may spend flushing its goodbye.
const GOODBYE_FLUSH: Duration = Duration::from_millis(500);
/// Read buffer sizes: an idle session reads into a small buffer (a ping is
/// 13 bytes); one whose reads fill the buffer gets a bigger one next time.
const READ_MIN: usize = 256;
const READ_MAX: usize = 256 * 1024;
/// Messages decoded per batch before they are handed to the event queue.
const DELIVER_BATCH: usize = 1024;
/// The timer is moved later only when the deadline moved by more than this
/// (moving it on every frame costs more than one early wake-up).
const TIMER_SLACK: Duration = Duration::from_millis(20);

/// The supervisor's answer to a completed handshake.
#[derive(Debug)]
pub(crate) enum Approval {
    Accept { outbox: Arc<Outbox> },
    Reject(ProtocolViolation),
}

/// From a connection to the supervisor.
#[derive(Debug)]
pub(crate) enum Note {
    Handshaken {
        conn: u64,
        hello: Box<Hello>,
        addr: SocketAddr,
        approve: oneshot::Sender<Approval>,
    },
    Ended {
        conn: u64,
        /// The peer, if the session was up.
        peer: Option<PeerId>,
        reason: DownReason,
    },
}

/// Everything a connection task needs.
pub(crate) struct Conn {
    pub(crate) id: u64,
    pub(crate) session: Arc<SessionConfig>,
    pub(crate) expected: Option<PeerId>,
    pub(crate) outbound: bool,
    pub(crate) max_frame: u32,
    pub(crate) write_timeout: Duration,
    pub(crate) events: Arc<Queue<Event>>,
    pub(crate) notes: mpsc::UnboundedSender<Note>,
    /// The supervisor closes the session through this (say goodbye).
    pub(crate) ctrl: oneshot::Receiver<DownReason>,
    pub(crate) shared: Arc<Shared>,
}

/// TCP options derived from the heartbeat: no Nagle delay for heartbeats,
/// and kernel-level limits a little beyond our own timeout, so that our
/// heartbeat decides first and the kernel catches what it cannot see.
pub(crate) fn tune(stream: &TcpStream, interval: Duration, timeout: Duration) {
    let sock = SockRef::from(stream);
    let ka = TcpKeepalive::new()
        .with_time(timeout)
        .with_interval(interval);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let ka = ka.with_retries(3);
    let results = [
        sock.set_tcp_nodelay(true),
        sock.set_tcp_keepalive(&ka),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        sock.set_tcp_user_timeout(Some(timeout * 2)),
    ];
    for r in results {
        if let Err(e) = r {
            debug!(error = %e, "cannot set a TCP option");
        }
    }
}

impl Conn {
    /// Runs the connection to its end and reports the end to the supervisor.
    pub(crate) async fn run(mut self, stream: TcpStream, addr: SocketAddr) {
        let id = self.id;
        let notes = self.notes.clone();
        let (peer, reason) = self.drive(stream, addr).await;
        let _ = notes.send(Note::Ended {
            conn: id,
            peer,
            reason,
        });
    }

    async fn drive(&mut self, stream: TcpStream, addr: SocketAddr) -> (Option<PeerId>, DownReason) {
        let mut session = Session::new(clock::now(), self.session.clone(), self.expected);
        let (mut rd, mut wr) = stream.into_split();
        let mut rbuf = BytesMut::new();
        let mut read_size = READ_MIN;
        let mut wbuf = BytesMut::new();
        let mut outbox: Option<Arc<Outbox>> = None;
        let mut peer: Option<PeerId> = None;
        // Received messages the event queue has no room for yet. While any
        // wait, the task reads nothing more and the heartbeat timeout is
        // suspended (the silence is ours).
        let mut pending: VecDeque<Event> = VecDeque::new();
        let mut last_write = clock::now();
        let mut ctrl_open = true;
        // One timer for the whole life of the connection, moved as needed.
        let mut armed = clock::now() + Duration::from_secs(3600);
        let sleep = clock::sleep_until(armed);
        tokio::pin!(sleep);
        let reason = loop {
            // Frames already buffered are processed before reading more.
            if pending.is_empty() && !session.is_closed() {
                self.decode_buffered(&mut session, &mut rbuf, peer, &mut pending);
            }
            if !pending.is_empty() {
                let blocked = self.events.push_many(&mut pending);
                session.set_paused(clock::now(), blocked);
            }
            while let Some(f) = session.poll_transmit() {
                f.encode(&mut wbuf);
            }
            let mut closed = None;
            while let Some(ev) = session.poll_event() {
                match ev {
                    SessionEvent::Established(hello) => {
                        match Box::pin(self.approve(hello, addr)).await {
                            Ok((p, o)) => {
                                peer = Some(p);
                                outbox = Some(o);
                            }
                            Err(v) => session.close(DownReason::ProtocolError(v), false),
                        }
                    }
                    SessionEvent::Rtt(rtt) => {
                        if let Some(p) = peer {
                            self.shared.record_rtt(p, rtt);
                            // A sample is skipped (and counted), never
                            // waited for: the session must keep going.
                            if self.events.try_push(Event::Rtt { peer: p, rtt }).is_err() {
                                Counters::bump(&self.shared.counters.rtt_events_skipped);
                            }
                        }
                    }
                    SessionEvent::Closed(r) => closed = Some(r),
                }
            }
            if let Some(r) = closed {
                break r;
            }
            // Take messages from the outbox while the peer keeps up.
            if let Some(o) = outbox.as_ref() {
                let now = clock::now();
                let mut sent = 0;
                while session.can_send() && wbuf.len() < WRITE_HIGH_WATER {
                    // Stop as soon as the in-flight limits are reached.
                    let (n, _) = o.pop_while(64, |m| {
                        frame::encode_data(&m, &mut wbuf);
                        session.record_data_sent(now, m);
                        session.can_send()
                    });
                    sent += n as u64;
                    if n == 0 {
                        break;
                    }
                }
                Counters::add(&self.shared.counters.messages_sent, sent);
            }
            let stall = (!wbuf.is_empty()).then(|| last_write + self.write_timeout);
            let deadline = [session.poll_timeout(), stall]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(armed);
            // Move the timer when it must fire earlier, or much later; a
            // timer that fires a little early finds nothing due and is
            // re-armed.
            if deadline < armed || deadline > armed + TIMER_SLACK {
                armed = deadline;
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
            }
            let can_take = outbox.is_some() && session.can_send() && wbuf.len() < WRITE_HIGH_WATER;
            // An idle session holds no buffers: 10 000 of them must fit in
            // a few KiB each.
            if rbuf.is_empty() && read_size == READ_MIN && rbuf.capacity() > 0 {
                rbuf = BytesMut::new();
            }
            if wbuf.is_empty()
                && wbuf.capacity() > 0
                && (wbuf.capacity() <= 4096 || outbox.as_ref().is_none_or(|o| o.is_empty()))
            {
                wbuf = BytesMut::new();
            }
            tokio::select! {
                r = &mut self.ctrl, if ctrl_open => {
                    ctrl_open = false;
                    if let Ok(r) = r {
                        session.close(r, true);
                    }
                }
                r = async {
                    rd.readable().await?;
                    // The buffer is allocated only now that there is data.
                    if rbuf.capacity() - rbuf.len() < read_size / 2 {
                        rbuf.reserve(read_size);
                    }
                    rd.read_buf(&mut rbuf).await
                }, if pending.is_empty() => match r {
                    Ok(0) => session.handle_eof(),
                    Ok(n) => {
                        // Grow the buffer for a busy peer, shrink it back
                        // for an idle one.
                        if n >= read_size && read_size < READ_MAX {
                            read_size *= 2;
                        } else if n < READ_MIN && read_size > READ_MIN {
                            read_size = READ_MIN;
                            if rbuf.is_empty() {
                                rbuf = BytesMut::new();
                            }
                        }
                    }
                    Err(e) => session.handle_io_error(e.kind()),
                },
                () = self.events.room(), if !pending.is_empty() => {}
                w = wr.write_buf(&mut wbuf), if !wbuf.is_empty() => match w {
                    Ok(_) => last_write = clock::now(),
                    Err(e) => session.handle_io_error(e.kind()),
                },
                () = async { outbox.as_ref().expect("guarded").filled().await }, if can_take => {}
                () = &mut sleep => {
                    let now = clock::now();
                    if stall.is_some_and(|s| now >= s) && !wbuf.is_empty() {
                        session.close(DownReason::WriteTimeout, false);
                    } else if session.poll_timeout().is_some_and(|t| t <= now) {
                        session.handle_timeout(now);
                    }
                    // Re-armed at the top of the loop.
                    armed = now + Duration::from_secs(3600);
                    sleep.as_mut().reset(tokio::time::Instant::from_std(armed));
                }
            }
        };
        Box::pin(self.finish(session, reason, peer, pending, outbox, wr, wbuf)).await
    }

    /// Decodes complete frames from `rbuf` into the machine, collecting the
    /// messages they carry (up to a batch).
    fn decode_buffered(
        &self,
        session: &mut Session,
        rbuf: &mut BytesMut,
        peer: Option<PeerId>,
        pending: &mut VecDeque<Event>,
    ) {
        let now = clock::now();
        let mut received = 0;
        while pending.len() < DELIVER_BATCH {
            match Frame::decode(rbuf, self.max_frame) {
                Ok(Some(f)) => {
                    trace!(kind = f.kind(), "frame in");
                    let data = session.handle_frame(now, f);
                    // The machine accepts data only once established, and
                    // we stop below right after the handshake until the
                    // supervisor approves: `peer` is set whenever data comes.
                    if let (Some(data), Some(p)) = (data, peer) {
                        received += 1;
                        pending.push_back(Event::Message { peer: p, data });
                    }
                    if session.is_closed() || (peer.is_none() && session.is_established()) {
                        // Closed, or the handshake just completed: the
                        // frames after it wait for the approval.
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "rejected frame; closing session");
                    session.handle_decode_error(e);
                    break;
                }
            }
        }
        Counters::add(&self.shared.counters.messages_received, received);
    }

    async fn approve(
        &self,
        hello: Box<Hello>,
        addr: SocketAddr,
    ) -> Result<(PeerId, Arc<Outbox>), ProtocolViolation> {
        let (tx, rx) = oneshot::channel();
        let peer = hello.id;
        let name = hello.name.clone();
        let note = Note::Handshaken {
            conn: self.id,
            hello,
            addr,
            approve: tx,
        };
        if self.notes.send(note).is_err() {
            return Err(ProtocolViolation::Refused("node shutting down"));
        }
        match rx.await {
            Ok(Approval::Accept { outbox }) => {
                info!(%peer, %addr, "session up");
                let _ = self
                    .events
                    .push(Event::SessionUp {
                        peer,
                        name,
                        addr,
                        outbound: self.outbound,
                    })
                    .await;
                Ok((peer, outbox))
            }
            Ok(Approval::Reject(v)) => Err(v),
            Err(_) => Err(ProtocolViolation::Refused("node shutting down")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &mut self,
        mut session: Session,
        reason: DownReason,
        peer: Option<PeerId>,
        pending: VecDeque<Event>,
        outbox: Option<Arc<Outbox>>,
        mut wr: OwnedWriteHalf,
        mut wbuf: BytesMut,
    ) -> (Option<PeerId>, DownReason) {
        let shared = self.shared.clone();
        let counters = &shared.counters;
        // A goodbye (or anything else the machine queued) goes out first,
        // briefly: the peer learns at once instead of by timeout.
        while let Some(f) = session.poll_transmit() {
            f.encode(&mut wbuf);
        }
        if matches!(
            reason,
            DownReason::Shutdown | DownReason::Replaced | DownReason::PeerRestarted
        ) && !wbuf.is_empty()
        {
            let _ = tokio::time::timeout(GOODBYE_FLUSH, wr.write_all(&wbuf)).await;
        }
        let _ = tokio::time::timeout(GOODBYE_FLUSH, wr.shutdown()).await;
        drop(wr);
        match &reason {
            DownReason::HeartbeatTimeout => Counters::bump(&counters.heartbeat_timeouts),
            DownReason::WriteTimeout => Counters::bump(&counters.write_timeouts),
            DownReason::ProtocolError(_) if peer.is_some() => {
                Counters::bump(&counters.protocol_errors)
            }
            DownReason::HandshakeTimeout => Counters::bump(&counters.handshake_timeouts),
            _ if peer.is_none() => Counters::bump(&counters.handshake_failures),
            _ => {}
        }
        let Some(p) = peer else {
            debug!(%reason, "connection ended before its session was up");
            return (None, reason);
        };
        // Messages already received (and maybe acknowledged) are delivered.
        for e in pending {
            let _ = self.events.push(e).await;
        }
        let mut undelivered = session.take_unacked();
        if let Some(o) = outbox {
            undelivered.extend(o.close_and_take());
        }
        info!(peer = %p, %reason, undelivered = undelivered.len(), "session down");
        let _ = self
            .events
            .push(Event::SessionDown {
                peer: p,
                reason: reason.clone(),
            })
            .await;
        if !undelivered.is_empty() {
            Counters::add(&counters.messages_undelivered, undelivered.len() as u64);
            let _ = self
                .events
                .push(Event::Undelivered {
                    peer: p,
                    messages: undelivered,
                })
                .await;
        }
        (Some(p), reason)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Every idle session holds its task's future: keep it small (the
    /// 10 000-session memory budget is 4 KiB per session, all included).
    #[test]
    fn the_session_task_stays_small() {
        let (_ctx, ctrl) = oneshot::channel();
        let (notes, _nrx) = mpsc::unbounded_channel();
        let conn = Conn {
            id: 0,
            session: Arc::new(crate::fuzzing_session_config()),
            expected: None,
            outbound: false,
            max_frame: 1024,
            write_timeout: Duration::from_secs(1),
            events: Arc::new(Queue::new(1)),
            notes,
            ctrl,
            shared: Default::default(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let addr = s.peer_addr().unwrap();
            let fut = conn.run(s, addr);
            let size = std::mem::size_of_val(&fut);
            assert!(size <= 1600, "session task future is {size} bytes");
        });
    }
}
