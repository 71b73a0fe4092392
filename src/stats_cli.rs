//! `ringpush stats`: a compact, human summary of a running box, read from its HTTP
//! port (`GET /stats`). Refreshes like `top` on a terminal; prints once with `--once`
//! or when stdout is not a terminal. Rates are computed between two samples.

use serde_json::Value;
use std::io::{IsTerminal, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// GETs `path` from `server` (HOST:PORT) and returns the body.
pub fn http_get(server: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(server).map_err(|e| format!("cannot connect to {server}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("reading from {server}: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let body_at = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("{server} did not answer with HTTP")),
    };
    if resp.code != Some(200) {
        return Err(format!("{server}{path} answered {}", resp.code.unwrap_or(0)));
    }
    String::from_utf8(raw[body_at..].to_vec()).map_err(|_| "response is not UTF-8".into())
}

const ACCEPTED: &str = "ringpush_pushes_total{kind=*,result=accepted}";

/// A shard's counter; `kind=*` in the key sums it over the push kinds.
fn counter(shard: &Value, key: &str) -> u64 {
    if key.contains("kind=*") {
        crate::stats::KINDS.iter().map(|k| counter(shard, &key.replace("kind=*", &format!("kind={k}")))).sum()
    } else {
        shard["counters"][key].as_u64().unwrap_or(0)
    }
}

/// A counter summed over the shards.
fn total(stats: &Value, key: &str) -> u64 {
    stats["shards"].as_array().map_or(0, |a| a.iter().map(|s| counter(s, key)).sum())
}

/// Renders the summary from two samples taken `dt` apart.
pub fn render(server: &str, prev: &Value, now: &Value, dt: Duration) -> String {
    let secs = dt.as_secs_f64().max(1e-3);
    let rate = |key: &str| (total(now, key).saturating_sub(total(prev, key))) as f64 / secs;
    let gauge = |field: &str| -> u64 {
        now["shards"].as_array().map_or(0, |a| a.iter().map(|s| s[field].as_u64().unwrap_or(0)).sum())
    };
    let shards = now["shards"].as_array().map_or(0, |a| a.len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ringpush {server}   shards {shards}   sessions {}   devices {}   queued {}   app connections {}",
        gauge("sessions"),
        gauge("devices"),
        gauge("queued_messages"),
        gauge("app_connections")
    );
    let _ = writeln!(
        out,
        "pushes/s {:.0} accepted, {:.0} busy, {:.0} rejected   messages/s {:.0} written, {:.0} acked, {:.0} expired",
        rate(ACCEPTED),
        rate("ringpush_pushes_total{kind=*,result=busy}"),
        rate("ringpush_pushes_total{kind=*,result=rejected}"),
        rate("ringpush_messages_total{event=written}"),
        rate("ringpush_messages_total{event=acked}"),
        rate("ringpush_messages_total{event=expired}"),
    );
    let store = |name: &str| -> u64 {
        now["shards"].as_array().map_or(0, |a| a.iter().map(|s| s["gauges"][name].as_u64().unwrap_or(0)).sum())
    };
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(
        out,
        "store {:.1} MB on disk, {:.1} MB live, {} segments   flushes/s {:.0}   refused {}",
        mb(store("ringpush_store_bytes")),
        mb(store("ringpush_store_live_bytes")),
        store("ringpush_store_segments"),
        rate("ringpush_store_flushes_total"),
        total(now, "ringpush_store_errors_total"),
    );
    let _ = writeln!(out, "\nlatency (µs)      count      p50      p90      p99    p99.9      max");
    for (key, label) in [
        ("push_to_write", "push→write"),
        ("push_to_ack", "push→ack"),
        ("push_reply", "push reply"),
        ("handshake", "handshake"),
        ("store_flush", "store flush"),
    ] {
        let q = &now["latency_us"][key];
        let f = |k: &str| q[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{label:<14}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
            f("count"),
            f("p50"),
            f("p90"),
            f("p99"),
            f("p999"),
            f("max")
        );
    }
    let _ = writeln!(out, "\nshard  sessions   devices    queued  pushes/s  written/s");
    let empty = Vec::new();
    for (i, s) in now["shards"].as_array().unwrap_or(&empty).iter().enumerate() {
        let p = &prev["shards"][i];
        let r = |key: &str| counter(s, key).saturating_sub(counter(p, key)) as f64 / secs;
        let _ = writeln!(
            out,
            "{:>5}{:>10}{:>10}{:>10}{:>10.0}{:>11.0}",
            s["shard"].as_u64().unwrap_or(0),
            s["sessions"].as_u64().unwrap_or(0),
            s["devices"].as_u64().unwrap_or(0),
            s["queued_messages"].as_u64().unwrap_or(0),
            r(ACCEPTED),
            r("ringpush_messages_total{event=written}"),
        );
    }
    out
}

use std::fmt::Write as _;

/// Runs `ringpush stats`.
pub fn run(server: &str, once: bool, interval: Duration) -> Result<(), String> {
    let fetch = || -> Result<Value, String> {
        serde_json::from_str(&http_get(server, "/stats")?).map_err(|e| format!("bad /stats JSON: {e}"))
    };
    let live = !once && std::io::stdout().is_terminal();
    let mut prev = fetch()?;
    let mut at = Instant::now();
    loop {
        std::thread::sleep(interval);
        let now = fetch()?;
        let text = render(server, &prev, &now, at.elapsed());
        at = Instant::now();
        let mut out = std::io::stdout().lock();
        if live {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        if !live {
            return Ok(());
        }
        prev = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rates_from_two_samples() {
        let prev = serde_json::json!({"shards": [{"shard": 0, "sessions": 1, "devices": 1, "queued_messages": 0,
            "counters": {"ringpush_pushes_total{kind=unicast,result=accepted}": 10, "ringpush_messages_total{event=written}": 10}}],
            "latency_us": {}});
        let now = serde_json::json!({"shards": [{"shard": 0, "sessions": 3, "devices": 4, "queued_messages": 2,
            "gauges": {"ringpush_store_bytes": 3145728, "ringpush_store_live_bytes": 1048576, "ringpush_store_segments": 2},
            "counters": {"ringpush_pushes_total{kind=unicast,result=accepted}": 30, "ringpush_messages_total{event=written}": 50,
                "ringpush_store_flushes_total": 8}}],
            "latency_us": {"push_to_write": {"count": 5, "p50": 12, "p90": 20, "p99": 30, "p999": 31, "max": 40}}});
        let text = render("box:7200", &prev, &now, Duration::from_secs(2));
        assert!(text.contains("sessions 3"), "{text}");
        assert!(text.contains("pushes/s 10 accepted"), "{text}");
        assert!(text.contains("messages/s 20 written"), "{text}");
        assert!(text.contains("push→write"), "{text}");
        assert!(text.contains("store 3.0 MB on disk, 1.0 MB live, 2 segments   flushes/s 4"), "{text}");
    }
}
