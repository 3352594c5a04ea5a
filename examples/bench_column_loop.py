"""Micro-benchmark of GPTQ's column loop: the eager fused loop (Triton block step + addmm_ per 128-column block)
against the same loop replayed from a CUDA graph (``lightning_tlq.core.gptq_graph``), per module shape.

Each shape ``ROWSxIN[:COUNT]`` (COUNT: modules of that shape per decoder layer) gets random weights, a random
well-conditioned upper-triangular factor ``U`` with a positive diagonal (``--hessian``: the real factor of
``H = X^T X / m + damp`` from random ``X``, built on the device), per-group 4-bit scales of the weights and a random
act-order permutation of the groups. Times are CUDA-synchronised wall times, the median of ``--repeats`` after
``--warmup`` calls; the graph's time includes copying the inputs into its static buffers; ``first`` is the call
that runs the loop eagerly on the static buffers and captures it. The codes of every graph call are checked
against the eager loop's (bit-identical). The per-run total weighs each shape by COUNT x ``--layers`` (the 7B
defaults: q/o 3584x3584, k/v 512x3584, gate/up 18944x3584, down 3584x18944, 28 layers); the graph total counts the
first call once and replays for the rest, and the eager fused loop for shapes over the budget.

    PYTHONPATH=$PWD python examples/bench_column_loop.py                       # the 7B shapes, 1 GiB budget
    PYTHONPATH=$PWD python examples/bench_column_loop.py --shapes 4096x4096:2 --budget-gib 2 --json out.jsonl
    PYTHONPATH=$PWD python examples/bench_column_loop.py --device cpu --shapes 64x256   # torch loop only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from lightning_tlq.core import gptq_graph, gptq_triton
from lightning_tlq.core.gptq import _quantize_columns
from lightning_tlq.core.quantizer import QuantSpec, compute_qparams

SHAPES_7B = "3584x3584:2,512x3584:2,18944x3584:2,3584x18944:1"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"RxN[:COUNT],..."`` -> ``[(rows, n, count)]``."""
    out = []
    for item in text.split(","):
        dims, _, count = item.strip().partition(":")
        rows, n = (int(v) for v in dims.lower().split("x"))
        out.append((rows, n, int(count or 1)))
    return out


