//! The example peer as a library module, so that the demo can run it as a
//! child process of itself.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use lanbeat::{Config, Event, Node, Role};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A lanbeat peer: finds others of its service on the LAN, keeps a
/// heartbeat-checked session with each, and sends every line typed on stdin
/// to all of them. Lines `/peers` and `/stats` print the peer table and the
/// counters instead.
#[derive(Debug, Parser)]
#[command(name = "peer", args_override_self = true)]
pub struct Args {
    /// Service name; only peers of the same service pair.
    #[arg(long, default_value = "lanbeat-demo")]
    pub service: String,
    /// This peer's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Node id (16 hex digits), with --insecure-plaintext only (with
    /// encryption an id must be proven by a key: use --identity).
    #[arg(long)]
    pub id: Option<lanbeat::PeerId>,
    /// Sessions in plaintext, ids unproven (protocol 1): anyone on the LAN
    /// can read and hijack them. Default: encrypted and authenticated.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Fleet key file (64 hex digits): sessions only with peers that hold
    /// the same key.
    #[arg(long)]
    pub psk_file: Option<std::path::PathBuf>,
    /// Cipher of encrypted sessions: `auto` (AES-256-GCM where both ends
    /// have AES instructions, else ChaCha20-Poly1305) or
    /// `chacha20-poly1305` (always: about 1.1 KiB less per session, half
    /// AES-GCM's large-message speed where AES instructions exist).
    #[arg(long, value_enum, default_value_t = Cipher::Auto, conflicts_with = "insecure_plaintext")]
    pub cipher: Cipher,
    /// Sessions only with this peer id (repeatable): others are not dialed
    /// and are refused after the handshake.
    #[arg(long = "trust")]
    pub trusted: Vec<lanbeat::PeerId>,
    /// Identity file: the node's key pair, created if missing (mode 0600);
    /// the same file gives the same id on every start.
    #[arg(long)]
    pub identity: Option<std::path::PathBuf>,
    /// TCP port to accept sessions on (0 = any).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// UDP discovery port, the same on every peer.
    #[arg(long, default_value_t = lanbeat::DEFAULT_DISCOVERY_PORT)]
    pub discovery_port: u16,
    /// Use the loopback interface only (whatever its name): peers on this
    /// host, unreachable from others.
    #[arg(long)]
    pub loopback: bool,
    /// A peer by address (repeatable): IP, IP:port or host[:port], the port
    /// being its discovery port. For networks where broadcast does not
    /// reach it (other subnets, access points that drop broadcast).
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Use only this interface (repeatable). Default: every usable one.
    #[arg(long = "interface")]
    pub interfaces: Vec<String>,
    /// peer, controller or device.
    #[arg(long, default_value = "peer")]
    pub role: Role,
    /// Metadata announced to peers, `KEY=VALUE` (repeatable; over an
    /// announce's limits the peer refuses to start and names the limit).
    #[arg(long = "meta", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Heartbeat timeout in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub heartbeat_timeout_ms: u64,
    /// How long an encrypted session's stream may bring nothing while the
    /// peer answers liveness datagrams, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub stall_timeout_ms: u64,
    /// How long a cut session is held for the peer to resume it, in
    /// milliseconds: lines typed meanwhile wait for it. 0: hand back at
    /// once.
    #[arg(long, default_value_t = 30_000)]
    pub resume_grace_ms: u64,
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Also print every RTT sample in readable mode.
    #[arg(long)]
    pub rtt: bool,
}

/// The `--cipher` choices, as [`lanbeat::SessionCipher`].
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Cipher {
    /// AES-256-GCM where both ends have AES instructions.
    Auto,
    /// ChaCha20-Poly1305 always.
    #[value(name = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

/// Runs the peer on a runtime of its own until SIGTERM or Ctrl-C, then exits
/// the process (0 on success). Exiting, rather than returning, matters: the
/// blocking read of stdin cannot be cancelled, so dropping the runtime would
/// wait for the next line forever.
pub fn main(args: Args) -> ! {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peer: cannot start tokio: {e}");
            std::process::exit(1)
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("peer: {e}");
            1
        }
    };
    // `rt` is deliberately never dropped.
    std::process::exit(code)
}

