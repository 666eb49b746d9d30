//! `lifecycle`: start → discovered / session up, SIGSTOP → heartbeat_timeout,
//! SIGCONT → session up again, on loopback.

use std::time::{Duration, Instant};

use lanbeat::{Config, DownReason, Event, Node};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Helper, free_port, pct, row, row_header, udp_floor};

pub(crate) async fn lifecycle(trials: usize) {
    println!("lanbeat lifecycle bench on loopback, {trials} trials per setting\n");
    row_header();
    let floor = udp_floor(trials.max(50));
    let floor_p50 = {
        let mut f = floor.clone();
        f.sort();
        pct(&f, 0.5)
    };
    row("baseline: UDP broadcast probe → reply", floor, None);
    for (interval, timeout) in [(100u64, 300u64), (1000, 3000)] {
        let mut discovered = Vec::new();
        let mut up = Vec::new();
        let mut detect = Vec::new();
        let mut since_pong = Vec::new();
        let mut reconnect = Vec::new();
        for _ in 0..trials {
            let r = trial(interval, timeout).await;
            discovered.push(r.0);
            up.push(r.1);
            detect.push(r.2);
            since_pong.extend(r.3);
            reconnect.push(r.4);
        }
        let tag = format!("{interval} ms / {timeout} ms");
        row(
            &format!("start → discovered ({tag})"),
            discovered,
            Some(floor_p50),
        );
        row(&format!("start → session up ({tag})"), up, Some(floor_p50));
        row(
            &format!("SIGSTOP → heartbeat_timeout ({tag})"),
            detect,
            None,
        );
        row(
            &format!("last pong → timeout, as dialer ({tag})"),
            since_pong,
            None,
        );
        row(
            &format!("SIGCONT → session up again ({tag})"),
            reconnect,
            None,
        );
    }
    println!("\nSIGSTOP → timeout is below the timeout: the last frame from the frozen");
    println!("peer arrived up to one send interval before the freeze. 'last pong' is");
    println!("measured from the last RTT event seen by the bench, in the trials where");
    println!("it dialed (the acceptor's RTT events are the dialer's reports); the timeout");
    println!("counts from the last frame of any kind, so it can be a little shorter.");
    println!("An RTT event reaches the application up to one tick of the node's timer");
    println!("(8 ms) after its pong, so 'last pong' may also read up to 8 ms short.");
}

async fn trial(interval: u64, timeout: u64) -> Trial {
    let port = free_port();
    let service = format!("bench-{}-{port}", std::process::id());
    let (port_s, i, t) = (port.to_string(), interval.to_string(), timeout.to_string());
    let args: Vec<String> = [
        "--service",
        &service,
        "--name",
        "child",
        "--interface",
        "lo",
        "--discovery-port",
        &port_s,
        "--heartbeat-interval-ms",
        &i,
        "--heartbeat-timeout-ms",
        &t,
        "--json",
    ]
    .map(String::from)
    .into();
    let mut child = Helper::start_peer(&args);
    // Wait until the child is listening, then keep its pipe drained.
    assert!(child.line().contains("\"started\""));
    let lines = child.take_lines();
    std::thread::spawn(move || lines.for_each(drop));
    let pid = Pid::from_raw(child.pid() as i32);

    let config = Config::builder(&service)
        .name("bench")
        .loopback_only()
        .discovery_port(port)
        .heartbeat(
            Duration::from_millis(interval),
            Duration::from_millis(timeout),
        )
        .build()
        .unwrap();
    let t0 = Instant::now();
    let (node, mut events) = Node::start(config).await.unwrap();
    let mut t_disc = None;
    let (t_up, dialer) = loop {
        match events.recv().await.unwrap() {
            Event::Discovered(_) => t_disc = Some(t0.elapsed()),
            Event::SessionUp { outbound, .. } => break (t0.elapsed(), outbound),
            _ => {}
        }
    };
    // Timestamp events as they arrive.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if tx.send((Instant::now(), e)).is_err() {
                break;
            }
        }
    });
    // Freeze at a random phase of the heartbeat.
    let phase = rand::random_range(0..interval);
    tokio::time::sleep(Duration::from_millis(3 * interval + phase)).await;
    let stop = Instant::now();
    kill(pid, Signal::SIGSTOP).unwrap();
    let mut last_pong = None;
    let (detect, since_pong) = loop {
        let (at, e) = rx.recv().await.unwrap();
        match e {
            Event::SessionDown { reason, .. } => {
                assert_eq!(reason, DownReason::HeartbeatTimeout);
                // Only the dialer pings (the acceptor reports the dialer's
                // samples), so only the dialer's last pong marks a frame.
                let since = dialer.then(|| at - last_pong.expect("a pong before the freeze"));
                break (at - stop, since);
            }
            Event::Rtt { .. } => last_pong = Some(at),
            _ => {}
        }
    };
    let cont = Instant::now();
    kill(pid, Signal::SIGCONT).unwrap();
    let reconnect = loop {
        if let (at, Event::SessionUp { .. }) = rx.recv().await.unwrap() {
            break at - cont;
        }
    };
    node.shutdown().await;
    drop(child);
    (t_disc.unwrap_or(t_up), t_up, detect, since_pong, reconnect)
}

/// One trial's figures; `since_pong` only when this node dialed.
type Trial = (Duration, Duration, Duration, Option<Duration>, Duration);
