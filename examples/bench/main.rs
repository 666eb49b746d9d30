//! lanbeat benchmarks: each figure beside a baseline measured in the same
//! run, printed as a markdown table. Loopback and namespaces of its own only.
//!
//! ```text
//! cargo run --release --example bench -- lifecycle [--trials N]
//! cargo run --release --example bench -- rtt [--n N]
//! cargo run --release --example bench -- throughput [--scale F]
//! cargo run --release --example bench -- tls [--scale F] [--rounds 1] [--pin]
//! cargo run --release --example bench -- scale [--sessions 1000,10000] [--secs 30] [--rounds 1] [--paired [--pin] [--timeout-baseline | --noise [--aes]]]
//! cargo run --release --example bench -- discovery [--trials 50]   (namespaces need root)
//! cargo run --release --example bench -- detect [--trials 20]      (root)
//! cargo run --release --example bench -- soak [--minutes 10]
//! cargo run --release --example bench -- impaired [--minutes 1] [--loss 5,10,20,30] [--baseline-bin PATH]   (root, nft)
//! cargo run --release --example bench -- jittered [--minutes 1] [--jitter 100,300,600] [--baseline-bin PATH]   (root)
//! cargo run --release --example bench -- saturated [--minutes 2] [--baseline-bin PATH]   (root, tc)
//! ```
//!
//! See docs/BENCHMARKS.md for what each scenario measures and the results.

#[cfg(target_os = "linux")]
#[path = "../peer/app.rs"]
mod app;
#[cfg(target_os = "linux")]
#[path = "../../tests/common/mod.rs"]
mod common;
#[cfg(target_os = "linux")]
mod lifecycle;
#[cfg(target_os = "linux")]
mod msg;
#[cfg(target_os = "linux")]
mod net;
#[cfg(target_os = "linux")]
#[path = "../../tests/netlab/mod.rs"]
mod netlab;
#[cfg(target_os = "linux")]
mod scale;
#[cfg(target_os = "linux")]
mod tls;
#[cfg(target_os = "linux")]
mod util;

#[cfg(target_os = "linux")]
use clap::Parser;

#[cfg(target_os = "linux")]
#[derive(Parser)]
struct Args {
    /// Scenario: lifecycle, rtt, throughput.
    scenario: String,
    /// Trials per setting (lifecycle).
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Round trips (rtt).
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Scale of the message counts (throughput).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Session counts (scale), comma-separated.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Minutes (soak; per setting for impaired).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Impaired: an example-peer binary of another build (the previous
    /// design), measured beside this one.
    #[arg(long)]
    baseline_bin: Option<String>,
    /// Impaired: the loss rates in percent, comma-separated.
    #[arg(long, default_value = "5,10,20,30", value_delimiter = ',')]
    loss: Vec<u32>,
    /// Jittered: the most each host's link holds a frame each way, in
    /// milliseconds, comma-separated.
    #[arg(long, default_value = "100,300,600", value_delimiter = ',')]
    jitter: Vec<u64>,
    /// Seconds of CPU sampling (scale).
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Rounds of the three servers, one after the other (scale), or of
    /// every row (tls): the summary gives medians.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Scale: run the raw and the lanbeat server side by side and sample
    /// both over the same windows (`--rounds` of them).
    #[arg(long)]
    paired: bool,
    /// Scale, with `--paired`: both servers on CPU 0, both clients on
    /// CPU 1 (steadier ratios). Tls: the one-way rows' sink on CPU 0 and
    /// source on CPU 1.
    #[arg(long)]
    pin: bool,
    /// Scale, with `--paired`: compare with the raw server that has a 3 s
    /// read timeout.
    #[arg(long)]
    timeout_baseline: bool,
    /// Scale, with `--paired`: compare lanbeat with Noise against
    /// plaintext lanbeat.
    #[arg(long)]
    noise: bool,
    /// Scale, with `--noise`: the Noise sessions use AES-256-GCM, not
    /// ChaCha20-Poly1305.
    #[arg(long)]
    aes: bool,
}

#[cfg(target_os = "linux")]
fn main() {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("--peer-child") => app::main(app::Args::parse_from(
            std::iter::once("peer".to_owned()).chain(argv[2..].iter().cloned()),
        )),
        Some("__child") => {
            if std::env::var_os("RUST_LOG").is_some() {
                tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                    .with_writer(std::io::stderr)
                    .init();
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // The role runs in a spawned task, as an application's loop
            // would; `--block-on` first runs it in `block_on` instead, where
            // every wake-up of the loop costs the runtime a driver poll
            // (docs/BENCHMARKS.md).
            let block_on = argv.get(2).is_some_and(|a| a == "--block-on");
            let argv: Vec<String> = argv[if block_on { 3 } else { 2 }..].to_vec();
            let role = argv[0].clone();
            let run = async move {
                msg::child(&argv[0], &argv[1..]).await
                    || scale::child(&argv[0], &argv[1..]).await
                    || net::child(&argv[0], &argv[1..]).await
                    || tls::child(&argv[0], &argv[1..]).await
            };
            let known = if block_on {
                rt.block_on(run)
            } else {
                rt.block_on(async { tokio::spawn(run).await.unwrap() })
            };
            assert!(known, "unknown helper role {role}");
            std::process::exit(0);
        }
        _ => {}
    }
    let args = Args::parse();
    match args.scenario.as_str() {
        "lifecycle" => tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(lifecycle::lifecycle(args.trials)),
        "rtt" => msg::rtt(args.n),
        "throughput" => msg::throughput(args.scale),
        "tls" => tls::tls(args.scale, args.rounds, args.pin),
        "scale" if args.paired => {
            let pairing = if args.noise {
                scale::Pairing::Noise { aes: args.aes }
            } else {
                scale::Pairing::Raw {
                    timeout: args.timeout_baseline,
                }
            };
            scale::scale_paired(&args.sessions, args.secs, args.rounds, args.pin, pairing)
        }
        "scale" => scale::scale(&args.sessions, args.secs, args.rounds),
        "discovery" => net::discovery(args.trials.max(50)),
        "detect" => net::detect(args.trials),
        "soak" => net::soak(args.minutes),
        "impaired" => net::impaired(args.minutes, &args.loss, args.baseline_bin),
        "saturated" => net::saturated(args.minutes, args.baseline_bin),
        "jittered" => net::jittered(args.minutes, &args.jitter, args.baseline_bin),
        other => {
            eprintln!(
                "unknown scenario {other:?}; try lifecycle, rtt, throughput, tls, scale, discovery, detect, soak, impaired, saturated, jittered"
            );
            std::process::exit(2);
        }
    }
}

/// The benchmarks run on Linux only: criterion and the TLS baseline (ring)
/// need a C compiler for the target, and the namespace scenarios need
/// Linux (docs/PLATFORMS.md).
#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("bench: the benchmarks run on Linux only (docs/PLATFORMS.md)");
    std::process::exit(2);
}
