//! One Noise XX handshake, both sides in memory, with lanbeat's primitives
//! (X25519 from aws-lc-rs with the default `aws-lc` feature) beside snow's
//! own (curve25519-dalek): `cargo bench --bench handshake`. The ratio of
//! the two is what the `aws-lc` feature buys per connection, before any
//! socket or task.

// On Linux only (criterion's alloca needs a C compiler for the target;
// docs/PLATFORMS.md).
#[cfg(target_os = "linux")]
mod handshake {
    use criterion::{Criterion, criterion_group};

    const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

    type Build = fn(snow::params::NoiseParams) -> snow::Builder<'static>;

    /// Both sides of one handshake, with fresh ephemeral keys.
    fn run(build: Build, a: &[u8; 32], b: &[u8; 32]) {
        let side = |key: &[u8; 32], initiator: bool| {
            let b = build(PATTERN.parse().unwrap())
                .local_private_key(key)
                .unwrap()
                .prologue(b"lanbeat/2\0bench")
                .unwrap();
            if initiator {
                b.build_initiator().unwrap()
            } else {
                b.build_responder().unwrap()
            }
        };
        let (mut i, mut r) = (side(a, true), side(b, false));
        let (mut msg, mut out) = ([0u8; 256], [0u8; 256]);
        for turn in 0..3 {
            let (from, to) = if turn % 2 == 0 {
                (&mut i, &mut r)
            } else {
                (&mut r, &mut i)
            };
            let n = from.write_message(&[], &mut msg).unwrap();
            to.read_message(&msg[..n], &mut out).unwrap();
        }
        assert!(i.is_handshake_finished() && r.is_handshake_finished());
    }

    fn handshakes(c: &mut Criterion) {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut g = c.benchmark_group("noise XX handshake, both sides");
        g.bench_function("lanbeat's primitives", |t| {
            t.iter(|| run(lanbeat::session::noise_builder, &a, &b))
        });
        g.bench_function("snow's own (baseline)", |t| {
            t.iter(|| run(snow::Builder::new, &a, &b))
        });
        g.finish();
    }

    criterion_group!(benches, handshakes);
}

#[cfg(target_os = "linux")]
fn main() {
    handshake::benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

#[cfg(not(target_os = "linux"))]
fn main() {}
