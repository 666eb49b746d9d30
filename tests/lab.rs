//! Scenarios on the real network stack, in a lab of network namespaces (see
//! `tests/netlab`). Peers are example-peer processes started with
//! `ip netns exec`, heartbeat 200 ms / timeout 1 s, default interface
//! selection (so `eth0` only, no loopback). Needs root; skips (or fails
//! under `LANBEAT_REQUIRE_NETNS=1`) otherwise. Figures are printed with
//! `LAB:` so `cargo test --test lab -- --nocapture | grep LAB:` collects them.

// Network namespaces: Linux only.
#![cfg(target_os = "linux")]

mod common;
mod netlab;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use netlab::{Lab, Peer, about};
use nix::sys::signal::Signal;

/// The bound of the issue: timeout + one interval + 200 ms.
const DETECT_BOUND: Duration = Duration::from_millis(1000 + 200 + 200);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits until `a` and `b` report a session with each other; returns when
/// the later of the two did.
fn both_up(a: &mut Peer, am: usize, b: &mut Peer, bm: usize, limit: Duration) -> Instant {
    let (ta, _) = a.wait(am, limit, about("session_up", &b.id.clone()));
    let (tb, _) = b.wait(bm, limit, about("session_up", &a.id.clone()));
    ta.max(tb)
}