def problem(rows: int, n: int, spec: QuantSpec, device: torch.device, hessian: bool, seed: int):
    """``W [rows, n]``, ``U [n, n]``, per-group scale/zero and each (permuted) column's group, on ``device``."""
    g = torch.Generator(device).manual_seed(seed)
    W = torch.randn(rows, n, generator=g, device=device)
    if hessian:
        X = torch.randn(n + 256, n, generator=g, device=device)
        H = X.T @ X / X.shape[0]
        H.diagonal().add_(0.01 * H.diagonal().mean())
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        del X, H
    else:
        U = torch.randn(n, n, generator=g, device=device).triu_(1).mul_(0.5 / n**0.5)
        U.diagonal().copy_(torch.rand(n, generator=g, device=device).add_(0.5))
    scale, zero = compute_qparams(W, spec)
    perm = torch.randperm(n, generator=g, device=device)
    groups = torch.arange(n, device=device) // spec.group_len(n)
    return W[:, perm].contiguous(), U, scale, zero, groups[perm]


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def bench_shape(rows, n, args, device, cache) -> dict:
    spec = QuantSpec(bits=4, group_size=args.group_size if n % args.group_size == 0 else -1)
    W, U, scale, zero, groups = problem(rows, n, spec, device, args.hessian, seed=rows * 7 + n)
    loops = ["torch"] if device.type != "cuda" else ["triton", "graph"]
    static = gptq_graph.static_bytes(rows, n, scale.shape[1], args.block_size)
    res: dict = {"shape": f"{rows}x{n}", "static_mb": static / 1e6}
    ref = None
    for loop in loops:
        times, first = [], None
        for i in range(args.warmup + args.repeats):
            Wc, out = W.clone(), []

            def call(Wc=Wc, out=out, loop=loop) -> None:
                out.append(_quantize_columns(Wc, U, scale, zero, groups, spec, args.block_size, loop))

            dt = _time(call, device)
            codes = out[0]
            if loop == "triton" and ref is None:
                ref = codes.clone()
            elif loop == "graph" and not torch.equal(codes, ref):
                raise SystemExit(f"{rows}x{n}: graph codes differ from the eager fused loop's (call {i})")
            if i == 0:
                first = dt
            if i >= args.warmup:
                times.append(dt)
            del Wc, out, codes
        res[f"{loop}_s"] = statistics.median(times)
        res[f"{loop}_first_s"] = first
    if "graph" in loops:
        res["captured"] = any(k.rows == rows and k.n == n for k in cache.lru_keys())
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES_7B, help=f"ROWSxIN[:COUNT per layer],... (default {SHAPES_7B})")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="calls before timing (the first includes the capture)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--group-size", type=int, default=128, help="one group per row where it does not divide IN")
    p.add_argument("--budget-gib", type=float, default=gptq_graph.DEFAULT_BUDGET_BYTES / 2**30)
    p.add_argument("--hessian", action="store_true", help="U from a real H = X^T X + damp (slower to build)")
    p.add_argument("--json", default=None, help="append one JSON line with the results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = parse_shapes(args.shapes)
    if device.type != "cuda" or not gptq_triton.available():
        print("CUDA graphs of the fused loop need a CUDA device and Triton: timing the eager torch loop only.")
        if args.shapes == SHAPES_7B:
            print("(the 7B shapes take minutes per call on a CPU: pass small --shapes, e.g. 64x256, to time it)")
            return 0
        args.warmup, args.repeats, device = 0, 1, torch.device("cpu")
    cache = gptq_graph.cache
    cache.clear()
    cache.set_budget(int(args.budget_gib * 2**30))
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    results = []
    for rows, n, count in shapes:
        r = bench_shape(rows, n, args, device, cache)
        r["count_per_layer"] = count
        results.append(r)
        times = "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in r.items() if k.endswith("_s"))
        print(f"{r['shape']:>12} x{count}: {times}  static {r['static_mb']:.1f} MB {r.get('captured', '')}")
    summary: dict = {"device": str(device), "layers": args.layers, "budget_gib": args.budget_gib, "shapes": results}
    calls = {r["shape"]: r["count_per_layer"] * args.layers for r in results}
    for loop in ("torch", "triton"):
        if f"{loop}_s" in results[0]:
            summary[f"{loop}_total_s"] = sum(calls[r["shape"]] * r[f"{loop}_s"] for r in results)
    if device.type == "cuda":
        summary["graph_total_s"] = sum(
            r["graph_first_s"] + (calls[r["shape"]] - 1) * r["graph_s"]
            if r["captured"]
            else calls[r["shape"]] * r["triton_s"]
            for r in results
        )
        torch.cuda.synchronize(device)
        summary["cache_static_mb"] = cache.bytes / 1e6
        summary["cache_allocated_mb"] = (torch.cuda.memory_allocated(device) - base) / 1e6
        summary["gpu"] = torch.cuda.get_device_name(device)
        summary["counters"] = {k: getattr(cache, k) for k in ("captures", "replays", "eager", "evictions")}
    totals = ", ".join(f"{k} {v:.3f} s" for k, v in summary.items() if k.endswith("total_s"))
    print(f"per run ({args.layers} layers, estimated from the medians): {totals}")
    if device.type == "cuda":
        print(f"graph cache: {summary['cache_static_mb']:.1f} MB static, {summary['cache_allocated_mb']:.1f} MB "
              f"allocated since start (budget {args.budget_gib} GiB), {summary['counters']}")  # fmt: skip
    cache.clear()
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
