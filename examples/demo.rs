//! The local demo: three example peers on loopback find each other, hold
//! heartbeat-checked sessions and exchange a message; then one is frozen for
//! real (SIGSTOP), the others detect it by heartbeat timeout, it is thawed
//! and the mesh recovers; finally all leave gracefully. Ends by itself in
//! well under 30 s. Uses only the loopback interface.
//!
//! ```text
//! cargo run --example demo
//! ```

#[cfg(unix)]
#[path = "peer/app.rs"]
mod app;

#[cfg(unix)]
use std::collections::{HashMap, HashSet};
#[cfg(unix)]
use std::io::{BufRead, BufReader, Write};
#[cfg(unix)]
use std::process::{Child, ChildStdin, Command, Stdio};
#[cfg(unix)]
use std::sync::mpsc;
#[cfg(unix)]
use std::time::{Duration, Instant};

#[cfg(unix)]
use clap::Parser;
#[cfg(unix)]
use nix::sys::signal::{Signal, kill};
#[cfg(unix)]
use nix::unistd::Pid;
#[cfg(unix)]
use serde_json::Value;

#[cfg(unix)]
const NAMES: [&str; 3] = ["alice", "bob", "carol"];
#[cfg(unix)]
const INTERVAL_MS: u64 = 200;
#[cfg(unix)]
const TIMEOUT_MS: u64 = 1000;

#[cfg(unix)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--peer-child") {
        // Run as one of the peers.
        let peer_args = app::Args::parse_from(
            std::iter::once("peer".to_owned()).chain(args[2..].iter().cloned()),
        );
        app::main(peer_args);
    }
    if let Err(e) = demo() {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

/// A child peer; killed on drop so that a failing demo leaves nothing behind.
#[cfg(unix)]
struct Peer {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
}

#[cfg(unix)]
impl Peer {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
    fn signal(&self, s: Signal) {
        let _ = kill(self.pid(), s);
    }
}

#[cfg(unix)]
impl Drop for Peer {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One JSON line from one peer, with its arrival time.
#[cfg(unix)]
struct Line {
    from: &'static str,
    at: Instant,
    v: Value,
}

#[cfg(unix)]
struct Demo {
    rx: mpsc::Receiver<Line>,
    ids: HashMap<String, &'static str>,
    start: Instant,
}

#[cfg(unix)]
impl Demo {
    /// Waits for a line matching `pred` (up to `limit`), printing notable
    /// ones as they pass.
    fn wait(
        &mut self,
        limit: Duration,
        what: &str,
        mut pred: impl FnMut(&Line, &HashMap<String, &'static str>) -> bool,
    ) -> Result<Line, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .rx
                .recv_timeout(left)
                .map_err(|_| format!("timed out waiting for {what}"))?;
            if line.v["event"] == "started" {
                let id = line.v["id"].as_str().unwrap_or_default().to_owned();
                self.ids.insert(id, line.from);
            }
            if pred(&line, &self.ids) {
                return Ok(line);
            }
        }
    }

    fn name_of(&self, v: &Value) -> &'static str {
        v["peer"]
            .as_str()
            .and_then(|id| self.ids.get(id).copied())
            .unwrap_or("?")
    }

    fn t(&self) -> String {
        format!("[{:6.3} s]", self.start.elapsed().as_secs_f64())
    }
}

