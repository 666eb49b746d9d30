//! `rtt` and `throughput`: messages through a lanbeat session against raw
//! tokio TCP with length-prefixed frames, each side in its own process on a
//! current-thread runtime.

use std::time::{Duration, Instant};

use bytes::Bytes;
use lanbeat::{Config, Event, Events, Node, PeerId};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

use crate::util::{Helper, arg, free_port};

fn config(args: &[String]) -> Config {
    Config::builder(arg::<String>(args, "--service"))
        .loopback_only()
        .discovery_port(arg(args, "--dport"))
        .build()
        .unwrap()
}

async fn first_peer(events: &mut Events) -> PeerId {
    loop {
        if let Some(Event::SessionUp { peer, .. }) = events.recv().await {
            return peer;
        }
    }
}

pub(crate) fn summary(mut v: Vec<Duration>) -> Value {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let p = |q: f64| us(v[((v.len() - 1) as f64 * q) as usize]);
    json!({"n": v.len(), "min_us": us(v[0]), "p50_us": p(0.5), "p99_us": p(0.99), "max_us": us(v[v.len() - 1])})
}

/// Runs a child role; returns false if `role` is not one of ours.
pub(crate) async fn child(role: &str, args: &[String]) -> bool {
    match role {
        "raw-echo" => raw_echo().await,
        "raw-rtt" => raw_rtt(arg(args, "--port"), arg(args, "--n")).await,
        "lb-echo" => lb_echo(args).await,
        "lb-rtt" => lb_rtt(args).await,
        "raw-sink" => raw_sink(arg(args, "--n")).await,
        "raw-source" => {
            raw_source(arg(args, "--port"), arg(args, "--n"), arg(args, "--size")).await
        }
        "lb-sink" => lb_sink(args).await,
        "lb-source" => lb_source(args).await,
        _ => return false,
    }
    true
}

async fn raw_echo() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap().port());
    let (s, _) = l.accept().await.unwrap();
    s.set_nodelay(true).unwrap();
    echo(s).await;
}

/// Echoes every complete length-prefixed frame back (raw TCP or TLS).
pub(crate) async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    loop {
        // The end of the stream, or an error (a TLS client that leaves
        // without close_notify): done.
        let n = s.read(&mut buf[have..]).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        have += n;
        // Echo every complete frame back.
        let mut at = 0;
        while have - at >= 4 {
            let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            if have - at < 4 + len {
                break;
            }
            at += 4 + len;
        }
        if at > 0 {
            s.write_all(&buf[..at]).await.unwrap();
            s.flush().await.unwrap();
            buf.copy_within(at..have, 0);
            have -= at;
        }
    }
}

async fn raw_rtt(port: u16, n: usize) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.set_nodelay(true).unwrap();
    rtt_loop(s, n).await;
}

/// `n` 16-byte requests, each timed to its echo (after 1 000 unmeasured).
pub(crate) async fn rtt_loop<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, n: usize) {
    let mut msg = 16u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&[7u8; 16]);
    let mut buf = [0u8; 64];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 1000 {
        let t0 = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.flush().await.unwrap();
        let mut got = 0;
        while got < msg.len() {
            got += s.read(&mut buf[got..]).await.unwrap();
        }
        if i >= 1000 {
            samples.push(t0.elapsed());
        }
    }
    println!("{}", summary(samples));
}

async fn lb_echo(args: &[String]) {
    let (node, mut events) = Node::start(config(args)).await.unwrap();
    println!("ready");
    while let Some(e) = events.recv().await {
        if let Event::Message { peer, data } = e {
            let _ = node.send(peer, data).await;
        }
    }
}

