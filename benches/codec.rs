//! Codec benchmarks: MESSAGE frames with a 64-byte payload (the device hot path) and
//! PUSH frames (the app hot path). Run: `cargo bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringpush::protocol::app::{AppFrame, Push, Target};
use ringpush::protocol::device::{encode_message, DeviceFrame, Message};
use ringpush::protocol::Limits;

fn message(c: &mut Criterion) {
    let payload = [0x5au8; 64];
    let m = Message { flags: 0, seq: 42, push_id: 7, expiry_ms: 1_800_000_000_000, payload: &payload };
    let mut g = c.benchmark_group("message_64B");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode_message(&mut out, black_box(&m));
            black_box(out.len())
        })
    });
    let mut bytes = Vec::new();
    encode_message(&mut bytes, &m);
    let limits = Limits::default();
    g.bench_function("decode", |b| {
        b.iter(|| match DeviceFrame::decode(black_box(&bytes), &limits) {
            Ok(Some((DeviceFrame::Message(m), n))) => black_box((m.seq, n)),
            _ => unreachable!(),
        })
    });
    // A batch of 1000 frames decoded back to back, as a session reads them.
    let batch: Vec<u8> = bytes.iter().copied().cycle().take(bytes.len() * 1000).collect();
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_batch_1000", |b| {
        b.iter(|| {
            let mut rest = &batch[..];
            let mut n = 0;
            while let Ok(Some((_, used))) = DeviceFrame::decode(rest, &limits) {
                rest = &rest[used..];
                n += 1;
            }
            black_box(n)
        })
    });
    g.finish();
}

fn push(c: &mut Criterion) {
    let payload = [0x5au8; 64];
    let p = AppFrame::Push(Push {
        request_id: 1,
        ttl_secs: 60,
        flags: 0,
        target: Target::Device("device-000123"),
        payload: &payload,
    });
    let mut bytes = Vec::new();
    p.encode(&mut bytes);
    let limits = Limits::default();
    let mut g = c.benchmark_group("push_64B");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1024);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&p).encode(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("decode", |b| b.iter(|| black_box(AppFrame::decode(black_box(&bytes), &limits).is_ok())));
    g.finish();
}

criterion_group!(benches, message, push);
criterion_main!(benches);
