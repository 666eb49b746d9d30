//! `scale`: the cost of idle sessions. A server process holds N sessions at
//! a 1 Hz heartbeat; a client process opens them. The bench samples the
//! server's CPU time (`/proc/PID/stat`) and resident memory. Baseline: a
//! minimal hand-written tokio heartbeat server, one task per connection,
//! answering 13-byte pings with 13-byte pongs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lanbeat::{Config, Node};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::noise;
use crate::util::{Helper, arg, cpu_times, rss_kib};

fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(ty);
    f.extend_from_slice(payload);
    f
}

/// Runs a child role; returns false if `role` is not one of ours.
pub(crate) async fn child(role: &str, args: &[String]) -> bool {
    match role {
        "raw-hb-server" => raw_server(false).await,
        "raw-hb-server-timeout" => raw_server(true).await,
        "lb-hb-server" => lb_server(arg(args, "--sessions"), false).await,
        "lb-hb-server-noise" | "lb-hb-server-noise-aes" => {
            lb_server(arg(args, "--sessions"), true).await
        }
        "hb-client" => {
            client(
                arg(args, "--port"),
                arg(args, "--sessions"),
                arg(args, "--lanbeat"),
                arg(args, "--noise"),
                arg(args, "--aes"),
            )
            .await
        }
        _ => return false,
    }
    true
}