fn pair(lab: &Lab) -> (Peer, Peer) {
    let mut a = lab.peer(0, "a", &[]);
    let mut b = lab.peer(1, "b", &[]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    (a, b)
}

#[test]
fn s01_default_interfaces_directed_broadcast_one_session() {
    let Some(lab) = Lab::new("s01", 2) else {
        return;
    };
    // IPv4 only: the addresses checked below are the IPv4 ones (IPv6 has
    // s20 and s21).
    lab.disable_ipv6(0);
    lab.disable_ipv6(1);
    let t0 = Instant::now();
    let mut a = lab.peer(0, "a", &[]);
    let mut b = lab.peer(1, "b", &[]);
    let up = both_up(&mut a, 0, &mut b, 0, Duration::from_secs(3));
    println!(
        "LAB: s01 two hosts: session up {:.1} ms after the first start",
        ms(up - t0)
    );
    let (_, d) = a.wait(0, Duration::ZERO, about("discovered", &b.id.clone()));
    assert_eq!(d["interface"], "eth0");
    assert_eq!(d["addr"], format!("{}:{}", lab.ip(1), b.tcp_port));
    std::thread::sleep(Duration::from_secs(1));
    for p in [&mut a, &mut b] {
        assert_eq!(
            p.matching(0, |v| v["event"] == "session_up").len(),
            1,
            "{}",
            p.name
        );
        assert!(p.matching(0, |v| v["event"] == "session_down").is_empty());
    }
}

#[test]
fn s02_cable_cut_is_a_heartbeat_timeout_on_both_ends() {
    let Some(lab) = Lab::new("s02", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let (am, bm) = (a.mark(), b.mark());
    let cut = Instant::now();
    lab.cut(1);
    let (aid, bid) = (a.id.clone(), b.id.clone());
    for (p, m, other) in [(&mut a, am, bid), (&mut b, bm, aid)] {
        let (t, v) = p.wait(
            m,
            DETECT_BOUND + Duration::from_millis(500),
            about("session_down", &other),
        );
        assert_eq!(v["reason"], "heartbeat_timeout", "{}", p.name);
        let delay = t - cut;
        println!(
            "LAB: s02 cut: {} detected after {:.0} ms",
            p.name,
            ms(delay)
        );
        assert!(delay <= DETECT_BOUND, "{}: {delay:?}", p.name);
    }
    std::thread::sleep(Duration::from_millis(500));
    for (p, m) in [(&mut a, am), (&mut b, bm)] {
        let downs = p.matching(m, |v| v["event"] == "session_down");
        assert_eq!(downs.len(), 1, "{}: {downs:?}", p.name);
    }
}

#[test]
fn s03_heal_brings_a_new_session_within_two_seconds() {
    let Some(lab) = Lab::new("s03", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    let (am, bm) = (a.mark(), b.mark());
    lab.cut(1);
    a.wait(am, DETECT_BOUND, about("session_down", &b.id.clone()));
    b.wait(bm, DETECT_BOUND, about("session_down", &a.id.clone()));
    std::thread::sleep(Duration::from_secs(1));
    let (am, bm) = (a.mark(), b.mark());
    let healed = Instant::now();
    lab.heal(1);
    let up = both_up(&mut a, am, &mut b, bm, Duration::from_secs(2));
    println!(
        "LAB: s03 heal: new session {:.0} ms after the link returned",
        ms(up - healed)
    );
    assert!(up - healed <= Duration::from_secs(2));
}

#[test]
fn s04_frozen_peer_times_out_and_recovers_to_one_session() {
    let Some(lab) = Lab::new("s04", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    std::thread::sleep(Duration::from_millis(300));
    let am = a.mark();
    let frozen = Instant::now();
    b.signal(Signal::SIGSTOP);
    let (t, v) = a.wait(
        am,
        DETECT_BOUND + Duration::from_millis(500),
        about("session_down", &b.id.clone()),
    );
    assert_eq!(v["reason"], "heartbeat_timeout");
    println!("LAB: s04 freeze: detected after {:.0} ms", ms(t - frozen));
    assert!(t - frozen <= DETECT_BOUND);
    std::thread::sleep(Duration::from_millis(500));
    let (am, bm) = (a.mark(), b.mark());
    let thawed = Instant::now();
    b.signal(Signal::SIGCONT);
    let up = both_up(&mut a, am, &mut b, bm, Duration::from_secs(3));
    println!(
        "LAB: s04 thaw: session up again {:.0} ms after SIGCONT",
        ms(up - thawed)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a.matching(am, |v| v["event"] == "session_up").len(), 1);
    assert!(a.matching(am, |v| v["event"] == "session_down").is_empty());
    assert_eq!(b.matching(bm, |v| v["event"] == "session_up").len(), 1);
}

#[test]
fn s05_sigterm_is_a_goodbye_within_300_ms() {
    let Some(lab) = Lab::new("s05", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    let am = a.mark();
    let t0 = Instant::now();
    b.signal(Signal::SIGTERM);
    let (t, v) = a.wait(
        am,
        Duration::from_secs(2),
        about("session_down", &b.id.clone()),
    );
    assert_eq!(v["reason"], "goodbye");
    println!("LAB: s05 goodbye seen after {:.1} ms", ms(t - t0));
    assert!(t - t0 <= Duration::from_millis(300));
    a.wait(am, Duration::from_secs(1), about("lost", &b.id.clone()));
    assert!(b.wait_exit(Duration::from_secs(3)).success());
}

#[test]
fn s06_sigkill_is_seen_at_once_and_the_restart_is_rediscovered() {
    let Some(lab) = Lab::new("s06", 2) else {
        return;
    };
    // IPv4 only: the addresses checked below are the IPv4 ones (IPv6 has
    // s20 and s21).
    lab.disable_ipv6(0);
    lab.disable_ipv6(1);
    let mut a = lab.peer(0, "a", &[]);
    // The restarted node keeps its identity, so its id.
    let key = KeyFile::new("s06", "b", &lanbeat::Identity::generate());
    let id = key.id.as_str();
    let mut b = lab.peer(1, "b", &["--identity", key.arg()]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    let old_port = b.tcp_port;
    let am = a.mark();
    let t0 = Instant::now();
    b.signal(Signal::SIGKILL);
    let (t, v) = a.wait(am, Duration::from_secs(2), about("session_down", id));
    println!(
        "LAB: s06 crash: loss seen after {:.1} ms ({})",
        ms(t - t0),
        v["reason"]
    );
    assert_eq!(v["reason"], "closed");
    assert!(t - t0 <= Duration::from_millis(300));
    drop(b);
    let restart = Instant::now();
    let mut b2 = lab.peer(1, "b", &["--identity", key.arg()]);
    assert_ne!(b2.tcp_port, old_port);
    let (_, d) = a.wait(am, Duration::from_secs(3), |v| {
        v["event"] == "discovered"
            && v["peer"] == id
            && v["addr"] != format!("{}:{old_port}", lab.ip(1))
    });
    assert_eq!(d["addr"], format!("{}:{}", lab.ip(1), b2.tcp_port));
    let up = both_up(&mut a, am, &mut b2, 0, Duration::from_secs(3));
    println!(
        "LAB: s06 restart: session up {:.1} ms after the restart began",
        ms(up - restart)
    );
}

#[test]
fn s07_five_hosts_full_mesh_cut_one_heal_it() {
    let Some(lab) = Lab::new("s07", 5) else {
        return;
    };
    let t0 = Instant::now();
    let mut peers: Vec<Peer> = (0..5).map(|i| lab.peer(i, &format!("p{i}"), &[])).collect();
    let started = Instant::now();
    let ids: Vec<String> = peers.iter().map(|p| p.id.clone()).collect();
    let mut done = started;
    for (i, p) in peers.iter_mut().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                let (t, _) = p.wait(0, Duration::from_secs(3), about("session_up", id));
                done = done.max(t);
            }
        }
    }
    println!(
        "LAB: s07 mesh of 10 sessions: {:.0} ms after the last start ({:.0} ms after the first)",
        ms(done - started),
        ms(done - t0)
    );
    assert!(done - started <= Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(500));
    for p in peers.iter_mut() {
        assert_eq!(
            p.matching(0, |v| v["event"] == "session_up").len(),
            4,
            "{}",
            p.name
        );
    }
    // Cut host 4: only its sessions drop.
    let marks: Vec<usize> = peers.iter_mut().map(|p| p.mark()).collect();
    let cut = Instant::now();
    lab.cut(4);
    for i in 0..4 {
        let (t, v) = peers[i].wait(
            marks[i],
            DETECT_BOUND + Duration::from_millis(500),
            about("session_down", &ids[4]),
        );
        assert_eq!(v["reason"], "heartbeat_timeout");
        assert!(t - cut <= DETECT_BOUND, "{:?}", t - cut);
    }
    for id in &ids[..4] {
        peers[4].wait(
            marks[4],
            DETECT_BOUND + Duration::from_millis(500),
            about("session_down", id),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..4 {
        let downs = peers[i].matching(marks[i], |v| v["event"] == "session_down");
        assert_eq!(
            downs.len(),
            1,
            "{}: only the cut host's session drops: {downs:?}",
            peers[i].name
        );
    }
    // Heal: it rejoins everyone.
    let marks: Vec<usize> = peers.iter_mut().map(|p| p.mark()).collect();
    let healed = Instant::now();
    lab.heal(4);
    let mut back = healed;
    for j in 0..4 {
        let (t, _) = peers[4].wait(
            marks[4],
            Duration::from_secs(3),
            about("session_up", &ids[j]),
        );
        let (t2, _) = peers[j].wait(
            marks[j],
            Duration::from_secs(3),
            about("session_up", &ids[4]),
        );
        back = back.max(t).max(t2);
    }
    println!(
        "LAB: s07 heal: host 4 rejoined all 4 peers {:.0} ms after the link returned",
        ms(back - healed)
    );
}

#[test]
fn s08_late_interface_is_used_without_a_restart() {
    let Some(lab) = Lab::with_addresses("s08", 2, &[true, false]) else {
        return;
    };
    // No IPv6 either: b has no address at all until the IPv4 one comes.
    lab.disable_ipv6(1);
    let mut a = lab.peer(0, "a", &[]);
    let mut b = lab.peer(1, "b", &[]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(b.matching(0, |v| v["event"] == "session_up").is_empty());
    let added = Instant::now();
    lab.add_addr(1);
    let up = both_up(&mut a, 0, &mut b, 0, Duration::from_secs(3));
    println!(
        "LAB: s08 late address: session up {:.0} ms after the address was added",
        ms(up - added)
    );
    let (_, d) = a.wait(0, Duration::ZERO, about("discovered", &b.id.clone()));
    assert_eq!(d["addr"], format!("{}:{}", lab.ip(1), b.tcp_port));
}

#[test]
fn s09_services_on_one_host() {
    let Some(lab) = Lab::new("s09", 2) else {
        return;
    };
    let mut x1 = lab.peer(0, "x1", &["--service", "svc-x"]);
    let mut y = lab.peer(0, "y", &["--service", "svc-y"]);
    let mut x2 = lab.peer(0, "x2", &["--service", "svc-x"]);
    let mut far = lab.peer(1, "far", &["--service", "svc-x"]);
    let (x1id, x2id, farid) = (x1.id.clone(), x2.id.clone(), far.id.clone());
    for (p, others) in [
        (&mut x1, vec![&x2id, &farid]),
        (&mut x2, vec![&x1id, &farid]),
        (&mut far, vec![&x1id, &x2id]),
    ] {
        for o in others {
            p.wait(0, Duration::from_secs(3), about("session_up", o));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        y.matching(0, |v| v["event"] == "discovered"
            || v["event"] == "session_up")
            .is_empty()
    );
    let seen: HashSet<String> = far
        .matching(0, |v| v["event"] == "session_up")
        .iter()
        .map(|(_, v)| v["peer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, HashSet::from([x1id, x2id]));
    assert!(!seen.contains(&y.id));
}

#[test]
fn s10_without_resumption_messages_sent_during_a_cut_are_handed_back_none_lost() {
    let Some(lab) = Lab::new("s10", 2) else {
        return;
    };
    // Resumption off (a grace of 0 on A is enough): a cut hands back.
    let mut a = lab.peer(0, "a", &["--resume-grace-ms", "0"]);
    let mut b = lab.peer(1, "b", &[]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    let bid = b.id.clone();
    let bm = b.mark();
    for i in 0..10 {
        a.say(&format!("before {i}"));
    }
    b.wait(bm, Duration::from_secs(2), |v| {
        v["event"] == "message" && v["data"] == "before 9"
    });
    std::thread::sleep(Duration::from_millis(300));
    let am = a.mark();
    lab.cut(1);
    for i in 0..10 {
        a.say(&format!("during {i}"));
    }
    a.wait(
        am,
        DETECT_BOUND + Duration::from_millis(500),
        about("session_down", &bid),
    );
    // Written into the cut, never acknowledged: unconfirmed.
    let (_, und) = a.wait(am, Duration::from_secs(1), about("unconfirmed", &bid));
    lab.heal(1);
    let (am2, bm2) = (a.mark(), b.mark());
    both_up(&mut a, am2, &mut b, bm2, Duration::from_secs(3));
    for i in 0..10 {
        a.say(&format!("after {i}"));
    }
    b.wait(bm2, Duration::from_secs(2), |v| {
        v["event"] == "message" && v["data"] == "after 9"
    });
    std::thread::sleep(Duration::from_millis(200));
    // Every line that was accepted for b: delivered or handed back.
    let sent = a
        .matching(0, |v| {
            v["event"] == "sent"
                && v["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|x| x == bid.as_str()))
        })
        .len();
    let delivered = b.matching(0, |v| v["event"] == "message").len();
    let count = |a: &mut Peer, what: &str| -> u64 {
        a.matching(0, about(what, &bid))
            .iter()
            .map(|(_, v)| v["count"].as_u64().unwrap())
            .sum()
    };
    let (unconfirmed, undelivered) = (count(&mut a, "unconfirmed"), count(&mut a, "undelivered"));
    let handed_back = unconfirmed + undelivered;
    println!(
        "LAB: s10 sent {sent} = delivered {delivered} + handed back {handed_back} ({unconfirmed} unconfirmed, {undelivered} undelivered)"
    );
    assert_eq!(sent, 30);
    assert_eq!(sent as u64, delivered as u64 + handed_back);
    assert_eq!(und["count"], 10);
    let back: Vec<_> = und["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        back,
        (0..10).map(|i| format!("during {i}")).collect::<Vec<_>>()
    );
}

/// Whether a TCP connection from `lab`'s host `from` to `addr:port` is
/// accepted (bash's `/dev/tcp`, inside the host's namespace).
fn tcp_reaches(lab: &Lab, from: usize, addr: &str, port: u16) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", lab.ns(from), "timeout", "5", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{addr}/{port}"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run bash in the namespace")
        .success()
}

/// The attack of issue 14: a client on another host opened a session to a
/// node configured for loopback only, whose listener was bound to every
/// address. Now a node that names one interface binds its sockets to it:
/// from another host the port is closed, on the node's own host it is
/// open, and the loopback-only nodes still find each other.
#[test]
fn s11_a_loopback_only_node_is_unreachable_from_another_host() {
    let Some(lab) = Lab::new("s11", 2) else {
        return;
    };
    // One by name, one by flag: both mean the same.
    let mut a = lab.peer(0, "a", &["--interface", "lo"]);
    let mut b = lab.peer(0, "b", &["--loopback"]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(3));
    let open = lab.peer(0, "open", &[]);
    let h0 = lab.ip(0).to_string();
    // The probe itself works: a node on every interface is reachable.
    assert!(tcp_reaches(&lab, 1, &h0, open.tcp_port));
    for p in [&a, &b] {
        assert!(
            !tcp_reaches(&lab, 1, &h0, p.tcp_port),
            "{} reachable from another host",
            p.name
        );
        assert!(tcp_reaches(&lab, 0, "127.0.0.1", p.tcp_port), "{}", p.name);
    }
    // And nothing of the other host's discovery reaches them.
    let mut far = lab.peer(1, "far", &[]);
    std::thread::sleep(Duration::from_secs(1));
    for p in [&mut a, &mut b] {
        assert!(
            p.matching(0, |v| v["event"] == "discovered"
                && v["peer"] == far.id.as_str())
                .is_empty(),
            "{} discovered the far host",
            p.name
        );
    }
    assert!(
        far.matching(0, |v| v["event"] == "discovered")
            .iter()
            .all(|(_, v)| v["peer"] == open.id.as_str())
    );
}

/// A lanbeat announce of `service` for a made-up node.
fn fake_announce(service: &str, id: u64, instance: u64, port: u16) -> Vec<u8> {
    let body = serde_json::json!({
        "service": service, "id": format!("{id:016x}"), "instance": format!("{instance:016x}"),
        "role": "peer", "name": "fake", "port": port,
    });
    let mut d = b"LNBT\x02\x02".to_vec();
    d.extend(serde_json::to_vec(&body).unwrap());
    d
}

/// An identity file for a lab peer (`--identity`), deleted on drop.
struct KeyFile {
    path: std::path::PathBuf,
    id: String,
}

impl KeyFile {
    fn new(lab: &str, who: &str, identity: &lanbeat::Identity) -> KeyFile {
        let path = std::env::temp_dir().join(format!(
            "lanbeat-lab-{lab}-{who}-{}.key",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        identity.save(&path).unwrap();
        KeyFile {
            path,
            id: identity.peer_id().to_string(),
        }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An announce flood from another host (issue 14): 2 000 made-up ids a
/// second for 3 s, broadcast, each naming a port on the sending host (a
/// receiver takes the address from the datagram's source; a spoofed
/// source would name a third party, at the same rate). The attacked node
/// connects there at most at its dial rate (20 a second after a burst of
/// 20), and a real node that starts in the middle of the flood still has
/// its session within 3 s.
#[test]
fn s12_an_announce_flood_drives_no_connects_and_locks_no_one_out() {
    let Some(lab) = Lab::new("s12", 3) else {
        return;
    };
    let service = "lanbeat-demo";
    let mut victim = lab.peer(0, "victim", &[]);
    // Counts every connection the flood provokes from the victim (the
    // real node hears the flood too, and dials on its own budget).
    let victim_ip = std::net::IpAddr::V4(lab.ip(0));
    let counted = lab.inside(1, move || {
        let l = std::net::TcpListener::bind("0.0.0.0:4711").unwrap();
        l.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        let mut n = 0u32;
        while Instant::now() < end {
            match l.accept() {
                Ok((_, from)) if from.ip() == victim_ip => n += 1,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        n
    });
    let flood = lab.inside(1, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_broadcast(true).unwrap();
        let mut sent = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            for _ in 0..20 {
                sent += 1;
                // Above the victim's id (but for odds of 2^-32), so the
                // victim is the one to dial them.
                let id = 0xffff_ffff_0000_0000 + sent;
                let d = fake_announce(service, id, sent, 4711);
                let _ = s.send_to(&d, ("10.77.0.255", lanbeat::DEFAULT_DISCOVERY_PORT));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(1));
    let m = victim.mark();
    let t0 = Instant::now();
    let real = lab.peer(2, "real", &[]);
    let (up, _) = victim.wait(
        m,
        Duration::from_secs(3),
        about("session_up", &real.id.clone()),
    );
    let sent = flood.join().unwrap();
    let connects = counted.join().unwrap();
    println!(
        "LAB: s12 flood of {sent} announces in 3 s: real peer up {:.0} ms after its start, {connects} connects to the named address in 5 s",
        ms(up - t0)
    );
    assert!(sent >= 4000, "flood too slow ({sent})");
    // Over the counter's 5 s (made-up peers that entered are redialed
    // after the flood too, until they expire): the burst, then 20 a second.
    assert!(
        connects <= 20 + 5 * 20 + 5,
        "{connects} connects to the named address in 5 s"
    );
    // The flood did reach the node: it dialed some of the made-up peers.
    assert!(
        connects >= 20,
        "only {connects} connects: did the flood arrive?"
    );
}

/// Two hosts run one copied identity (the same `--identity` file): the third sees
/// them answer in turns. It must report it and hold its session with one
/// of them instead of flapping (issue 14: about 43 changes a minute
/// before).
#[test]
fn s13_a_duplicated_id_is_reported_and_does_not_flap() {
    let Some(lab) = Lab::new("s13", 3) else {
        return;
    };
    // The lower id dials: the observer gets the lower of two identities.
    let mut keys = [lanbeat::Identity::generate(), lanbeat::Identity::generate()];
    keys.sort_by_key(|k| k.peer_id());
    let mine = KeyFile::new("s13", "observer", &keys[0]);
    let copied = KeyFile::new("s13", "copied", &keys[1]);
    let dup = copied.id.as_str();
    let mut observer = lab.peer(0, "observer", &["--identity", mine.arg()]);
    let _a = lab.peer(1, "a", &["--identity", copied.arg()]);
    observer.wait(0, Duration::from_secs(3), about("session_up", dup));
    let _b = lab.peer(2, "b", &["--identity", copied.arg()]);
    let (_, dup_event) =
        observer.wait(0, Duration::from_secs(10), |v| v["event"] == "duplicate_id");
    assert_eq!(dup_event["peer"], dup);
    assert_ne!(dup_event["kept"], dup_event["other"]);
    std::thread::sleep(Duration::from_secs(1));
    let m = observer.mark();
    std::thread::sleep(Duration::from_secs(5));
    let changes = observer.matching(m, |v| {
        (v["event"] == "session_up" || v["event"] == "session_down") && v["peer"] == dup
    });
    println!(
        "LAB: s13 duplicate id: reported; {} session changes in the 5 s after",
        changes.len()
    );
    assert!(changes.is_empty(), "still flapping: {changes:?}");
}

/// Every frame that crosses the bridge for `d`: an `AF_PACKET` socket in
/// the bridge's namespace sees each port's traffic, headers and all.
fn capture(d: Duration) -> (usize, Vec<u8>) {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::Read;
    // ETH_P_ALL, in network byte order.
    let mut s = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(0x0300))).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let end = Instant::now() + d;
    let (mut frames, mut bytes) = (0, Vec::new());
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        if let Ok(n) = s.read(&mut buf) {
            frames += 1;
            bytes.extend_from_slice(&buf[..n]);
        }
    }
    (frames, bytes)
}

/// Nothing a message says can be read off the wire (issue 14): a capture
/// on the bridge of everything two hosts exchange never holds the
/// message's marker. The same capture of two peers in insecure plaintext
/// mode does: the capture sees what it must.
#[test]
fn s14_a_capture_of_the_wire_never_holds_a_message() {
    let Some(lab) = Lab::new("s14", 4) else {
        return;
    };
    const MARKER: &str = "MARKER-c0ffee-turn-the-lamp-on";
    let mut seen = Vec::new();
    for (hosts, args) in [((0, 1), &[][..]), ((2, 3), &["--insecure-plaintext"][..])] {
        let cap = lab.inside_bridge(|| capture(Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(100));
        let mut a = lab.peer(hosts.0, "a", args);
        let mut b = lab.peer(hosts.1, "b", args);
        both_up(&mut a, 0, &mut b, 0, Duration::from_secs(2));
        for i in 0..20 {
            a.say(&format!("{MARKER} {i}"));
        }
        b.wait(0, Duration::from_secs(1), |v| {
            v["event"] == "message" && v["data"] == format!("{MARKER} 19")
        });
        let (frames, bytes) = cap.join().unwrap();
        let found = bytes
            .windows(MARKER.len())
            .filter(|w| *w == MARKER.as_bytes())
            .count();
        println!(
            "LAB: s14 {}: {frames} frames ({} bytes) captured, marker found {found} times",
            if args.is_empty() {
                "encrypted"
            } else {
                "plaintext"
            },
            bytes.len()
        );
        seen.push((frames, found));
    }
    let [(enc_frames, enc_found), (_, plain_found)] = seen[..] else {
        unreachable!()
    };
    assert!(enc_frames > 20, "the capture saw the session");
    assert_eq!(enc_found, 0, "a message was readable on the wire");
    assert!(
        plain_found >= 20,
        "the capture missed the plaintext messages"
    );
}

/// A key file (64 hex digits) for `--psk-file`, deleted on drop.
struct PskFile(std::path::PathBuf);

impl PskFile {
    fn new(lab: &str, who: &str, key: &lanbeat::FleetKey) -> PskFile {
        let path = std::env::temp_dir().join(format!(
            "lanbeat-lab-{lab}-{who}-{}.psk",
            std::process::id()
        ));
        let hex: String = key.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, hex + "\n").unwrap();
        PskFile(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for PskFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fleet key between hosts (issue 14): two hosts with the key pair; a
/// third with another key and a bare prober without any get no answer and
/// no session, and learn nothing of the two.
#[test]
fn s15_without_the_fleet_key_no_reply_and_no_session() {
    let Some(lab) = Lab::new("s15", 4) else {
        return;
    };
    let fleet = PskFile::new("s15", "fleet", &lanbeat::FleetKey::generate());
    let wrong = PskFile::new("s15", "wrong", &lanbeat::FleetKey::generate());
    let mut a = lab.peer(0, "a", &["--psk-file", fleet.arg()]);
    let mut b = lab.peer(1, "b", &["--psk-file", fleet.arg()]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(3));
    let mut c = lab.peer(2, "c", &["--psk-file", wrong.arg()]);
    // A prober without the key, as the protocol describes it (no trailer).
    let probe_from_3 = |lab: &Lab| {
        lab.inside(3, || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_broadcast(true).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let body = br#"{"service":"lanbeat-demo","id":"00000000000000ee","instance":"1"}"#;
            let probe = [&b"LNBT\x02\x01"[..], body].concat();
            let mut replies = 0;
            let mut buf = [0u8; 2048];
            for _ in 0..10 {
                s.send_to(&probe, ("10.77.0.255", lanbeat::DEFAULT_DISCOVERY_PORT))
                    .unwrap();
                while s.recv_from(&mut buf).is_ok() {
                    replies += 1;
                }
            }
            replies
        })
        .join()
        .unwrap()
    };
    let replies = probe_from_3(&lab);
    std::thread::sleep(Duration::from_secs(2));
    let c_saw = c.matching(0, |v| {
        ["discovered", "session_up"].contains(&v["event"].as_str().unwrap_or(""))
    });
    let a_saw = a.matching(0, |v| v["event"] == "discovered" && v["peer"] != b.id);
    // The control: an open node on the third host answers the same probe.
    drop(c);
    let _open = lab.peer(2, "open", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let control = probe_from_3(&lab);
    println!(
        "LAB: s15 fleet key: {replies} replies to 10 unkeyed probes ({control} from an open node); \
         the wrong-key host saw {} events of the others",
        c_saw.len()
    );
    assert!(
        control > 0,
        "the probe itself is wrong: an open node did not answer"
    );
    assert_eq!(replies, 0, "a node answered a probe without the key");
    assert!(c_saw.is_empty(), "the wrong-key host learned of: {c_saw:?}");
    assert!(a_saw.is_empty(), "a key holder learned of: {a_saw:?}");
}

/// The UDP payloads to `port` in captured Ethernet frames (IPv4, no
/// options assumed beyond what IHL says).
fn udp_payloads(frames: &[Vec<u8>], port: u16) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter_map(|f| {
            let ip = f.get(14..)?;
            if f.get(12..14)? != [0x08, 0x00] || ip.get(9)? != &17 {
                return None;
            }
            let udp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
            let dst = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
            (dst == port).then(|| udp.get(8..).map(<[u8]>::to_vec))?
        })
        .collect()
}

/// Every frame that crosses the bridge for `d`, one by one.
fn capture_frames(d: Duration) -> Vec<Vec<u8>> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::Read;
    let mut s = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(0x0300))).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let end = Instant::now() + d;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        if let Ok(n) = s.read(&mut buf) {
            frames.push(buf[..n].to_vec());
        }
    }
    frames
}

/// The attacks of issue 14 between hosts, against a fleet with a key: an
/// attacker host captures the fleet's datagrams and sends them again, sends
/// announces claiming B's id pointing at itself, and connects to A with a
/// Noise handshake of its own claiming B's id. A's session with B never
/// drops, every message A sends reaches B in order, and A counts the
/// replays and the forgeries.
#[test]
fn s16_replays_spoofed_announces_and_forged_hellos_change_nothing() {
    let Some(lab) = Lab::new("s16", 3) else {
        return;
    };
    let fleet = PskFile::new("s16", "fleet", &lanbeat::FleetKey::generate());
    // Built before the capture starts, so the peers start within it.
    common::example_bin("peer");
    let cap = lab.inside_bridge(|| capture_frames(Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    let mut a = lab.peer(0, "a", &["--psk-file", fleet.arg()]);
    let mut b = lab.peer(1, "b", &["--psk-file", fleet.arg()]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(3));
    let captured = udp_payloads(&cap.join().unwrap(), lanbeat::DEFAULT_DISCOVERY_PORT);
    assert!(!captured.is_empty(), "nothing captured");
    println!("LAB: s16 captured {} discovery datagrams", captured.len());
    let (b_id, a_port) = (b.id.clone(), a.tcp_port);
    let a_ip = lab.ip(0);
    let attack = lab.inside(2, move || {
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.set_broadcast(true).unwrap();
        let sink = std::net::TcpListener::bind("0.0.0.0:4712").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut diverted = 0;
        for round in 0..5u8 {
            // Replays of everything captured, broadcast and to A.
            for d in &captured {
                let _ = udp.send_to(d, ("10.77.0.255", lanbeat::DEFAULT_DISCOVERY_PORT));
                let _ = udp.send_to(d, (a_ip, lanbeat::DEFAULT_DISCOVERY_PORT));
            }
            // A spoofed announce: B's id, a new instance, our port (no MAC:
            // we lack the key).
            let body = serde_json::json!({
                "service": "lanbeat-demo", "id": b_id, "instance": format!("{:016x}", 0xbad0 + u64::from(round)),
                "role": "peer", "name": "b", "port": 4712,
            });
            let mut d = b"LNBT\x02\x02".to_vec();
            d.extend(serde_json::to_vec(&body).unwrap());
            let _ = udp.send_to(&d, ("10.77.0.255", lanbeat::DEFAULT_DISCOVERY_PORT));
            // A forged hello over a Noise handshake of our own (it fails
            // at the fleet key: XX without the psk).
            diverted += rt.block_on(async {
                let Ok(tcp) = tokio::net::TcpStream::connect((a_ip, a_port)).await else {
                    return 0;
                };
                let secret = common::noise::secret(0x60 + round);
                let Ok(mut conn) = common::noise::handshake(tcp, "lanbeat-demo", &secret, true).await
                else {
                    return 0;
                };
                let id: lanbeat::PeerId = b_id.parse().unwrap();
                let forged = common::noise::hello("lanbeat-demo", id, "b");
                let _ = conn.send(&common::noise::frame(1, &serde_json::to_vec(&forged).unwrap())).await;
                let mut data = 0;
                while let Ok(Some((ty, _))) =
                    tokio::time::timeout(Duration::from_secs(1), conn.recv_frame()).await
                {
                    data += usize::from(ty == 4);
                }
                data
            });
            std::thread::sleep(Duration::from_millis(200));
        }
        sink.set_nonblocking(true).unwrap();
        let dials = std::iter::from_fn(|| sink.accept().ok()).count();
        (diverted, dials)
    });
    let am = a.mark();
    let bm = b.mark();
    for i in 0..30 {
        a.say(&format!("through the attack {i}"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (diverted, dials) = attack.join().unwrap();
    b.wait(bm, Duration::from_secs(2), |v| {
        v["event"] == "message" && v["data"] == "through the attack 29"
    });
    let got: Vec<String> = b
        .matching(bm, |v| v["event"] == "message")
        .iter()
        .map(|(_, v)| v["data"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (0..30).map(|i| format!("through the attack {i}")).collect();
    let downs = a.matching(am, |v| v["event"] == "session_down");
    a.say("/stats");
    let (_, stats) = a.wait(am, Duration::from_secs(2), |v| v["event"] == "stats");
    let stats = &stats["stats"];
    println!(
        "LAB: s16 replays and forgeries: {} replayed and {} unauthenticated datagrams dropped at A, \
         {diverted} messages diverted, {dials} dials to the attacker, {} of 30 messages delivered in order",
        stats["dropped_replayed"],
        stats["dropped_unauthenticated"],
        got.len()
    );
    assert!(downs.is_empty(), "A's session went down: {downs:?}");
    assert_eq!(got, want, "every message to B, in order");
    assert_eq!(diverted, 0);
    assert_eq!(dials, 0, "A dialed the address a spoofed announce named");
    assert!(stats["dropped_replayed"].as_u64().unwrap() > 0);
    assert!(stats["dropped_unauthenticated"].as_u64().unwrap() >= 5);
}

/// Two hosts on different subnets behind a router (issue 16): no broadcast
/// crosses. One names the other (`--peer`); the session comes up, carries
/// messages, times out when the far host's cable is cut, and comes back
/// after the heal.
#[test]
fn s17_a_peer_named_by_address_across_a_router() {
    let Some(lab) = Lab::routed("s17", 2) else {
        return;
    };
    let far = lab.ip(1).to_string();
    let mut b = lab.peer(1, "b", &[]);
    let started = Instant::now();
    let mut a = lab.peer(0, "a", &["--peer", &far]);
    let up = both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    let bm = b.mark();
    for i in 0..10 {
        a.say(&format!("across {i}"));
    }
    b.wait(bm, Duration::from_secs(2), |v| {
        v["event"] == "message" && v["data"] == "across 9"
    });
    let am = a.mark();
    let t0 = Instant::now();
    lab.cut(1);
    let (t, v) = a.wait(
        am,
        Duration::from_secs(3),
        about("session_down", &b.id.clone()),
    );
    assert_eq!(v["reason"], "heartbeat_timeout");
    let detect = t - t0;
    let am = a.mark();
    let bm = b.mark();
    let healed = Instant::now();
    lab.heal(1);
    let back = both_up(&mut a, am, &mut b, bm, Duration::from_secs(5));
    println!(
        "LAB: s17 across a router by address: session up {:.0} ms after a started, cut seen after {:.0} ms, back {:.0} ms after the heal",
        ms(up - started),
        ms(detect),
        ms(back - healed)
    );
    assert!(detect <= DETECT_BOUND, "{detect:?}");
}

/// The steady state of discovery at 12 hosts (issue 16): once every node
/// holds its sessions and its probes have backed off to their cap, a probe
/// is not answered by the peers it lists as known, so what a node sends
/// does not grow with the number of nodes: at most 10 datagrams a minute.
#[test]
fn s18_steady_state_discovery_is_quiet_at_12_hosts() {
    // `LANBEAT_LAB_HOSTS=24` for the larger run (by hand: docs/TESTING.md).
    let n: usize = std::env::var("LANBEAT_LAB_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    assert!(
        n <= 24,
        "more than 24 hosts needs the neighbour table raised"
    );
    let Some(lab) = Lab::new("s18", n) else {
        return;
    };
    let mut peers: Vec<Peer> = (0..n).map(|i| lab.peer(i, &format!("p{i}"), &[])).collect();
    let t0 = Instant::now();
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let id = peers[j].id.clone();
                peers[i].wait(0, Duration::from_secs(10), about("session_up", &id));
            }
        }
    }
    let mesh = t0.elapsed();
    let stats = |p: &mut Peer| {
        let m = p.mark();
        p.say("/stats");
        let (_, v) = p.wait(m, Duration::from_secs(2), |v| v["event"] == "stats");
        v["stats"]["datagrams_sent"].as_u64().unwrap()
    };
    // Probes back off to their 30 s cap within about 50 s of the start.
    std::thread::sleep(Duration::from_secs(55).saturating_sub(t0.elapsed()));
    let before: Vec<u64> = peers.iter_mut().map(stats).collect();
    let marks: Vec<usize> = peers.iter_mut().map(|p| p.mark()).collect();
    let window = Duration::from_secs(30);
    std::thread::sleep(window);
    let after: Vec<u64> = peers.iter_mut().map(stats).collect();
    let per_min: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 * 60.0 / window.as_secs_f64())
        .collect();
    let max = per_min.iter().cloned().fold(0.0, f64::max);
    let mean = per_min.iter().sum::<f64>() / n as f64;
    let churn: usize = peers
        .iter_mut()
        .zip(&marks)
        .map(|(p, m)| p.matching(*m, |v| v["event"] == "session_down").len())
        .sum();
    println!(
        "LAB: s18 {n} hosts: full mesh {:.0} ms after the last start; steady state {mean:.1} datagrams sent per node per minute (max {max:.1}); {churn} sessions down",
        ms(mesh)
    );
    assert_eq!(churn, 0);
    assert!(max <= 10.0, "{per_min:?} datagrams per node per minute");
}

/// A link that comes back is acted on at once (the OS's notification, not
/// the next periodic rescan): an announce and a probe go out, and the
/// session is back within milliseconds. The cuts last 4 s, past the
/// kernel's resolution of the peer's link address from sends made during
/// the cut (three ARP probes one second apart): after a shorter cut the
/// first unicast waits for that resolution to fail, up to about a second
/// (docs/PLATFORMS.md). While the link is down nothing is sent on it.
#[test]
fn s19_a_link_that_returns_is_used_at_once_and_a_down_one_not_at_all() {
    let Some(lab) = Lab::new("s19", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    let mut heals = Vec::new();
    for _ in 0..3 {
        let (am, bm) = (a.mark(), b.mark());
        lab.cut(1);
        a.wait(am, DETECT_BOUND, about("session_down", &b.id.clone()));
        b.wait(bm, DETECT_BOUND, about("session_down", &a.id.clone()));
        // Past the detection: b's counters now see only the link down.
        let stats = |b: &mut netlab::Peer| {
            let m = b.mark();
            b.say("/stats");
            b.wait(m, Duration::from_secs(2), |v| v["event"] == "stats")
                .1
        };
        let before = stats(&mut b);
        std::thread::sleep(Duration::from_secs(3));
        let during = stats(&mut b);
        let errors = |v: &serde_json::Value| v["stats"]["datagram_send_errors"].as_u64().unwrap();
        let sent = |v: &serde_json::Value| v["stats"]["datagrams_sent"].as_u64().unwrap();
        assert_eq!(
            errors(&during),
            errors(&before),
            "no send errors while down"
        );
        assert_eq!(
            sent(&during),
            sent(&before),
            "nothing sent on the down link"
        );
        let (am, bm) = (a.mark(), b.mark());
        let healed = Instant::now();
        lab.heal(1);
        heals.push(both_up(&mut a, am, &mut b, bm, Duration::from_secs(3)) - healed);
    }
    heals.sort();
    println!(
        "LAB: s19 heal after 4 s cuts: session back after {:?} (p50 {:.1} ms)",
        heals
            .iter()
            .map(|d| format!("{:.1} ms", ms(*d)))
            .collect::<Vec<_>>(),
        ms(heals[1])
    );
    assert!(heals[1] <= Duration::from_millis(150), "{heals:?}");
}

/// Hosts with IPv6 only (link-local addresses, no IPv4, no configuration):
/// discovery by the project's multicast group, a session over link-local
/// addresses with their scope, a cut seen by timeout, and recovery.
#[test]
fn s20_ipv6_only_hosts_find_each_other_time_out_and_recover() {
    let Some(lab) = Lab::with_addresses("s20", 2, &[false, false]) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    // From the later of the two starts.
    let started = |p: &mut Peer| p.wait(0, Duration::ZERO, |v| v["event"] == "started").0;
    let t0 = started(&mut a).max(started(&mut b));
    let (ta, s) = a.wait(0, Duration::ZERO, about("session_up", &b.id.clone()));
    let (tb, _) = b.wait(0, Duration::ZERO, about("session_up", &a.id.clone()));
    let up = ta.max(tb) - t0;
    let addr = s["addr"].as_str().unwrap().to_owned();
    assert!(addr.starts_with("[fe80::") && addr.contains('%'), "{addr}");
    let (am, bm) = (a.mark(), b.mark());
    let cut = Instant::now();
    lab.cut(1);
    let (aid, bid) = (a.id.clone(), b.id.clone());
    for (p, m, other) in [(&mut a, am, bid), (&mut b, bm, aid)] {
        let (t, v) = p.wait(m, DETECT_BOUND, about("session_down", &other));
        assert_eq!(v["reason"], "heartbeat_timeout", "{}", p.name);
        assert!(t - cut <= DETECT_BOUND, "{}: {:?}", p.name, t - cut);
    }
    let detected = cut.elapsed();
    // Long enough for the kernel to give up resolving the peer (see s19).
    std::thread::sleep(Duration::from_secs(3));
    let (am, bm) = (a.mark(), b.mark());
    let healed = Instant::now();
    lab.heal(1);
    let back = both_up(&mut a, am, &mut b, bm, Duration::from_secs(3)) - healed;
    println!(
        "LAB: s20 IPv6 only: session up {:.1} ms after the later start (over {addr}), cut seen after {:.0} ms, back {:.1} ms after the heal",
        ms(up),
        ms(detected),
        ms(back)
    );
    assert!(back <= Duration::from_secs(1), "{back:?}");
}

/// Dual-stack hosts hear each other over IPv4 and IPv6 and hold one
/// session, not two, with no flapping.
#[test]
fn s21_dual_stack_hosts_hold_one_session() {
    let Some(lab) = Lab::new("s21", 3) else {
        return;
    };
    let mut peers: Vec<Peer> = (0..3).map(|i| lab.peer(i, &format!("d{i}"), &[])).collect();
    let ids: Vec<String> = peers.iter().map(|p| p.id.clone()).collect();
    for (i, p) in peers.iter_mut().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                p.wait(0, Duration::from_secs(5), about("session_up", id));
            }
        }
    }
    // Announces keep coming over both families meanwhile.
    std::thread::sleep(Duration::from_secs(3));
    for p in &mut peers {
        p.say("/stats");
        let (_, stats) = p.wait(0, Duration::from_secs(2), |v| v["event"] == "stats");
        let ups = p.matching(0, |v| v["event"] == "session_up");
        assert_eq!(ups.len(), 2, "{}: one session per peer: {ups:?}", p.name);
        assert!(
            p.matching(0, |v| v["event"] == "session_down").is_empty(),
            "{}",
            p.name
        );
        assert_eq!(stats["stats"]["sessions_up"], 2, "{}", p.name);
        assert_eq!(stats["stats"]["duplicate_ids"], 0, "{}", p.name);
    }
    println!("LAB: s21 dual stack, 3 hosts: one session per pair, none dropped in 3 s");
}

/// IPv6 across a router: two hosts on subnets of their own (unique local
/// addresses), no multicast crossing, and one names the other by its IPv6
/// address: a session over the routed addresses, messages, a timeout and
/// recovery.
#[test]
fn s22_a_peer_named_by_ipv6_address_across_a_router() {
    let Some(lab) = Lab::routed("s22", 2) else {
        return;
    };
    lab.route_ipv6();
    // IPv6 only, so the session cannot go over the IPv4 routes instead.
    for i in 0..2 {
        let ns = lab.ns(i).to_owned();
        let v4 = format!("{}/24", lab.ip(i));
        let _ = std::process::Command::new("ip")
            .args(["-n", &ns, "addr", "del", &v4, "dev", "eth0"])
            .status();
    }
    let far = lab.ip6(1).to_string();
    let mut b = lab.peer(1, "b", &[]);
    let started = Instant::now();
    let mut a = lab.peer(0, "a", &["--peer", &far]);
    let up = both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    let (_, s) = a.wait(0, Duration::ZERO, about("session_up", &b.id.clone()));
    let addr = s["addr"].as_str().unwrap().to_owned();
    assert!(addr.starts_with(&format!("[{}]", lab.ip6(1))), "{addr}");
    let bm = b.mark();
    for i in 0..10 {
        a.say(&format!("v6 {i}"));
    }
    b.wait(bm, Duration::from_secs(2), |v| {
        v["event"] == "message" && v["data"] == "v6 9"
    });
    let am = a.mark();
    let t0 = Instant::now();
    lab.cut(1);
    let (t, v) = a.wait(am, DETECT_BOUND, about("session_down", &b.id.clone()));
    assert_eq!(v["reason"], "heartbeat_timeout");
    let detect = t - t0;
    std::thread::sleep(Duration::from_secs(3));
    let (am, bm) = (a.mark(), b.mark());
    let healed = Instant::now();
    lab.heal(1);
    let back = both_up(&mut a, am, &mut b, bm, Duration::from_secs(5));
    println!(
        "LAB: s22 IPv6 across a router by address ({addr}): session up {:.0} ms after a started, cut seen after {:.0} ms, back {:.0} ms after the heal",
        ms(up - started),
        ms(detect),
        ms(back - healed)
    );
    assert!(detect <= DETECT_BOUND, "{detect:?}");
}

/// One-way loss (issue 15): everything host 1 sends is dropped, what it
/// receives arrives. The end that cannot hear times out; the other learns
/// of it at once (the connection's close still reaches it), so both end
/// within timeout + one interval. The end that cannot send keeps hearing
/// the other's probes, so the peer stays known and missing: its probing
/// is fast for the peer's expiry (10 s), then backs off to its cap instead
/// of going on every second.
#[test]
fn s23_one_way_loss_ends_both_sides_and_probing_backs_off() {
    let Some(lab) = Lab::new("s23", 2) else {
        return;
    };
    if !Lab::can_impair("s23") {
        return;
    }
    let (mut a, mut b) = pair(&lab);
    let (am, bm) = (a.mark(), b.mark());
    let cut = Instant::now();
    lab.drop_from(1, 100);
    let bound = DETECT_BOUND;
    let (ta, va) = a.wait(am, bound, about("session_down", &b.id.clone()));
    let (tb, vb) = b.wait(bm, bound, about("session_down", &a.id.clone()));
    println!(
        "LAB: s23 one-way loss: a (hears nothing) down after {:.0} ms ({}), b (cannot send) after {:.0} ms ({})",
        ms(ta - cut),
        va["reason"],
        ms(tb - cut),
        vb["reason"]
    );
    let sent = |p: &mut Peer| {
        let m = p.mark();
        p.say("/stats");
        let (_, v) = p.wait(m, Duration::from_secs(2), |v| v["event"] == "stats");
        v["stats"]["datagrams_sent"].as_u64().unwrap()
    };
    // Fast while the loss is fresh...
    std::thread::sleep(Duration::from_secs(2));
    let s0 = sent(&mut b);
    std::thread::sleep(Duration::from_secs(5));
    let fresh = sent(&mut b) - s0;
    // ...slow once the peer has been missing for longer than its expiry.
    std::thread::sleep(Duration::from_secs(8));
    let s1 = sent(&mut b);
    std::thread::sleep(Duration::from_secs(15));
    let late = sent(&mut b) - s1;
    println!(
        "LAB: s23 b's datagrams: {fresh} in 5 s while the loss was fresh, {late} in 15 s after the expiry"
    );
    assert!(fresh >= 6, "probing fast at first: {fresh}");
    assert!(late <= 8, "backed off: {late} datagrams in 15 s");
}

/// Liveness datagrams (PROTOCOL.md §7): with every TCP segment dropped on
/// the bridge and UDP untouched (a stream stalled, the hosts alive), an
/// encrypted session outlives its heartbeat timeout (1 s) four times over,
/// proven alive by datagrams, and ends by the stall timeout (here 4 s) on
/// both sides. The same stall between plaintext peers, which have no
/// datagrams, is a heartbeat timeout after 1 s: the stall is real.
#[test]
fn s24_liveness_datagrams_ride_out_a_stalled_stream() {
    let Some(lab) = Lab::new("s24", 2) else {
        return;
    };
    if !Lab::can_impair("s24") {
        return;
    }
    for (args, reason, after) in [
        (
            &["--stall-timeout-ms", "4000"][..],
            "stream_stalled",
            3700..4600,
        ),
        (
            &["--insecure-plaintext"][..],
            "heartbeat_timeout",
            700..1400,
        ),
    ] {
        let mut a = lab.peer(0, "a", args);
        let mut b = lab.peer(1, "b", args);
        both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
        let (am, bm) = (a.mark(), b.mark());
        let stalled = Instant::now();
        lab.drop_tcp();
        let limit = Duration::from_secs(6);
        let (ta, va) = a.wait(am, limit, about("session_down", &b.id.clone()));
        let (tb, vb) = b.wait(bm, limit, about("session_down", &a.id.clone()));
        let (da, db) = (ms(ta - stalled), ms(tb - stalled));
        println!(
            "LAB: s24 {args:?}: down after {da:.0} ms ({}) and {db:.0} ms ({})",
            va["reason"], vb["reason"]
        );
        for (v, d) in [(&va, da), (&vb, db)] {
            assert_eq!(v["reason"], reason, "{args:?}");
            assert!(
                after.contains(&(d as u64)),
                "{args:?}: down after {d:.0} ms"
            );
        }
        if reason == "stream_stalled" {
            for p in [&mut a, &mut b] {
                let m = p.mark();
                p.say("/stats");
                let (_, v) = p.wait(m, Duration::from_secs(2), |v| v["event"] == "stats");
                let heard = v["stats"]["liveness_received"].as_u64().unwrap();
                assert!(heard >= 5, "datagrams accepted: {heard}");
                assert_eq!(v["stats"]["liveness_dropped"].as_u64(), Some(0));
            }
        }
        lab.clear_loss();
    }
}

/// The liveness datagrams (PROTOCOL.md §7) in `frames` that `src` sent
/// over IPv4: their destination port and payload.
fn liveness_datagrams(frames: &[Vec<u8>], src: std::net::Ipv4Addr) -> Vec<(u16, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| {
            let ip = f.get(14..)?;
            if f.get(12..14)? != [0x08, 0x00]
                || ip.get(9)? != &17
                || ip.get(12..16)? != src.octets()
            {
                return None;
            }
            let udp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
            let dst = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
            let payload = udp.get(8..)?;
            (payload.len() == 34 && payload[0] == 2).then(|| (dst, payload.to_vec()))
        })
        .collect()
}

/// Liveness datagrams keep no dead peer alive: an attacker host that
/// captured B's probes and answers to A during a stall (TCP dropped on the
/// bridge) sends them to A again, every 10 ms, once B is gone, along with
/// datagrams forged under B's id. A times B out within the usual bound all
/// the same, and counts the replays and the forgeries.
#[test]
fn s25_replayed_and_forged_liveness_datagrams_keep_no_dead_peer_alive() {
    let Some(lab) = Lab::new("s25", 3) else {
        return;
    };
    if !Lab::can_impair("s25") {
        return;
    }
    // IPv4 only: the capture below reads IPv4 frames.
    for i in 0..3 {
        lab.disable_ipv6(i);
    }
    let (mut a, b) = pair(&lab);
    let cap = lab.inside_bridge(|| capture_frames(Duration::from_millis(2500)));
    std::thread::sleep(Duration::from_millis(100));
    lab.drop_tcp();
    let captured = liveness_datagrams(&cap.join().unwrap(), lab.ip(1));
    assert!(
        captured.len() >= 4,
        "captured {} of B's datagrams",
        captured.len()
    );
    let a_port = captured[0].0;
    let b_id = u64::from_str_radix(&b.id, 16).unwrap();
    let a_ip = lab.ip(0);
    let am = a.mark();
    let cut = Instant::now();
    lab.cut(1);
    let sent = captured.len();
    let attack = lab.inside(2, move || {
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let (mut replays, mut forged) = (0, 0u64);
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            for (_, d) in &captured {
                replays += usize::from(udp.send_to(d, (a_ip, a_port)).is_ok());
            }
            // B's id, a fresh nonce, made-up ciphertext and tag.
            let mut d = vec![2];
            d.extend(b_id.to_be_bytes());
            d.extend(((1u64 << 63) + 1_000_000 + forged).to_be_bytes());
            d.extend((0..17).map(|k| (forged as u8).wrapping_mul(31).wrapping_add(k)));
            forged += u64::from(udp.send_to(&d, (a_ip, a_port)).is_ok());
            std::thread::sleep(Duration::from_millis(10));
        }
        (replays, forged)
    });
    let (t, v) = a.wait(
        am,
        Duration::from_secs(4),
        about("session_down", &b.id.clone()),
    );
    let (replays, forged) = attack.join().unwrap();
    a.say("/stats");
    let (_, stats) = a.wait(am, Duration::from_secs(2), |v| v["event"] == "stats");
    let stats = &stats["stats"];
    println!(
        "LAB: s25 B down at A after {:.0} ms ({}) under {replays} replays of {sent} captured datagrams and {forged} forged; A counted {} replayed, {} dropped",
        ms(t - cut),
        v["reason"],
        stats["liveness_replayed"],
        stats["liveness_dropped"]
    );
    assert_eq!(v["reason"], "heartbeat_timeout");
    assert!(t - cut <= DETECT_BOUND, "{:?}", t - cut);
    assert!(stats["liveness_replayed"].as_u64().unwrap() >= sent as u64);
    assert!(stats["liveness_dropped"].as_u64().unwrap() >= forged / 2);
}

/// Lossy links end no session whose peer is alive (issue 15): a full mesh
/// of 6 hosts (15 sessions) for 40 s with 20 % of all frames dropped on the
/// bridge, heartbeat 200 ms / 1 s. Stream-only heartbeats lost about 220
/// sessions per session-hour here (about 37 in this run); with liveness
/// datagrams the bench measured none. At most 2 are allowed (a bound, not
/// the expectation: 12 per session-hour).
#[test]
fn s26_twenty_percent_loss_ends_no_live_session() {
    let Some(lab) = Lab::new("s26", 6) else {
        return;
    };
    if !Lab::can_impair("s26") {
        return;
    }
    let (n, hours) = lab.timeouts_under_impairment(&[], Duration::from_secs(40), |l| l.lose(20));
    println!(
        "LAB: s26 20 % loss, 200 ms / 1 s: {n} sessions ended in {hours:.3} session-hours ({:.1} /h)",
        n as f64 / hours
    );
    assert!(n <= 2, "{n} sessions ended under 20 % loss");
}

/// Saturated slow links slow the senders instead of ending sessions
/// (issue 15): both hosts' uplinks are 64 kbit/s with a 1.5 MB queue (tc
/// tbf), heartbeat 1 s / 3 s, and each side types 200-byte lines at 120 %
/// of the link's rate for 40 s (`LANBEAT_LAB_SATURATED_SECS`). No session
/// ends, every line arrives in order, and the links' queues never hold
/// what takes the heartbeat timeout to drain: the in-flight window keeps
/// them short, the rest waits in the sender (a full queue would hold each
/// ping for minutes).
#[test]
fn s27_a_saturated_slow_link_pushes_back_instead_of_ending_sessions() {
    let Some(lab) = Lab::new("s27", 2) else {
        return;
    };
    let secs: u64 = std::env::var("LANBEAT_LAB_SATURATED_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let args = [
        "--heartbeat-interval-ms",
        "1000",
        "--heartbeat-timeout-ms",
        "3000",
    ];
    let mut a = lab.peer(0, "a", &args);
    let mut b = lab.peer(1, "b", &args);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    lab.rate_limit(0, 64, 1_500_000);
    lab.rate_limit(1, 64, 1_500_000);
    let (am, bm) = (a.mark(), b.mark());
    // 48 lines of 200 bytes a second: 76.8 kbit/s of messages alone.
    let ([typed_a, typed_b], backlog) = lab.saturate(&mut a, &mut b, 48, Duration::from_secs(secs));
    let offered = Instant::now();
    // Everything typed arrives (the backlog drains at the link's rate).
    let last = |name: &str, n: u64| netlab::saturating_line(name, n - 1);
    let (last_a, last_b) = (last("a", typed_a), last("b", typed_b));
    b.wait(bm, Duration::from_secs(90), |v| {
        v["event"] == "message" && v["data"] == last_a.as_str()
    });
    a.wait(am, Duration::from_secs(90), |v| {
        v["event"] == "message" && v["data"] == last_b.as_str()
    });
    let drained = offered.elapsed();
    for (p, m, name, typed) in [(&mut a, am, "b", typed_b), (&mut b, bm, "a", typed_a)] {
        let got: Vec<String> = p
            .matching(m, |v| v["event"] == "message")
            .iter()
            .map(|(_, v)| v["data"].as_str().unwrap()[..8].to_owned())
            .collect();
        let want: Vec<String> = (0..typed).map(|k| format!("{name}-{k:06}")).collect();
        let downs = p.matching(m, |v| v["event"] == "session_down");
        assert!(downs.is_empty(), "sessions ended: {downs:?}");
        assert!(
            got == want,
            "{} of {typed} lines from {name} arrived, or out of order",
            got.len()
        );
    }
    println!(
        "LAB: s27 64 kbit/s, 1.5 MB queue, {secs} s at 120 % both ways: {typed_a} and {typed_b} lines in order, \
         drained {:.1} s after the typing stopped, at most {backlog} bytes in a link's queue ({:.1} s of it), no session ended",
        drained.as_secs_f64(),
        backlog as f64 / 8000.0
    );
    // 3 s of the link (the heartbeat timeout) would hold a ping too long.
    assert!(backlog < 24_000, "{backlog} bytes queued in a link");
}

/// A flapping link (issue 15): B's cable is cut and plugged in again every
/// 1 to 3 s for 30 s while A types 20 lines a second. Every line accepted
/// for B is delivered or handed back, and what comes back as
/// `undelivered` never arrived: only `unconfirmed` lines may have (before
/// this split, a quarter of the lines handed back had been delivered).
#[test]
fn s28_a_flapping_link_delivers_everything_once_in_order() {
    use std::collections::HashSet;
    let Some(lab) = Lab::new("s28", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    let bid = b.id.clone();
    let (am, bm) = (a.mark(), b.mark());
    let start = Instant::now();
    let mut typed = 0;
    let mut flips = 0u64;
    let mut next_flip = start + Duration::from_secs(1);
    let mut cut = false;
    while start.elapsed() < Duration::from_secs(30) {
        a.say(&format!("flap {typed}"));
        typed += 1;
        if Instant::now() >= next_flip {
            if cut {
                lab.heal(1);
            } else {
                lab.cut(1);
            }
            cut = !cut;
            flips += 1;
            // 1 to 3 s, spread by the flip count (no randomness needed).
            next_flip = Instant::now() + Duration::from_millis(1000 + (flips * 733) % 2000);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if cut {
        lab.heal(1);
    }
    // Once a line gets through again, everything before has settled.
    let bm2 = b.mark();
    let healed = Instant::now();
    loop {
        a.say("flap end");
        std::thread::sleep(Duration::from_millis(300));
        let through = !b
            .matching(bm2, |v| v["event"] == "message" && v["data"] == "flap end")
            .is_empty();
        if through {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "no session after the flapping"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let texts = |p: &mut Peer, from: usize, event: &str| -> Vec<String> {
        p.matching(from, |v| v["event"] == event)
            .iter()
            .flat_map(|(_, v)| match event {
                "message" => vec![v["data"].as_str().unwrap().to_owned()],
                _ => v["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_str().unwrap().to_owned())
                    .collect(),
            })
            .filter(|t| t.starts_with("flap ") && t != "flap end")
            .collect()
    };
    let accepted: HashSet<String> = a
        .matching(am, |v| {
            v["event"] == "sent"
                && v["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|x| x == bid.as_str()))
        })
        .iter()
        .map(|(_, v)| v["data"].as_str().unwrap().to_owned())
        .filter(|t| t != "flap end")
        .collect();
    let delivered_list = texts(&mut b, bm, "message");
    let delivered: HashSet<String> = delivered_list.iter().cloned().collect();
    let unconfirmed: HashSet<String> = texts(&mut a, am, "unconfirmed").into_iter().collect();
    let undelivered: HashSet<String> = texts(&mut a, am, "undelivered").into_iter().collect();
    let duplicates = delivered_list.len() - delivered.len();
    let unconfirmed_arrived = unconfirmed.intersection(&delivered).count();
    let undelivered_arrived = undelivered.intersection(&delivered).count();
    let downs = a.matching(am, about("session_down", &bid)).len();
    println!(
        "LAB: s28 {flips} flips, {downs} sessions down; {typed} typed, {} accepted for B: {} delivered ({duplicates} twice), \
         {} unconfirmed ({unconfirmed_arrived} of them arrived), {} undelivered ({undelivered_arrived} of them arrived)",
        accepted.len(),
        delivered.len(),
        unconfirmed.len(),
        undelivered.len()
    );
    assert!(downs >= 3, "the link flapped: {downs} sessions down");
    assert_eq!(duplicates, 0);
    assert_eq!(undelivered_arrived, 0, "an undelivered line arrived");
    // Every outage is shorter than the grace: each session resumed the one
    // before, so everything accepted arrived, once, in the order typed,
    // and nothing was handed back.
    let resumed = b.matching(bm, |v| v["event"] == "session_up" && v["resumed"] == true);
    println!("LAB: s28 {} of the new sessions resumed", resumed.len());
    assert!(unconfirmed.is_empty(), "unconfirmed: {unconfirmed:?}");
    assert!(undelivered.is_empty(), "undelivered: {undelivered:?}");
    assert_eq!(
        delivered.len(),
        accepted.len(),
        "all accepted lines arrived"
    );
    let order: Vec<u64> = delivered_list
        .iter()
        .map(|t| t["flap ".len()..].parse().unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {order:?}");
    let accounted: HashSet<String> = delivered
        .union(&unconfirmed)
        .chain(undelivered.iter())
        .cloned()
        .collect();
    let lost: Vec<_> = accepted.difference(&accounted).collect();
    assert!(
        lost.is_empty(),
        "accepted, neither delivered nor handed back: {lost:?}"
    );
}

/// Issue 15, item 1: a cut shorter than the grace is resumed. What was in
/// flight and what was sent during the cut arrive once, in order; nothing
/// is handed back; both sides see the session go down and come back as
/// resumed. A peer that comes back restarted instead gets nothing of it,
/// and the sender is told at once.
#[test]
fn s29_a_cut_within_the_grace_is_resumed_and_a_restart_is_not() {
    let Some(lab) = Lab::new("s29", 2) else {
        return;
    };
    let mut a = lab.peer(0, "a", &[]);
    // B restarts later with its identity, so its id.
    let key = KeyFile::new("s29", "b", &lanbeat::Identity::generate());
    let mut b = lab.peer(1, "b", &["--identity", key.arg()]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    let (aid, bid) = (a.id.clone(), b.id.clone());
    let bm = b.mark();
    for i in 0..10 {
        a.say(&format!("before {i}"));
    }
    b.wait(bm, Duration::from_secs(2), |v| {
        v["event"] == "message" && v["data"] == "before 9"
    });
    let (am, bm2) = (a.mark(), b.mark());
    lab.cut(1);
    let cut = Instant::now();
    for i in 0..10 {
        a.say(&format!("during {i}"));
    }
    a.wait(am, DETECT_BOUND, about("session_down", &bid));
    b.wait(bm2, DETECT_BOUND, about("session_down", &aid));
    std::thread::sleep(Duration::from_secs(2));
    for i in 10..20 {
        a.say(&format!("during {i}"));
    }
    let healed = Instant::now();
    lab.heal(1);
    let (ta, up_a) = a.wait(am, Duration::from_secs(5), about("session_up", &bid));
    let (tb, up_b) = b.wait(bm2, Duration::from_secs(5), about("session_up", &aid));
    assert_eq!(up_a["resumed"], true, "{up_a}");
    assert_eq!(up_b["resumed"], true, "{up_b}");
    for i in 0..10 {
        a.say(&format!("after {i}"));
    }
    b.wait(bm, Duration::from_secs(3), |v| {
        v["event"] == "message" && v["data"] == "after 9"
    });
    std::thread::sleep(Duration::from_millis(200));
    let got: Vec<String> = b
        .matching(bm, |v| v["event"] == "message")
        .iter()
        .map(|(_, v)| v["data"].as_str().unwrap().to_owned())
        .collect();
    let want: Vec<String> = (0..10)
        .map(|i| format!("before {i}"))
        .chain((0..20).map(|i| format!("during {i}")))
        .chain((0..10).map(|i| format!("after {i}")))
        .collect();
    let handed = a.matching(am, |v| {
        v["event"] == "unconfirmed" || v["event"] == "undelivered"
    });
    println!(
        "LAB: s29 cut of {:.1} s resumed {:.0} ms after the heal: {} of {} lines delivered, in order, once; {} hand-backs",
        ms(healed - cut) / 1e3,
        ms(ta.max(tb).saturating_duration_since(healed)),
        got.len(),
        want.len(),
        handed.len()
    );
    assert_eq!(got, want);
    assert!(handed.is_empty(), "{handed:?}");

    // B restarts (a new instance) while A holds lines for it: the new
    // session does not resume, and what A held comes back before it.
    let am = a.mark();
    lab.cut(1);
    a.wait(am, DETECT_BOUND, about("session_down", &bid));
    for i in 0..5 {
        a.say(&format!("held {i}"));
    }
    b.signal(Signal::SIGKILL);
    drop(b);
    lab.heal(1);
    let mut b = lab.peer(1, "b", &["--identity", key.arg()]);
    let (_, und) = a.wait(am, Duration::from_secs(5), about("undelivered", &bid));
    let (_, up) = a.wait(am, Duration::from_secs(5), about("session_up", &bid));
    assert_eq!(up["resumed"], false, "{up}");
    assert_eq!(und["count"], 5, "{und}");
    let bm = b.mark();
    a.say("fresh");
    b.wait(bm, Duration::from_secs(3), |v| {
        v["event"] == "message" && v["data"] == "fresh"
    });
    assert!(
        b.matching(0, |v| v["event"] == "message"
            && v["data"].as_str().is_some_and(|d| d.starts_with("held")))
            .is_empty()
    );
    println!(
        "LAB: s29 restarted peer: 5 held lines handed back as undelivered before the new session"
    );
}

/// A cut longer than the grace: the held session is given up when the
/// grace ends (what was in flight comes back as unconfirmed, what was
/// typed during the cut as undelivered), and the session after the heal
/// is a new one.
#[test]
fn s30_a_cut_longer_than_the_grace_hands_back_when_the_grace_ends() {
    let Some(lab) = Lab::new("s30", 2) else {
        return;
    };
    // A holds for 1.5 s, B for 30 s: both hold for the shorter.
    let mut a = lab.peer(0, "a", &["--resume-grace-ms", "1500"]);
    let mut b = lab.peer(1, "b", &[]);
    both_up(&mut a, 0, &mut b, 0, Duration::from_secs(5));
    let (aid, bid) = (a.id.clone(), b.id.clone());
    let (am, bm) = (a.mark(), b.mark());
    lab.cut(1);
    let cut = Instant::now();
    for i in 0..5 {
        a.say(&format!("lost {i}"));
    }
    let (down, _) = a.wait(am, DETECT_BOUND, about("session_down", &bid));
    for i in 5..8 {
        a.say(&format!("lost {i}"));
    }
    let (t, und) = a.wait(am, Duration::from_secs(4), about("undelivered", &bid));
    let unconfirmed = a.matching(am, about("unconfirmed", &bid));
    let given_up = t.saturating_duration_since(down);
    println!(
        "LAB: s30 grace 1.5 s: handed back {:.0} ms after the session went down ({} unconfirmed, {} undelivered)",
        ms(given_up),
        unconfirmed
            .iter()
            .map(|(_, v)| v["count"].as_u64().unwrap())
            .sum::<u64>(),
        und["count"]
    );
    assert!(given_up >= Duration::from_millis(1400), "{given_up:?}");
    assert!(given_up <= Duration::from_millis(2500), "{given_up:?}");
    let back: u64 = und["count"].as_u64().unwrap()
        + unconfirmed
            .iter()
            .map(|(_, v)| v["count"].as_u64().unwrap())
            .sum::<u64>();
    assert_eq!(back, 8, "every line typed into the cut comes back");
    // B gave up too (the shorter grace): the next session is new.
    b.wait(bm, Duration::from_secs(1), about("session_down", &aid));
    std::thread::sleep(Duration::from_secs(3).saturating_sub(cut.elapsed()));
    lab.heal(1);
    let (_, up) = a.wait(am, Duration::from_secs(5), about("session_up", &bid));
    assert_eq!(up["resumed"], false, "{up}");
    let (_, up) = b.wait(bm, Duration::from_secs(5), about("session_up", &aid));
    assert_eq!(up["resumed"], false, "{up}");
    assert!(
        b.matching(bm, |v| v["event"] == "message").is_empty(),
        "nothing of the given-up session arrives"
    );
}

/// Issue 15, item 6: jitter, by the lab's user-space delay relay. B's
/// frames, both ways, are each held 0 to 400 ms (in order: a late frame
/// holds up the ones behind it), so round trips swing from a fraction of
/// a millisecond to 800 ms, at 200 ms / 1 s. No session ends in 20 s, the
/// lines typed meanwhile arrive in order, and a cut is still detected
/// within the timeout plus one interval plus the largest delay.
#[test]
fn s31_jitter_of_up_to_400_ms_each_way_ends_no_session() {
    let Some(lab) = Lab::new("s31", 2) else {
        return;
    };
    let (mut a, mut b) = pair(&lab);
    let (aid, bid) = (a.id.clone(), b.id.clone());
    lab.delay(1, Duration::ZERO, Duration::from_millis(400));
    let (am, bm) = (a.mark(), b.mark());
    let start = Instant::now();
    let mut typed = 0;
    while start.elapsed() < Duration::from_secs(20) {
        a.say(&format!("jitter {typed}"));
        typed += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    b.wait(bm, Duration::from_secs(3), |v| {
        v["event"] == "message" && v["data"] == format!("jitter {}", typed - 1).as_str()
    });
    let got: Vec<String> = b
        .matching(bm, |v| v["event"] == "message")
        .iter()
        .map(|(_, v)| v["data"].as_str().unwrap().to_owned())
        .collect();
    // Each side's samples (a passive side reports the dialer's).
    let mut rtts: Vec<u64> = a
        .matching(am, about("rtt", &bid))
        .into_iter()
        .chain(b.matching(bm, about("rtt", &aid)))
        .map(|(_, v)| v["rtt_us"].as_u64().unwrap())
        .collect();
    rtts.sort_unstable();
    let downs = a.matching(am, about("session_down", &bid)).len()
        + b.matching(bm, about("session_down", &aid)).len();
    let cut_at = Instant::now();
    lab.cut(1);
    let (t, v) = a.wait(am, Duration::from_secs(4), about("session_down", &bid));
    let detect = t.saturating_duration_since(cut_at);
    println!(
        "LAB: s31 jitter 0-400 ms each way, 20 s: {downs} sessions down, {} of {typed} lines in order; \
         RTT p50 {:.0} ms, max {:.0} ms ({} samples); cut detected after {:.0} ms ({})",
        got.len(),
        rtts.get(rtts.len() / 2).copied().unwrap_or(0) as f64 / 1e3,
        rtts.last().copied().unwrap_or(0) as f64 / 1e3,
        rtts.len(),
        ms(detect),
        v["reason"]
    );
    assert_eq!(downs, 0, "a session ended under jitter");
    let want: Vec<String> = (0..typed).map(|i| format!("jitter {i}")).collect();
    assert_eq!(got, want);
    assert!(
        rtts.last().is_some_and(|&m| m > 300_000),
        "the relay delayed frames: {rtts:?}"
    );
    assert!(
        detect <= Duration::from_millis(1000 + 200 + 400 + 200),
        "{detect:?}"
    );
}
