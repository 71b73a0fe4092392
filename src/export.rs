//! Renders gathered shard snapshots as Prometheus text (`GET /metrics`) and JSON
//! (`GET /stats`, read by `ringpush stats`).
//!
//! Runs on: the shard serving HTTP, only when scraped. Counters and gauges go through
//! the `metrics` facade into a fresh `metrics-exporter-prometheus` recorder per scrape
//! (scoped with `with_local_recorder`, so nothing global is shared between cores).
//! Latencies come from the shards' hdrhistograms, merged, and are written as
//! Prometheus summaries (quantiles 0.5, 0.9, 0.99, 0.999, plus `_max`).

use crate::stats::{Hist, ShardSnapshot, Stage};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::fmt::Write;

fn describe() {
    let c = |n: &'static str, h: &'static str| metrics::describe_counter!(n, h);
    c("ringpush_device_connections_accepted_total", "Device TCP connections accepted.");
    c("ringpush_handshakes_total", "Device handshakes, by result.");
    c("ringpush_handoffs_total", "Device connections handed from the accepting shard to the owner shard.");
    c(
        "ringpush_pushes_forwarded_total",
        "Unicast and list pushes (or shares) sent on to the shard owning the devices.",
    );
    c("ringpush_sessions_closed_total", "Device sessions ended, for any reason.");
    c("ringpush_device_disconnects_total", "Device sessions closed by the server, by reason.");
    c("ringpush_app_connections_accepted_total", "App connections authenticated.");
    c("ringpush_app_handshake_failures_total", "App connections refused during preamble or AUTH.");
    c("ringpush_bytes_total", "Bytes read and written on device and app sockets.");
    c("ringpush_device_writes_total", "Sends to device sockets: messages written / writes is the coalescing factor.");
    c("ringpush_pushes_total", "Push requests answered, by kind and result.");
    c("ringpush_messages_total", "Messages (one push to one device), by event.");
    c("ringpush_store_errors_total", "Store writes or flushes that failed (disk full, I/O error).");
    c("ringpush_cache_evictions_total", "Devices whose queued-message references left the heap (LRU).");
    c("ringpush_cache_loads_total", "Cold devices whose queue was read back from the store.");
    c("ringpush_devices_forgotten_total", "Devices dropped from the registry: nothing stored, silent for max_ttl.");
    c("ringpush_store_compacted_records_total", "Live records copied forward by compaction.");
    c("ringpush_store_appends_total", "Records appended to the store.");
    c("ringpush_store_append_bytes_total", "Bytes appended to the store (record headers and padding included).");
    c("ringpush_store_flushes_total", "Store flushes (fdatasync rounds).");
    c("ringpush_store_segments_deleted_total", "Segment files deleted once nothing in them was needed.");
    c("ringpush_store_compactions_total", "Segments compacted (live records moved, segment freed).");
    c("ringpush_store_full_total", "Times a new segment could not be made (budget or disk full).");
    let g = |n: &'static str, h: &'static str| metrics::describe_gauge!(n, h);
    g("ringpush_sessions", "Connected device sessions.");
    g("ringpush_app_connections", "Open app connections.");
    g("ringpush_devices", "Device records held in memory.");
    g("ringpush_queued_messages", "Messages waiting for a device or its ack.");
    g("ringpush_shards", "Shards answering this scrape.");
    g("ringpush_store_bytes", "Disk used by the store (segment files; the active one at its preallocated size).");
    g("ringpush_store_live_bytes", "Bytes of store records still needed (pending messages, registry, broadcasts).");
    g("ringpush_store_segments", "Store segment files.");
    g("ringpush_broadcasts_stored", "Broadcasts kept in the per-app logs.");
    g("ringpush_cache_messages", "Queued-message references held on the heap (the LRU's size).");
    g("ringpush_store_recovery_damaged_bytes", "Bytes cut or skipped as torn or corrupt by the last recovery.");
}

