//! Black-box test of the load generator: it spawns a box, spreads devices over several
//! worker processes, and reports every accepted push as delivered exactly once.

use serde_json::Value;
use std::process::Command;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .arg("bench")
        .args(args)
        .args(["--json", "--shards", "2"])
        .output()
        .expect("run ringpush bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn unicast_over_three_worker_processes_loses_nothing() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let r = bench(&["unicast", "--devices", "300", "--per-process", "100", "--messages", "3000", "--out", dir]);
    let svg = std::fs::read_to_string(out.path().join("chart.svg")).expect("--out writes chart.svg");
    assert!(svg.contains("<polyline") && svg.contains("ringpush"), "{svg}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary[0]["delivered"], 3000);
    assert!(std::fs::read_to_string(out.path().join("summary.txt")).unwrap().contains("delivered/s"));
    for key in [
        "scenario",
        "system",
        "devices",
        "sent",
        "delivered",
        "lost",
        "duplicates",
        "delivered_per_sec",
        "server_rss_bytes",
    ] {
        assert!(r.get(key).is_some(), "missing {key} in {r}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(r["latency_us"][key].is_u64(), "missing latency_us.{key} in {r}");
    }
    assert_eq!(r["devices"], 300);
    assert_eq!(r["sent"], 3000);
    assert_eq!(r["delivered"], 3000);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicates"], 0);
    assert!(r["latency_us"]["max"].as_u64().unwrap() > 0);
}

#[test]
fn broadcast_and_offline_deliver_everything_and_idle_reports_memory() {
    let r = bench(&["broadcast", "--devices", "200", "--messages", "5"]);
    assert_eq!((r["sent"].as_u64(), r["delivered"].as_u64(), r["lost"].as_u64()), (Some(5), Some(1000), Some(0)));
    let r = bench(&["offline", "--devices", "200", "--messages", "1000"]);
    assert_eq!(
        (r["sent"].as_u64(), r["delivered"].as_u64(), r["lost"].as_u64()),
        (Some(1000), Some(1000), Some(0)),
        "{r}"
    );
    let r = bench(&["idle", "--devices", "200", "--hold", "200ms"]);
    assert!(r["rss_per_device_bytes"].is_u64() && r["kernel_bytes_per_socket"].is_u64(), "{r}");
    assert_eq!(r["devices"], 200);
}

#[test]
fn peers_run_through_the_same_path_and_lose_nothing() {
    // Needs redis-server and mosquitto (Debian packages; .ci/run installs them).
    let out = Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .args(["bench", "unicast", "--devices", "200", "--messages", "2000", "--shards", "2"])
        .args(["--compare", "redis,mosquitto,raw", "--json"])
        .output()
        .expect("run ringpush bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    let systems: Vec<&str> = rows.iter().map(|r| r["system"].as_str().unwrap()).collect();
    assert_eq!(systems, ["ringpush", "redis", "mosquitto", "raw"]);
    assert!(rows.iter().all(|r| r["ratio_to_raw"].as_f64().is_some_and(|v| v > 0.0)), "{stdout}");
    for r in &rows {
        assert_eq!(
            (r["sent"].as_u64(), r["delivered"].as_u64(), r["lost"].as_u64()),
            (Some(2000), Some(2000), Some(0)),
            "{r}"
        );
    }
}

#[test]
fn duration_and_rate_bound_the_run() {
    let r = bench(&["unicast", "--devices", "100", "--messages", "1000000", "--duration", "500ms", "--rate", "2000"]);
    let sent = r["sent"].as_u64().unwrap();
    assert!((500..=1400).contains(&sent), "2000/s for 0.5 s sent {sent}");
    assert_eq!(r["delivered"].as_u64(), Some(sent));
    assert_eq!(r["lost"], 0);
}

#[test]
fn storm_connects_everyone_again_after_a_restart_on_the_same_ports() {
    let r = bench(&["storm", "--devices", "300", "--per-process", "150"]);
    assert_eq!(r["devices"], 300);
    assert!(r["connect_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["reconnected"], 300, "everyone reconnects after the restart: {r}");
    assert!(r["reconnect_per_sec"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    assert!(r["warm_up_connect_per_sec"].as_f64().is_some_and(|v| v > 0.0), "an untimed raw round first: {r}");
}
