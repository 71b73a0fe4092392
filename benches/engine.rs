//! Engine building blocks: device placement over shards and over a fleet's node ring,
//! the timer wheel, and the device table's enqueue → encode → ack cycle.
//! Run: `cargo bench --bench engine`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringpush::devices::{DeviceTable, QueueLimits, TableOptions};
use ringpush::dispatch::Ring;
use ringpush::routing::shard_for;
use ringpush::store::StoreOptions;
use ringpush::timer::TimerWheel;

fn placement(c: &mut Criterion) {
    let ids: Vec<String> = (0..1024).map(|i| format!("device-{i:06}")).collect();
    let mut g = c.benchmark_group("shard_for");
    g.throughput(Throughput::Elements(ids.len() as u64));
    for shards in [2usize, 64] {
        g.bench_function(format!("{shards}_shards"), |b| {
            b.iter(|| ids.iter().map(|d| shard_for("demo", d, shards)).sum::<usize>())
        });
    }
    g.finish();
}

fn ring(c: &mut Criterion) {
    let ids: Vec<String> = (0..1024).map(|i| format!("device-{i:06}")).collect();
    let mut g = c.benchmark_group("node_ring");
    g.throughput(Throughput::Elements(ids.len() as u64));
    for nodes in [3usize, 100] {
        let names: Vec<String> = (0..nodes).map(|i| format!("push-{i:03}")).collect();
        let ring = Ring::new(names.iter().map(|n| (n.as_str(), 100)));
        g.bench_function(format!("{nodes}_nodes"), |b| {
            b.iter(|| ids.iter().map(|d| ring.node_for("demo", d)).sum::<usize>())
        });
    }
    // Building the ring (once at start): throughput in virtual points.
    let names: Vec<String> = (0..100).map(|i| format!("push-{i:03}")).collect();
    let build = || Ring::new(black_box(&names).iter().map(|n| (n.as_str(), 100)));
    g.throughput(Throughput::Elements(build().points() as u64));
    g.bench_function("build_100_nodes", |b| b.iter(|| build().points()));
    g.finish();
}

fn wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("insert_and_fire_10k", |b| {
        let mut fired = Vec::with_capacity(10_000);
        b.iter(|| {
            let mut w = TimerWheel::new(1024, 100, 0);
            for k in 0..10_000u64 {
                w.insert(k, 100 + (k * 37) % 60_000);
            }
            fired.clear();
            w.advance(61_000, &mut fired);
            black_box(fired.len())
        })
    });
    g.finish();
}

fn table(c: &mut Criterion) {
    let limits = QueueLimits { window: 64, max_msgs: 4096, max_bytes: 1 << 24 };
    let opts = TableOptions { limits, receipts: 65_536, cache_msgs: usize::MAX, latencies: true, clock_seqs: false };
    let dir = tempfile::tempdir().expect("temp dir");
    let sopts = StoreOptions { segment_bytes: 64 << 20, max_bytes: u64::MAX };
    let mut t = DeviceTable::open(dir.path(), sopts, vec!["a".into()], opts, 0).expect("store opens");
    let keys: Vec<usize> = (0..1000).map(|i| t.attach(0, &format!("d{i}"), 0, 0, i, 0, 0).device).collect();
    let payload = vec![0u8; 64];
    let mut out = Vec::with_capacity(1 << 20);
    let mut g = c.benchmark_group("device_table");
    g.throughput(Throughput::Elements(keys.len() as u64));
    let mut push_id = 0;
    g.bench_function("store_fill_ack_1000_devices", |b| {
        b.iter(|| {
            out.clear();
            for &k in &keys {
                push_id += 1;
                t.enqueue(k, push_id, u64::MAX, &payload, 0).unwrap();
                t.fill(k, 1, 5, &mut out, usize::MAX);
                let acked = t.device(k).acked();
                t.on_ack(k, acked + 1, 0, 9);
            }
            let dead = t.store.dead_segments();
            t.store.delete(&dead).unwrap();
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, placement, ring, wheel, table);
criterion_main!(benches);