/// Prometheus text for the given snapshots.
pub fn prometheus(snaps: &[ShardSnapshot]) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        describe();
        metrics::gauge!("ringpush_shards").set(snaps.len() as f64);
        for s in snaps {
            let shard = s.shard.to_string();
            for (name, labels, value) in &s.counters {
                let mut l: Vec<metrics::Label> = vec![metrics::Label::new("shard", shard.clone())];
                l.extend(labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)));
                metrics::counter!(*name, l).absolute(*value);
            }
            let gauges = [
                ("ringpush_sessions", s.sessions),
                ("ringpush_app_connections", s.app_connections),
                ("ringpush_devices", s.devices),
                ("ringpush_queued_messages", s.queued_messages),
            ];
            for (name, v) in gauges.iter().chain(&s.gauges) {
                metrics::gauge!(*name, "shard" => shard.clone()).set(*v as f64);
            }
        }
    });
    let mut text = handle.render();
    for (stage, h) in merged(snaps) {
        let q = h.summary();
        let name = stage.metric();
        let sec = |us: u64| us as f64 / 1e6;
        let _ = writeln!(text, "# HELP {name} {}", stage.help());
        let _ = writeln!(text, "# TYPE {name} summary");
        for (label, v) in [("0.5", q.p50), ("0.9", q.p90), ("0.99", q.p99), ("0.999", q.p999)] {
            let _ = writeln!(text, "{name}{{quantile=\"{label}\"}} {}", sec(v));
        }
        let _ = writeln!(text, "{name}_sum {}", q.mean * q.count as f64 / 1e6);
        let _ = writeln!(text, "{name}_count {}", q.count);
        let _ = writeln!(text, "# HELP {name}_max Largest value of {name}.");
        let _ = writeln!(text, "# TYPE {name}_max gauge");
        let _ = writeln!(text, "{name}_max {}", sec(q.max));
    }
    text
}

/// Every stage's histogram merged over the shards.
fn merged(snaps: &[ShardSnapshot]) -> Vec<(Stage, Hist)> {
    Stage::ALL
        .iter()
        .map(|&stage| {
            let mut all = Hist::new(false);
            for s in snaps {
                for (st, h) in &s.hists {
                    if *st == stage {
                        all.merge(h);
                    }
                }
            }
            (stage, all)
        })
        .collect()
}

/// Counter key used in the JSON form: `name{k=v,...}`.
pub fn counter_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{{{}}}", l.join(","))
}

/// JSON for `ringpush stats`: per shard and merged totals.
pub fn json(snaps: &[ShardSnapshot]) -> serde_json::Value {
    let shard_json = |s: &ShardSnapshot| {
        let counters: serde_json::Map<String, serde_json::Value> =
            s.counters.iter().map(|(n, l, v)| (counter_key(n, l), (*v).into())).collect();
        serde_json::json!({
            "shard": s.shard,
            "sessions": s.sessions,
            "app_connections": s.app_connections,
            "devices": s.devices,
            "queued_messages": s.queued_messages,
            "gauges": s.gauges.iter().map(|(n, v)| (n.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
            "counters": counters,
        })
    };
    let latency: serde_json::Map<String, serde_json::Value> = merged(snaps)
        .into_iter()
        .map(|(stage, h)| (stage.key().to_string(), serde_json::to_value(h.summary()).unwrap_or_default()))
        .collect();
    serde_json::json!({
        "shards": snaps.iter().map(shard_json).collect::<Vec<_>>(),
        "latency_us": latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(shard: usize, written: u64, lat: &[u64]) -> ShardSnapshot {
        let mut h = Hist::new(true);
        for &v in lat {
            h.record(v);
        }
        ShardSnapshot {
            shard,
            sessions: 2,
            app_connections: 1,
            devices: 3,
            queued_messages: 4,
            gauges: vec![("ringpush_store_segments", 2)],
            counters: vec![("ringpush_messages_total", vec![("event", "written")], written)],
            latency_us: vec![],
            hists: vec![(Stage::Write, h)],
        }
    }

    #[test]
    fn renders_parseable_text_with_per_shard_counters_and_merged_summaries() {
        let text = prometheus(&[snap(0, 5, &[100, 200]), snap(1, 7, &[300])]);
        assert!(text.contains("ringpush_messages_total{shard=\"0\",event=\"written\"} 5"), "{text}");
        assert!(text.contains("ringpush_messages_total{shard=\"1\",event=\"written\"} 7"), "{text}");
        assert!(text.contains("ringpush_push_to_write_seconds_count 3"), "{text}");
        assert!(text.contains("ringpush_shards 2"), "{text}");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        assert!(parsed.samples.iter().any(|s| s.metric == "ringpush_sessions"));
    }

    #[test]
    fn json_keys_counters_by_labels() {
        let j = json(&[snap(0, 5, &[100])]);
        assert_eq!(j["shards"][0]["counters"]["ringpush_messages_total{event=written}"], 5);
        assert_eq!(j["latency_us"]["push_to_write"]["count"], 1);
    }
}
