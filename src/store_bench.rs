//! `ringpush bench store`: one shard's store partition, in process, on the disk under
//! `--data-dir` (default: a temp dir).
//!
//! Measures what the offline store costs: append throughput of one shard under each
//! durability policy, disk bytes per stored message, recovery time of the whole
//! partition, and heap per stored message with the LRU holding every device's queue
//! (hot) or none (cold). Pushes are unicast to `--devices` offline devices, round robin,
//! with `--payload`-byte payloads, through the same device table the server uses.
//!
//! The server flushes on glommio's blocking thread while the shard keeps appending;
//! here one thread appends and flushes in turn, so `batched` and `sync` figures are a
//! floor for what a shard sustains.

use crate::bench::BenchArgs;
use crate::devices::{DeviceTable, QueueLimits, TableOptions};
use crate::store::StoreOptions;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const SEGMENT: usize = 64 << 20;

fn options(cache_msgs: usize) -> (StoreOptions, TableOptions) {
    let limits = QueueLimits { window: 64, max_msgs: u32::MAX, max_bytes: u64::MAX };
    (
        StoreOptions { segment_bytes: SEGMENT, max_bytes: u64::MAX },
        TableOptions { limits, receipts: 1024, cache_msgs, latencies: false, clock_seqs: false },
    )
}

fn open(dir: &Path, cache_msgs: usize, now: u64) -> Result<DeviceTable, String> {
    let (s, t) = options(cache_msgs);
    DeviceTable::open(dir, s, vec!["bench".into()], t, now).map_err(|e| e.to_string())
}

/// Anonymous (heap) resident bytes of this process.
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map_or(0, |rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
}

/// Appends `n` messages; `flush_every` decides when a flush runs (None: never).
/// Returns (seconds, flushes).
fn append(
    t: &mut DeviceTable,
    n: u64,
    devices: usize,
    payload: &[u8],
    now: u64,
    flush_every: Option<Duration>,
) -> Result<(f64, u64), String> {
    let ids: Vec<String> = (0..devices).map(|i| format!("dev-{i:07}")).collect();
    // As the server does: staged appends when a flush will write them, written through
    // when nothing flushes (`memory`).
    t.store.stage_writes(flush_every.is_some()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let mut flushes = 0;
    for i in 0..n {
        let id = &ids[(i % devices as u64) as usize];
        t.enqueue_to(0, id, i, now + 86_400_000, payload, now, 0).map_err(|e| format!("append refused: {e}"))?;
        if let Some(every) = flush_every {
            if last_flush.elapsed() >= every {
                t.store.flush_now().map_err(|e| e.to_string())?;
                last_flush = Instant::now();
                flushes += 1;
            }
        }
    }
    if flush_every.is_some() {
        t.store.flush_now().map_err(|e| e.to_string())?;
        flushes += 1;
    }
    Ok((start.elapsed().as_secs_f64(), flushes))
}

/// Recovers `dir` in this (fresh) process and prints seconds and heap as JSON.
fn recover_only(dir: &Path, cache_msgs: usize, now: u64) -> Result<(), String> {
    let before = rss_anon();
    let start = Instant::now();
    let t = open(dir, cache_msgs, now)?;
    let secs = start.elapsed().as_secs_f64();
    println!("{}", json!({"seconds": secs, "heap_bytes": rss_anon().saturating_sub(before), "queued": t.queued()}));
    Ok(())
}

/// Runs `recover_only` in a child process, so its heap is measured from a clean start.
fn recover_in_child(dir: &Path, cache_msgs: usize) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(["bench", "store", "--recover-only"])
        .arg(dir)
        .args(["--cache-msgs", &cache_msgs.to_string()])
        .output()
        .map_err(|e| format!("cannot run the recovery process: {e}"))?;
    if !out.status.success() {
        return Err(format!("recovery process failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("recovery process output: {e}"))
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    let now = crate::client::unix_ms();
    if let Some(dir) = &args.recover_only {
        return recover_only(dir, args.cache_msgs, now);
    }
    let n = args.messages();
    let devices = args.devices.max(1);
    let payload = vec![0x5au8; args.payload];
    let base = match &args.data_dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .map_err(|e| format!("cannot make a data dir: {e}"))?;
    let mut rows = Vec::new();

    // Append throughput, one policy at a time, each on a fresh partition.
    let sync_n = n.min(2_000);
    for (policy, count, every) in
        [("memory", n, None), ("batched", n, Some(Duration::from_millis(2))), ("sync", sync_n, Some(Duration::ZERO))]
    {
        let dir = base.path().join(format!("append-{policy}"));
        let mut t = open(&dir, usize::MAX, now)?;
        let (secs, flushes) = append(&mut t, count, devices, &payload, now, every)?;
        rows.push(json!({
            "measure": "append", "durability": policy, "messages": count,
            "messages_per_sec": (count as f64 / secs) as u64, "flushes": flushes, "seconds": secs,
        }));
    }

    // Disk bytes per message, recovery time and heap per message, on the memory run's
    // partition (the same records any policy writes).
    let dir = base.path().join("append-memory");
    // Opening seals the partition (the active segment is cut to what it holds).
    let appended = open(&dir, 0, now)?.store.live_bytes();
    let disk = du(&dir);
    rows.push(json!({
        "measure": "disk", "messages": n, "payload_bytes": args.payload,
        "record_bytes_per_message": appended as f64 / n as f64, "disk_bytes_per_message": disk as f64 / n as f64,
    }));
    for (cache, label) in [(0, "cold"), (usize::MAX, "hot")] {
        let r = recover_in_child(&dir, cache)?;
        let (secs, heap) = (r["seconds"].as_f64().unwrap_or(0.0), r["heap_bytes"].as_u64().unwrap_or(0));
        if r["queued"].as_u64() != Some(n) {
            return Err(format!("recovered {} of {n} messages", r["queued"]));
        }
        rows.push(json!({
            "measure": "recovery", "cache": label, "messages": n, "devices": devices, "seconds": secs,
            "records_per_sec": (n as f64 / secs) as u64, "heap_bytes": heap, "heap_bytes_per_message": heap as f64 / n as f64,
        }));
    }

    if args.json {
        for r in &rows {
            println!("{r}");
        }
    } else {
        println!("store of one shard: {n} messages of {} B to {devices} offline devices", args.payload);
        for r in &rows {
            let m = r["measure"].as_str().unwrap_or("");
            match m {
                "append" => println!(
                    "  append  {:<8} {:>10} msg/s  ({} messages, {} flushes)",
                    r["durability"].as_str().unwrap_or(""),
                    r["messages_per_sec"],
                    r["messages"],
                    r["flushes"]
                ),
                "disk" => println!(
                    "  disk    {:.1} B of records, {:.1} B on disk per message",
                    r["record_bytes_per_message"].as_f64().unwrap_or(0.0),
                    r["disk_bytes_per_message"].as_f64().unwrap_or(0.0)
                ),
                _ => println!(
                    "  recover {:<4} {:.3} s ({} records/s), heap {:.1} B per message",
                    r["cache"].as_str().unwrap_or(""),
                    r["seconds"].as_f64().unwrap_or(0.0),
                    r["records_per_sec"],
                    r["heap_bytes_per_message"].as_f64().unwrap_or(0.0)
                ),
            }
        }
    }
    Ok(())
}
