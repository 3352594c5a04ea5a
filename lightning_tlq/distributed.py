"""Collectives for layer-wise calibration over ranks (METHOD.md section 4), in plain ``torch.distributed``.

Tensors travel as tensors (never pickled): Hessians are *reduced* to the rank that owns a module, owners
solve, and results are *broadcast* back. Everything here is a no-op on one process, so the stage code is the
same for 1 or N ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class Collective:
    """The few collectives a calibration needs; identity operations when not distributed."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.rank = dist.get_rank() if self.enabled else 0

    def _ready(self, tensor: Tensor) -> Tensor:
        # gloo takes CPU tensors, NCCL CUDA tensors; both want contiguous buffers.
        backend = dist.get_backend()
        if backend == "nccl" and tensor.device.type != "cuda":
            return tensor.to(torch.device("cuda", torch.cuda.current_device())).contiguous()
        if backend == "gloo" and tensor.device.type != "cpu":
            return tensor.cpu().contiguous()
        return tensor.contiguous()

    def reduce_to(self, tensor: Tensor, dst: int) -> Tensor:
        """Sum ``tensor`` over ranks into rank ``dst`` (other ranks' results are meaningless)."""
        if not self.enabled:
            return tensor
        buf = self._ready(tensor)
        dist.reduce(buf, dst=dst, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device) if buf.device != tensor.device else buf

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (``op="sum"``) or maximum (``op="max"``) of ``tensor`` over ranks, result on every rank."""
        if op not in ("sum", "max"):
            raise ValueError(f"Collective.all_reduce: op must be 'sum' or 'max', got {op!r}.")
        if not self.enabled:
            return tensor
        buf = self._ready(tensor)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return buf.to(tensor.device) if buf.device != tensor.device else buf

    def broadcast(self, tensor: Tensor, src: int) -> Tensor:
        """Rank ``src``'s ``tensor`` on every rank (same shape and dtype required everywhere)."""
        if not self.enabled:
            return tensor
        buf = self._ready(tensor)
        dist.broadcast(buf, src=src)
        return buf.to(tensor.device) if buf.device != tensor.device else buf

    def exclusive_offset(self, n: int) -> int:
        """Sum of ``n`` over the ranks before this one (where this rank's items start in :meth:`gather_cat`)."""
        if not self.enabled:
            return 0
        sizes = torch.zeros(self.world_size, dtype=torch.long)
        sizes[self.rank] = n
        sizes = self.all_reduce(sizes)
        return int(sizes[: self.rank].sum())

    def gather_cat(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` along dim 0, in rank order (first dims may differ by rank)."""
        if not self.enabled:
            return tensor
        if tensor.dtype == torch.bool:
            return self.gather_cat(tensor.to(torch.uint8)).bool()
        local = self._ready(tensor)
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=local.device)
        sizes[self.rank] = local.shape[0]
        sizes = self.all_reduce(sizes)
        longest = int(sizes.max())
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        out = torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])
        return out.to(tensor.device)


def shard_range(n: int, world_size: int, rank: int) -> range:
    """Contiguous shard of ``n`` items for ``rank``: no padding, no repetition, sizes differ by at most 1."""
    if n < world_size:
        raise ValueError(
            f"{n} calibration samples cannot be split over {world_size} ranks without repetition; "
            "use more samples or fewer processes."
        )
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_batches(n: int, batch_size: int, world_size: int, rank: int) -> list[range]:
    """This rank's calibration batches, as ranges of global sample indices.

    Batches are global -- ``[k * batch_size, (k + 1) * batch_size)``, the last one possibly smaller -- and whole
    batches are sharded over ranks (:func:`shard_range` over batch indices: contiguous, no padding, no
    repetition). Every batch therefore holds the same samples, padded to the same length, whatever the number of
    ranks, so its activations and Hessian partials are bit-identical, and the result depends on the number of
    ranks only through the order in which whole-batch partials are summed (see ``HessianAccumulator``).

    If there are fewer batches than ranks, the batch size is lowered to ``n // world_size`` so that every rank
    gets a batch (batch boundaries, and so the last bits of the result, then depend on the number of ranks).
    """
    if n < world_size:
        shard_range(n, world_size, rank)  # raises the "without repetition" error
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if -(-n // batch_size) < world_size:
        batch_size = n // world_size
    n_batches = -(-n // batch_size)
    return [range(k * batch_size, min(n, (k + 1) * batch_size)) for k in shard_range(n_batches, world_size, rank)]


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy bin packing: each item (largest first) goes to the rank with the least total cost so far.

    Deterministic (ties broken by item index, then rank), so every rank computes the same owners.
    """
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += costs[index]
    return owners
