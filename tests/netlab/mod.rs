//! A lab of hosts made of Linux network namespaces, for tests that need the
//! real network stack: veth links, directed broadcast without a default
//! route, cables that can be cut, addresses that come and go.
//!
//! Layout of one lab (or see [`Lab::routed`]): a bridge `br0` inside a namespace of its own
//! (`<prefix>-br`), and N host namespaces (`<prefix>-h<i>`), each with one
//! veth `eth0` (10.77.0.<i+1>/24) whose other end is a port of the bridge.
//! Nothing is created in the machine's own namespace and no host has a
//! route anywhere else. Names carry the test process id and the test name,
//! so concurrent tests never collide. Everything is deleted on drop, also
//! when the test panics; namespaces left by a test process that died are
//! removed by the next lab.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod relay;

const PREFIX: &str = "lbt";

/// Turns off IPv6 duplicate address detection on `ns`'s `eth0`, so that
/// its link-local address is usable as soon as the link is up (instead of
/// a second or more later): the lab's hosts are unique by construction.
fn no_dad(ns: &str) {
    sysctl(ns, &["net.ipv6.conf.eth0.accept_dad=0"]);
}

/// Sets kernel `settings` (`key=value`) in namespace `ns`; panics if it
/// cannot.
fn sysctl(ns: &str, settings: &[&str]) {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .args(settings)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot set {settings:?} in {ns}");
}

/// Runs `ip` with `args`; panics with its stderr on failure.
/// Line `n` of what [`Lab::saturate`] types as `name`: 200 bytes.
pub fn saturating_line(name: &str, n: u64) -> String {
    format!("{name}-{n:06} {}", "x".repeat(191))
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Kills every process in a namespace, then deletes it.
fn delete_ns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    ip_quiet(&["netns", "del", ns]);
}

/// Why the lab cannot run here, if it cannot.
fn unavailable(test: &str) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !ip_quiet(&["-V"]) {
        return Some("no `ip` command (iproute2)".into());
    }
    let probe = format!("{PREFIX}-{}-{test}-probe", std::process::id());
    if !ip_quiet(&["netns", "add", &probe]) {
        return Some("`ip netns add` failed (no CAP_SYS_ADMIN?)".into());
    }
    ip_quiet(&["netns", "del", &probe]);
    None
}

/// Whether the lab can run here. If not it says why and skips (returns
/// false), or, with `LANBEAT_REQUIRE_NETNS=1`, fails the test.
fn usable(test: &str) -> bool {
    let Some(why) = unavailable(test) else {
        return true;
    };
    if std::env::var("LANBEAT_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("namespace lab required (LANBEAT_REQUIRE_NETNS=1) but unavailable: {why}");
    }
    // Written past the test harness's capture, so the skip shows.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: namespace lab unavailable: {why} (set LANBEAT_REQUIRE_NETNS=1 to fail instead)"
    );
    false
}

/// Removes namespaces left behind by test processes that no longer exist.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        if let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok())
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            delete_ns(name);
        }
    }
}

/// A lab of `n` hosts on one bridge.
pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
    /// How to start the example peer: the built example by default; a
    /// program that embeds the peer (the bench) sets its own.
    pub peer_cmd: Option<Vec<std::ffi::OsString>>,
    /// Each host on a subnet of its own behind a router (see
    /// [`Lab::routed`]) rather than all on one bridge.
    routed: bool,
    /// Delay relays (see [`Lab::delay`]), stopped before the namespaces go.
    relays: std::sync::Mutex<Vec<relay::Relay>>,
}

impl Lab {
    /// Builds the lab, or returns `None` (after printing why) where network
    /// namespaces cannot be made. With `LANBEAT_REQUIRE_NETNS=1` that is a
    /// failure instead.
    pub fn new(test: &str, n: usize) -> Option<Lab> {
        Self::with_addresses(test, n, &vec![true; n])
    }

    /// A lab with no hosts yet: its middle namespace (the bridge's, or the
    /// router's) made, with loopback up, and the prefix of its namespaces'
    /// names; `None` where the lab cannot run.
    fn empty(test: &str, routed: bool) -> Option<(Lab, String)> {
        if !usable(test) {
            return None;
        }
        remove_stale();
        let prefix = format!("{PREFIX}-{}-{test}", std::process::id());
        let lab = Lab {
            hosts: Vec::new(),
            prefix: prefix.clone(),
            peer_cmd: None,
            routed,
            relays: Default::default(),
        };
        let middle = lab.bridge_ns();
        ip(&["netns", "add", &middle]);
        ip(&["-n", &middle, "link", "set", "lo", "up"]);
        Some((lab, prefix))
    }

