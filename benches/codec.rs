//! Codec micro-benchmarks: `cargo bench --bench codec`.

// On Linux only (criterion's alloca needs a C compiler for the target;
// docs/PLATFORMS.md).
#[cfg(target_os = "linux")]
mod codec {
    use std::hint::black_box;

    use bytes::{Bytes, BytesMut};
    use criterion::{Criterion, Throughput, criterion_group};
    use lanbeat::wire::discovery::{Datagram, DatagramLimits};
    use lanbeat::wire::frame::{self, Frame};

    fn datagrams(c: &mut Criterion) {
        // The wire types are `#[non_exhaustive]`: an announce is made the way
        // a receiver gets one, from its bytes (docs/PROTOCOL.md).
        let mut wire = b"LNBT\x01\x02".to_vec();
        wire.extend_from_slice(
        br#"{"service":"lamp-control","id":"123456789abcdef0","instance":"000000000000002a","role":"peer","name":"kitchen-hub","port":40123,"meta":{"fw":"1.2.3"}}"#,
    );
        let announce = Datagram::decode(&wire, &DatagramLimits::default()).unwrap();
        assert!(matches!(announce, Datagram::Announce(_)));
        let bytes = announce.encode();
        let limits = DatagramLimits::default();
        c.bench_function("datagram/encode announce", |b| {
            b.iter(|| black_box(&announce).encode())
        });
        c.bench_function("datagram/decode announce", |b| {
            b.iter(|| Datagram::decode(black_box(&bytes), &limits).unwrap())
        });
        let garbage = vec![0u8; 1000];
        c.bench_function("datagram/reject garbage", |b| {
            b.iter(|| Datagram::decode(black_box(&garbage), &limits).unwrap_err())
        });
    }

    fn frames(c: &mut Criterion) {
        let mut g = c.benchmark_group("frame");
        for size in [16usize, 64, 1024, 65536] {
            let payload = Bytes::from(vec![7u8; size]);
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_function(format!("encode data {size} B"), |b| {
                let mut buf = BytesMut::with_capacity(size + 16);
                b.iter(|| {
                    buf.clear();
                    frame::encode_data(black_box(&payload), &mut buf);
                })
            });
            let mut one = BytesMut::new();
            frame::encode_data(&payload, &mut one);
            g.bench_function(format!("decode data {size} B"), |b| {
                b.iter(|| {
                    let mut buf = one.clone();
                    Frame::decode(black_box(&mut buf), 1 << 20)
                        .unwrap()
                        .unwrap()
                })
            });
        }
        g.throughput(Throughput::Elements(1));
        let mut ping = BytesMut::new();
        Frame::Ping {
            seq: 1,
            rtt_us: Some(250),
        }
        .encode(&mut ping);
        g.bench_function("decode ping", |b| {
            b.iter(|| {
                let mut buf = ping.clone();
                Frame::decode(black_box(&mut buf), 1 << 20)
                    .unwrap()
                    .unwrap()
            })
        });
        g.finish();
    }

    criterion_group!(benches, datagrams, frames);
}

#[cfg(target_os = "linux")]
fn main() {
    codec::benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

#[cfg(not(target_os = "linux"))]
fn main() {}