async fn lb_rtt(args: &[String]) {
    let n: usize = arg(args, "--n");
    let (node, mut events) = Node::start(config(args)).await.unwrap();
    let peer = first_peer(&mut events).await;
    let msg = Bytes::from_static(&[7u8; 16]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 1000 {
        let t0 = Instant::now();
        node.send(peer, msg.clone()).await.unwrap();
        loop {
            if let Some(Event::Message { .. }) = events.recv().await {
                break;
            }
        }
        if i >= 1000 {
            samples.push(t0.elapsed());
        }
    }
    println!("{}", summary(samples));
}

async fn raw_sink(n: u64) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap().port());
    let (s, _) = l.accept().await.unwrap();
    sink(s, n).await;
}

/// Reads `n` length-prefixed messages and prints the rate.
pub(crate) async fn sink<S: AsyncRead + Unpin>(s: S, n: u64) {
    let mut r = BufReader::new(s);
    let mut body = vec![0u8; 1 << 20];
    let mut first = None;
    let mut bytes = 0u64;
    for _ in 0..n {
        let len = r.read_u32().await.unwrap() as usize;
        r.read_exact(&mut body[..len]).await.unwrap();
        first.get_or_insert_with(Instant::now);
        bytes += len as u64;
    }
    let secs = first.unwrap().elapsed().as_secs_f64();
    println!("{}", json!({"msgs": n, "bytes": bytes, "secs": secs}));
}

async fn raw_source(port: u16, n: u64, size: usize) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    source(s, n, size).await;
}

/// Writes `n` length-prefixed messages of `size` bytes through a buffer,
/// then stays connected until the parent is done.
pub(crate) async fn source<S: AsyncWrite + Unpin>(s: S, n: u64, size: usize) {
    let mut w = BufWriter::new(s);
    let body = vec![1u8; size];
    for _ in 0..n {
        w.write_u32(size as u32).await.unwrap();
        w.write_all(&body).await.unwrap();
    }
    w.flush().await.unwrap();
    // Stay connected until the parent is done with us.
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

async fn lb_sink(args: &[String]) {
    let n: u64 = arg(args, "--n");
    let batch: usize = arg(args, "--batch");
    let (_node, mut events) = Node::start(config(args)).await.unwrap();
    println!("ready");
    let mut first = None;
    let (mut count, mut bytes) = (0u64, 0u64);
    let mut take = |e: Event| {
        if let Event::Message { data, .. } = e {
            first.get_or_insert_with(Instant::now);
            count += 1;
            bytes += data.len() as u64;
        }
        count < n
    };
    let mut got = Vec::with_capacity(batch);
    'run: loop {
        if batch == 0 {
            // One event per call, as most applications take them.
            if let Some(e) = events.recv().await
                && !take(e)
            {
                break;
            }
            continue;
        }
        events.recv_many(&mut got, batch).await;
        for e in got.drain(..) {
            if !take(e) {
                break 'run;
            }
        }
    }
    let secs = first.unwrap().elapsed().as_secs_f64();
    println!("{}", json!({"msgs": n, "bytes": bytes, "secs": secs}));
}

