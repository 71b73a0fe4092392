//! Black-box observability tests: known traffic, then `/metrics` scraped with a real
//! HTTP client and parsed as Prometheus text; `/stats` and `ringpush stats`.

mod common;

use common::*;
use ringpush::client::{PushOutcome, PushTarget};
use std::collections::HashMap;
use std::time::Duration;

/// Scrapes /metrics and sums every sample by name and labels (without `shard`).
fn scrape(srv: &Server) -> HashMap<String, f64> {
    let (status, body) = http_get(srv.http, "/metrics");
    assert_eq!(status, 200, "{body}");
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{body}"));
    let mut sums = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<(String, String)> =
            s.labels.iter().filter(|(k, _)| k.as_str() != "shard").map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.sort();
        let key = if labels.is_empty() {
            s.metric.clone()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}{{{}}}", s.metric, l.join(","))
        };
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Summary(_) => continue,
            prometheus_parse::Value::Histogram(_) => continue,
        };
        *sums.entry(key).or_insert(0.0) += v;
    }
    sums
}

#[test]
fn counters_and_histograms_move_by_the_traffic_sent() {
    let srv = Server::start(2, "");
    let before = scrape(&srv);
    assert_eq!(before.get("ringpush_shards"), Some(&2.0));
    run(|| async {
        let ids: Vec<String> = (0..4).map(|i| format!("obs{i}")).collect();
        let mut devs = Vec::new();
        for id in &ids {
            devs.push(srv.device(id).await);
        }
        let mut app = srv.app().await;
        for i in 0..10 {
            let out = app.push(PushTarget::Device(&ids[i % 4]), 0, b"u").await.unwrap();
            assert!(matches!(out, PushOutcome::Accepted(_)));
        }
        assert!(matches!(app.push(PushTarget::App, 0, b"b").await.unwrap(), PushOutcome::Accepted(_)));
        assert!(matches!(
            app.push(PushTarget::Device("x"), u32::MAX, b"ttl").await.unwrap(),
            PushOutcome::Rejected(..)
        ));
        for (i, d) in devs.iter_mut().enumerate() {
            let n = 10 / 4 + usize::from(i < 10 % 4) + 1;
            let (mut last, mut blast) = (0, 0);
            for _ in 0..n {
                let m = message(d).await;
                *(if m.broadcast { &mut blast } else { &mut last }) = m.seq;
            }
            d.ack_both(last, blast).await.unwrap();
        }
        glommio::timer::sleep(Duration::from_millis(200)).await;
        let m = scrape(&srv);
        let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("no {k} in {m:?}"));
        assert_eq!(get("ringpush_pushes_total{kind=unicast,result=accepted}"), 10.0);
        assert_eq!(get("ringpush_pushes_total{kind=broadcast,result=accepted}"), 1.0);
        assert_eq!(get("ringpush_pushes_total{kind=unicast,result=rejected}"), 1.0);
        assert_eq!(get("ringpush_messages_total{event=enqueued}"), 10.0, "unicast: one per device");
        assert!(get("ringpush_messages_total{event=broadcast_stored}") >= 1.0, "once per shard with devices");
        assert_eq!(get("ringpush_messages_total{event=written}"), 14.0);
        assert_eq!(get("ringpush_messages_total{event=acked}"), 14.0);
        assert_eq!(get("ringpush_handshakes_total{result=ok}"), 4.0);
        assert_eq!(get("ringpush_sessions"), 4.0);
        assert_eq!(get("ringpush_app_connections"), 1.0);
        assert_eq!(get("ringpush_queued_messages"), 0.0);
        assert_eq!(get("ringpush_push_to_write_seconds_count"), 14.0, "one write latency per message");
        assert_eq!(get("ringpush_push_to_ack_seconds_count"), 14.0, "one ack latency per message");
        assert_eq!(get("ringpush_push_reply_seconds_count"), 12.0, "one reply latency per push");
        assert_eq!(get("ringpush_handshake_seconds_count"), 4.0);
        assert_eq!(get("ringpush_store_append_seconds_count"), 12.0, "10 unicast + 1 broadcast on each shard");
        assert!(get("ringpush_store_flush_seconds_count") >= 1.0);
        assert!(get("ringpush_store_appends_total") >= 11.0);
        assert!(get("ringpush_store_segments") >= 2.0, "one active segment per shard");
        assert!(get("ringpush_store_bytes") > 0.0);
        assert!(get("ringpush_bytes_total{direction=out,peer=device}") > 0.0);

        // The human summary reads the same numbers.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
            .args(["stats", "--once", "--interval", "100ms", "--server", &srv.http.to_string()])
            .output()
            .expect("run ringpush stats");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("shards 2   sessions 4"), "{text}");
        assert!(text.contains("push→ack") && text.lines().count() > 8, "{text}");
    });
}

#[test]
fn stats_against_a_dead_port_fails_clearly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpush"))
        .args(["stats", "--once", "--server", "127.0.0.1:1"])
        .output()
        .expect("run ringpush stats");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn the_grafana_dashboard_only_uses_metrics_the_box_exports() {
    let dash = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ansible/dashboards/ringpush.json"))
        .expect("dashboard file");
    let json: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let srv = Server::start(1, "");
    let (_, text) = http_get(srv.http, "/metrics");
    let mut names: Vec<&str> =
        dash.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("ringpush_")).collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 8, "{names:?}");
    for n in names {
        assert!(text.contains(&format!("# TYPE {n} ")), "dashboard uses {n}, which /metrics does not export");
    }
}
