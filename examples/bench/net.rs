//! Scenarios across network namespaces (root only) and the idle soak:
//! `discovery` (cold start → discovered / session up, loopback and two
//! namespaces, beside a bare UDP probe/reply floor), `detect` (link cut →
//! `heartbeat_timeout` in namespaces) and `soak` (false timeouts under a
//! CPU hog).

use std::time::{Duration, Instant};

use lanbeat::{Config, Event, Node};
use serde_json::{Value, json};

use crate::netlab::Lab;
use crate::util::{Helper, arg, free_port, pct, row, row_header};

fn durations(v: &Value) -> Vec<Duration> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| Duration::from_secs_f64(x.as_f64().unwrap() / 1e6))
        .collect()
}

/// Runs a child role; returns false if `role` is not one of ours.
pub(crate) async fn child(role: &str, args: &[String]) -> bool {
    match role {
        "partner" => partner(args).await,
        "cold-starts" => cold_starts(args).await,
        "udp-responder" => udp_responder(arg(args, "--dport")).await,
        "udp-floor" => udp_floor(args).await,
        _ => return false,
    }
    true
}

fn config(args: &[String]) -> Config {
    let mut b =
        Config::builder(arg::<String>(args, "--service")).discovery_port(arg(args, "--dport"));
    if args.iter().any(|a| a == "--lo") {
        b = b.loopback_only();
    }
    b.build().unwrap()
}

/// A node that stays up for the others to find.
async fn partner(args: &[String]) {
    let (_node, mut events) = Node::start(config(args)).await.unwrap();
    println!("ready");
    while events.recv().await.is_some() {}
}

/// Starts a node `--trials` times in a row; for each, the time from
/// `Node::start` to the first `Discovered` and to the first `SessionUp`.
async fn cold_starts(args: &[String]) {
    let trials: usize = arg(args, "--trials");
    let mut disc = Vec::new();
    let mut up = Vec::new();
    for _ in 0..trials {
        let t0 = Instant::now();
        let (node, mut events) = Node::start(config(args)).await.unwrap();
        let mut d = None;
        loop {
            match events.recv().await.unwrap() {
                Event::Discovered(_) => d = Some(t0.elapsed()),
                Event::SessionUp { .. } => break,
                _ => {}
            }
        }
        up.push(t0.elapsed().as_secs_f64() * 1e6);
        disc.push(d.unwrap_or(t0.elapsed()).as_secs_f64() * 1e6);
        node.shutdown().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{}", json!({"discovered_us": disc, "up_us": up}));
}

async fn udp_responder(port: u16) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())
        .unwrap();
    let s: std::net::UdpSocket = s.into();
    println!("ready");
    let mut buf = [0u8; 64];
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        let _ = s.send_to(&buf[..n], from);
    }
}