    /// Like [`Lab::new`]; host `i` gets its address only if `addr[i]`.
    pub fn with_addresses(test: &str, n: usize, addr: &[bool]) -> Option<Lab> {
        let (mut lab, prefix) = Lab::empty(test, false)?;
        let br = lab.bridge_ns();
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        // Forward at once: no STP listening delay on new ports.
        ip(&[
            "-n",
            &br,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for (i, &with_addr) in addr.iter().enumerate().take(n) {
            let ns = format!("{prefix}-h{i}");
            ip(&["netns", "add", &ns]);
            lab.hosts.push(ns.clone());
            let port = format!("h{i}");
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &br, "link", "set", &port, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            no_dad(&ns);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            if with_addr {
                lab.add_addr(i);
            }
        }
        Some(lab)
    }

    /// A lab of `n` hosts, each on a subnet of its own (10.77.<i+1>.0/24,
    /// the host at .2) behind one router namespace that forwards between
    /// them (at .1 on each): no broadcast crosses, unicast does. The
    /// router's port to host `i` is `h<i>`, so [`Lab::cut`] works as on a
    /// bridge.
    pub fn routed(test: &str, n: usize) -> Option<Lab> {
        let (mut lab, prefix) = Lab::empty(test, true)?;
        let router = lab.bridge_ns();
        let forward = Command::new("ip")
            .args(["netns", "exec", &router, "sh", "-c"])
            .arg("echo 1 > /proc/sys/net/ipv4/ip_forward")
            .status()
            .expect("run ip netns exec");
        assert!(forward.success(), "cannot turn forwarding on in the router");
        for i in 0..n {
            let ns = format!("{prefix}-h{i}");
            ip(&["netns", "add", &ns]);
            lab.hosts.push(ns.clone());
            let port = format!("h{i}");
            ip(&[
                "-n", &router, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            let gw = format!("10.77.{}.1", i + 1);
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                &port,
            ]);
            ip(&["-n", &router, "link", "set", &port, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            no_dad(&ns);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            lab.add_addr(i);
            ip(&["-n", &ns, "route", "add", "default", "via", &gw]);
        }
        Some(lab)
    }

    /// Gives a routed lab IPv6 routing too: host `i` at `fd77:<i+1>::2/64`
    /// (a unique local address), the router at `fd77:<i+1>::1` forwarding
    /// between them. Link-local multicast does not cross it.
    pub fn route_ipv6(&self) {
        assert!(self.routed, "only a routed lab has a router");
        let router = self.bridge_ns();
        // Forwarding on; and the router's addresses kept while a port is
        // down (a cut), as IPv4 keeps them: IPv6 drops them by default.
        sysctl(
            &router,
            &[
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.all.keep_addr_on_down=1",
            ],
        );
        for (i, ns) in self.hosts.iter().enumerate() {
            let gw = format!("fd77:{}::1", i + 1);
            let port = format!("h{i}");
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{gw}/64"),
                "dev",
                &port,
                "nodad",
            ]);
            let host = format!("{}/64", self.ip6(i));
            ip(&["-n", ns, "addr", "add", &host, "dev", "eth0", "nodad"]);
            ip(&["-n", ns, "-6", "route", "add", "default", "via", &gw]);
        }
    }

    /// Host `i`'s IPv6 address in a routed lab with [`Lab::route_ipv6`].
    pub fn ip6(&self, i: usize) -> std::net::Ipv6Addr {
        format!("fd77:{}::2", i + 1).parse().unwrap()
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Runs `f` on a thread of its own inside host `i`'s network
    /// namespace: the sockets it opens are that host's (for attackers and
    /// probes that no example peer plays).
    pub fn inside<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        in_namespace(self.ns(i), f)
    }

    /// Runs `f` on a thread of its own inside the bridge's namespace (to
    /// capture what crosses the wire).
    pub fn inside_bridge<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        in_namespace(&self.bridge_ns(), f)
    }
}

fn in_namespace<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the namespace");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
        f()
    })
}

