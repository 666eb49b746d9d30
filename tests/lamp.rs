//! The lamp scenario, end to end, with the example's programs on loopback:
//! one lamp, two phones. Each step is checked on both phones, and its time
//! printed (`cargo test --test lamp -- --nocapture`).

#![cfg(unix)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(10);
/// The heartbeat the programs run with: 200 ms, timeout 1 s.
const TIMEOUT: Duration = Duration::from_secs(1);

/// One program of the example, its JSON lines read as they come.
struct Program {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<(Instant, Value)>,
}

impl Program {
    fn start(args: &[&str]) -> Program {
        let mut child = Command::new(common::example_bin("lamp"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the lamp example");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("a JSON line");
                if tx.send((Instant::now(), v)).is_err() {
                    break;
                }
            }
        });
        Program {
            child,
            stdin,
            lines,
        }
    }

    fn type_line(&mut self, line: &str) -> Instant {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        Instant::now()
    }

    /// The first line from now on that has all of `fields`, and when it
    /// came.
    fn expect(&self, fields: Value) -> (Instant, Value) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, v) = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {fields}"));
            let matches = fields
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, want)| v.get(k) == Some(want));
            if matches {
                return (at, v);
            }
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[test]
fn phones_see_the_lamp_state_on_connect_every_change_and_the_lamp_going_and_coming() {
    let port = common::free_port().to_string();
    let service = format!("t-lamp-{}", std::process::id());
    let identity = std::env::temp_dir().join(format!("lanbeat-lamp-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&identity);
    // Every program: loopback, this test's service and port, a 200 ms / 1 s
    // heartbeat, then `extra`.
    let start = |mode: &str, name: &str, extra: &[&str]| {
        let mut args = vec![mode, "--name", name, "--loopback", "--service", &service];
        args.extend(["--discovery-port", &port, "--heartbeat-ms", "200", "1000"]);
        args.extend(extra);
        Program::start(&args)
    };
    let id_arg = identity.to_str().unwrap();
    let mut lamp = start("device", "kitchen", &["--identity", id_arg]);
    let (_, started) = lamp.expect(serde_json::json!({"event": "started"}));
    let lamp_id = started["id"].clone();

    // 1. Phones that connect get the lamp's state.
    let t0 = Instant::now();
    let mut phones = [
        start("controller", "phone-1", &[]),
        start("controller", "phone-2", &[]),
    ];
    let lamp_is = |on: bool, online: bool, via: &str| serde_json::json!({"event": "lamp", "peer": lamp_id, "on": on, "online": online, "via": via});
    for p in &phones {
        let (at, _) = p.expect(lamp_is(false, true, "connect"));
        eprintln!("state on connect: {} after the phone started", ms(at - t0));
    }

    // 2. A command from one phone: its reply, and a push to the other.
    let sent = phones[0].type_line("toggle kitchen");
    // The reply, or the push that may overtake it (the same change).
    let on = serde_json::json!({"event": "lamp", "peer": lamp_id, "on": true, "online": true});
    let (replied, _) = phones[0].expect(on);
    let (pushed, _) = phones[1].expect(lamp_is(true, true, "push"));
    lamp.expect(serde_json::json!({"event": "state", "on": true}));
    eprintln!(
        "command: reply after {}, other phone after {}",
        ms(replied - sent),
        ms(pushed - sent)
    );

    // 3. The hand switch: pushed to both.
    let flipped = lamp.type_line("switch");
    for p in &phones {
        let (at, _) = p.expect(lamp_is(false, true, "push"));
        eprintln!("hand switch: phone after {}", ms(at - flipped));
    }

    // 4. The lamp loses power (frozen: no FIN, no reset, just silence):
    // offline on both within the heartbeat timeout.
    let frozen = Command::new("kill")
        .args(["-STOP", &lamp.child.id().to_string()])
        .status()
        .unwrap();
    assert!(frozen.success());
    let killed = Instant::now();
    for p in &phones {
        let (at, _) = p.expect(lamp_is(false, false, "down"));
        let took = at - killed;
        eprintln!("offline: after {}", ms(took));
        assert!(took < TIMEOUT + Duration::from_millis(500), "{took:?}");
    }

    // 5. It comes back switched on (its real state), with the same id.
    drop(lamp);
    let restarted = Instant::now();
    let _lamp = start("device", "kitchen", &["--identity", id_arg, "--on"]);
    for p in &phones {
        let (at, _) = p.expect(lamp_is(true, true, "connect"));
        eprintln!("online again: after {}", ms(at - restarted));
    }

    // A lamp that is not there is an error, not a hang.
    phones[1].type_line("toggle hall");
    phones[1].expect(serde_json::json!({"event": "error", "lamp": "hall"}));
    let _ = std::fs::remove_file(&identity);
}