/// The floor: a fresh socket broadcasts a probe to `--broadcast`, a
/// responder answers unicast.
async fn udp_floor(args: &[String]) {
    let trials: usize = arg(args, "--trials");
    let port: u16 = arg(args, "--dport");
    let bcast: String = arg(args, "--broadcast");
    let mut out = Vec::new();
    for _ in 0..trials {
        let t0 = Instant::now();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_broadcast(true).unwrap();
        s.send_to(b"probe", (bcast.as_str(), port)).unwrap();
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf).unwrap();
        out.push(t0.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("{}", json!({"floor_us": out}));
}

fn to_args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Cold starts on loopback and, as root, between two namespaces.
pub(crate) fn discovery(trials: usize) {
    println!(
        "cold start → discovered / session up, {trials} starts, beside a bare UDP probe/reply\n"
    );
    row_header();
    // Loopback.
    let dport = free_port().to_string();
    let service = format!("disc-{dport}");
    let common = [
        "--service",
        service.as_str(),
        "--dport",
        dport.as_str(),
        "--lo",
    ];
    let floor = crate::util::udp_floor(trials.max(50));
    cold_start_rows("loopback", trials, &common, None, floor);
    // Namespaces.
    let Some(lab) = Lab::new("bench-disc", 2) else {
        println!("\n(namespaces skipped: not root)");
        return;
    };
    let dport = "47474";
    let service = "disc-ns";
    let common = ["--service", service, "--dport", dport];
    let mut r = Helper::start(
        &to_args(&["udp-responder", "--dport", "47475"]),
        None,
        Some(lab.ns(1)),
    );
    assert_eq!(r.line(), "ready");
    let mut fl = Helper::start(
        &to_args(&[
            "udp-floor",
            "--trials",
            &trials.max(50).to_string(),
            "--dport",
            "47475",
            "--broadcast",
            "10.77.0.255",
        ]),
        None,
        Some(lab.ns(0)),
    );
    let fv: Value = serde_json::from_str(&fl.line()).unwrap();
    drop(r);
    let hosts = Some((lab.ns(0), lab.ns(1)));
    cold_start_rows(
        "namespaces",
        trials,
        &common,
        hosts,
        durations(&fv["floor_us"]),
    );
}

/// Runs a partner and `trials` cold starts beside it (in two lab hosts,
/// `(measured, partner)`, when given), and prints their rows beside the UDP
/// floor.
fn cold_start_rows(
    place: &str,
    trials: usize,
    common: &[&str],
    hosts: Option<(&str, &str)>,
    floor: Vec<Duration>,
) {
    let mut f = floor.clone();
    f.sort();
    let base = pct(&f, 0.5);
    let partner_args = [to_args(&["partner"]), to_args(common)].concat();
    let mut p = Helper::start(&partner_args, None, hosts.map(|h| h.1));
    assert_eq!(p.line(), "ready");
    let trials = trials.to_string();
    let starts_args = [
        to_args(&["cold-starts", "--trials", &trials]),
        to_args(common),
    ]
    .concat();
    let mut c = Helper::start(&starts_args, None, hosts.map(|h| h.0));
    let v: Value = serde_json::from_str(&c.line()).unwrap();
    report(place, floor, base, &v);
    drop(p);
}

/// The three rows of one discovery setting.
fn report(place: &str, floor: Vec<Duration>, base: Duration, v: &Value) {
    row(&format!("{place}: UDP probe → reply (floor)"), floor, None);
    let starts = [("discovered", "discovered_us"), ("session up", "up_us")];
    for (what, key) in starts {
        row(
            &format!("{place}: start → {what}"),
            durations(&v[key]),
            Some(base),
        );
    }
}

/// Link cut in namespaces → `heartbeat_timeout`, over `trials` cuts per
/// setting, with example peers in two hosts.
pub(crate) fn detect(trials: usize) {
    let Some(mut lab) = Lab::new("bench-det", 2) else {
        println!("detect needs root (network namespaces)");
        return;
    };
    lab.peer_cmd = Some(vec![
        std::env::current_exe().unwrap().into_os_string(),
        "--peer-child".into(),
    ]);
    println!("link cut → heartbeat_timeout between two namespaces, {trials} cuts per setting\n");
    row_header();
    for (interval, timeout) in [(100u64, 300u64), (1000, 3000)] {
        let (i, t) = (interval.to_string(), timeout.to_string());
        let hb = [
            "--heartbeat-interval-ms",
            i.as_str(),
            "--heartbeat-timeout-ms",
            t.as_str(),
        ];
        let mut a = lab.peer(0, "a", &hb);
        let mut b = lab.peer(1, "b", &hb);
        let bid = b.id.clone();
        let aid = a.id.clone();
        let mut delays = Vec::new();
        let mut reconnects = Vec::new();
        a.wait(
            0,
            Duration::from_secs(5),
            crate::netlab::about("session_up", &bid),
        );
        b.wait(
            0,
            Duration::from_secs(5),
            crate::netlab::about("session_up", &aid),
        );
        for _ in 0..trials {
            // A random phase within the heartbeat.
            std::thread::sleep(Duration::from_millis(
                3 * interval + rand::random_range(0..interval),
            ));
            let m = a.mark();
            let cut = Instant::now();
            lab.cut(1);
            let (at, v) = a.wait(
                m,
                Duration::from_millis(timeout * 3),
                crate::netlab::about("session_down", &bid),
            );
            assert_eq!(v["reason"], "heartbeat_timeout");
            delays.push(at - cut);
            let m = a.mark();
            let healed = Instant::now();
            lab.heal(1);
            let (at, _) = a.wait(
                m,
                Duration::from_secs(5),
                crate::netlab::about("session_up", &bid),
            );
            reconnects.push(at - healed);
        }
        row(
            &format!("cut → heartbeat_timeout ({interval} ms / {timeout} ms)"),
            delays,
            None,
        );
        row(
            &format!("heal → session up ({interval} ms / {timeout} ms)"),
            reconnects,
            None,
        );
    }
    println!("\nA cut → timeout delay is the timeout minus the age of the last frame");
    println!("received before the cut; it can never exceed the timeout plus scheduling.");
}

/// Idle sessions for `minutes` with both cores kept busy: count timeouts.
pub(crate) fn soak(minutes: u64) {
    println!("soak: {minutes} min idle, 2 CPU hogs; any session_down is a false timeout\n");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    let mut helpers = Vec::new();
    for (interval, timeout) in [(100u64, 300u64), (1000, 3000)] {
        let dport = free_port().to_string();
        let service = format!("soak-{dport}");
        for n in 0..4 {
            let (i, t) = (interval.to_string(), timeout.to_string());
            let args = to_args(&[
                "--name",
                &format!("p{n}"),
                "--service",
                &service,
                "--interface",
                "lo",
                "--discovery-port",
                &dport,
                "--heartbeat-interval-ms",
                &i,
                "--heartbeat-timeout-ms",
                &t,
                "--json",
            ]);
            helpers.push((interval, timeout, Helper::start_peer(&args)));
        }
    }
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    // Read every peer's lines until the end; count session_up/down.
    let (tx, rx) = std::sync::mpsc::channel();
    for (idx, (i, t, h)) in helpers.iter_mut().enumerate() {
        let lines = h.take_lines();
        let tx = tx.clone();
        let (i, t) = (*i, *t);
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if l.contains("\"session_up\"") || l.contains("\"session_down\"") {
                    let _ = tx.send((idx, i, t, l));
                }
            }
        });
    }
    drop(tx);
    let mut ups = std::collections::HashMap::new();
    let mut downs = Vec::new();
    while Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((idx, i, t, l)) => {
                if l.contains("session_up") {
                    *ups.entry((i, t)).or_insert(0) += 1;
                    let _ = idx;
                } else {
                    downs.push((i, t, l));
                }
            }
            Err(_) => continue,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        let _ = h.join();
    }
    for (i, t) in [(100u64, 300u64), (1000, 3000)] {
        let d = downs.iter().filter(|x| x.0 == i && x.1 == t).count();
        results.push(format!(
            "| {i} ms / {t} ms | 4 peers, {} sessions up | {d} |",
            ups.get(&(i, t)).copied().unwrap_or(0) / 2
        ));
    }
    println!("| heartbeat | sessions | false timeouts in {minutes} min |");
    println!("| --- | --- | --- |");
    for r in results {
        println!("{r}");
    }
    for d in downs {
        println!("  {}", d.2);
    }
}

