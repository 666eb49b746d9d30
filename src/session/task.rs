//! The task of one TCP connection: a future that goes through the phases of
//! the connection's life (dial, handshake and session, approval, end). The
//! per-frame work of the running phase is in [`super::connection`]; what
//! runs once per connection is in [`super::lifecycle`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tracing::{Span, debug};

use super::connection::{Connection, LoopExit};
use super::lifecycle;
use super::machine::Session;
use super::noise::{self, NoiseKeys};
use super::stream::{NoiseStream, Stream};
use super::supervision::{ConnectFuture, NewConnection, NodeContext, Report};
use crate::clock;
use crate::event::DownReason;
use crate::peer::PeerId;

/// TCP options derived from the heartbeat: no Nagle delay for heartbeats,
/// and a limit on how long written data may stay unacknowledged, a little
/// beyond our own timeout (the heartbeat decides first).
///
/// No TCP keepalive: it probes only a connection that received nothing
/// for a while, which the heartbeat never lets happen, and a dead peer
/// fails the heartbeat first. It would decide nothing and cost a kernel
/// timer per connection.
pub(crate) fn tune(stream: &TcpStream, timeout: Duration) {
    let sock = SockRef::from(stream);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = timeout;
    let results = [
        sock.set_tcp_nodelay(true),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        sock.set_tcp_user_timeout(Some(timeout * 2)),
    ];
    for r in results {
        if let Err(e) = r {
            debug!(error = %e, "cannot set a TCP option");
        }
    }
}

/// The supervisor's decision on a handshake, once the application was told
/// (see [`lifecycle::approve`]): the peer, or why the session may not start.
type Decision = Pin<Box<dyn Future<Output = Result<lifecycle::Approved, DownReason>> + Send>>;

/// The Noise handshake (see [`noise::handshake`]): the secured stream and
/// the key the peer proved.
type Securing = Pin<Box<dyn Future<Output = Result<(NoiseStream, [u8; 32]), DownReason>> + Send>>;

/// The phase a connected stream starts in: the Noise handshake, or (for
/// plaintext sessions) the hellos straight away.
fn secure_or_run(
    node: &Arc<NodeContext>,
    tcp: TcpStream,
    initiator: Option<noise::Cipher>,
    timeout: Duration,
) -> Phase {
    if node.noise.is_none() {
        return Phase::Running(Stream::Plain(tcp));
    }
    let node = node.clone();
    Phase::Securing(Box::pin(async move {
        let keys: &NoiseKeys = node.noise.as_ref().expect("checked above");
        noise::handshake(tcp, keys, initiator, timeout).await
    }))
}

