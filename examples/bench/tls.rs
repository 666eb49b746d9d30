//! `tls`: lanbeat's encrypted sessions against tokio-rustls (TLS 1.3, ring),
//! what a user would otherwise put under their messages, over the same
//! loopback, each side in its own process: one-way throughput, pinned
//! round trip, and connect to ready.
//!
//! TLS is given its best case: the server alone is authenticated (no
//! client certificate, where lanbeat authenticates both sides), messages
//! go through a `BufWriter` (lanbeat: one `send` per message), and it runs
//! with its preferred AES-256-GCM on AES-NI as well as with
//! ChaCha20-Poly1305 (lanbeat's cipher).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use lanbeat::{Config, Node};
use serde_json::Value;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types};

use crate::common::noise;
use crate::msg::{echo, rtt_loop, sink, source, summary};
use crate::util::{Helper, arg, free_port};

/// Writes a self-signed certificate for `localhost` and its key to `dir`.
fn make_cert(dir: &Path) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.der"), c.cert.der()).unwrap();
    std::fs::write(dir.join("key.der"), c.signing_key.serialize_der()).unwrap();
}

fn provider(chacha: bool) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    if chacha {
        p.cipher_suites
            .retain(|s| s.suite() == rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }
    Arc::new(p)
}

fn acceptor(dir: &Path, chacha: bool) -> tokio_rustls::TlsAcceptor {
    let cert = pki_types::CertificateDer::from(std::fs::read(dir.join("cert.der")).unwrap());
    let key =
        pki_types::PrivateKeyDer::try_from(std::fs::read(dir.join("key.der")).unwrap()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider(chacha))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

fn connector(dir: &Path, chacha: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(pki_types::CertificateDer::from(
            std::fs::read(dir.join("cert.der")).unwrap(),
        ))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider(chacha))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    port: u16,
    c: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = pki_types::ServerName::try_from("localhost").unwrap();
    c.connect(name, tcp).await.unwrap()
}

/// One `write_all` per message, as with one `send` per message: each is
/// its own TLS record.
async fn source_unbuffered<S: AsyncWrite + Unpin>(mut s: S, n: u64, size: usize) {
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(1u8, size));
    for _ in 0..n {
        s.write_all(&frame).await.unwrap();
    }
    s.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
}

/// Runs a child role; returns false if `role` is not one of ours.
pub(crate) async fn child(role: &str, args: &[String]) -> bool {
    let dir = || PathBuf::from(arg::<String>(args, "--dir"));
    let chacha = || arg::<bool>(args, "--chacha");
    match role {
        "tls-server" => {
            // One kind per process: echo, sink, or the handshake only.
            let kind: String = arg(args, "--kind");
            let acc = acceptor(&dir(), chacha());
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", l.local_addr().unwrap().port());
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let Ok(s) = acc.accept(tcp).await else {
                    continue;
                };
                match kind.as_str() {
                    "echo" => echo(s).await,
                    "sink" => {
                        sink(s, arg(args, "--n")).await;
                        return true;
                    }
                    // Handshake only: next connection.
                    _ => drop(s),
                }
            }
        }
        "tls-rtt" => {
            let c = connector(&dir(), chacha());
            let s = tls_connect(arg(args, "--port"), &c).await;
            rtt_loop(s, arg(args, "--n")).await;
        }
        "tls-source" => {
            let c = connector(&dir(), chacha());
            let s = tls_connect(arg(args, "--port"), &c).await;
            let (n, size) = (arg(args, "--n"), arg(args, "--size"));
            if arg(args, "--unbuffered") {
                source_unbuffered(s, n, size).await;
            } else {
                source(s, n, size).await;
            }
        }
        "tls-connect" => {
            let c = connector(&dir(), chacha());
            let port = arg(args, "--port");
            let n: usize = arg(args, "--n");
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t0 = Instant::now();
                let s = tls_connect(port, &c).await;
                samples.push(t0.elapsed());
                drop(s);
            }
            println!("{}", summary(samples));
        }
        "lb-accept" => {
            let config = Config::builder("tls-bench")
                .loopback_only()
                .discovery_port(free_port())
                .build()
                .unwrap();
            let (node, mut events) = Node::start(config).await.unwrap();
            println!("{}", node.local().tcp_port);
            while events.recv().await.is_some() {}
        }
        "lb-connect" => {
            // A spec-written protocol-2 client: connect, Noise handshake,
            // hellos; ready once the node's hello arrived. With lanbeat's
            // primitives (its X25519), as a lanbeat dialer would have.
            let port: u16 = arg(args, "--port");
            let n: usize = arg(args, "--n");
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                let mut secret = [0u8; 32];
                secret[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                let hello = noise::hello("tls-bench", noise::id_of(&secret), "c");
                let t0 = Instant::now();
                let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let mut conn = noise::handshake_with(
                    tcp,
                    "tls-bench",
                    &secret,
                    true,
                    lanbeat::session::noise_builder,
                )
                .await
                .unwrap();
                conn.exchange_hellos(&hello).await;
                samples.push(t0.elapsed());
            }
            println!("{}", summary(samples));
        }
        _ => return false,
    }
    true
}

