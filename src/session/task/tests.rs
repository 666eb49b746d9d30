//! Tests of the connection task: its size, and each phase (dial,
//! handshake, approval, running, end) driven over a real loopback socket
//! against a scripted peer, with the supervisor's side played by the test.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Span;

use super::*;
use crate::event::{Event, ProtocolViolation};
use crate::node::EventQueue;
use crate::queue::{PushError, Queue};
use crate::session::lifecycle;
use crate::session::mailbox::Mailbox;
use crate::session::supervision::{Approval, ConnectionParams, NodeContext};
use crate::session::timer::Timer;
use crate::testing;
use crate::wire::frame::Frame;

const WAIT: Duration = Duration::from_secs(5);
/// Our node is node 1 (`testing::session_config`); the scripted peer is 2.
const PEER: u64 = 2;

fn new_connection(
    reports: mpsc::UnboundedSender<Report>,
    node: Arc<NodeContext>,
    expected: Option<PeerId>,
) -> NewConnection {
    NewConnection {
        params: ConnectionParams {
            id: 7,
            session: Arc::new(testing::session_config()),
            expected,
            outbound: expected.is_some(),
            addr: "127.0.0.1:1".parse().unwrap(),
            write_timeout: Duration::from_secs(3),
            proven_key: None,
            reports,
            lineage: 7,
            offer: None,
            cipher: crate::session::noise::Cipher::ChaChaPoly,
            token: 0,
            peer_instance: 0,
            grace: Duration::ZERO,
        },
        max_frame: 1 << 20,
        node,
        mailbox: Arc::new(Mailbox::new(8)),
    }
}

/// Every idle session holds its task's future: keep it small (the
/// 10 000-session memory budget is 4 KiB per session, all included).
#[test]
fn the_session_task_stays_small() {
    let (reports, _rx) = mpsc::unbounded_channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = Arc::new(NodeContext {
            events: Arc::new(Queue::new(1)),
            timer: Arc::new(Timer::new(clock::now())),
            counters: Default::default(),
            rtt_events: true,
            noise: None,
            datagrams: None,
            requests: Default::default(),
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let task = ConnectionTask::new(new_connection(reports, node, None), Ok(s), Span::none());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "session task is {size} bytes");
    });
}

/// One connection task, with the supervisor's side of it.
struct Harness {
    reports: mpsc::UnboundedReceiver<Report>,
    events: Arc<EventQueue>,
    mailbox: Arc<Mailbox>,
    task: JoinHandle<()>,
    timer: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
        self.timer.abort();
    }
}

impl Harness {
    fn start(expected: Option<PeerId>, stream: Result<TcpStream, ConnectFuture>) -> Harness {
        let (tx, reports) = mpsc::unbounded_channel();
        let events = Arc::new(Queue::new(64));
        let timer = Arc::new(Timer::new(clock::now()));
        let node = Arc::new(NodeContext {
            events: events.clone(),
            timer: timer.clone(),
            counters: Default::default(),
            rtt_events: true,
            noise: None,
            datagrams: None,
            requests: Default::default(),
        });
        let timer = tokio::spawn(timer.run(|| {}));
        let new = new_connection(tx, node, expected);
        let mailbox = new.mailbox.clone();
        let task = tokio::spawn(ConnectionTask::new(new, stream, Span::none()));
        Harness {
            reports,
            events,
            mailbox,
            task,
            timer,
        }
    }

    async fn report(&mut self) -> Report {
        tokio::time::timeout(WAIT, self.reports.recv())
            .await
            .expect("no report in time")
            .expect("the task dropped its report channel")
    }

    /// The connection's last report: the peer (if the session was up) and
    /// why it ended.
    async fn ended(&mut self) -> (Option<PeerId>, DownReason) {
        match self.report().await {
            Report::Ended { peer, reason, .. } => (peer, reason),
            other => panic!("expected the end, got {other:?}"),
        }
    }

    /// The supervisor's side of a completed handshake.
    async fn handshaken(
        &mut self,
    ) -> (
        Box<crate::wire::frame::Hello>,
        tokio::sync::oneshot::Sender<Approval>,
    ) {
        match self.report().await {
            Report::Handshaken { hello, approve, .. } => (hello, approve),
            other => panic!("expected a handshake, got {other:?}"),
        }
    }

