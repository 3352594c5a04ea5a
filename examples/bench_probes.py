"""What ``benchmark_speed.py`` measures beside wall time: GPU peak per phase, host peak RSS, per-layer costs, and an
estimate for a larger shape scaled from them.

- :class:`MemoryProbe` (a Fabric callback): ``torch.cuda.max_memory_allocated`` per phase (``capture``,
  ``importance``, each decoder layer, ``after``), the peak counter reset at each phase boundary.
- :class:`HostPeak`: the process's resident set sampled every 20 ms on a helper thread (page-locked and registered
  host memory included), and ``ru_maxrss`` (the whole process, model construction included).
- :func:`per_layer` and :func:`estimate`: one decoder layer's seconds per phase from a run, and a **model-based
  estimate** for another shape: each phase's per-layer time scaled by the ratio of that phase's work (matmul
  FLOPs at nominal H200 rates, factorisations as ``n^3``), times the other shape's layer count, plus the run's
  non-layer phases (capture, token sets). Not a measurement.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Any

import torch
from memory_model import DIMS, shape_bytes

GIB = 2**30
NOMINAL = {"bf16": 780e12, "tf32": 406e12, "fp32": 50.6e12, "factor": 26e12}
"""FLOP/s measured on one H200 on 2026-12-03 (``--floor``, docs/performance.md); the factorisation's rate is
``(2/3) n^3 / 173 ms`` at n = 18944."""


class MemoryProbe:
    """Peak GPU memory per calibration phase (no-op without CUDA); with ``progress``, one stderr line per phase
    (elapsed seconds, peak GiB, host resident set), for long runs that might not finish inside a time limit."""

    def __init__(self, progress: bool = False) -> None:
        self.cuda = torch.cuda.is_available()
        self.phases: dict[str, float] = {}
        self._phase = "before"
        self.progress, self._start = progress, time.perf_counter()

    def _close(self, next_phase: str) -> None:
        peak = 0.0
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / GIB
            self.phases[self._phase] = max(self.phases.get(self._phase, 0.0), round(peak, 3))
            torch.cuda.reset_peak_memory_stats()
        if self.progress:
            elapsed, host = time.perf_counter() - self._start, rss_bytes() / GIB
            print(f"[{elapsed:7.1f} s] {self._phase} done: peak {peak:.2f} GiB, host {host:.1f} GiB", file=sys.stderr,
                  flush=True)  # fmt: skip
        self._phase = next_phase

    def on_calibration_start(self, **_: Any) -> None:
        self._close("capture")

    def on_importance_start(self, **_: Any) -> None:
        self._close("importance")

    def on_importance_end(self, **_: Any) -> None:
        self._close("after importance")

    def on_layer_start(self, index: int, **_: Any) -> None:
        self._close(f"layer {index}")

    def on_layer_end(self, index: int, **_: Any) -> None:
        self._close("after")

    def finish(self) -> dict[str, Any]:
        """Per-phase peaks, the largest layer's, and the overall peak (GiB)."""
        self._close("done")
        layers = [v for k, v in self.phases.items() if k.startswith("layer ")]
        out = {k: v for k, v in self.phases.items() if not k.startswith("layer ")}
        out["layers_max"] = max(layers, default=0.0)
        out["layers_first"] = layers[0] if layers else 0.0
        out["peak"] = max(self.phases.values(), default=0.0)
        return out


def rss_bytes() -> int:
    """Resident set of this process now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def max_rss_bytes() -> int:
    """``ru_maxrss`` of this process (kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class HostPeak:
    """Samples :func:`rss_bytes` on a helper thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-peak", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def start(self) -> HostPeak:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling; the peak in GiB."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak / GIB


def layer_work(shape: str, samples: int, seq: int) -> dict[str, float]:
    """Seconds one decoder layer's work takes per phase at :data:`NOMINAL` rates (the floor's counting:
    ``benchmark_speed.floor_seconds``, every token kept)."""
    d, m, _, heads, kv, _ = DIMS[shape]
    kvd = d // heads * kv
    t = samples * seq
    mm = {"qkv": 2 * t * d * (d + 2 * kvd), "o": 2 * t * d * d, "gate_up": 4 * t * d * m, "down": 2 * t * m * d}
    attn = 2 * samples * seq * seq * d
    forward = (sum(mm.values()) + attn) / NOMINAL["bf16"]
    passes = (4 * mm["qkv"] + 3 * (attn + mm["o"]) + 2 * mm["gate_up"] + mm["down"]) / NOMINAL["bf16"]
    hessians = 2 * t * (6 * d * d + m * m) / NOMINAL["tf32"]  # q, k, v, o, gate, up read d inputs; down m
    widths = [(d, d), (kvd, d), (kvd, d), (d, d), (m, d), (m, d), (d, m)]  # (out, in) per module
    factor = sum(2 / 3 * n**3 for _, n in widths) / NOMINAL["factor"]
    updates = sum(out * n * n for out, n in widths) / NOMINAL["fp32"]
    return {"importance": 3 * forward, "layers.accumulate": passes + hessians, "layers.solve": factor + updates,
            "layers.propagate": forward}  # fmt: skip


PER_LAYER_PHASES = ("importance", "layers.accumulate", "layers.reduce", "layers.solve", "layers.propagate",
                    "layers.token_set")  # fmt: skip


def per_layer(result: dict) -> dict[str, float]:
    """Seconds per decoder layer per phase of a benchmark result (its ``phases_s_rank0`` over its layer count)."""
    phases, layers = result["phases_s_rank0"], result["layers"]
    return {k: phases[k] / layers for k in PER_LAYER_PHASES if k in phases}


def estimate(result: dict, target: str, layers: int | None = None) -> dict[str, Any]:
    """An estimate (not a measurement) of the wall time and memory of ``target`` from ``result``'s per-layer costs."""
    src, n_layers = result["shape"], layers or DIMS[target][2]
    seq, samples = result["tokens_per_sample"], result["samples"]
    work_src, work_dst = layer_work(src, samples, seq), layer_work(target, samples, seq)
    costs = per_layer(result)
    scaled = {k: v * (work_dst[k] / work_src[k] if k in work_src else 1.0) for k, v in costs.items()}
    rest = result["wall_s"] - sum(costs.values()) * result["layers"]  # capture, registration, head, ...
    from memory_model import predict

    profile = result.get("memory_profile", "fast")
    memory = predict(target, profile, samples, result.get("image_tokens", 256), result.get("text_tokens", 256))
    host = (shape_bytes(target)["layers"] + 2 * shape_bytes(target)["head"]) / GIB + memory["host_activations"]
    return {
        "label": f"ESTIMATE for {target} from measured {src} per-layer costs (not a measurement)",
        "target": target, "layers": n_layers, "per_layer_s": {k: round(v, 3) for k, v in scaled.items()},
        "wall_s": round(sum(scaled.values()) * n_layers + rest, 1), "non_layer_s": round(rest, 1),
        "gpu_peak_gib_model": round(memory["peak"], 1), "host_gib_model": round(host, 1),
    }  # fmt: skip
