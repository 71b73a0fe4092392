//! The store: appending one 64-byte message record, and recovering a partition of
//! 100 000 messages. Run: `cargo bench --bench store`. (`ringpush bench store` measures
//! the same at a million messages, with flushes, disk and heap per message.)

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringpush::devices::{DeviceTable, QueueLimits, TableOptions};
use ringpush::store::{MessageRec, Record, Store, StoreOptions, NO_LOC};

fn sopts() -> StoreOptions {
    StoreOptions { segment_bytes: 64 << 20, max_bytes: u64::MAX }
}

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut s = Store::open(dir.path(), sopts(), |_, _| {}).expect("store opens");
    let payload = [7u8; 64];
    let mut head = Vec::new();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    let mut seq = 0;
    g.bench_function("append_64B_message", |b| {
        b.iter(|| {
            seq += 1;
            let rec = Record::Message(MessageRec {
                app: "demo",
                id: "device-000042",
                seq,
                push_id: seq,
                expiry_ms: u64::MAX,
                prev: NO_LOC,
                payload: &payload,
            });
            let l = s.append(&rec, &mut head).expect("append");
            // Released at once, so old segments are deleted and the disk stays small.
            s.release(l);
            if seq % 100_000 == 0 {
                let dead = s.dead_segments();
                s.delete(&dead).expect("delete");
            }
            black_box(l)
        })
    });
    g.finish();
}

fn recovery(c: &mut Criterion) {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let limits = QueueLimits { window: 64, max_msgs: u32::MAX, max_bytes: u64::MAX };
    let opts = TableOptions { limits, receipts: 16, cache_msgs: usize::MAX, latencies: false, clock_seqs: false };
    let now = 1_000_000;
    {
        let mut t = DeviceTable::open(dir.path(), sopts(), vec!["demo".into()], opts, now).expect("open");
        for i in 0..N {
            t.enqueue_to(0, &format!("d{}", i % 1000), i, u64::MAX, &[7u8; 64], now, 0).expect("append");
        }
    }
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N));
    g.bench_function("recover_100k_messages_1000_devices", |b| {
        b.iter(|| {
            let t = DeviceTable::open(dir.path(), sopts(), vec!["demo".into()], opts, now).expect("open");
            assert_eq!(t.queued(), N);
            black_box(t.len())
        })
    });
    g.finish();
}

criterion_group!(benches, append, recovery);
criterion_main!(benches);