#[cfg(unix)]
fn demo() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // A free discovery port and a service of our own: nothing else on this
    // host hears the demo, and it hears nothing else.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let service = format!("lanbeat-demo-{}", std::process::id());
    println!("lanbeat demo: 3 peers on loopback, service {service}, discovery port {port}");
    println!("heartbeat every {INTERVAL_MS} ms, timeout {TIMEOUT_MS} ms\n");

    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let mut peers = Vec::new();
    for name in NAMES {
        let mut child = Command::new(&exe)
            .arg("--peer-child")
            .args(["--service", &service, "--name", name, "--loopback"])
            .args(["--discovery-port", &port.to_string()])
            .args(["--heartbeat-interval-ms", &INTERVAL_MS.to_string()])
            .args(["--heartbeat-timeout-ms", &TIMEOUT_MS.to_string()])
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start peer {name}: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(Line {
                        from: name,
                        at: Instant::now(),
                        v,
                    });
                }
            }
        });
        peers.push(Peer { name, child, stdin });
    }
    let mut d = Demo {
        rx,
        ids: HashMap::new(),
        start,
    };

    // 1. Discovery and sessions: every pair up.
    println!("1. discovery and sessions");
    let mut up: HashSet<(&str, &str)> = HashSet::new();
    while up.len() < 6 {
        let l = d.wait(Duration::from_secs(10), "the full mesh", |l, _| {
            l.v["event"] == "session_up" || l.v["event"] == "discovered"
        })?;
        let other = d.name_of(&l.v);
        if l.v["event"] == "discovered" {
            println!("{} {} discovered {other} at {}", d.t(), l.from, l.v["addr"]);
        } else if up.insert((l.from, other)) {
            println!("{} {} ↔ {other}: session up", d.t(), l.from);
        }
    }
    let mesh = start.elapsed();
    println!(
        "   full mesh of 3 sessions after {:.0} ms\n",
        mesh.as_secs_f64() * 1e3
    );

    // 2. RTT samples for a second.
    println!("2. heartbeat round-trip times (1 s of samples)");
    let mut rtts: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if let Ok(l) = d.wait(until - Instant::now(), "rtt", |l, _| l.v["event"] == "rtt") {
            let other = d.name_of(&l.v);
            rtts.entry((l.from, other))
                .or_default()
                .push(l.v["rtt_us"].as_u64().unwrap_or(0));
        }
    }
    let mut pairs: Vec<_> = rtts.into_iter().collect();
    pairs.sort();
    for ((a, b), mut v) in pairs {
        v.sort_unstable();
        println!(
            "   {a} → {b}: {} samples, median {} µs",
            v.len(),
            v[v.len() / 2]
        );
    }
    println!();

    // 3. A message from alice to everyone.
    println!("3. alice sends a message to all");
    let stdin = peers[0].stdin.as_mut().expect("piped");
    writeln!(stdin, "hello from alice").map_err(|e| e.to_string())?;
    let mut got = HashSet::new();
    while got.len() < 2 {
        let l = d.wait(Duration::from_secs(5), "the message", |l, _| {
            l.v["event"] == "message"
        })?;
        println!(
            "{} {} received from {}: {}",
            d.t(),
            l.from,
            d.name_of(&l.v),
            l.v["data"]
        );
        got.insert(l.from);
    }
    println!();

    // 4. Freeze carol for real.
    println!("4. freezing carol (SIGSTOP): the others must notice by heartbeat timeout");
    let frozen_at = Instant::now();
    peers[2].signal(Signal::SIGSTOP);
    let mut down = HashSet::new();
    while down.len() < 2 {
        let l = d.wait(Duration::from_secs(5), "the timeouts", |l, ids| {
            l.v["event"] == "session_down"
                && l.v["peer"].as_str().and_then(|p| ids.get(p)) == Some(&"carol")
        })?;
        let delay = l.at - frozen_at;
        println!(
            "{} {} → carol: session down, reason {} ({:.0} ms after the freeze, \
             {TIMEOUT_MS} ms after her last frame)",
            d.t(),
            l.from,
            l.v["reason"],
            delay.as_secs_f64() * 1e3
        );
        if l.v["reason"] != "heartbeat_timeout" {
            return Err(format!("unexpected reason {}", l.v["reason"]));
        }
        down.insert(l.from);
    }
    std::thread::sleep(Duration::from_millis(1500));
    println!();

    // 5. Thaw and recover.
    println!("5. thawing carol (SIGCONT): discovery finds her again");
    let thawed_at = Instant::now();
    peers[2].signal(Signal::SIGCONT);
    let mut back = HashSet::new();
    while back.len() < 4 {
        let l = d.wait(Duration::from_secs(10), "the recovery", |l, ids| {
            let other = l.v["peer"].as_str().and_then(|p| ids.get(p)).copied();
            (l.v["event"] == "session_up" && (l.from == "carol" || other == Some("carol")))
                || (l.v["event"] == "session_down" && l.from == "carol")
        })?;
        let other = d.name_of(&l.v);
        if l.v["event"] == "session_down" {
            println!(
                "{} carol → {other}: her stale session ends ({})",
                d.t(),
                l.v["reason"]
            );
            continue;
        }
        if back.insert((l.from, other)) {
            println!(
                "{} {} ↔ {other}: session up again, {:.0} ms after the thaw",
                d.t(),
                l.from,
                (l.at - thawed_at).as_secs_f64() * 1e3
            );
        }
    }
    println!();

    // 6. Graceful goodbye.
    println!("6. everyone leaves gracefully (SIGTERM): peers see goodbye, not a timeout");
    let bye_at = Instant::now();
    peers[1].signal(Signal::SIGTERM);
    let mut byes = 0;
    while byes < 2 {
        let l = d.wait(Duration::from_secs(5), "the goodbyes", |l, ids| {
            l.v["event"] == "session_down"
                && l.v["peer"].as_str().and_then(|p| ids.get(p)) == Some(&"bob")
        })?;
        println!(
            "{} {} → bob: session down, reason {} ({:.0} ms after SIGTERM)",
            d.t(),
            l.from,
            l.v["reason"],
            (l.at - bye_at).as_secs_f64() * 1e3
        );
        byes += 1;
    }
    for p in &peers {
        p.signal(Signal::SIGTERM);
    }
    for p in &mut peers {
        let status = p.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("peer {} exited with {status}", p.name));
        }
    }
    println!(
        "\ndone in {:.1} s: discovery, sessions, RTT, messages, timeout, recovery, goodbye.",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The demo freezes a peer with SIGSTOP: Unix only (docs/PLATFORMS.md).
/// Elsewhere, run the example peer in two terminals.
#[cfg(not(unix))]
fn main() {
    eprintln!(
        "demo: needs Unix signals (SIGSTOP); run `cargo run --example peer -- --loopback` in two terminals instead"
    );
    std::process::exit(2);
}
