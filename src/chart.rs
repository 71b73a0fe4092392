//! `ringpush bench --out DIR` chart: one SVG with throughput over time (a line per
//! system), latency percentiles (grouped bars per system, log scale) and the slowest
//! message per 100 ms over time (a line per system, log scale). Hand-written SVG: no
//! plotting dependency for three simple panels.

use serde_json::Value;
use std::fmt::Write;

const W: f64 = 900.0;
const COLORS: [&str; 6] = ["#d62728", "#1f77b4", "#2ca02c", "#7f7f7f", "#9467bd", "#ff7f0e"];
const PCTS: [(&str, &str); 5] = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The chart for a set of per-system results (as `ringpush bench --json` prints them).
pub fn svg(results: &[Value]) -> String {
    let mut s = String::new();
    let title = results
        .first()
        .map(|r| {
            format!(
                "ringpush bench {} — {} devices, {} B payload",
                r["scenario"].as_str().unwrap_or("?"),
                r["devices"],
                r["payload_bytes"]
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="920" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, W / 2.0, esc(&title));

    // Panel 1: deliveries per second over time.
    time_panel(&mut s, results, 50.0, "deliveries/s over time (s)", ("timeline", 1), Scale::Linear);

    // Panel 2: latency percentiles, log scale (µs).
    let (x0, y0, pw, ph) = (70.0, 340.0, W - 200.0, 230.0);
    axes(&mut s, x0, y0, pw, ph, "end-to-end latency (µs, log scale)");
    let lmax = results.iter().filter_map(|r| r["latency_us"]["max"].as_f64()).fold(10.0, f64::max).log10().ceil();
    log_grid(&mut s, x0, y0, pw, ph, lmax);
    let group = pw / PCTS.len() as f64;
    let bar = group / (results.len() as f64 + 1.0);
    for (g, (key, label)) in PCTS.iter().enumerate() {
        let gx = x0 + group * g as f64;
        let _ =
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#, gx + group / 2.0, y0 + ph + 16.0);
        for (i, r) in results.iter().enumerate() {
            let v = r["latency_us"][*key].as_f64().unwrap_or(0.0).max(1.0);
            let h = ph * v.log10() / lmax;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {label}: {v} µs</title></rect>"#,
                gx + bar * (i as f64 + 0.5),
                y0 + ph - h,
                bar * 0.9,
                h,
                COLORS[i % COLORS.len()],
                esc(r["system"].as_str().unwrap_or("?"))
            );
        }
    }
    for (i, r) in results.iter().enumerate() {
        legend(
            &mut s,
            x0 + pw + 20.0,
            y0 + 10.0 + 18.0 * i as f64,
            COLORS[i % COLORS.len()],
            r["system"].as_str().unwrap_or("?"),
        );
    }

    // Panel 3: the slowest message of each 100 ms over time, log scale (µs).
    let label = "slowest message per 100 ms (µs, log scale) over time (s)";
    time_panel(&mut s, results, 630.0, label, ("latency_timeline", 2), Scale::Log);
    s.push_str("</svg>\n");
    s
}

enum Scale {
    Linear,
    Log,
}

/// A panel with a line per system over the run: column `series.1` of each result's
/// `series.0` array, whose entries start with ms since the measured phase began.
fn time_panel(s: &mut String, results: &[Value], y0: f64, label: &str, series: (&str, usize), scale: Scale) {
    let (x0, pw, ph) = (70.0, W - 200.0, 230.0);
    let lines: Vec<Vec<(f64, f64)>> = results
        .iter()
        .map(|r| {
            let point = |p: &Value| Some((p[0].as_f64()? / 1000.0, p[series.1].as_f64()?));
            r[series.0].as_array().map(|a| a.iter().filter_map(point).collect()).unwrap_or_default()
        })
        .collect();
    let tmax = lines.iter().flatten().map(|q| q.0).fold(0.1, f64::max);
    let vmax = lines.iter().flatten().map(|q| q.1).fold(1.0, f64::max);
    axes(s, x0, y0, pw, ph, label);
    let decades = vmax.max(10.0).log10().ceil();
    match scale {
        Scale::Linear => {
            for i in 0..=4 {
                let y = y0 + ph - ph * i as f64 / 4.0;
                let v = vmax * i as f64 / 4.0;
                let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{v:.0}</text>"#, x0 - 5.0, y + 4.0);
            }
        }
        Scale::Log => log_grid(s, x0, y0, pw, ph, decades),
    }
    // Height of a value within the panel, 0 to `ph`.
    let height = |v: f64| match scale {
        Scale::Linear => ph * v / vmax,
        Scale::Log => ph * v.max(1.0).log10() / decades,
    };
    for i in 0..=4 {
        let (x, t) = (x0 + pw * i as f64 / 4.0, tmax * i as f64 / 4.0);
        let _ = writeln!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{t:.1}</text>"#, y0 + ph + 16.0);
    }
    for (i, (r, pts)) in results.iter().zip(&lines).enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> =
            pts.iter().map(|(t, v)| format!("{:.1},{:.1}", x0 + pw * t / tmax, y0 + ph - height(*v))).collect();
        if !path.is_empty() {
            let _ =
                writeln!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        }
        legend(s, x0 + pw + 20.0, y0 + 10.0 + 18.0 * i as f64, c, r["system"].as_str().unwrap_or("?"));
    }
}

/// Labels and grid lines of a log-scale y axis from 1 to 10^`decades`.
fn log_grid(s: &mut String, x0: f64, y0: f64, w: f64, h: f64, decades: f64) {
    for d in 0..=decades as i32 {
        let y = y0 + h - h * d as f64 / decades;
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">1e{d}</text>"#, x0 - 5.0, y + 4.0);
        let _ = writeln!(s, r##"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/>"##, x0 + w);
    }
}

fn axes(s: &mut String, x0: f64, y0: f64, w: f64, h: f64, label: &str) {
    let _ = writeln!(s, r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, y0 + h, x0 + w, y0 + h);
    let _ = writeln!(s, r#"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{}" stroke="black"/>"#, y0 + h);
    let _ = writeln!(s, r#"<text x="{x0}" y="{}" font-weight="bold">{}</text>"#, y0 - 8.0, esc(label));
}

fn legend(s: &mut String, x: f64, y: f64, color: &str, name: &str) {
    let _ = writeln!(s, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/>"#, y - 10.0);
    let _ = writeln!(s, r#"<text x="{}" y="{y}">{}</text>"#, x + 18.0, esc(name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_a_line_and_bars_per_system() {
        let r = |sys: &str| {
            json!({"system": sys, "scenario": "unicast", "devices": 10, "payload_bytes": 64,
                   "timeline": [[0, 100], [100, 300]],
                   "latency_timeline": [[0, 0, 800], [100, 3, 4200]],
                   "latency_us": {"p50": 100, "p90": 200, "p99": 900, "p999": 1000, "max": 5000}})
        };
        let svg = svg(&[r("ringpush"), r("redis<x>")]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2 * 2, "throughput and slowest message, per system");
        assert_eq!(svg.matches("<rect x=").count(), 2 * PCTS.len() + 3 * 2, "bars and legends");
        assert!(svg.contains("redis&lt;x&gt;"), "names are escaped");
    }
}
