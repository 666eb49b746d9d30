//! The examples are part of the product: the demo must run to its end and
//! the example peer must keep its JSON contract. Both run on loopback only.

// The examples are driven with Unix signals (SIGTERM, SIGSTOP).
#![cfg(unix)]

mod common;

use common::example_bin as example;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_runs_to_its_end_within_30_seconds() {
    let mut child = Guard(
        Command::new(example("demo"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s).unwrap();
        s
    });
    let status = wait_exit(&mut child.0, Duration::from_secs(30));
    let out = reader.join().unwrap();
    assert!(status.success(), "{out}");
    for needle in [
        "full mesh of 3 sessions",
        "received from alice: \"hello from alice\"",
        "alice → carol: session down, reason \"heartbeat_timeout\"",
        "bob → carol: session down, reason \"heartbeat_timeout\"",
        "session up again",
        "alice → bob: session down, reason \"goodbye\"",
        "done in",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

struct JsonPeer {
    child: Guard,
    lines: mpsc::Receiver<Value>,
}

impl JsonPeer {
    fn start(name: &str, port: u16, service: &str) -> JsonPeer {
        Self::start_with(name, port, service, &[])
    }

    fn start_with(name: &str, port: u16, service: &str, extra: &[&str]) -> JsonPeer {
        let mut child = Command::new(example("peer"))
            .args(["--name", name, "--service", service, "--interface", "lo"])
            .args(extra)
            .args(["--discovery-port", &port.to_string()])
            .args([
                "--heartbeat-interval-ms",
                "100",
                "--heartbeat-timeout-ms",
                "300",
            ])
            .arg("--json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line: {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        JsonPeer {
            child: Guard(child),
            lines,
        }
    }

    fn expect(&self, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {event} event"));
            if v["event"] == event && pred(&v) {
                return v;
            }
        }
    }
}

#[test]
fn example_peer_keeps_its_json_contract() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let service = format!("t-contract-{}", std::process::id());
    let a = JsonPeer::start("ann", port, &service);
    let started = a.expect("started", |_| true);
    for f in ["id", "name", "tcp_port", "discovery_port"] {
        assert!(!started[f].is_null(), "started lacks {f}");
    }
    assert_eq!(started["discovery_port"], port);
    let mut b = JsonPeer::start_with("ben", port, &service, &["--meta", "fw=1.2"]);
    let b_started = b.expect("started", |_| true);
    let b_id = b_started["id"].clone();

    let d = a.expect("discovered", |v| v["peer"] == b_id);
    assert_eq!(d["name"], "ben");
    let addr: std::net::SocketAddr = d["addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr.port(), b_started["tcp_port"]);
    let up = a.expect("session_up", |v| v["peer"] == b_id);
    assert_eq!(up["name"], "ben");
    assert_eq!(up["role"], "peer");
    assert_eq!(up["metadata"]["fw"], "1.2");
    assert!(
        up["addr"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .is_ok()
    );
    let rtt = a.expect("rtt", |v| v["peer"] == b_id);
    assert!(rtt["rtt_us"].as_u64().is_some());

    // A line on stdin goes to every connected peer.
    b.expect("session_up", |_| true);
    let stdin = b.child.0.stdin.as_mut().unwrap();
    writeln!(stdin, "hello ann").unwrap();
    let m = a.expect("message", |v| v["peer"] == b_id);
    assert_eq!(m["data"], "hello ann");

    // `/meta KEY=VALUE` changes one entry; peers print the new metadata.
    writeln!(b.child.0.stdin.as_mut().unwrap(), "/meta fw=1.3").unwrap();
    let m = a.expect("metadata", |v| v["peer"] == b_id);
    assert_eq!(m["metadata"]["fw"], "1.3");

    // SIGTERM: a goodbye, well before the 300 ms timeout.
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let down = a.expect("session_down", |v| v["peer"] == b_id);
    assert_eq!(down["reason"], "goodbye");
    assert!(t0.elapsed() < Duration::from_millis(300));
    a.expect("lost", |v| v["peer"] == b_id);
    b.expect("stopped", |_| true);
    assert!(wait_exit(&mut b.child.0, Duration::from_secs(5)).success());
}

#[test]
fn example_peer_keeps_its_id_in_its_identity_file() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let service = format!("t-identity-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("lanbeat-ex-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.key");
    let _ = std::fs::remove_file(&file);
    let path = file.to_str().unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut p = JsonPeer::start_with("kay", port, &service, &["--identity", path]);
        let started = p.expect("started", |_| true);
        assert!(
            started["fingerprint"]
                .as_str()
                .is_some_and(|f| f.len() == 39),
            "{started}"
        );
        ids.push((started["id"].clone(), started["fingerprint"].clone()));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.child.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(wait_exit(&mut p.child.0, Duration::from_secs(5)).success());
    }
    assert_eq!(ids[0], ids[1], "same file, same id");
    // A file that is not an identity: the peer refuses to start, names the
    // file, and leaves it alone.
    std::fs::write(&file, "not a key\n").unwrap();
    let out = Command::new(example("peer"))
        .args([
            "--service",
            &service,
            "--interface",
            "lo",
            "--identity",
            path,
        ])
        .args(["--discovery-port", &port.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.key") && err.contains("not a lanbeat identity"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a key\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn example_peer_refuses_metadata_over_the_limits_and_names_them() {
    let long = format!("k={}", "v".repeat(257));
    let out = Command::new(example("peer"))
        .args(["--interface", "lo", "--meta", &long])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("257 bytes") && err.contains("256"), "{err}");
    let out = Command::new(example("peer"))
        .args(["--interface", "lo", "--meta", "no-equals-sign"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));
}

#[test]
fn example_peer_takes_a_cipher_and_refuses_one_without_encryption() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let service = format!("t-cipher-{}", std::process::id());
    // A ChaCha20-only peer and an `auto` one pair and talk.
    let a = JsonPeer::start_with("cha", port, &service, &["--cipher", "chacha20-poly1305"]);
    a.expect("started", |_| true);
    let mut b = JsonPeer::start_with("aut", port, &service, &["--cipher", "auto"]);
    let b_id = b.expect("started", |_| true)["id"].clone();
    a.expect("session_up", |v| v["peer"] == b_id);
    b.expect("session_up", |_| true);
    writeln!(b.child.0.stdin.as_mut().unwrap(), "over chacha").unwrap();
    let m = a.expect("message", |v| v["peer"] == b_id);
    assert_eq!(m["data"], "over chacha");
    // A cipher for plaintext sessions is a mistake, named at once.
    let out = Command::new(example("peer"))
        .args(["--interface", "lo", "--insecure-plaintext"])
        .args(["--cipher", "chacha20-poly1305"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cipher") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    // So is an unknown one.
    let out = Command::new(example("peer"))
        .args(["--interface", "lo", "--cipher", "rot13"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chacha20-poly1305"));
}