/// Where a connection is in its life. What runs once per connection (the
/// dial, the approval, the end) is a boxed future; what runs per frame is
/// the hand-written loop of [`Connection::poll_session`].
enum Phase {
    /// We dial.
    Connecting(ConnectFuture),
    /// The Noise handshake.
    Securing(Securing),
    /// Hellos, then session: the per-frame loop.
    Running(Stream),
    /// The supervisor decides on the handshake; the loop waits. (Boxed
    /// with the stream: no variant is bigger than `Running`'s, so the
    /// phase is five words.)
    Approving(Box<(Stream, Decision, u16)>),
    /// The goodbye, the last events, the report to the supervisor.
    Ending(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

/// The task of one TCP connection, written out as a future rather than as
/// an `async fn`: the state an idle heartbeat touches is then laid out
/// together at the start of the task (nested `async` state machines
/// scattered it, and their state tags, over the task's memory: with 10 000
/// sessions, every line touched per heartbeat is a cache miss).
// In declaration order: the hot fields first (checked in `layout` below).
#[repr(C)]
pub(crate) struct ConnectionTask {
    phase: Phase,
    /// The connection's span, when a subscriber takes it (entered on each
    /// poll).
    span: Option<Box<Span>>,
    conn: Connection,
}

impl ConnectionTask {
    /// A task for an accepted connection (`Ok`) or one to dial.
    pub(crate) fn new(
        new: NewConnection,
        stream: Result<TcpStream, ConnectFuture>,
        span: Span,
    ) -> ConnectionTask {
        let phase = match stream {
            Ok(s) => {
                let session = &new.params.session;
                tune(&s, session.heartbeat_timeout);
                secure_or_run(&new.node, s, None, session.handshake_timeout)
            }
            Err(connect) => Phase::Connecting(connect),
        };
        ConnectionTask {
            phase,
            span: (!span.is_disabled()).then(|| Box::new(span)),
            conn: Connection::new(clock::now(), new),
        }
    }
}

impl Future for ConnectionTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let _entered = this.span.as_ref().map(|s| s.enter());
        let c = &mut this.conn;
        loop {
            // Each arm puts back the phase it leaves, or the next one.
            this.phase = match std::mem::replace(&mut this.phase, Phase::Done) {
                Phase::Running(mut stream) => match c.poll_session(cx, &mut stream) {
                    Poll::Pending => {
                        this.phase = Phase::Running(stream);
                        return Poll::Pending;
                    }
                    Poll::Ready(LoopExit::Handshaken(hello)) => {
                        let port = hello.datagram_port;
                        let approval = lifecycle::approve(&c.params, hello, c.node.events.clone());
                        Phase::Approving(Box::new((stream, Box::pin(approval), port)))
                    }
                    Poll::Ready(LoopExit::Closed(reason)) => {
                        Phase::Ending(Box::pin(c.end(Some(stream), reason)))
                    }
                },
                Phase::Approving(mut waiting) => match waiting.1.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Approving(waiting);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(approved)) => {
                        c.approved(cx, approved);
                        c.attach_link(&mut waiting.0, waiting.2);
                        Phase::Running(waiting.0)
                    }
                    // The peer may already count the session as up (it has
                    // our hello): a node shutting down says goodbye (after
                    // its hello, if that waited for the approval).
                    Poll::Ready(Err(r)) => {
                        let goodbye = r == DownReason::Shutdown;
                        if goodbye {
                            c.session.send_hello(clock::now(), 0, 0);
                        }
                        c.session.close(r, goodbye);
                        Phase::Running(waiting.0)
                    }
                },
                Phase::Connecting(mut connect) => match connect.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Connecting(connect);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(stream)) => {
                        let session = &c.params.session;
                        tune(&stream, session.heartbeat_timeout);
                        // The handshake has its time from now on.
                        c.session = Session::new(clock::now(), session.clone(), c.params.expected);
                        if let Some((token, received)) = c.params.offer {
                            c.session.offer_resume(token, received);
                        }
                        let cipher = Some(c.params.cipher);
                        secure_or_run(&c.node, stream, cipher, session.handshake_timeout)
                    }
                    Poll::Ready(Err(e)) => {
                        debug!(error = %e, "connect failed");
                        let _ = c.params.reports.send(Report::Ended {
                            conn: c.params.id,
                            peer: None,
                            reason: DownReason::Io(e.kind()),
                            held: None,
                        });
                        return Poll::Ready(());
                    }
                },
                Phase::Securing(mut securing) => match securing.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Securing(securing);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok((stream, key))) => {
                        c.session.set_proven(PeerId::from_public_key(&key));
                        c.params.proven_key = Some(key);
                        Phase::Running(Stream::Noise(Box::new(stream)))
                    }
                    Poll::Ready(Err(reason)) => {
                        debug!(%reason, "noise handshake failed");
                        Phase::Ending(Box::pin(c.end(None, reason)))
                    }
                },
                Phase::Ending(mut end) => match end.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.phase = Phase::Ending(end);
                        return Poll::Pending;
                    }
                    Poll::Ready(()) => return Poll::Ready(()),
                },
                Phase::Done => return Poll::Ready(()),
            };
        }
    }
}

/// The layout the heartbeat path relies on: the phase (whose `Running`
/// variant holds the stream) and the loop's state at the start of the task.
/// Stated relative to the stream's size, which differs between platforms
/// (with the tag, five words on Linux).
mod layout {
    use std::mem::offset_of;

    use super::{ConnectionTask, Phase, Stream};

    const _: () = assert!(offset_of!(ConnectionTask, phase) == 0);
    // `Approving` and `Ending` are boxed so that no phase is bigger than
    // `Running`: the stream and the tag.
    const _: () = assert!(size_of::<Phase>() <= size_of::<Stream>() + size_of::<usize>());
    // Then the span (one word), then the loop's state.
    const _: () =
        assert!(offset_of!(ConnectionTask, conn) <= size_of::<Phase>() + size_of::<usize>());
}

#[cfg(test)]
mod tests;
