#!/usr/bin/env python3
"""Runs the criterion benches N times and prints one Markdown table row per benchmark:
median of the runs' median throughputs, with min-max. Usage:
    python3 benches/summarize.py [runs]   (from the repository root; default 3 runs)
"""
import json, pathlib, subprocess, sys, statistics

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
results = {}
for _ in range(runs):
    for bench in ("codec", "engine", "store"):
        subprocess.run(["cargo", "bench", "--bench", bench, "--", "--noplot"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for est in pathlib.Path("target/criterion").glob("*/*/new/estimates.json"):
        meta = json.loads((est.parent / "benchmark.json").read_text())
        elems = (meta.get("throughput") or {}).get("Elements", 1)
        ns = json.loads(est.read_text())["median"]["point_estimate"]
        results.setdefault(meta["full_id"], []).append(elems / ns * 1e9)

print("| benchmark | median | min | max |")
print("|---|---|---|---|")
for name in sorted(results):
    v = results[name]
    f = lambda x: f"{x / 1e6:.1f} M/s"
    print(f"| {name} | {f(statistics.median(v))} | {f(min(v))} | {f(max(v))} |")
