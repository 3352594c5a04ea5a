"""Where a calibration's time goes, from a Chrome trace written by ``benchmark_speed.py --trace``.

For every named range (``tlq.*`` phases and steps, ``gptq.*`` solver parts, summed over their occurrences): wall
time on the host, time the GPU was busy with kernels inside it (union of kernel intervals, so concurrent kernels
count once), time in copies, and the top kernels. A phase whose busy share is low waits on the host (launches,
device syncs, host copies) rather than on the GPU.

    python examples/trace_phases.py trace.json.gz [--top 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def _load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _clip(intervals: list[tuple[float, float, str]], lo: float, hi: float) -> list[tuple[float, float, str]]:
    return [(max(a, lo), min(b, hi), n) for a, b, n in intervals if b > lo and a < hi]


def summarize(events: list[dict], top: int = 8) -> str:
    ranges: dict[str, list[tuple[float, float]]] = defaultdict(list)
    kernels: list[tuple[float, float, str]] = []
    copies: list[tuple[float, float, str]] = []
    for e in events:
        if e.get("ph") != "X":
            continue
        start, dur, cat, name = float(e["ts"]), float(e.get("dur", 0)), e.get("cat", ""), e.get("name", "")
        if cat == "user_annotation" and name.startswith(("tlq.", "gptq.")):
            ranges[name].append((start, start + dur))
        elif cat == "kernel":
            kernels.append((start, start + dur, name))
        elif cat in ("gpu_memcpy", "gpu_memset"):
            copies.append((start, start + dur, name))
    kernels.sort()
    copies.sort()
    lines = [
        "| range | count | wall (s) | GPU busy (s) | busy share | copies (s) | top kernels (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(ranges, key=lambda n: -sum(b - a for a, b in ranges[n])):
        spans = ranges[name]
        wall = sum(b - a for a, b in spans)
        busy, copy = 0.0, 0.0
        by_kernel: dict[str, float] = defaultdict(float)
        for lo, hi in spans:
            inside = _clip(kernels, lo, hi)
            busy += _union([(a, b) for a, b, _ in inside])
            copy += _union([(a, b) for a, b, _ in _clip(copies, lo, hi)])
            for a, b, n in inside:
                by_kernel[n[:60]] += b - a
        best = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]
        tops = "; ".join(f"{n} {t / 1e6:.2f}" for n, t in best)
        share = busy / wall if wall else 0.0
        lines.append(
            f"| {name} | {len(spans)} | {wall / 1e6:.2f} | {busy / 1e6:.2f} | {share:.0%} | {copy / 1e6:.2f} | {tops} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    print(summarize(_load(args.trace), args.top))
