"""Accuracy and speed of GPTQ's inverse-Hessian factor in each product precision (``quant.factor_precision``).

For each width ``n``: a Hessian with activation-like spread (``X^T X`` of ``2n`` Gaussian rows whose columns are
scaled over four decades, 1% damping), its factor in float64 as the reference, then per precision the mean time of
:func:`~lightning_tlq.core.factor.inverse_upper_factor` (3 runs after 2 warm-ups), the GPU memory it takes beyond
its input, and its relative (Frobenius) error against the reference; finally GPTQ W4 g128 on random weights with
each precision: the share of equal codes and the output error ``tr(dW H dW^T)`` of each. Needs a CUDA GPU.

    python examples/bench_factor.py --widths 3584 18944 --json factor.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lightning_tlq.core.factor import inverse_upper_factor
from lightning_tlq.core.gptq import gptq_quantize
from lightning_tlq.core.quantizer import QuantSpec

PRECISIONS = ("fp32", "tf32x3")


def _hessian(n: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(2 * n, n, device=device, generator=g) * torch.logspace(-2, 2, n, device=device)
    H = (x.double().T @ x.double()) if n <= 4096 else (x.T @ x).double()  # fp32 product above 4096: memory
    H += 0.01 * H.diagonal().mean() * torch.eye(n, device=device, dtype=torch.float64)
    return H


def measure(n: int, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    H = _hessian(n, device, g)
    reference, _ = inverse_upper_factor(H, "fp32")  # float64 in: float64 products
    H32 = H.float()
    row: dict = {"n": n}
    for p in PRECISIONS:
        for _ in range(2):
            inverse_upper_factor(H32, p)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        for _ in range(3):
            U, _ = inverse_upper_factor(H32, p)
        torch.cuda.synchronize(device)
        row[f"{p}_s"] = (time.perf_counter() - start) / 3
        row[f"{p}_peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        row[f"{p}_rel_err"] = float((U.double() - reference).norm() / reference.norm())
        del U
    W = torch.randn(3584 if n > 4096 else 4 * n, n, device=device, generator=g)
    spec = QuantSpec(bits=4, group_size=128)
    results = {p: gptq_quantize(W, H32, spec, factor_precision=p) for p in PRECISIONS}

    def error(r) -> float:
        d = r.weight.double() - W.double()
        return float(((d @ H) * d).sum())

    row["codes_equal"] = float((results["fp32"].codes == results["tf32x3"].codes).double().mean())
    row.update({f"err_{p}": error(results[p]) for p in PRECISIONS})
    return row


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[3584, 18944])
    p.add_argument("--json", default=None, help="append one JSON line per width")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_factor.py needs a CUDA GPU (tf32x3 is the CUDA path; on a CPU auto is fp32).")
    for n in args.widths:
        row = measure(n, torch.device("cuda"))
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()
