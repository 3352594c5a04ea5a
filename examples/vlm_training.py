"""What the two training scripts (``train_scenes_vlm.py``, ``train_hard_vlm.py``) share.

An endless stream of collated ``train``-split batches rendered by DataLoader workers, AdamW with weight decay on
the matrices only, a learning rate that follows the wall clock (linear warm-up, then a cosine that ends when the
budget is spent), and round-to-nearest copies of a trained model for the quick quantization check.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_tlq.adapters import get_adapter
from lightning_tlq.core.quantizer import QuantSpec, rtn

RTN_SETTINGS: dict[str, tuple[int, int] | None] = {
    "fp": None,
    "rtn_w4_g128": (4, 128),
    "rtn_w3_g128": (3, 128),
    "rtn_w2_g64": (2, 64),
}
"""The evaluated settings: full precision, then the language model's Linears rounded to ``(bits, group size)``."""


class TrainStream(IterableDataset):
    """Collated training batches of the ``train`` split; each worker draws its own seed."""

    def __init__(self, examples: Callable[..., Iterator[Any]], encoder: Any, batch_size: int, seed: int) -> None:
        self.examples, self.encoder, self.batch_size, self.seed = examples, encoder, batch_size, seed

    def __iter__(self):
        torch.set_num_threads(1)  # many workers share the cores: intra-op threads would oversubscribe them
        info = get_worker_info()
        stream = self.examples("train", seed=self.seed * 1000 + (info.id if info else 0))
        while True:
            yield self.encoder.batch([next(stream) for _ in range(self.batch_size)])


def rtn_copy(model, bits: int, group_size: int):
    """A copy with the language model's decoder Linears rounded to nearest (what the quantizers start from)."""
    q = copy.deepcopy(model)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=True)
    for name in get_adapter(q).target_module_names():
        lin = q.get_submodule(name)
        lin.weight.data.copy_(rtn(lin.weight.data, spec).weight)
    return q


def lr_scale(step: int, elapsed: float, warm_s: float | None, warmup: int, budget_s: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``warm_s`` (when warm-up ended) to ``budget_s``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (elapsed - warm_s) / max(budget_s - warm_s, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fit(
    model, stream: TrainStream, device: torch.device, args, budget_s: float,
    loss_fn: Callable[[Any, dict], torch.Tensor], on_log: Callable[[dict], None],
) -> tuple[int, float]:  # fmt: skip
    """Train until ``budget_s`` seconds or ``args.steps`` steps; returns ``(steps, seconds)``.

    ``args`` gives ``lr``, ``weight_decay``, ``warmup``, ``workers``, ``steps`` and ``log_every``; ``loss_fn(model,
    batch)`` runs the forward pass (under bf16 autocast on GPU); every ``log_every`` steps ``on_log`` gets
    ``{"step", "loss", "lr", "s"}``.
    """
    loader = DataLoader(
        stream, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda",
        prefetch_factor=8 if args.workers else None,
    )  # fmt: skip
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": rest}], lr=args.lr,
                            weight_decay=0.0, betas=(0.9, 0.98), fused=device.type == "cuda")  # fmt: skip
    step, warm_s, start, waited = 0, None, time.perf_counter(), 0.0
    batches = iter(loader)
    while True:
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch  # time the step loop stood waiting for rendered batches
        elapsed = time.perf_counter() - start
        if step == args.warmup:
            warm_s = elapsed
        if elapsed >= budget_s or (args.steps is not None and step >= args.steps):
            break
        scale = lr_scale(step, elapsed, warm_s, args.warmup, budget_s)
        for g in opt.param_groups:
            g["lr"] = args.lr * scale
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            on_log({"step": step, "loss": loss.item(), "lr": args.lr * scale, "s": time.perf_counter() - start,
                    "data_wait_s": round(waited, 1)})  # fmt: skip
    return step, time.perf_counter() - start
