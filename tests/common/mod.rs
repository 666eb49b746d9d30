//! Helpers shared by the loopback tests. Every node here uses `lo` only, its
//! own service name and its own discovery port, so tests running in
//! parallel never see each other and nothing leaves the machine.
#![allow(dead_code)]

pub mod noise;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use lanbeat::{Config, ConfigBuilder, Event, Events, Node, PeerId};
use tokio::time::{Instant, timeout};

/// A UDP port nobody uses right now.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback-only config with a fast heartbeat for test `name`.
pub fn config(name: &str, port: u16) -> ConfigBuilder {
    Config::builder(format!("t-{name}-{}", std::process::id()))
        .name(name)
        .loopback_only()
        .discovery_port(port)
        .heartbeat(Duration::from_millis(100), Duration::from_millis(300))
}

/// Waits up to `limit` for an event matching `pred`, skipping others.
pub async fn wait_for(
    events: &mut Events,
    limit: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = Instant::now() + limit;
    loop {
        match timeout(deadline - Instant::now(), events.recv()).await {
            Ok(Some(e)) if pred(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no matching event within {limit:?}"),
        }
    }
}

/// Waits for `SessionUp` with `peer`.
pub async fn wait_up(events: &mut Events, peer: PeerId, limit: Duration) {
    wait_for(
        events,
        limit,
        |e| matches!(e, Event::SessionUp { peer: p, .. } if *p == peer),
    )
    .await;
}

/// Starts two nodes and waits until each has a session with the other.
pub async fn connected_pair(a: Config, b: Config) -> ((Node, Events), (Node, Events)) {
    let (a, mut ea) = Node::start(a).await.unwrap();
    let (b, mut eb) = Node::start(b).await.unwrap();
    wait_up(&mut ea, b.id(), Duration::from_secs(5)).await;
    wait_up(&mut eb, a.id(), Duration::from_secs(5)).await;
    ((a, ea), (b, eb))
}

/// Initialises tracing output once (RUST_LOG=lanbeat=debug to see it).
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The path of an example binary, built (or found fresh) first: running
/// one test file alone does not build the examples, and a stale binary would
/// test old code.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--quiet", "--example", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot build example {name}");
        built.push(name.to_owned());
    }
    path
}