impl Lab {
    /// The address of host `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        if self.routed {
            Ipv4Addr::new(10, 77, i as u8 + 1, 2)
        } else {
            Ipv4Addr::new(10, 77, 0, i as u8 + 1)
        }
    }

    /// Cuts host `i`'s cable: its bridge port goes down (the host sees no
    /// carrier).
    pub fn cut(&self, i: usize) {
        self.set_port(i, "down");
    }

    /// Plugs host `i`'s cable back in.
    pub fn heal(&self, i: usize) {
        self.set_port(i, "up");
    }

    fn set_port(&self, i: usize, state: &str) {
        let port = format!("h{i}");
        ip(&["-n", &self.bridge_ns(), "link", "set", &port, state]);
    }

    /// Whether the lab can impair links (the `nft` tool is installed; the
    /// kernel's nftables is there wherever namespaces are). Without it a
    /// test prints why and skips, unless `LANBEAT_REQUIRE_NETNS=1`.
    pub fn can_impair(test: &str) -> bool {
        let ok = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("LANBEAT_REQUIRE_NETNS").as_deref() != Ok("1"),
                "{test}: the nft tool is required (LANBEAT_REQUIRE_NETNS=1); .ci/run installs nftables"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no nft tool (install nftables)"
            );
        }
        ok
    }

    /// Drops `percent` % of the frames host `i` sends (chosen at random,
    /// each frame on its own), by an nftables rule on the bridge: one-way
    /// loss, what the host receives is untouched. 100 drops all. Rules add
    /// up; [`Lab::clear_loss`] removes them. Gone with the lab's namespaces.
    pub fn drop_from(&self, i: usize, percent: u32) {
        let port = format!("h{i}");
        self.nft_rule(&if percent >= 100 {
            format!("add rule bridge lab pass iifname {port} counter drop")
        } else {
            let limit = percent * 100;
            format!("add rule bridge lab pass iifname {port} numgen random mod 10000 < {limit} counter drop")
        });
    }

    /// Limits what host `i` sends to `kbit` kbit/s with a queue of
    /// `queue_bytes` (tc tbf on its interface: a slow link with a deep
    /// buffer, as a weak Wi-Fi uplink is). Gone with the lab's namespaces.
    pub fn rate_limit(&self, i: usize, kbit: u32, queue_bytes: u32) {
        let (rate, limit) = (format!("{kbit}kbit"), queue_bytes.to_string());
        let ok = Command::new("tc")
            .args(["-n", self.ns(i), "qdisc", "replace", "dev", "eth0", "root"])
            .args(["tbf", "rate", &rate, "burst", "4096", "limit", &limit])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "tc tbf on host {i} failed");
    }

    /// Bytes waiting in host `i`'s interface queue now (the qdisc's
    /// backlog, as `tc -s` reports it).
    pub fn queued(&self, i: usize) -> u64 {
        let out = Command::new("tc")
            .args(["-n", self.ns(i), "-s", "qdisc", "show", "dev", "eth0"])
            .output()
            .expect("run tc");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "backlog")
            .nth(1)
            .and_then(|b| b.strip_suffix('b'))
            .and_then(|b| b.parse().ok())
            .unwrap_or(0)
    }

    /// Saturates hosts 0 and 1, both running `a` and `b`: each types
    /// `rate` lines of 200 bytes a second into its peer's stdin for `run`
    /// (a write blocks while the peer takes no more: its sends wait for
    /// room). Returns the lines each took (`a-000000 x...`, then
    /// `b-...`) and the most bytes seen waiting in either host's interface
    /// queue, sampled every 200 ms.
    pub fn saturate(
        &self,
        a: &mut Peer,
        b: &mut Peer,
        rate: u64,
        run: Duration,
    ) -> ([u64; 2], u64) {
        let start = Instant::now();
        let typist = |name: &'static str, mut stdin: ChildStdin| {
            std::thread::spawn(move || {
                let mut typed = 0u64;
                while start.elapsed() < run {
                    if writeln!(stdin, "{}", saturating_line(name, typed)).is_err() {
                        break;
                    }
                    let _ = stdin.flush();
                    typed += 1;
                    let due = start + Duration::from_micros(typed * 1_000_000 / rate);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                (typed, stdin)
            })
        };
        let (ta, tb) = (typist("a", a.take_stdin()), typist("b", b.take_stdin()));
        let mut backlog = 0;
        while !(ta.is_finished() && tb.is_finished()) {
            backlog = backlog.max(self.queued(0)).max(self.queued(1));
            std::thread::sleep(Duration::from_millis(200));
        }
        let ((typed_a, ia), (typed_b, ib)) = (ta.join().unwrap(), tb.join().unwrap());
        a.stdin = Some(ia);
        b.stdin = Some(ib);
        ([typed_a, typed_b], backlog)
    }

    /// Drops every TCP segment crossing the bridge (IPv4 and IPv6), both
    /// ways; UDP passes: a stream that stalls while the hosts are alive.
    pub fn drop_tcp(&self) {
        self.nft_rule("add rule bridge lab pass ip protocol tcp counter drop");
        self.nft_rule("add rule bridge lab pass ip6 nexthdr tcp counter drop");
    }

    /// Drops `percent` % of all frames crossing the bridge, each direction
    /// alike (random, each frame on its own).
    pub fn lose(&self, percent: u32) {
        self.nft_rule(&format!(
            "add rule bridge lab pass numgen random mod 10000 < {} counter drop",
            percent * 100
        ));
    }

    fn nft_rule(&self, rule: &str) {
        assert!(!self.routed, "loss rules are for the bridged lab");
        let br = self.bridge_ns();
        let nft = |args: &[&str]| {
            let ok = Command::new("ip")
                .args(["netns", "exec", &br, "nft"])
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "nft {args:?} failed in {br}");
        };
        nft(&["add", "table", "bridge", "lab"]);
        nft(&["add chain bridge lab pass { type filter hook forward priority 0; }"]);
        nft(&[rule]);
    }

    /// Runs a full mesh of this lab's hosts for `run` under what the test
    /// set up (loss rules), the example peers started with `args`, and
    /// returns the session ends by timeout (heartbeat, write or stall, or
    /// the kernel's `TCP_USER_TIMEOUT` as an I/O error; counted on the side
    /// that timed out) and the session-hours they were up.
    pub fn timeouts_under_impairment(
        &self,
        args: &[&str],
        run: Duration,
        impair: impl FnOnce(&Lab),
    ) -> (usize, f64) {
        let n = self.hosts.len();
        let mut peers: Vec<Peer> = (0..n)
            .map(|i| self.peer(i, &format!("m{i}"), args))
            .collect();
        let ids: Vec<String> = peers.iter().map(|p| p.id.clone()).collect();
        for (i, p) in peers.iter_mut().enumerate() {
            for (j, id) in ids.iter().enumerate() {
                if i != j {
                    p.wait(0, Duration::from_secs(10), |v| {
                        v["event"] == "session_up" && v["peer"] == id.as_str()
                    });
                }
            }
        }
        let marks: Vec<usize> = peers.iter_mut().map(|p| p.mark()).collect();
        impair(self);
        std::thread::sleep(run);
        let mut timeouts = 0;
        for (p, m) in peers.iter_mut().zip(marks) {
            timeouts += p
                .matching(m, |v| {
                    v["event"] == "session_down"
                        && [
                            "heartbeat_timeout",
                            "write_timeout",
                            "stream_stalled",
                            "io_error",
                        ]
                        .contains(&v["reason"].as_str().unwrap_or(""))
                })
                .len();
        }
        let pairs = n * (n - 1) / 2;
        (timeouts, pairs as f64 * run.as_secs_f64() / 3600.0)
    }

    /// Delays every frame host `i` sends and receives by `base` plus a
    /// random share of `jitter`, in order (see `relay.rs`: the kernel has
    /// no netem). Its bridge port leaves the bridge and is joined to it
    /// again through a user-space relay; [`Lab::cut`] still cuts it. Until
    /// the lab is dropped. Bridged labs only.
    pub fn delay(&self, i: usize, base: Duration, jitter: Duration) {
        assert!(!self.routed, "delay relays are for bridged labs");
        let br = self.bridge_ns();
        let (port, near, far) = (format!("h{i}"), format!("j{i}"), format!("jb{i}"));
        ip(&["-n", &br, "link", "set", &port, "nomaster"]);
        ip(&[
            "-n", &br, "link", "add", &near, "type", "veth", "peer", "name", &far,
        ]);
        ip(&["-n", &br, "link", "set", &far, "master", "br0"]);
        // The relay's ends carry the host's frames only: no addresses, no
        // IPv6 chatter of their own.
        let off: Vec<String> = [&port, &near]
            .iter()
            .map(|d| format!("net.ipv6.conf.{d}.disable_ipv6=1"))
            .collect();
        sysctl(&br, &off.iter().map(String::as_str).collect::<Vec<_>>());
        for d in [&far, &near] {
            ip(&["-n", &br, "link", "set", d, "up"]);
        }
        let relay = relay::Relay::start(&br, &port, &near, base, jitter);
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(relay);
    }

    /// Removes every loss rule ([`Lab::drop_from`]).
    pub fn clear_loss(&self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.bridge_ns(),
                "nft",
                "flush",
                "chain",
                "bridge",
                "lab",
                "pass",
            ])
            .stderr(Stdio::null())
            .status();
    }

    /// Turns IPv6 off on host `i`'s link (an IPv4-only host).
    pub fn disable_ipv6(&self, i: usize) {
        sysctl(self.ns(i), &["net.ipv6.conf.eth0.disable_ipv6=1"]);
    }

    /// Gives host `i` its address.
    pub fn add_addr(&self, i: usize) {
        let a = format!("{}/24", self.ip(i));
        ip(&[
            "-n",
            self.ns(i),
            "addr",
            "add",
            &a,
            "brd",
            "+",
            "dev",
            "eth0",
        ]);
    }

    /// Takes host `i`'s address away.
    pub fn del_addr(&self, i: usize) {
        let a = format!("{}/24", self.ip(i));
        ip(&["-n", self.ns(i), "addr", "del", &a, "dev", "eth0"]);
    }

    /// Starts the example peer in host `i` with `--json` and the lab's
    /// default heartbeat (200 ms / 1 s), plus `args`.
    pub fn peer(&self, i: usize, name: &str, args: &[&str]) -> Peer {
        let cmd = match &self.peer_cmd {
            Some(c) => c.clone(),
            None => vec![crate::common::example_bin("peer").into_os_string()],
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.ns(i)])
            .args(cmd)
            .args(["--name", name, "--json"])
            .args(if args.contains(&"--heartbeat-interval-ms") {
                &[][..]
            } else {
                &[
                    "--heartbeat-interval-ms",
                    "200",
                    "--heartbeat-timeout-ms",
                    "1000",
                ][..]
            })
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start peer");
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send((Instant::now(), v)).is_err()
                {
                    break;
                }
            }
        });
        let mut p = Peer {
            name: name.to_owned(),
            child,
            stdin,
            rx,
            lines: Vec::new(),
            id: String::new(),
            tcp_port: 0,
        };
        let (_, started) = p.wait(0, Duration::from_secs(10), |v| v["event"] == "started");
        p.id = started["id"].as_str().unwrap().to_owned();
        p.tcp_port = started["tcp_port"].as_u64().unwrap() as u16;
        p
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for ns in &self.hosts {
            delete_ns(ns);
        }
        delete_ns(&self.bridge_ns());
    }
}