/// The heartbeat settings of the impaired-link benches: the default and
/// a fast one, with the example peer's arguments for each.
const HEARTBEATS: [(&str, [&str; 4]); 2] = [
    (
        "1 s / 3 s",
        [
            "--heartbeat-interval-ms",
            "1000",
            "--heartbeat-timeout-ms",
            "3000",
        ],
    ),
    (
        "200 ms / 1 s",
        [
            "--heartbeat-interval-ms",
            "200",
            "--heartbeat-timeout-ms",
            "1000",
        ],
    ),
];

/// False timeouts on impaired links: a full mesh of 6 hosts (15 sessions)
/// in namespaces, loss on the bridge (an nftables rule, both ways), for
/// `minutes` per setting; prints session ends by timeout per session-hour
/// for each loss rate and heartbeat setting. `--baseline-bin PATH` runs an
/// example-peer binary of another build beside this one (the previous
/// design), setting by setting.
pub(crate) fn impaired(minutes: u64, losses: &[u32], baseline: Option<String>) {
    let settings = losses
        .iter()
        .map(|&loss| {
            let f: Impair = Box::new(move |l: &Lab| l.lose(loss));
            (format!("{loss} % loss"), f)
        })
        .collect();
    false_timeouts("loss on the bridge both ways", minutes, settings, baseline);
}

