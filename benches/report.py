#!/usr/bin/env python3
"""Runs the end-to-end scenarios of `ringpush bench` several times against ringpush and
its peers, and prints Markdown tables: median of the runs with min-max, and each
system's delivered/s as a ratio to the raw io_uring limit measured in the same run.

Usage (from the repository root, after `cargo build --release`):
    python3 benches/report.py [runs] [scenario...]   (default: 3 runs, every scenario)
"""
import json, statistics, subprocess, sys

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
BIN = "target/release/ringpush"
SCENARIOS = [
    ("unicast", ["--devices", "10000", "--messages", "200000"], "redis,mosquitto,raw"),
    ("broadcast", ["--devices", "10000", "--messages", "20"], "redis,mosquitto,raw"),
    ("offline", ["--devices", "10000", "--messages", "100000"], "ringpush"),
    ("idle", ["--devices", "16000", "--hold", "3s"], "redis"),
    ("storm", ["--devices", "10000"], "raw"),
]


def run(scenario, extra, compare):
    cmd = [BIN, "bench", scenario, *extra, "--shards", "2", "--json", "--compare", compare]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    out = p.stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def fmt(values, digits=0):
    m = statistics.median(values)
    return f"{m:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def ratio(rs):
    """Ratio to raw, or a dash when no raw run was in the same invocation (offline)."""
    values = [r["ratio_to_raw"] for r in rs if "ratio_to_raw" in r]
    return fmt(values, 2) if values else "—"


ONLY = sys.argv[2:]
for scenario, extra, compare in SCENARIOS:
    if ONLY and scenario not in ONLY:
        continue
    rows = {}
    for _ in range(RUNS):
        for r in run(scenario, extra, compare):
            rows.setdefault(r["system"], []).append(r)
    print(f"\n### {scenario}: `ringpush bench {scenario} {' '.join(extra)} --shards 2 --compare {compare}`\n")
    if scenario == "storm":
        print("| system | handshakes/s, all at once | ratio to raw accept+connect | after a restart, handshakes/s |")
        print("|---|---|---|---|")
        for system, rs in rows.items():
            again = [r["reconnect_per_sec"] for r in rs if "reconnect_per_sec" in r]
            print(f"| {system} | {fmt([r['connect_per_sec'] for r in rs])} | {fmt([r.get('ratio_to_raw', 0) for r in rs], 2)} | "
                  f"{fmt(again) if again else '—'} |")
        warm = [r["warm_up_connect_per_sec"] for r in next(iter(rows.values())) if "warm_up_connect_per_sec" in r]
        if warm:
            print(f"\nThe untimed raw round before them (a cold kernel): {fmt(warm)} connects/s.")
        continue
    if scenario == "idle":
        print("| system | devices | RSS per device, bytes | kernel per socket, bytes | connects/s |")
        print("|---|---|---|---|---|")
        for system, rs in rows.items():
            print(f"| {system} | {rs[0]['devices']} | {fmt([r['rss_per_device_bytes'] for r in rs])} | "
                  f"{fmt([r['kernel_bytes_per_socket'] for r in rs])} | {fmt([r['connect_per_sec'] for r in rs])} |")
        continue
    print("| system | delivered/s | ratio to raw | p50 µs | p99 µs | max µs | lost | dups | server CPU % | server RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for system, rs in rows.items():
        print(f"| {system} | {fmt([r['delivered_per_sec'] for r in rs])} | "
              f"{ratio(rs)} | "
              f"{fmt([r['latency_us']['p50'] for r in rs])} | {fmt([r['latency_us']['p99'] for r in rs])} | "
              f"{fmt([r['latency_us']['max'] for r in rs])} | {max(r['lost'] for r in rs)} | "
              f"{max(r['duplicates'] for r in rs)} | {fmt([r['server_cpu_percent'] for r in rs])} | "
              f"{fmt([r['server_rss_bytes'] / 1e6 for r in rs], 1)} |")
