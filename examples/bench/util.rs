//! Helpers shared by the bench scenarios.

use std::io::{BufRead, BufReader, Lines};
use std::net::UdpSocket;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The value after `--name` in a helper's arguments.
pub(crate) fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> T {
    let i = args
        .iter()
        .position(|a| a == name)
        .unwrap_or_else(|| panic!("missing {name}"));
    args[i + 1]
        .parse()
        .ok()
        .unwrap_or_else(|| panic!("bad {name}"))
}

/// A UDP port nobody uses right now.
pub(crate) fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Percentile `p` (0..=1) of sorted samples.
pub(crate) fn pct(v: &[Duration], p: f64) -> Duration {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Prints one table row of latency samples, with the p50 ratio to `base`.
pub(crate) fn row(name: &str, mut v: Vec<Duration>, base: Option<Duration>) {
    if v.is_empty() {
        println!("| {name:<46} |    0 | - | - | - | - | - |");
        return;
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = base
        .map(|b| format!("{:.1}×", ms(pct(&v, 0.5)) / ms(b)))
        .unwrap_or_else(|| "-".into());
    println!(
        "| {name:<46} | {:>4} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {ratio:>7} |",
        v.len(),
        ms(v[0]),
        ms(pct(&v, 0.5)),
        ms(pct(&v, 0.99)),
        ms(v[v.len() - 1]),
    );
}

/// Header for [`row`].
pub(crate) fn row_header() {
    println!("| what | n | min ms | p50 ms | p99 ms | max ms | vs baseline |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
}

/// The physical floor of discovery: one broadcast probe from a fresh socket
/// to a socket that answers unicast, on loopback.
pub(crate) fn udp_floor(trials: usize) -> Vec<Duration> {
    let port = free_port();
    let responder =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    responder.set_reuse_address(true).unwrap();
    responder
        .bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())
        .unwrap();
    let responder: UdpSocket = responder.into();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..trials {
            let (n, from) = responder.recv_from(&mut buf).unwrap();
            responder.send_to(&buf[..n], from).unwrap();
        }
    });
    let mut out = Vec::new();
    for _ in 0..trials {
        let t0 = Instant::now();
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_broadcast(true).unwrap();
        s.send_to(b"probe", ("127.255.255.255", port)).unwrap();
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).unwrap();
        out.push(t0.elapsed());
    }
    t.join().unwrap();
    out
}

/// A child process of this binary in a helper role; killed on drop.
pub(crate) struct Helper {
    child: Child,
    lines: Option<Lines<BufReader<ChildStdout>>>,
}

impl Helper {
    /// Starts `bench __child <args>`, optionally pinned to one CPU with
    /// `taskset`, optionally inside network namespace `netns`.
    pub(crate) fn start(args: &[String], cpu: Option<usize>, netns: Option<&str>) -> Helper {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Vec::<String>::new();
        if let Some(ns) = netns {
            cmd.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        if let Some(cpu) = cpu {
            cmd.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        }
        cmd.push(exe.to_string_lossy().into_owned());
        cmd.push("__child".into());
        cmd.extend(args.iter().cloned());
        Self::spawn(&cmd)
    }

    /// Starts the example peer (this binary in peer mode) with `args`.
    pub(crate) fn start_peer(args: &[String]) -> Helper {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = vec![exe.to_string_lossy().into_owned(), "--peer-child".into()];
        cmd.extend(args.iter().cloned());
        Self::spawn(&cmd)
    }

    fn spawn(cmd: &[String]) -> Helper {
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start helper");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Helper {
            child,
            lines: Some(lines),
        }
    }

    /// Hands the output over (to a reader thread).
    pub(crate) fn take_lines(&mut self) -> Lines<BufReader<ChildStdout>> {
        self.lines.take().expect("lines already taken")
    }

    /// The next line the helper printed.
    pub(crate) fn line(&mut self) -> String {
        self.lines
            .as_mut()
            .expect("lines taken")
            .next()
            .expect("helper ended")
            .expect("helper output")
    }

    /// The helper's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) of a process, from `/proc/<pid>/stat`.
/// CPU time of a process so far: (user, system).
pub(crate) fn cpu_times(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" of the command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let hz = 100; // USER_HZ on Linux
    let ticks = |i: usize| Duration::from_millis(f[i].parse::<u64>().unwrap() * 1000 / hz);
    (ticks(11), ticks(12))
}

/// Resident memory of a process in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