/// The baseline: answers each 13-byte ping with a 13-byte pong. With
/// `timeout`, it also gives up on a connection silent for 3 s, the least a
/// heartbeat must do (lanbeat's sessions do that and more).
async fn raw_server(timeout: bool) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap().port());
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 13];
            loop {
                let read = s.read_exact(&mut buf);
                let ok = if timeout {
                    matches!(
                        tokio::time::timeout(Duration::from_secs(3), read).await,
                        Ok(Ok(_))
                    )
                } else {
                    read.await.is_ok()
                };
                buf[4] = 3;
                if !ok || s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// A lanbeat node accepting the sessions: in plaintext (protocol 1, what
/// the raw servers are compared with), or with `noise` (the default).
async fn lb_server(sessions: usize, noise: bool) {
    let mut config = Config::builder("scale");
    if !noise {
        config = config.insecure_plaintext();
    }
    let config = config
        .loopback_only()
        .discovery_port(crate::util::free_port())
        .max_sessions(sessions + 16)
        .max_handshakes(4096)
        .build()
        .unwrap();
    let (node, mut events) = Node::start(config).await.unwrap();
    println!("{}", node.local().tcp_port);
    while events.recv().await.is_some() {}
}

/// Opens `n` connections; on each, pings once a second (13 bytes; 17 with
/// the round-trip report of a lanbeat dialer). Speaks the lanbeat handshake
/// when `lanbeat`, after a Noise handshake and in records with `noise`.
async fn client(port: u16, n: usize, lanbeat: bool, noise: bool, aes: bool) {
    if noise {
        return noise_client(port, n, aes).await;
    }
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut s = loop {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        if lanbeat {
            let hello = json!({
                "protocol": 1, "service": "scale", "id": format!("{:016x}", 0x5ca1_e000_0000_0000_u64 + i as u64),
                "instance": "1", "name": "c", "role": "controller", "port": 0,
                "heartbeat_interval_ms": 1000, "heartbeat_timeout_ms": 3000, "max_frame_size": 65536,
            });
            s.write_all(&frame(1, &serde_json::to_vec(&hello).unwrap()))
                .await
                .unwrap();
        }
        // Spread the pings over the second.
        let phase = Duration::from_micros((i as u64 * 1_000_000 / n as u64) % 1_000_000);
        tasks.push(tokio::spawn(async move {
            let (mut rd, mut wr) = s.into_split();
            // A lanbeat dialer's ping reports its last round trip (time of
            // the last ping to its pong, in µs).
            let epoch = Instant::now();
            let clock = Arc::new((AtomicU64::new(0), AtomicU32::new(0)));
            let ours = clock.clone();
            let writer = tokio::spawn(async move {
                tokio::time::sleep(phase).await;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                for seq in 1u64.. {
                    tick.tick().await;
                    let mut payload = seq.to_be_bytes().to_vec();
                    let rtt = ours.1.load(Ordering::Relaxed);
                    if lanbeat && rtt > 0 {
                        payload.extend_from_slice(&rtt.to_be_bytes());
                    }
                    ours.0
                        .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    if wr.write_all(&frame(2, &payload)).await.is_err() {
                        break;
                    }
                }
            });
            // Read frames; a pong gives the next round-trip sample. (The
            // server's own first ping goes unanswered: it times nothing out.)
            let mut len = [0u8; 4];
            let mut body = vec![0u8; 65536];
            loop {
                if rd.read_exact(&mut len).await.is_err() {
                    break;
                }
                let l = u32::from_be_bytes(len) as usize;
                if l > body.len() || rd.read_exact(&mut body[..l]).await.is_err() {
                    break;
                }
                if l == 9 && body[0] == 3 {
                    let sent = clock.0.load(Ordering::Relaxed);
                    let us = (epoch.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000;
                    clock
                        .1
                        .store(us.clamp(1, u32::MAX as u64) as u32, Ordering::Relaxed);
                }
            }
            writer.abort();
        }));
        if i % 256 == 255 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!("connected");
    futures_pending().await;
}

/// The client of a Noise server: the same pings as [`client`]'s, in
/// records (one per ping), after the handshake and the hellos.
async fn noise_client(port: u16, n: usize, aes: bool) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = loop {
            match TcpStream::connect(("127.0.0.1", port)).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        // As a lanbeat dialer: without it, the handshake's last message
        // and the hello wait for a delayed ack (40 ms per session).
        s.set_nodelay(true).unwrap();
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let mut conn = noise::handshake_cipher(s, "scale", &secret, true, snow::Builder::new, aes)
            .await
            .unwrap();
        let mut hello = noise::hello("scale", noise::id_of(&secret), "c");
        hello["role"] = "controller".into();
        hello["heartbeat_interval_ms"] = 1000.into();
        hello["heartbeat_timeout_ms"] = 3000.into();
        conn.exchange_hellos(&hello).await;
        let phase = Duration::from_micros((i as u64 * 1_000_000 / n as u64) % 1_000_000);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(phase).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // As the plaintext client: each ping after the first reports
            // the last round trip, so the server stays passive.
            let (mut sent_at, mut rtt_us) = (Instant::now(), 0u32);
            for seq in 1u64.. {
                tokio::select! {
                    _ = tick.tick() => {
                        let mut payload = seq.to_be_bytes().to_vec();
                        if rtt_us > 0 {
                            payload.extend_from_slice(&rtt_us.to_be_bytes());
                        }
                        let ping = conn.seal(&frame(2, &payload));
                        sent_at = Instant::now();
                        if conn.tcp.write_all(&ping).await.is_err() {
                            break;
                        }
                    }
                    // One frame per record: a read is whole.
                    f = conn.recv_frame() => match f {
                        Some((3, _)) => {
                            rtt_us = sent_at.elapsed().as_micros().clamp(1, u32::MAX as u128) as u32;
                        }
                        Some(_) => {}
                        None => break,
                    },
                }
            }
        }));
        if i % 256 == 255 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!("connected");
    futures_pending().await;
}

async fn futures_pending() {
    std::future::pending::<()>().await;
}

/// The servers compared, baseline first.
const SERVERS: [(&str, &str); 3] = [
    ("raw-hb-server", "raw tokio"),
    ("raw-hb-server-timeout", "raw tokio + 3 s read timeout"),
    ("lb-hb-server", "lanbeat"),
];

