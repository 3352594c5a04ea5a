"""Check, on the machine it runs on, that GPTQ row slices reproduce the unsplit solve, and time the parts the
multi-GPU cost model (``lightning_tlq.rowsplit.SolveCost``) prices.

For a module shape (default: the 7B ``down_proj``, 3584 x 18944) it solves ``gptq_quantize(W, H)`` once, then
``gptq_factor`` + ``gptq_rows`` on the slices ``rowsplit.row_slices`` gives 2, 4 and 8 ranks, and prints how many
codes differ (0 expected on the CPU; on a GPU a BLAS may round a product of fewer rows differently), the factor's
time and the slowest slice's time::

    python3 examples/check_row_split.py --device cuda
    python3 examples/check_row_split.py --device cpu --rows 256 --cols 1024   # small, for the CPU
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_tlq.core.gptq import gptq_quantize
from lightning_tlq.core.gptq_rows import gptq_factor, gptq_rows
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.rowsplit import row_slices


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3584)
    p.add_argument("--cols", type=int, default=18944)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ranks", default="2,4,8")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(args.rows, args.cols, generator=g, device=device).bfloat16()
    X = torch.randn(args.tokens, args.cols, generator=g, device=device)
    H = (X.T @ X).double()
    del X
    spec = QuantSpec(4, 128)
    gptq_quantize(W[:16], H, spec)  # warm-up (Triton compile, BLAS handles)
    full, t_full = _timed(lambda: gptq_quantize(W, H, spec), device)
    factor, t_factor = _timed(lambda: gptq_factor(W, H, spec), device)
    print(f"{args.rows} x {args.cols} on {device}: unsplit solve {t_full * 1e3:.1f} ms, factor {t_factor * 1e3:.1f} ms")
    for world in (int(r) for r in args.ranks.split(",")):
        slowest, differ = 0.0, 0
        for sl in row_slices(args.rows, world):
            part, t = _timed(lambda sl=sl: gptq_rows(W[sl.start : sl.stop], factor, spec), device)
            slowest = max(slowest, t)
            differ += int((part.codes != full.codes[sl.start : sl.stop]).sum())
        print(f"  {world} ranks: slowest slice {slowest * 1e3:.1f} ms, codes differing from the unsplit solve: "
              f"{differ} of {full.codes.numel()}")  # fmt: skip


if __name__ == "__main__":
    main()
