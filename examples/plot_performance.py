"""Figures for docs/performance.md from the benchmark's JSON-lines records.

Reads the records written by ``examples/benchmark_speed.py --json`` and ``examples/benchmark_llmcompressor.py
--json`` and draws two panels: wall time and peak GPU memory against model size (billions of decoder
parameters, from the shape) for each tool and method, and the 7B phase breakdown of the newest TLQ run that
carries a floor (``--floor``) beside that floor. Rows of partial models (``--layers``) are left out of the size
panels. Needs matplotlib (not a dependency of the package: ``pip install matplotlib``).

    python examples/plot_performance.py docs/performance_runs_*.jsonl --out docs/performance.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Decoder parameters (billions) of the shapes examples/benchmark_speed.py builds (published model sizes).
SHAPE_PARAMS = {"2b": 1.5, "7b": 7.1, "32b": 31.2, "72b": 70.0}
FULL_LAYERS = {"2b": 28, "7b": 28, "32b": 64, "72b": 80}
PHASES = ("importance", "accumulate", "solve", "propagate")


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _series(rows: list[dict]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """``{label: {shape: (wall, peak)}}``, the last full-model one-GPU row per label and shape."""
    out: dict[str, dict[str, tuple[float, float | None]]] = {}
    for r in rows:
        shape = r.get("shape")
        if shape not in SHAPE_PARAMS or r.get("devices", 1) != 1 or r.get("layers") != FULL_LAYERS[shape]:
            continue
        label = f"{r.get('tool', 'lightning-tlq')} {r.get('method') or 'gptq'}"
        if r.get("memory_profile", "fast") != "fast":
            label += f" ({r['memory_profile']} memory)"
        peak = r.get("peak_gib") or max(r.get("peak_gib_per_rank") or [0.0]) or None
        out.setdefault(label, {})[shape] = (float(r["wall_s"]), peak)
    return out


def _phases(rows: list[dict]) -> tuple[dict[str, float], dict[str, float]] | None:
    for r in reversed(rows):
        floor = r.get("floor_s")
        if floor and r.get("shape") == "7b":
            phases = r["phases_s_rank0"]
            measured = {p: phases.get(p if p in ("importance", "capture") else f"layers.{p}", 0.0) for p in PHASES}
            return measured, {p: floor.get(p, 0.0) for p in PHASES}
    return None


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    series = _series(rows)
    phases = _phases(rows)
    fig, axes = plt.subplots(1, 3 if phases else 2, figsize=(15 if phases else 10, 4.2))
    for label, points in sorted(series.items()):
        shapes = sorted(points, key=SHAPE_PARAMS.get)
        x = [SHAPE_PARAMS[s] for s in shapes]
        axes[0].plot(x, [points[s][0] for s in shapes], marker="o", label=label)
        peaks = [(SHAPE_PARAMS[s], points[s][1]) for s in shapes if points[s][1]]
        if peaks:
            axes[1].plot(*zip(*peaks), marker="o", label=label)
    for ax, title in zip(axes[:2], ("wall time (s)", "peak GPU memory (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("decoder parameters (billions)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.ScalarFormatter())
            axis.set_minor_formatter(ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    if phases:
        measured, floor = phases
        xs = range(len(PHASES))
        axes[2].bar([i - 0.2 for i in xs], [measured[p] for p in PHASES], width=0.4, label="measured")
        axes[2].bar([i + 0.2 for i in xs], [floor[p] for p in PHASES], width=0.4, label="floor")
        axes[2].set_xticks(list(xs), PHASES)
        axes[2].set_title("7B TLQ phases (s)")
        axes[2].legend(fontsize=8)
    fig.suptitle("lightning-tlq vs llm-compressor, 1 x NVIDIA H200 (records in docs/performance_runs_*.jsonl)")
    fig.tight_layout()
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", help="JSON-lines files of benchmark records")
    p.add_argument("--out", default="docs/performance.png", help="PNG to write")
    args = p.parse_args(argv)
    plot(load(args.records), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