pub(crate) fn scale(sessions: &[usize], secs: u64, rounds: usize) {
    println!("idle sessions at 1 Hz heartbeat; server CPU over {secs} s and RSS per session");
    println!("(servers one after the other, {rounds} round(s); ratios within a round)\n");
    println!("| sessions | round | server | CPU % of a core | RSS KiB/session | CPU vs raw |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for &n in sessions {
        // Per server: (CPU, RSS per session, CPU ratio to raw) per round.
        let mut results = vec![Vec::new(); SERVERS.len()];
        for round in 1..=rounds.max(1) {
            let mut raw_cpu = 0.0;
            for (i, (role, what)) in SERVERS.into_iter().enumerate() {
                let (cpu, per) = measure(role, n, secs);
                if i == 0 {
                    raw_cpu = cpu;
                }
                let ratio = cpu / f64::max(raw_cpu, 0.01);
                println!("| {n} | {round} | {what} | {cpu:.1} % | {per:.2} | {ratio:.2}× |");
                results[i].push((cpu, per, ratio));
            }
        }
        if rounds > 1 {
            for ((_, what), r) in SERVERS.into_iter().zip(&results) {
                let med = |f: fn(&(f64, f64, f64)) -> f64| median(r.iter().map(f).collect());
                let ratios: Vec<String> = r.iter().map(|x| format!("{:.2}", x.2)).collect();
                println!(
                    "| {n} | median | {what} | {:.1} % | {:.2} | {:.2}× ({}) |",
                    med(|x| x.0),
                    med(|x| x.1),
                    med(|x| x.2),
                    ratios.join(", ")
                );
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `role` as the server of `n` idle sessions: its CPU (% of a core
/// over `secs`) and RSS per session.
fn measure(role: &str, n: usize, secs: u64) -> (f64, f64) {
    let run = Running::start(role, n, false);
    let window = Window::open(&[&run]);
    std::thread::sleep(Duration::from_secs(secs));
    (window.close()[0].total(), run.per_session)
}

/// A server of idle sessions and the client holding them, up and pinging.
struct Running {
    server: Helper,
    _client: Helper,
    /// RSS per session, KiB.
    per_session: f64,
}

impl Running {
    /// With `pin`, the server runs on CPU 0 and its client on CPU 1.
    fn start(role: &str, n: usize, pin: bool) -> Running {
        let lanbeat = role.starts_with("lb-");
        let noise = role.starts_with("lb-hb-server-noise");
        let aes = role.ends_with("-aes");
        let mut server = Helper::start(
            &[role.into(), "--sessions".into(), n.to_string()],
            pin.then_some(0),
            None,
        );
        let port = server.line();
        std::thread::sleep(Duration::from_millis(300));
        let rss0 = rss_kib(server.pid());
        let mut client = Helper::start(
            &[
                "hb-client".into(),
                "--port".into(),
                port,
                "--sessions".into(),
                n.to_string(),
                "--lanbeat".into(),
                lanbeat.to_string(),
                "--noise".into(),
                noise.to_string(),
                "--aes".into(),
                aes.to_string(),
            ],
            pin.then_some(1),
            None,
        );
        assert_eq!(client.line(), "connected");
        std::thread::sleep(Duration::from_secs(5));
        let rss1 = rss_kib(server.pid());
        Running {
            per_session: (rss1.saturating_sub(rss0)) as f64 / n as f64,
            server,
            _client: client,
        }
    }
}

/// CPU time of some servers, sampled over the same stretch of time.
struct Window {
    pids: Vec<u32>,
    start: Vec<(Duration, Duration)>,
    t0: Instant,
}

/// A server's CPU over a window, in % of a core.
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.sys
    }
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} % ({:.2} + {:.2})",
            self.total(),
            self.user,
            self.sys
        )
    }
}

impl Window {
    fn open(runs: &[&Running]) -> Window {
        let pids: Vec<u32> = runs.iter().map(|r| r.server.pid()).collect();
        Window {
            start: pids.iter().map(|&p| cpu_times(p)).collect(),
            pids,
            t0: Instant::now(),
        }
    }