/// An example-peer process in a lab host, with every JSON line it printed
/// and when it arrived.
pub struct Peer {
    pub name: String,
    pub id: String,
    pub tcp_port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<(Instant, Value)>,
    /// Every line so far.
    pub lines: Vec<(Instant, Value)>,
}

impl Peer {
    /// Takes the peer's stdin, to type into from another thread (a write
    /// blocks while the peer reads nothing: its sends wait for room).
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("stdin")
    }

    /// The index the next line will get: a mark for [`Peer::wait`].
    pub fn mark(&mut self) -> usize {
        self.drain();
        self.lines.len()
    }

    fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
    }

    /// The first line at or after `from` matching `pred`, waiting up to
    /// `limit`; panics otherwise.
    pub fn wait(
        &mut self,
        from: usize,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        let deadline = Instant::now() + limit;
        let mut i = from;
        loop {
            while i < self.lines.len() {
                if pred(&self.lines[i].1) {
                    return self.lines[i].clone();
                }
                i += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.lines.push(l),
                Err(_) => panic!(
                    "{}: no matching line within {limit:?}; saw {:?}",
                    self.name,
                    self.lines[from.min(self.lines.len())..]
                        .iter()
                        .map(|(_, v)| v.to_string())
                        .filter(|s| !s.contains("\"rtt\""))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Lines at or after `from` (after taking what has arrived) matching
    /// `pred`.
    pub fn matching(
        &mut self,
        from: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<(Instant, Value)> {
        self.drain();
        self.lines[from.min(self.lines.len())..]
            .iter()
            .filter(|(_, v)| pred(v))
            .cloned()
            .collect()
    }

    /// Types a line on the peer's stdin (sent to every connected peer).
    pub fn say(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        writeln!(s, "{line}").unwrap();
        s.flush().unwrap();
    }

    /// Sends a signal to the peer process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pred` for an event about a given peer.
pub fn about<'a>(event: &'a str, peer: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |v| v["event"] == event && v["peer"] == peer
}