/// Jittered links: as [`impaired`], with every host's frames held 0 to
/// `jitter` ms each way by the lab's user-space delay relay (in order), so
/// a frame between two hosts waits up to twice that.
pub(crate) fn jittered(minutes: u64, jitters: &[u64], baseline: Option<String>) {
    let settings = jitters
        .iter()
        .map(|&ms| {
            let f: Impair = Box::new(move |l: &Lab| {
                for i in 0..6 {
                    l.delay(i, Duration::ZERO, Duration::from_millis(ms));
                }
            });
            (format!("0–{ms} ms per link each way"), f)
        })
        .collect();
    false_timeouts("jitter on every host's link", minutes, settings, baseline);
}

/// An impairment of a lab's links.
type Impair = Box<dyn Fn(&Lab)>;

/// False timeouts per session-hour under each impairment, at both heartbeat
/// settings, for this build and (with `baseline`) another build's example
/// peer, setting by setting.
fn false_timeouts(
    what: &str,
    minutes: u64,
    settings: Vec<(String, Impair)>,
    baseline: Option<String>,
) {
    let run = Duration::from_secs(minutes.max(1) * 60);
    println!(
        "false timeouts per session-hour, 6 hosts (15 sessions), {} min per setting, {what}\n",
        run.as_secs() / 60
    );
    println!("| condition | heartbeat | this build | previous build |");
    println!("| --- | --- | --- | --- |");
    for (condition, impair) in &settings {
        for (label, args) in HEARTBEATS {
            let measure = |bin: Option<&str>| {
                let mut lab = Lab::new("bench-impaired", 6).expect("namespaces (root) needed");
                if let Some(b) = bin {
                    lab.peer_cmd = Some(vec![b.into()]);
                }
                let (n, hours) = lab.timeouts_under_impairment(&args, run, |l| impair(l));
                format!("{:.1} ({n} in {hours:.2} h)", n as f64 / hours)
            };
            let this = measure(None);
            let prev = baseline
                .as_deref()
                .map(|b| measure(Some(b)))
                .unwrap_or_else(|| "-".into());
            println!("| {condition} | {label} | {this} | {prev} |");
        }
    }
}

/// Saturated slow links: two hosts whose uplinks are 64 kbit/s with a
/// 1.5 MB queue (tc tbf), each typing 200-byte lines at 120 % of the link
/// into its example peer for `minutes`, at both heartbeat settings; prints
/// session ends per session-hour and the most bytes queued in a link.
/// `--baseline-bin PATH` runs another build's example peer beside this
/// one, setting by setting.
pub(crate) fn saturated(minutes: u64, baseline: Option<String>) {
    let run = Duration::from_secs(minutes.max(1) * 60);
    println!(
        "session ends on a saturated link: 2 hosts, 64 kbit/s uplinks with a 1.5 MB queue, 120 % offered both ways for {} min\n",
        run.as_secs() / 60
    );
    println!(
        "| heartbeat | build | session ends | per session-hour | lines taken (a, b) | most queued |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, args) in HEARTBEATS {
        let builds = [Some(None), baseline.as_deref().map(Some)];
        for bin in builds.into_iter().flatten() {
            let mut lab = Lab::new("bench-sat", 2).expect("namespaces (root) needed");
            if let Some(b) = bin {
                lab.peer_cmd = Some(vec![b.into()]);
            }
            let mut a = lab.peer(0, "a", &args);
            let mut b = lab.peer(1, "b", &args);
            let bid = b.id.clone();
            b.wait(
                0,
                Duration::from_secs(10),
                crate::netlab::about("session_up", &a.id.clone()),
            );
            a.wait(
                0,
                Duration::from_secs(10),
                crate::netlab::about("session_up", &bid),
            );
            lab.rate_limit(0, 64, 1_500_000);
            lab.rate_limit(1, 64, 1_500_000);
            let am = a.mark();
            let (typed, backlog) = lab.saturate(&mut a, &mut b, 48, run);
            let ends = a
                .matching(am, crate::netlab::about("session_down", &bid))
                .len();
            let hours = run.as_secs_f64() / 3600.0;
            println!(
                "| {label} | {} | {ends} | {:.0} | {}, {} | {} KB ({:.1} s of the link) |",
                if bin.is_some() { "previous" } else { "this" },
                ends as f64 / hours,
                typed[0],
                typed[1],
                backlog / 1000,
                backlog as f64 / 8000.0
            );
        }
    }
}