    /// Each server's CPU since `open`.
    fn close(self) -> Vec<Cpu> {
        let secs = self.t0.elapsed().as_secs_f64();
        let pct = |d: Duration| d.as_secs_f64() / secs * 100.0;
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(&p, &(u0, s0))| {
                let (u, s) = cpu_times(p);
                Cpu {
                    user: pct(u - u0),
                    sys: pct(s - s0),
                }
            })
            .collect()
    }
}

/// `scale --paired`: the raw server and lanbeat's run side by side, each
/// with its own client, and their CPU is sampled over the same windows, so
/// that what the machine does meanwhile (other tenants of the VM, clock
/// changes) weighs on both alike. One after the other, the ratio of one
/// 30 s window moved between 0.91 and 1.29 from round to round; side by
/// side, between about 1.01 and 1.09.
///
/// With `pin` both servers share CPU 0 and both clients CPU 1: where the
/// scheduler puts each process no longer varies (it decides which process
/// is charged for the loopback's receive work), and a window's ratio stays
/// within about 1 % of the run's (two raw servers: 0.986 to 1.000).
///
/// With `timeout`, the baseline is the raw server with a 3 s read timeout:
/// the least a heartbeat that notices a silent peer must do.
/// What `scale --paired` puts side by side: a baseline and lanbeat.
#[derive(Clone, Copy)]
pub(crate) enum Pairing {
    /// Raw tokio (or with `timeout`, raw tokio with a read timeout) and
    /// plaintext lanbeat.
    Raw { timeout: bool },
    /// Plaintext lanbeat and lanbeat with Noise: ChaCha20-Poly1305, or
    /// with `aes` AES-256-GCM (what a discovered peer with AES
    /// instructions is dialed with).
    Noise { aes: bool },
}

pub(crate) fn scale_paired(
    sessions: &[usize],
    secs: u64,
    windows: usize,
    pin: bool,
    pairing: Pairing,
) {
    let ((role, what), candidate) = match pairing {
        Pairing::Raw { timeout } => (SERVERS[usize::from(timeout)], "lb-hb-server"),
        Pairing::Noise { aes: false } => {
            (("lb-hb-server", "lanbeat plaintext"), "lb-hb-server-noise")
        }
        Pairing::Noise { aes: true } => (
            ("lb-hb-server", "lanbeat plaintext"),
            "lb-hb-server-noise-aes",
        ),
    };
    println!("idle sessions at 1 Hz heartbeat; {what} and lanbeat servers side by side,");
    println!("CPU sampled over the same {windows} window(s) of {secs} s");
    if pin {
        println!("(both servers on CPU 0, both clients on CPU 1)");
    }
    println!();
    println!(
        "| sessions | window | {what} CPU % (user + sys) | lanbeat CPU % (user + sys) | lanbeat RSS KiB/session | CPU vs baseline |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for &n in sessions {
        let raw = Running::start(role, n, pin);
        let lb = Running::start(candidate, n, pin);
        let mut ratios = Vec::new();
        let mut cpus = (Vec::new(), Vec::new());
        for w in 1..=windows.max(1) {
            let window = Window::open(&[&raw, &lb]);
            std::thread::sleep(Duration::from_secs(secs));
            let cpu = window.close();
            let ratio = cpu[1].total() / f64::max(cpu[0].total(), 0.01);
            println!(
                "| {n} | {w} | {} | {} | {:.2} | {ratio:.2}× |",
                cpu[0], cpu[1], lb.per_session
            );
            ratios.push(ratio);
            cpus.0.push(cpu[0]);
            cpus.1.push(cpu[1]);
        }
        // Each column's median on its own (user and system alike).
        let med = |c: &[Cpu]| Cpu {
            user: median(c.iter().map(|x| x.user).collect()),
            sys: median(c.iter().map(|x| x.sys).collect()),
        };
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {n} | median | {} | {} | {:.2} | {:.2}× ({}) |",
            med(&cpus.0),
            med(&cpus.1),
            lb.per_session,
            median(ratios.clone()),
            shown.join(", ")
        );
    }
}