    /// The events queued so far.
    fn events(&self) -> Vec<Event> {
        let mut out = VecDeque::new();
        self.events.take_all(&mut out, None);
        out.into()
    }

    /// The events, once `n` are there.
    async fn wait_events(&self, n: usize) -> Vec<Event> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "events so far: {got:?}"
            );
            got.extend(self.events());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        got
    }

    async fn finished(self) {
        let task = &mut { self }.task;
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the task did not end")
            .unwrap();
    }
}

/// The scripted peer's end of the socket.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
}

impl Peer {
    async fn send(&mut self, f: Frame) {
        let mut out = BytesMut::new();
        f.encode(&mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn hello(&mut self) {
        let hello = testing::hello(PEER, 1000, 3000);
        self.send(Frame::Hello(Ok(Box::new(hello)))).await;
    }

    /// The next frame, `None` at the end of the stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = Frame::decode(&mut self.buf, 1 << 20).unwrap() {
                return Some(f);
            }
            let read = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf));
            if read.await.expect("no frame in time").unwrap() == 0 {
                return None;
            }
        }
    }

    /// The next message, heartbeats and acks skipped.
    async fn data(&mut self) -> Bytes {
        loop {
            match self.frame().await {
                Some(Frame::Data(d)) => return d,
                Some(_) => {}
                None => panic!("closed before a message"),
            }
        }
    }

    /// The frames up to the end of the stream, heartbeats and acks left out.
    async fn rest(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.frame().await {
            if !matches!(f, Frame::Ping { .. } | Frame::Pong(_) | Frame::Ack(_)) {
                out.push(f);
            }
        }
        out
    }

    /// Our hello, which every connection sends first.
    async fn expect_hello(&mut self) {
        match self.frame().await {
            Some(Frame::Hello(Ok(h))) => assert_eq!(h.id, PeerId::from_u64(1)),
            other => panic!("expected our hello, got {other:?}"),
        }
    }
}

/// An accepted connection (`expected` `None`) or a dial, and the peer.
async fn connected(dial: bool) -> (Harness, Peer) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (h, stream) = if dial {
        let connect = lifecycle::connect(addr, WAIT);
        let h = Harness::start(Some(PeerId::from_u64(PEER)), Err(connect));
        (h, l.accept().await.unwrap().0)
    } else {
        let peer = TcpStream::connect(addr).await.unwrap();
        let ours = l.accept().await.unwrap().0;
        (Harness::start(None, Ok(ours)), peer)
    };
    let peer = Peer {
        stream,
        buf: BytesMut::new(),
    };
    (h, peer)
}

/// Handshake and approval: the session is up on both sides.
async fn up(dial: bool) -> (Harness, Peer) {
    let (mut h, mut peer) = connected(dial).await;
    peer.expect_hello().await;
    peer.hello().await;
    let (hello, approve) = h.handshaken().await;
    assert_eq!(hello.id, PeerId::from_u64(PEER));
    approve
        .send(Approval::Accept {
            metadata: Default::default(),
            terms: Default::default(),
        })
        .unwrap();
    match &h.wait_events(1).await[..] {
        [Event::SessionUp { peer, outbound, .. }] => {
            assert_eq!(*peer, PeerId::from_u64(PEER));
            assert_eq!(*outbound, dial);
        }
        other => panic!("{other:?}"),
    }
    (h, peer)
}

#[tokio::test]
async fn a_dial_that_fails_is_reported_and_the_task_ends() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let mut h = Harness::start(
        Some(PeerId::from_u64(PEER)),
        Err(lifecycle::connect(addr, WAIT)),
    );
    let refused = DownReason::Io(std::io::ErrorKind::ConnectionRefused);
    assert_eq!(h.ended().await, (None, refused));
    assert!(h.events().is_empty(), "no session, no event");
    h.finished().await;
}

