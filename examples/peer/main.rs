//! The example peer. Run it on two machines of one LAN:
//!
//! ```text
//! cargo run --release --example peer -- --name kitchen
//! cargo run --release --example peer -- --name hall --json
//! ```
//!
//! See `--help` for the options and the README for what to expect.

mod app;

use clap::Parser;

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    app::main(app::Args::parse())
}