/// A TLS server helper of `kind` and a client helper, on the CPUs `cpus`
/// (server, client) if given; the measuring side's line. A client whose
/// first argument is `--block-on` gets a server run the same way.
fn tls_pair(
    dir: &Path,
    kind: &str,
    client: &[String],
    chacha: bool,
    cpus: Option<(usize, usize)>,
) -> Value {
    let d = dir.to_str().unwrap().to_owned();
    let c = chacha.to_string();
    let mut extra = vec!["--dir".to_owned(), d, "--chacha".to_owned(), c];
    let mut server = vec![
        "tls-server".to_owned(),
        "--kind".to_owned(),
        kind.to_owned(),
    ];
    if client.first().is_some_and(|a| a == "--block-on") {
        server.insert(0, "--block-on".to_owned());
    }
    if kind == "sink" {
        let n = client[client.iter().position(|a| a == "--n").unwrap() + 1].clone();
        server.extend(["--n".to_owned(), n]);
    }
    server.extend(extra.clone());
    let mut s = Helper::start(&server, cpus.map(|c| c.0), None);
    let port = s.line();
    extra.extend(["--port".to_owned(), port]);
    let mut cl = Helper::start(&[client.to_vec(), extra].concat(), cpus.map(|c| c.1), None);
    let out = if kind == "sink" { s.line() } else { cl.line() };
    serde_json::from_str(&out).unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// One measured row: what, its unit, and rustls AES, rustls ChaCha and
/// lanbeat.
type Row = (&'static str, &'static str, f64, f64, f64);

pub(crate) fn tls(scale: f64, rounds: usize, pin: bool) {
    let dir = std::env::temp_dir().join(format!("lanbeat-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_cert(&dir);
    println!("lanbeat (Noise XX, both sides authenticated; AES-256-GCM where both ends");
    println!("have AES instructions) against tokio-rustls (TLS 1.3, ring, server");
    println!("authenticated only), same loopback, separate processes; the round trip");
    println!(
        "and connect rows pinned to one CPU{}. {rounds} round(s), the three taken",
        if pin {
            ", the one-way rows' sink to CPU 0 and source to CPU 1"
        } else {
            ""
        }
    );
    println!("in turn within each; the table gives each cell's median (and, over");
    println!("several rounds, the range of the ratio)\n");
    let runs: Vec<Vec<Row>> = (0..rounds.max(1))
        .map(|_| round(&dir, scale, pin))
        .collect();
    println!(
        "| what | rustls AES-256-GCM | rustls ChaCha20 | lanbeat | vs rustls AES | vs rustls ChaCha |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (i, &(what, unit, ..)) in runs[0].iter().enumerate() {
        // One value of the row per round.
        let per_round = |f: &dyn Fn(&Row) -> f64| runs.iter().map(|r| f(&r[i])).collect();
        let (aes, chacha, lb) = (
            median(per_round(&|r| r.2)),
            median(per_round(&|r| r.3)),
            median(per_round(&|r| r.4)),
        );
        let range = |f: &dyn Fn(&Row) -> f64| {
            let v: Vec<f64> = per_round(f);
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(0.0, f64::max);
            if v.len() < 2 {
                String::new()
            } else {
                format!(" ({lo:.2}–{hi:.2})")
            }
        };
        println!(
            "| {what} | {aes:.2} {unit} | {chacha:.2} {unit} | {lb:.2} {unit} | {:.2}×{} | {:.2}×{} |",
            lb / aes,
            range(&|r| r.4 / r.2),
            lb / chacha,
            range(&|r| r.4 / r.3),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One round of every row; with `pin`, the one-way rows' sink on CPU 0
/// and source on CPU 1 (each side is one thread), so that neither
/// lanbeat nor rustls is measured while the scheduler puts both
/// processes on one CPU.
fn round(dir: &Path, scale: f64, pin: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    let apart = pin.then_some((0, 1));
    for (size, n) in [(64usize, 2_000_000.0), (65536, 20_000.0)] {
        let n = ((n * scale) as u64).max(1000).to_string();
        let ss = size.to_string();
        let rate = |v: &Value| {
            let secs = v["secs"].as_f64().unwrap();
            if size == 64 {
                v["msgs"].as_f64().unwrap() / secs / 1e6
            } else {
                v["bytes"].as_f64().unwrap() / secs / 1e6
            }
        };
        let lb = crate::msg::pair_on(
            &["lb-sink", "--n", &n, "--batch", "0"],
            &["lb-source", "--n", &n, "--size", &ss, "--batch", "0"],
            apart,
            true,
        );
        let lb = rate(&lb);
        for buffered in [false, true] {
            let client = strings(&[
                "tls-source",
                "--n",
                &n,
                "--size",
                &ss,
                "--unbuffered",
                &(!buffered).to_string(),
            ]);
            let aes = rate(&tls_pair(dir, "sink", &client, false, apart));
            let chacha = rate(&tls_pair(dir, "sink", &client, true, apart));
            let (what, unit) = match (size, buffered) {
                (64, false) => (
                    "64 B one-way, one write per message (higher is better)",
                    "M msg/s",
                ),
                (64, true) => ("64 B one-way, TLS through a BufWriter", "M msg/s"),
                (_, false) => ("64 KiB one-way, one write per message", "MB/s"),
                (_, true) => ("64 KiB one-way, TLS through a BufWriter", "MB/s"),
            };
            rows.push((what, unit, aes, chacha, lb));
        }
    }
    let n = ((50_000.0 * scale) as usize).max(2000).to_string();
    let p50 = |v: &Value| v["p50_us"].as_f64().unwrap();
    // Each side's loop in a spawned task (as the other rows), then in
    // `block_on`, where each wake-up of a lanbeat application (woken by
    // its session's task) costs tokio a driver poll; a TLS application
    // does its own I/O and is not woken by another task.
    for (pre, what) in [
        (&[][..], "16 B round trip p50 (lower is better)"),
        (
            &["--block-on"][..],
            "16 B round trip p50, both loops in `block_on`",
        ),
    ] {
        let client = strings(&[pre, &["tls-rtt", "--n", &n]].concat());
        let aes = p50(&tls_pair(dir, "echo", &client, false, Some((0, 0))));
        let chacha = p50(&tls_pair(dir, "echo", &client, true, Some((0, 0))));
        let lb = p50(&crate::msg::pair(
            &[pre, &["lb-echo"]].concat(),
            &[pre, &["lb-rtt", "--n", &n]].concat(),
            true,
            true,
        ));
        rows.push((what, "µs", aes, chacha, lb));
    }
    let n = ((500.0 * scale) as usize).max(100).to_string();
    let client = strings(&["tls-connect", "--n", &n]);
    let aes = p50(&tls_pair(dir, "handshake", &client, false, Some((0, 0))));
    let chacha = p50(&tls_pair(dir, "handshake", &client, true, Some((0, 0))));
    let mut s = Helper::start(&strings(&["lb-accept"]), Some(0), None);
    let port = s.line();
    let mut c = Helper::start(
        &strings(&["lb-connect", "--n", &n, "--port", &port]),
        Some(0),
        None,
    );
    let lb = p50(&serde_json::from_str(&c.line()).unwrap());
    rows.push((
        "connect → ready p50 (lower is better)",
        "µs",
        aes,
        chacha,
        lb,
    ));
    rows
}