/// Runs the peer until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut b = Config::builder(&args.service)
        .role(args.role)
        .tcp_port(args.port)
        .discovery_port(args.discovery_port)
        .heartbeat(
            Duration::from_millis(args.heartbeat_interval_ms),
            Duration::from_millis(args.heartbeat_timeout_ms),
        )
        .stall_timeout(Duration::from_millis(args.stall_timeout_ms))
        .resume_grace(Duration::from_millis(args.resume_grace_ms));
    if let Some(n) = &args.name {
        b = b.name(n);
    }
    if let Some(id) = args.id {
        b = b.id(id);
    }
    if args.insecure_plaintext {
        b = b.insecure_plaintext();
    }
    b = b.session_cipher(match args.cipher {
        Cipher::Auto => lanbeat::SessionCipher::Auto,
        Cipher::ChaCha20Poly1305 => lanbeat::SessionCipher::ChaCha20Poly1305,
    });
    if !args.trusted.is_empty() {
        b = b.trust_only(args.trusted.iter().copied());
    }
    if let Some(path) = &args.psk_file {
        b = b.fleet_key(lanbeat::FleetKey::load(path)?);
    }
    if let Some(path) = &args.identity {
        b = b.identity(lanbeat::Identity::load_or_create(path)?);
    }
    if args.loopback {
        b = b.loopback_only();
    }
    for (k, v) in &args.meta {
        b = b.metadata(k, v);
    }
    for p in &args.peers {
        b = b.peer(p);
    }
    for i in &args.interfaces {
        b = b.interface(i);
    }
    // Before `started` is printed: a SIGTERM right after it must be a
    // graceful stop, not the default kill.
    let mut sigterm = Terminate::new()?;
    let config = b.build()?;
    let meta = config.metadata.clone();
    let (node, mut events) = Node::start(config).await?;
    let out = Printer {
        json: args.json,
        rtt: args.rtt,
    };
    let me = node.local().clone();
    out.line(
        json!({"event": "started", "id": me.id, "instance": format!("{:016x}", me.instance),
               "name": me.name, "tcp_port": me.tcp_port, "discovery_port": me.discovery_port,
               "fingerprint": me.fingerprint}),
        format!(
            "started {} ({}) tcp port {}, discovery port {}{}",
            me.name,
            me.id,
            me.tcp_port,
            me.discovery_port,
            me.fingerprint
                .as_deref()
                .map(|f| format!(", fingerprint {f}"))
                .unwrap_or_default()
        ),
    );
    // Typed lines on a task of their own: a send waiting for room (a slow
    // or stalled peer) holds up the next line, never the events.
    let typed = tokio::spawn(commands(node.clone(), out, meta));
    let mut names = std::collections::HashMap::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(e) => out.event(&e, &mut names),
                None => break,
            },
            _ = sigterm.recv(), if !stopping => {
                stopping = true;
                node.shutdown().await;
            }
            _ = tokio::signal::ctrl_c(), if !stopping => {
                stopping = true;
                node.shutdown().await;
            }
        }
    }
    typed.abort();
    out.line(json!({"event": "stopped"}), "stopped".to_owned());
    Ok(())
}