#[tokio::test]
async fn frames_after_the_handshake_wait_for_the_approval() {
    let (mut h, mut peer) = connected(true).await;
    peer.expect_hello().await;
    // The hello and a message in one write: the message must not reach
    // the application before the session is up.
    let mut out = BytesMut::new();
    Frame::Hello(Ok(Box::new(testing::hello(PEER, 1000, 3000)))).encode(&mut out);
    Frame::Data(Bytes::from_static(b"early")).encode(&mut out);
    peer.stream.write_all(&out).await.unwrap();
    let (_, approve) = h.handshaken().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(h.events().is_empty(), "nothing before the approval");
    approve
        .send(Approval::Accept {
            metadata: Default::default(),
            terms: Default::default(),
        })
        .unwrap();
    match &h.wait_events(2).await[..] {
        [
            Event::SessionUp { outbound: true, .. },
            Event::Message { data, .. },
        ] => {
            assert_eq!(data, "early");
        }
        other => panic!("{other:?}"),
    }
    // Running: the outbox reaches the wire.
    h.mailbox.outbox().try_push(Bytes::from("hi")).unwrap();
    assert_eq!(peer.data().await, "hi");
}

#[tokio::test]
async fn a_rejected_handshake_closes_without_a_session_or_goodbye() {
    let (mut h, mut peer) = connected(false).await;
    peer.expect_hello().await;
    peer.hello().await;
    let why = ProtocolViolation::Refused("duplicate session");
    let (_, approve) = h.handshaken().await;
    approve.send(Approval::Reject(why.clone())).unwrap();
    assert_eq!(h.ended().await, (None, DownReason::ProtocolError(why)));
    assert!(peer.rest().await.is_empty(), "closed without a goodbye");
    assert!(h.events().is_empty(), "never a session for the application");
    h.finished().await;
}

#[tokio::test]
async fn a_shutdown_during_the_approval_says_goodbye() {
    let (mut h, mut peer) = connected(false).await;
    peer.expect_hello().await;
    peer.hello().await;
    let (_, approve) = h.handshaken().await;
    approve.send(Approval::Shutdown).unwrap();
    match &peer.rest().await[..] {
        [Frame::Goodbye(g)] => assert_eq!(g.reason, "shutdown"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.ended().await, (None, DownReason::Shutdown));
    h.finished().await;
}

#[tokio::test]
async fn a_silent_connection_ends_at_the_handshake_timeout() {
    let (mut h, mut peer) = connected(false).await;
    peer.expect_hello().await;
    let started = tokio::time::Instant::now();
    assert_eq!(h.ended().await, (None, DownReason::HandshakeTimeout));
    // The handshake timeout of `testing::session_config` is 500 ms.
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(peer.rest().await.is_empty());
    h.finished().await;
}

#[tokio::test]
async fn a_close_request_says_goodbye_and_hands_back_what_was_not_acknowledged() {
    let (mut h, mut peer) = up(true).await;
    // The peer acknowledges nothing: both messages stay in flight.
    let outbox = h.mailbox.outbox();
    outbox.try_push(Bytes::from("one")).unwrap();
    outbox.try_push(Bytes::from("two")).unwrap();
    assert_eq!(peer.data().await, "one");
    assert_eq!(peer.data().await, "two");
    h.mailbox.request_close(DownReason::Replaced);
    match &peer.rest().await[..] {
        [Frame::Goodbye(g)] => assert_eq!(g.reason, "replaced"),
        other => panic!("{other:?}"),
    }
    let peer = Some(PeerId::from_u64(PEER));
    assert_eq!(h.ended().await, (peer, DownReason::Replaced));
    // Written, never acknowledged: the peer read them, and we cannot know.
    match &h.events()[..] {
        [
            Event::SessionDown { reason, .. },
            Event::Unconfirmed { messages, .. },
        ] => {
            assert_eq!(*reason, DownReason::Replaced);
            assert_eq!(messages, &["one", "two"]);
        }
        other => panic!("{other:?}"),
    }
    // Senders are refused from now on, and get their message back.
    assert!(matches!(
        h.mailbox.outbox().try_push(Bytes::from("late")),
        Err(PushError::Closed(_))
    ));
    h.finished().await;
}

#[tokio::test]
async fn what_arrived_before_the_peer_closed_is_delivered_before_the_session_down() {
    let (mut h, mut peer) = up(false).await;
    peer.send(Frame::Data(Bytes::from_static(b"last words")))
        .await;
    peer.stream.shutdown().await.unwrap();
    let peer = Some(PeerId::from_u64(PEER));
    assert_eq!(h.ended().await, (peer, DownReason::Closed));
    match &h.events()[..] {
        [
            Event::Message { data, .. },
            Event::SessionDown { reason, .. },
        ] => {
            assert_eq!(data, "last words");
            assert_eq!(*reason, DownReason::Closed);
        }
        other => panic!("{other:?}"),
    }
    h.finished().await;
}
