//! Several phones controlling the same lamps: a lamp device, and a
//! controller for each phone. Run them on one machine (or several: drop
//! `--loopback`):
//!
//! ```text
//! cargo run --example lamp -- device --name kitchen --loopback
//! cargo run --example lamp -- controller --name phone-1 --loopback
//! cargo run --example lamp -- controller --name phone-2 --loopback
//! ```
//!
//! On a controller's stdin, `toggle kitchen`, `on kitchen` or `off kitchen`
//! switches the lamp (a request; the reply is the lamp's new state). On the
//! lamp's stdin, `switch` flips it by hand. Every change is pushed to every
//! controller; a controller that connects asks for the state; a lamp that
//! goes away shows as offline and comes back with its real state. Each
//! program prints one JSON object per line.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lanbeat::{Config, Event, Node, PeerId, Role};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// `device` (the lamp) or `controller` (a phone).
    mode: Mode,
    /// The lamp's or the phone's name.
    #[arg(long, default_value = "kitchen")]
    name: String,
    /// Only lamps and phones of the same service see each other.
    #[arg(long, default_value = "lanbeat-lamps")]
    service: String,
    /// UDP discovery port, the same everywhere.
    #[arg(long, default_value_t = lanbeat::DEFAULT_DISCOVERY_PORT)]
    discovery_port: u16,
    /// This machine only.
    #[arg(long)]
    loopback: bool,
    /// The lamp starts switched on (a real lamp reads its hardware).
    #[arg(long)]
    on: bool,
    /// Identity file (created if missing): the same id on every start.
    #[arg(long)]
    identity: Option<std::path::PathBuf>,
    /// Heartbeat interval and timeout, in milliseconds.
    #[arg(long, num_args = 2, default_values_t = [1000, 3000])]
    heartbeat_ms: Vec<u64>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    Device,
    Controller,
}

/// What a controller asks a lamp.
#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Command {
    Get,
    Toggle,
    Set { on: bool },
}

/// A lamp's state: the reply to every command, and what it pushes to every
/// controller when it changes. `version` orders a reply and a push that
/// race; it restarts with the lamp.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct State {
    on: bool,
    version: u64,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let role = match args.mode {
        Mode::Device => Role::Device,
        Mode::Controller => Role::Controller,
    };
    let (interval, timeout) = (args.heartbeat_ms[0], args.heartbeat_ms[1]);
    let mut config = Config::builder(&args.service)
        .name(&args.name)
        .role(role)
        .discovery_port(args.discovery_port)
        .heartbeat(
            Duration::from_millis(interval),
            Duration::from_millis(timeout),
        )
        .metadata("kind", "lamp");
    if args.loopback {
        config = config.loopback_only();
    }
    if let Some(path) = &args.identity {
        config = config.identity(lanbeat::Identity::load_or_create(path)?);
    }
    let (node, events) = Node::start(config.build()?).await?;
    print(json!({"event": "started", "name": args.name, "id": node.id()}));
    match args.mode {
        Mode::Device => lamp(node, events, args.on).await,
        Mode::Controller => controller(node, events).await,
    }
}

fn print(line: serde_json::Value) {
    println!("{line}");
}

/// The lamp: answers commands, pushes every change, takes `switch` on stdin.
async fn lamp(node: Node, mut events: lanbeat::Events, on: bool) -> Result<()> {
    let mut state = State { on, version: 0 };
    node.set_metadata([("on".into(), on.to_string())]).await?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let (to, by) = tokio::select! {
            e = events.recv() => match e {
                Some(Event::Request { peer, body, reply }) => {
                    let to = match serde_json::from_slice(&body) {
                        Ok(Command::Get) => state.on,
                        Ok(Command::Toggle) => !state.on,
                        Ok(Command::Set { on }) => on,
                        Err(e) => {
                            node.reply_json(&reply, &json!({"error": e.to_string()})).await?;
                            continue;
                        }
                    };
                    change(&node, &mut state, to, &peer.to_string()).await?;
                    // A controller gone meanwhile was told its request was lost.
                    let _ = node.reply_json(&reply, &state).await;
                    continue;
                }
                Some(Event::SessionUp { name, .. }) => {
                    print(json!({"event": "controller_up", "name": name}));
                    continue;
                }
                Some(_) => continue,
                None => return Ok(()),
            },
            line = stdin.next_line() => match line?.as_deref() {
                Some("switch") => (!state.on, "switch"),
                Some(_) => continue,
                None => break,
            },
        };
        change(&node, &mut state, to, by).await?;
    }
    node.shutdown().await;
    Ok(())
}