/// Reads typed lines until stdin closes: `/stats`, `/meta KEY=VALUE`,
/// `/peers`, or a message for every peer with a session.
async fn commands(node: Node, out: Printer, mut meta: std::collections::BTreeMap<String, String>) {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = stdin.next_line().await {
        if line == "/stats" {
            out.line(
                json!({"event": "stats", "stats": node.stats()}),
                format!("stats {:?}", node.stats()),
            );
        } else if let Some(entry) = line.strip_prefix("/meta ") {
            // One entry changed, the rest kept.
            match parse_meta(entry) {
                Ok((k, v)) => {
                    meta.insert(k, v);
                    if let Err(e) = node.set_metadata(meta.clone()).await {
                        eprintln!("peer: {e}");
                    }
                }
                Err(e) => eprintln!("peer: {e}"),
            }
        } else if line == "/peers" {
            for p in node.peers() {
                out.line(
                    json!({"event": "peer", "peer": p.info.id, "name": p.info.name,
                           "addr": p.info.addr.to_string(), "state": p.state,
                           "rtt_us": p.last_rtt.map(|r| r.as_micros() as u64)}),
                    format!(
                        "peer {} ({}) at {}: {:?}, rtt {:?}",
                        p.info.name, p.info.id, p.info.addr, p.state, p.last_rtt
                    ),
                );
            }
        } else {
            match node.send_all(line.clone()).await {
                Ok(sent) => out.line(
                    json!({"event": "sent", "data": line, "peers": sent}),
                    format!("sent to {} peer(s)", sent.len()),
                ),
                Err(e) => {
                    eprintln!("peer: {e}");
                    return;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Printer {
    json: bool,
    rtt: bool,
}

impl Printer {
    fn line(&self, j: serde_json::Value, text: String) {
        let mut o = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(o, "{j}")
        } else {
            writeln!(o, "{text}")
        };
        let _ = o.flush();
    }

    fn event(&self, e: &Event, names: &mut std::collections::HashMap<lanbeat::PeerId, String>) {
        let name = |p: &lanbeat::PeerId, names: &std::collections::HashMap<_, String>| {
            names.get(p).cloned().unwrap_or_else(|| p.to_string())
        };
        match e {
            Event::Discovered(i) => {
                names.insert(i.id, i.name.clone());
                self.line(
                    json!({"event": "discovered", "peer": i.id, "name": i.name,
                           "addr": i.addr.to_string(), "interface": i.interface}),
                    format!(
                        "discovered {} ({}) at {} via {}",
                        i.name,
                        i.id,
                        i.addr,
                        i.interface.as_deref().unwrap_or("?")
                    ),
                );
            }
            Event::SessionUp {
                peer,
                name: n,
                addr,
                outbound,
                role,
                metadata,
                resumed,
                ..
            } => {
                names.insert(*peer, n.clone());
                let how = if *resumed { "resumed" } else { "up" };
                self.line(
                    json!({"event": "session_up", "peer": peer, "name": n,
                           "addr": addr.to_string(), "outbound": outbound,
                           "role": role, "metadata": metadata, "resumed": resumed}),
                    format!("session {how} with {n} ({peer}) at {addr}"),
                );
            }
            Event::Rtt { peer, rtt } => {
                let j = json!({"event": "rtt", "peer": peer, "rtt_us": rtt.as_micros() as u64});
                if self.json {
                    self.line(j, String::new());
                } else if self.rtt {
                    self.line(j, format!("rtt to {} {:.2} ms", name(peer, names), rtt.as_secs_f64() * 1e3));
                }
            }
            Event::Message { peer, data } => {
                let text = String::from_utf8_lossy(data);
                self.line(
                    json!({"event": "message", "peer": peer, "data": text}),
                    format!("{}: {text}", name(peer, names)),
                );
            }
            Event::SessionDown { peer, reason } => self.line(
                json!({"event": "session_down", "peer": peer, "reason": reason.as_str(),
                       "detail": reason.to_string()}),
                format!("session with {} down: {reason}", name(peer, names)),
            ),
            Event::Unconfirmed { peer, messages } => self.line(
                json!({"event": "unconfirmed", "peer": peer, "count": messages.len(),
                       "data": messages.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect::<Vec<_>>()}),
                format!("{} message(s) to {} may or may not have arrived", messages.len(), name(peer, names)),
            ),
            Event::Undelivered { peer, messages } => self.line(
                json!({"event": "undelivered", "peer": peer, "count": messages.len(),
                       "data": messages.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect::<Vec<_>>()}),
                format!("{} message(s) to {} not delivered", messages.len(), name(peer, names)),
            ),
            Event::Metadata { peer, metadata } => self.line(
                json!({"event": "metadata", "peer": peer, "metadata": metadata}),
                format!("{} now has {metadata:?}", name(peer, names)),
            ),
            Event::PeerLost { peer } => self.line(
                json!({"event": "lost", "peer": peer}),
                format!("lost {}", name(peer, names)),
            ),
            Event::DuplicateId { peer, kept, other } => self.line(
                json!({"event": "duplicate_id", "peer": peer,
                       "kept": kept.to_string(), "other": other.to_string()}),
                format!("two nodes use id {peer}: keeping {kept}, ignoring {other}"),
            ),
            _ => {}
        }
    }
}

/// `KEY=VALUE`, for `--meta`.
fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// SIGTERM where there is one (Unix); elsewhere a stop is Ctrl-C only.
struct Terminate {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Terminate {
    fn new() -> std::io::Result<Self> {
        Ok(Terminate {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}
