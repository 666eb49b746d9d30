//! Requests and replies between two loopback nodes: matched by id, in
//! order with messages, and every way a request can fail tells the
//! application what it may conclude.

mod common;

use std::time::Duration;

use common::{config, connected_pair, free_port, trace, wait_for};
use lanbeat::{Error, Event, PeerId, ReplyTo};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

const LONG: Duration = Duration::from_secs(5);

/// The next request on `events` (skipping other events): its body and
/// where its reply goes.
async fn next_request(events: &mut lanbeat::Events) -> (bytes::Bytes, ReplyTo) {
    match wait_for(events, LONG, |e| matches!(e, Event::Request { .. })).await {
        Event::Request { body, reply, .. } => (body, reply),
        _ => unreachable!(),
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Toggle {
    lamp: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct State {
    on: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_their_own_replies_in_order_with_messages() {
    trace();
    let port = free_port();
    let ((a, _ea), (b, mut eb)) = connected_pair(
        config("req-order", port).name("a").build().unwrap(),
        config("req-order", port).name("b").build().unwrap(),
    )
    .await;
    let bid = b.id();
    a.send(bid, "before").await.unwrap();
    // Ten requests at once, then a message.
    let asks: Vec<_> = (0..10u8)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { (i, a.request(bid, vec![i], LONG).await) })
        })
        .collect();
    // Wait until all ten are queued before the message behind them.
    let deadline = Instant::now() + LONG;
    while b.stats().requests_received < 10 {
        assert!(Instant::now() < deadline, "requests did not arrive");
        sleep(Duration::from_millis(5)).await;
    }
    a.send(bid, "after").await.unwrap();
    // B sees the first message, the ten requests, the last message, in order.
    let mut order = Vec::new();
    let mut pending = Vec::new();
    while order.last().map(String::as_str) != Some("after") {
        match tokio::time::timeout(LONG, eb.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Message { data, .. } => order.push(String::from_utf8(data.to_vec()).unwrap()),
            Event::Request { peer, body, reply } => {
                assert_eq!((peer, reply.peer()), (a.id(), a.id()));
                order.push("request".into());
                pending.push((body, reply));
            }
            _ => {}
        }
    }
    assert_eq!(order.len(), 12, "{order:?}");
    assert_eq!((order[0].as_str(), order[11].as_str()), ("before", "after"));
    // Answered in reverse order: each reply still finds its request.
    for (body, reply) in pending.into_iter().rev() {
        b.reply(&reply, [&b"re:"[..], &body[..]].concat())
            .await
            .unwrap();
    }
    for ask in asks {
        let (i, got) = ask.await.unwrap();
        assert_eq!(&got.unwrap()[..], &[b'r', b'e', b':', i][..]);
    }
    // JSON both ways.
    let a2 = a.clone();
    let ask = tokio::spawn(async move {
        a2.request_json::<_, State>(bid, &Toggle { lamp: "k".into() }, LONG)
            .await
    });
    let (body, reply) = next_request(&mut eb).await;
    let toggle: Toggle = serde_json::from_slice(&body).unwrap();
    assert_eq!(toggle.lamp, "k");
    b.reply_json(&reply, &State { on: true }).await.unwrap();
    assert_eq!(ask.await.unwrap().unwrap(), State { on: true });
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sb.requests_received, sa.replies_unmatched), (11, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_times_out_and_its_late_reply_is_dropped() {
    let port = free_port();
    let ((a, _ea), (b, mut eb)) = connected_pair(
        config("req-timeout", port).name("a").build().unwrap(),
        config("req-timeout", port).name("b").build().unwrap(),
    )
    .await;
    let started = Instant::now();
    let ask = a.request(b.id(), "slow", Duration::from_millis(300));
    let (ask, (_, reply)) = tokio::join!(ask, next_request(&mut eb));
    match ask {
        Err(Error::RequestTimedOut { peer, timeout }) => {
            assert_eq!((peer, timeout), (b.id(), Duration::from_millis(300)));
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The reply comes too late: the responder's side accepts it, the
    // requester drops and counts it; the session is unharmed.
    b.reply(&reply, "late").await.unwrap();
    let deadline = Instant::now() + LONG;
    while a.stats().replies_unmatched == 0 {
        assert!(Instant::now() < deadline, "late reply not counted");
        sleep(Duration::from_millis(5)).await;
    }
    let ok = tokio::join!(a.request(b.id(), "again", LONG), async {
        let (_, r) = next_request(&mut eb).await;
        b.reply(&r, "fine").await.unwrap();
    });
    assert_eq!(&ok.0.unwrap()[..], b"fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_after_the_request_was_written_says_it_may_have_been_processed() {
    let port = free_port();
    let ((a, _ea), (b, mut eb)) = connected_pair(
        config("req-lost", port).name("a").build().unwrap(),
        config("req-lost", port).name("b").build().unwrap(),
    )
    .await;
    let started = Instant::now();
    let (ask, (body, reply)) = tokio::join!(a.request(b.id(), "toggle", LONG), async {
        let got = next_request(&mut eb).await;
        // The responder goes away without answering.
        b.shutdown().await;
        got
    });
    assert_eq!(&body[..], b"toggle");
    assert!(
        matches!(ask, Err(Error::RequestLost { peer }) if peer == b.id()),
        "{ask:?}"
    );
    assert!(
        started.elapsed() < LONG,
        "settled by the session's end, not the timeout"
    );
    assert!(matches!(b.reply(&reply, "x").await, Err(Error::Shutdown)));
    // A reply to a request whose session ended is refused, body handed back.
    let port2 = free_port();
    let ((c, _ec), (d, mut ed)) = connected_pair(
        config("req-stale", port2).name("c").build().unwrap(),
        config("req-stale", port2).name("d").build().unwrap(),
    )
    .await;
    let c2 = c.clone();
    let did = d.id();
    let ask = tokio::spawn(async move { c2.request(did, "q", LONG).await });
    let (_, reply) = next_request(&mut ed).await;
    c.shutdown().await;
    assert!(matches!(ask.await.unwrap(), Err(Error::RequestLost { .. })));
    wait_for(&mut ed, LONG, |e| matches!(e, Event::SessionDown { .. })).await;
    match d.reply(&reply, "too late").await {
        Err(Error::NotConnected { peer, message }) => {
            assert_eq!((peer, &message[..]), (c.id(), &b"too late"[..]));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_queued_when_the_session_ends_is_handed_back_as_not_sent() {
    trace();
    let port = free_port();
    // B's application never reads its (small) event queue, so B stops
    // reading its socket; A's writes stall, and its write timeout ends the
    // session with the request still queued behind the messages. A does
    // not hold cut sessions for resumption (grace 0): it hands back at once.
    let ((a, mut ea), (b, _eb)) = connected_pair(
        config("req-unsent", port)
            .name("a")
            .resume_grace(Duration::ZERO)
            .write_timeout(Duration::from_millis(400))
            .max_unacked(8)
            .build()
            .unwrap(),
        config("req-unsent", port)
            .name("b")
            .event_capacity(4)
            .build()
            .unwrap(),
    )
    .await;
    let bid = b.id();
    let chunk = vec![7u8; 512];
    for _ in 0..64 {
        a.send(bid, chunk.clone()).await.unwrap();
    }
    match a.request(bid, "queued", LONG).await {
        Err(Error::RequestNotSent { peer, request }) => {
            assert_eq!((peer, &request[..]), (bid, &b"queued"[..]));
        }
        other => panic!("{other:?}"),
    }
    // The messages come back (those written as unconfirmed, the rest as
    // undelivered), the request is not among them.
    let back = match wait_for(&mut ea, LONG, |e| matches!(e, Event::Undelivered { .. })).await {
        Event::Undelivered { messages, .. } => messages,
        _ => unreachable!(),
    };
    assert!(!back.is_empty());
    assert!(back.iter().all(|m| m[..] == chunk[..]), "only the messages");
    let s = a.stats();
    assert_eq!(s.messages_undelivered, back.len() as u64);
    // In flight at most `max_unacked`: those come back as unconfirmed.
    assert!(s.messages_unconfirmed <= 8, "{}", s.messages_unconfirmed);
    assert_eq!(a.stats().write_timeouts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_precise() {
    let port = free_port();
    let ((a, _ea), (b, _eb)) = connected_pair(
        config("req-errors", port)
            .name("a")
            .max_frame_size(2048)
            .build()
            .unwrap(),
        config("req-errors", port)
            .name("b")
            .max_frame_size(1024)
            .build()
            .unwrap(),
    )
    .await;
    let nobody = PeerId::from_u64(42);
    match a.request(nobody, "hi", LONG).await {
        Err(Error::NotConnected { peer, message }) => {
            assert_eq!((peer, &message[..]), (nobody, &b"hi"[..]));
        }
        other => panic!("{other:?}"),
    }
    // The peer's limit (1024, less the type byte and the 8-byte id).
    match a.request(b.id(), vec![0u8; 1016], LONG).await {
        Err(Error::MessageTooLarge { size, limit }) => assert_eq!((size, limit), (1016, 1015)),
        other => panic!("{other:?}"),
    }
    a.shutdown().await;
    assert!(matches!(
        a.request(nobody, "late", LONG).await,
        Err(Error::Shutdown)
    ));
}
