//! The tokio task of one TCP connection: it moves bytes between the socket
//! and the [`Session`] machine, between the outbox and the socket, and
//! between the machine and the application's event stream.

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
use super::outbox::Outbox;
use crate::clock;
use crate::event::{DownReason, Event, ProtocolViolation};
use crate::node::Shared;
use crate::peer::PeerId;
use crate::stats::Counters;
use crate::wire::frame::{self, Frame, Hello};

/// Stop taking messages from the outbox while this much waits to be written.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// How long a closing session may spend flushing its goodbye.
const GOODBYE_FLUSH: Duration = Duration::from_millis(500);
/// Read buffer sizes: an idle session reads into a small buffer (a ping is
/// 13 bytes); one whose reads fill the buffer gets a bigger one next time.
const READ_MIN: usize = 256;
const READ_MAX: usize = 256 * 1024;

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
    pub(crate) events: mpsc::Sender<Event>,
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
        // A received message the application has no room for yet.
        let mut held: Option<Bytes> = None;
        let mut last_write = clock::now();
        let mut ctrl_open = true;
        // One timer for the whole life of the connection, moved as needed.
        let mut armed = clock::now() + Duration::from_secs(3600);
        let sleep = clock::sleep_until(armed);
        tokio::pin!(sleep);
        let reason = loop {
            // Frames already buffered are processed before reading more.
            if held.is_none() && !session.is_closed() {
                held = self.decode_buffered(&mut session, &mut rbuf, peer);
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
                            if self.events.try_send(Event::Rtt { peer: p, rtt }).is_err() {
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
                let counters = &self.shared.counters;
                while session.can_send() && wbuf.len() < WRITE_HIGH_WATER {
                    let now = clock::now();
                    let mut sent = 0;
                    let n = o.pop_batch(64, |m| {
                        frame::encode_data(&m, &mut wbuf);
                        session.record_data_sent(now, m);
                        sent += 1;
                    });
                    Counters::add(&counters.messages_sent, sent);
                    if n == 0 {
                        break;
                    }
                }
                // Frames the session queued while taking messages (none
                // today) go out with them.
                while let Some(f) = session.poll_transmit() {
                    f.encode(&mut wbuf);
                }
            }
            let stall = (!wbuf.is_empty()).then(|| last_write + self.write_timeout);
            let deadline = [session.poll_timeout(), stall]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(armed);
            if deadline != armed {
                armed = deadline;
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(deadline));
            }
            let can_take = outbox.is_some() && session.can_send() && wbuf.len() < WRITE_HIGH_WATER;
            if rbuf.capacity() - rbuf.len() < read_size / 2 {
                rbuf.reserve(read_size);
            }
            tokio::select! {
                r = &mut self.ctrl, if ctrl_open => {
                    ctrl_open = false;
                    if let Ok(r) = r {
                        session.close(r, true);
                    }
                }
                r = rd.read_buf(&mut rbuf), if held.is_none() => match r {
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
                permit = self.events.reserve(), if held.is_some() => {
                    if let (Ok(permit), Some(p), Some(data)) = (permit, peer, held.take()) {
                        permit.send(Event::Message { peer: p, data });
                    }
                    session.set_paused(clock::now(), false);
                }
                w = wr.write_buf(&mut wbuf), if !wbuf.is_empty() => match w {
                    Ok(_) => {
                        last_write = clock::now();
                        if wbuf.is_empty() && wbuf.capacity() > 64 * 1024 {
                            wbuf = BytesMut::new();
                        }
                    }
                    Err(e) => session.handle_io_error(e.kind()),
                },
                () = async { outbox.as_ref().expect("guarded").filled().await }, if can_take => {}
                () = &mut sleep => {
                    let now = clock::now();
                    armed = now + Duration::from_secs(3600);
                    if stall.is_some_and(|s| now >= s) && !wbuf.is_empty() {
                        session.close(DownReason::WriteTimeout, false);
                    } else {
                        session.handle_timeout(now);
                    }
                }
            }
        };
        Box::pin(self.finish(session, reason, peer, held, outbox, wr, wbuf)).await
    }

    /// Decodes complete frames from `rbuf` into the machine; stops at the
    /// first message the application has no room for and returns it.
    fn decode_buffered(
        &self,
        session: &mut Session,
        rbuf: &mut BytesMut,
        peer: Option<PeerId>,
    ) -> Option<Bytes> {
        let counters = &self.shared.counters;
        loop {
            match Frame::decode(rbuf, self.max_frame) {
                Ok(Some(f)) => {
                    trace!(kind = f.kind(), "frame in");
                    let now = clock::now();
                    if let Some(data) = session.handle_frame(now, f) {
                        Counters::bump(&counters.messages_received);
                        let p = peer.expect("data frames only after the handshake");
                        match self.events.try_send(Event::Message { peer: p, data }) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(Event::Message {
                                data, ..
                            })) => {
                                session.set_paused(now, true);
                                return Some(data);
                            }
                            // The application dropped its event receiver.
                            Err(_) => {}
                        }
                    }
                    if session.is_closed() {
                        return None;
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    warn!(error = %e, "rejected frame; closing session");
                    session.handle_decode_error(e);
                    return None;
                }
            }
        }
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
                    .send(Event::SessionUp {
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
        held: Option<Bytes>,
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
        // A message already received (and maybe acknowledged) is delivered.
        if let Some(data) = held {
            let _ = self.events.send(Event::Message { peer: p, data }).await;
        }
        let mut undelivered = session.take_unacked();
        if let Some(o) = outbox {
            undelivered.extend(o.close());
        }
        info!(peer = %p, %reason, undelivered = undelivered.len(), "session down");
        let _ = self
            .events
            .send(Event::SessionDown {
                peer: p,
                reason: reason.clone(),
            })
            .await;
        if !undelivered.is_empty() {
            Counters::add(&counters.messages_undelivered, undelivered.len() as u64);
            let _ = self
                .events
                .send(Event::Undelivered {
                    peer: p,
                    messages: undelivered,
                })
                .await;
        }
        (Some(p), reason)
    }
}

#[cfg(test)]
mod size_tests {
    use std::sync::Arc;

    #[test]
    fn print_sizes() {
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let (ntx, _nrx) = tokio::sync::mpsc::unbounded_channel();
        let (_ctx, crx) = tokio::sync::oneshot::channel();
        let conn = super::Conn {
            id: 0,
            session: Arc::new(crate::fuzzing_session_config()),
            expected: None,
            outbound: false,
            max_frame: 1024,
            write_timeout: std::time::Duration::from_secs(1),
            events: tx,
            notes: ntx,
            ctrl: crx,
            shared: Default::default(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let addr = s.peer_addr().unwrap();
            let fut = conn.run(s, addr);
            eprintln!("conn future: {} bytes", std::mem::size_of_val(&fut));
            eprintln!("event: {} bytes", std::mem::size_of::<crate::Event>());
            eprintln!("session: {} bytes", std::mem::size_of::<super::Session>());
        });
    }
}