async fn lb_source(args: &[String]) {
    let n: u64 = arg(args, "--n");
    let size: usize = arg(args, "--size");
    let batch: usize = arg(args, "--batch");
    let (node, mut events) = Node::start(config(args)).await.unwrap();
    let peer = first_peer(&mut events).await;
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let body = Bytes::from(vec![1u8; size]);
    // The per-peer handle: no session lookup per message.
    let to = node.sender(peer).unwrap();
    if batch == 0 {
        for _ in 0..n {
            to.send(body.clone()).await.unwrap();
        }
    } else {
        let mut queue = std::collections::VecDeque::with_capacity(batch);
        let mut left = n;
        while left > 0 {
            let k = left.min(batch as u64);
            queue.extend((0..k).map(|_| body.clone()));
            to.send_batch(&mut queue).await.unwrap();
            left -= k;
        }
    }
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

pub(crate) fn pair(server: &[&str], client: &[&str], pinned: bool, lanbeat: bool) -> Value {
    pair_on(server, client, pinned.then_some((0, 0)), lanbeat)
}

/// Runs `server` and `client` (on the CPUs `cpus`, server first, if
/// given) and returns what the measuring side prints.
pub(crate) fn pair_on(
    server: &[&str],
    client: &[&str],
    cpus: Option<(usize, usize)>,
    lanbeat: bool,
) -> Value {
    let to = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (scpu, ccpu) = (cpus.map(|c| c.0), cpus.map(|c| c.1));
    let (mut s, mut c) = if lanbeat {
        let service = format!("bench-{}", free_port());
        let dport = free_port().to_string();
        let extra = ["--service", &service, "--dport", &dport];
        let mut s = Helper::start(&[to(server), to(&extra)].concat(), scpu, None);
        assert_eq!(s.line(), "ready");
        let c = Helper::start(&[to(client), to(&extra)].concat(), ccpu, None);
        (s, c)
    } else {
        let mut s = Helper::start(&to(server), scpu, None);
        let port = s.line();
        let c = Helper::start(&[to(client), to(&["--port", &port])].concat(), ccpu, None);
        (s, c)
    };
    // Whichever side measures prints the result.
    let out = if server[0].ends_with("sink") {
        s.line()
    } else {
        c.line()
    };
    serde_json::from_str(&out).unwrap()
}

pub(crate) fn rtt(n: usize) {
    println!("16-byte request/response, {n} round trips, both processes pinned to CPU 0\n");
    println!("| what | p50 µs | p99 µs | p50 vs raw |");
    println!("| --- | --- | --- | --- |");
    let ns = n.to_string();
    let raw = pair(&["raw-echo"], &["raw-rtt", "--n", &ns], true, false);
    let lb = pair(&["lb-echo"], &["lb-rtt", "--n", &ns], true, true);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    println!(
        "| raw tokio TCP, 4-byte length prefix | {:.1} | {:.1} | 1.00× |",
        f(&raw, "p50_us"),
        f(&raw, "p99_us")
    );
    println!(
        "| lanbeat session | {:.1} | {:.1} | {:.2}× |",
        f(&lb, "p50_us"),
        f(&lb, "p99_us"),
        f(&lb, "p50_us") / f(&raw, "p50_us")
    );
}

pub(crate) fn throughput(scale: f64) {
    println!("one-way messages, sender and receiver in separate processes");
    println!("lanbeat: PeerSender::send + Events::recv per message; batch: send_batch");
    println!("and recv_many, {BATCH} messages per call\n");
    println!(
        "| size | raw msgs/s | raw MB/s | lanbeat msgs/s | ratio | lanbeat batch msgs/s | ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (size, n) in [(64usize, 5_000_000u64), (65536, 40_000)] {
        let n = ((n as f64 * scale) as u64).max(1000);
        let (ns, ss) = (n.to_string(), size.to_string());
        let raw = pair(
            &["raw-sink", "--n", &ns],
            &["raw-source", "--n", &ns, "--size", &ss],
            false,
            false,
        );
        let rate = |v: &Value| v["msgs"].as_f64().unwrap() / v["secs"].as_f64().unwrap();
        let lb = |batch: usize| {
            let b = batch.to_string();
            rate(&pair(
                &["lb-sink", "--n", &ns, "--batch", &b],
                &["lb-source", "--n", &ns, "--size", &ss, "--batch", &b],
                false,
                true,
            ))
        };
        let (one, many) = (lb(0), lb(BATCH));
        let raw_rate = rate(&raw);
        println!(
            "| {size} B | {:.2} M | {:.0} | {:.2} M | {:.2}× | {:.2} M | {:.2}× |",
            raw_rate / 1e6,
            raw["bytes"].as_f64().unwrap() / raw["secs"].as_f64().unwrap() / 1e6,
            one / 1e6,
            one / raw_rate,
            many / 1e6,
            many / raw_rate,
        );
    }
}

/// Messages per `send_batch` / `recv_many` call in the batch rows.
const BATCH: usize = 64;