/// Switches the lamp (if `on` is a change) and tells every controller.
async fn change(node: &Node, state: &mut State, on: bool, by: &str) -> Result<()> {
    if on == state.on {
        return Ok(());
    }
    *state = State {
        on,
        version: state.version + 1,
    };
    print(json!({"event": "state", "on": on, "by": by}));
    node.send_all_json(state).await?;
    // For apps that list lamps before connecting.
    node.set_metadata([("on".into(), on.to_string())]).await?;
    Ok(())
}

/// What a controller knows of a lamp.
struct Lamp {
    name: String,
    state: Option<State>,
    online: bool,
}

/// A phone: shows every lamp, switches them from stdin.
async fn controller(node: Node, mut events: lanbeat::Events) -> Result<()> {
    let mut lamps: BTreeMap<PeerId, Lamp> = BTreeMap::new();
    // Replies come back here from the tasks that wait for them.
    let (replies, mut replied) = mpsc::unbounded_channel();
    let ask = |peer: PeerId, cmd: Command, via: &'static str| {
        let (node, replies) = (node.clone(), replies.clone());
        tokio::spawn(async move {
            let got = node
                .request_json::<_, State>(peer, &cmd, Duration::from_secs(2))
                .await;
            let _ = replies.send((peer, via, got.map_err(|e| e.to_string())));
        });
    };
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        let (peer, via, update) = tokio::select! {
            e = events.recv() => match e {
                Some(Event::SessionUp { peer, name, role: Role::Device, .. }) => {
                    lamps.insert(peer, Lamp { name, state: None, online: true });
                    ask(peer, Command::Get, "connect");
                    continue;
                }
                Some(Event::Message { peer, data }) => match serde_json::from_slice(&data) {
                    Ok(state) => (peer, "push", Ok(state)),
                    Err(_) => continue,
                },
                Some(Event::SessionDown { peer, .. }) => match lamps.get_mut(&peer) {
                    Some(l) => {
                        l.online = false;
                        (peer, "down", Err("offline".into()))
                    }
                    None => continue,
                },
                Some(_) => continue,
                None => return Ok(()),
            },
            Some((peer, via, got)) = replied.recv() => (peer, via, got),
            line = stdin.next_line() => {
                let Some(line) = line? else { break };
                let cmd = match line.split_once(' ') {
                    Some(("toggle", name)) => (Command::Toggle, name),
                    Some(("on", name)) => (Command::Set { on: true }, name),
                    Some(("off", name)) => (Command::Set { on: false }, name),
                    _ => continue,
                };
                // Names need not be unique: the first connected lamp of that name.
                match node.peers_named(cmd.1).first() {
                    Some(p) => ask(p.info.id, cmd.0, "reply"),
                    None => print(json!({"event": "error", "lamp": cmd.1, "error": "no such lamp"})),
                }
                continue;
            }
        };
        let Some(lamp) = lamps.get_mut(&peer) else {
            continue;
        };
        match update {
            // A reply to `get` after a (re)connect starts the lamp's history
            // over; otherwise only newer states count.
            Ok(state)
                if via == "connect" || lamp.state.is_none_or(|s| state.version > s.version) =>
            {
                lamp.state = Some(state);
            }
            Ok(_) => continue,
            Err(e) if via != "down" => {
                print(json!({"event": "error", "lamp": lamp.name, "error": e}));
                continue;
            }
            Err(_) => {}
        }
        print(
            json!({"event": "lamp", "lamp": lamp.name, "peer": peer, "online": lamp.online,
                     "on": lamp.state.map(|s| s.on), "via": via}),
        );
    }
    node.shutdown().await;
    Ok(())
}
