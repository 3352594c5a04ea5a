"""Who solves what in one true-sequential group over ranks: whole *parts* packed by cost, and the rows of a lone
module that would dominate the group split over every rank (GPTQ's rows are independent given ``H``).

A part is what the stage reduces to one owner (:meth:`~lightning_tlq.shared_stats.LayerStatistics.components`):
modules sharing an accumulator, made of *solve units*, modules sharing one solve statistic and solved together with
one factor (q/k/v, gate/up under ``gptq``). A part costs one factor per unit (per importance group) plus its units'
rows. Only a part of one module, solved by plain GPTQ on one ungrouped Hessian (:func:`splittable`), may be split.

A split module is solved in three steps: its statistics are reduced to a *leader* (as for a whole part), the
leader computes the shared factor once (:func:`~lightning_tlq.core.gptq_rows.gptq_factor`: act-order, dead inputs,
the damped inverse factor ``U``) and broadcasts it, then every rank quantizes its slice of rows
(:func:`~lightning_tlq.core.gptq_rows.gptq_rows`) and the slices are broadcast back. Broadcasting ``U`` (float32)
moves half the bytes of a second float64 ``H`` that would let every rank factor on its own, and every rank then
uses the very same ``U``: the codes are those of the unsplit solve (see :mod:`lightning_tlq.core.gptq_rows` for
where that holds bit for bit).

The plan is a pure function of the parts, the modules' shapes and the number of ranks, so every rank computes the
same one. Its costs (:class:`SolveCost`) are seconds on one H200 from ``docs/performance.md``; they only decide
the plan, never the codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.core.gptq_checks import _column_loop
from lightning_tlq.core.gptq_rows import MIN_ROWS, GPTQFactor, gptq_factor, gptq_rows
from lightning_tlq.distributed import Collective, assign_owners, shard_range
from lightning_tlq.methods.base import GPTQSolve, _check_tokens
from lightning_tlq.module_stats import ModuleResult, ModuleStatistics

ROW_UNIT = 16
"""Slices are whole multiples of this many rows (>= ``MIN_ROWS``; the Triton block step's row tile)."""


@dataclass(frozen=True)
class SolveCost:
    """Seconds of one module's GPTQ solve on one device, and of moving bytes between ranks.

    Defaults: one H200 (``docs/performance.md``): the inverse factor at n = 3584 / 18944 took 4 / 142 ms with its
    products in tf32x3 (2026-12-04, call T2; 173 ms in float32), the column loop is host-bound (~0.17 ms per
    128-column block, from the small modules' solve seconds) plus its fp32 lazy updates (``rows x in^2`` flops at
    50 TFLOP/s); ``link_gbps`` is an assumed NVLink collective bandwidth (not measured here).
    """

    factor_fixed_s: float = 0.003
    factor_s_at_18944: float = 0.139
    block_s: float = 0.17e-3
    fp32_tflops: float = 50.0
    link_gbps: float = 150.0
    block_size: int = 128

    def factor(self, n: int) -> float:
        return self.factor_fixed_s + self.factor_s_at_18944 * (n / 18944) ** 3

    def columns(self, rows: int, n: int) -> float:
        return -(-n // self.block_size) * self.block_s + rows * n * n / (self.fp32_tflops * 1e12)

    def move(self, nbytes: float) -> float:
        return nbytes / (self.link_gbps * 1e9)


DEFAULT_COST = SolveCost()


@dataclass
class GroupPlan:
    """One group's schedule: ``owners`` (the solving rank of a whole module, the leader of a split one) and, for
    split modules, every rank's rows; ``seconds``: the group's predicted solve time under the cost model."""

    owners: dict[str, int]
    slices: dict[str, list[range]] = field(default_factory=dict)
    seconds: float = 0.0


def row_slices(rows: int, world_size: int, unit: int = ROW_UNIT) -> list[range]:
    """Contiguous slices of ``rows``, one per rank, each a whole number of ``unit`` rows (the remainder goes to
    the last); every slice has at least ``unit`` rows."""
    full = rows // unit
    if full < world_size:
        raise ValueError(f"{rows} rows cannot be split over {world_size} ranks in slices of {unit} rows.")
    cuts = [shard_range(full, world_size, r) for r in range(world_size)]
    out = [range(c.start * unit, c.stop * unit) for c in cuts]
    out[-1] = range(out[-1].start, rows)
    return out


def splittable(method: Any, groups: int) -> bool:
    """Whether a module's rows may be split: a GPTQ solve on one ungrouped Hessian."""
    return isinstance(method, GPTQSolve) and groups == 1


Parts = Sequence[Sequence[Sequence[str]]]
"""A group's parts, each a list of solve units, each a list of module names (solved together, one factor)."""


def part_seconds(
    part: Sequence[Sequence[str]],
    shapes: Mapping[str, tuple[int, int]],
    cost: SolveCost,
    groups: int = 1,
    split: Sequence[str] = (),
) -> float:
    """One part's solve on one rank: per unit ``groups`` factors and one column loop over its modules' rows (the
    loop of a module in ``split`` runs on every rank instead, priced apart)."""
    total = 0.0
    for unit in part:
        n = shapes[unit[0]][1]
        rows = sum(shapes[m][0] for m in unit)
        total += groups * cost.factor(n) + (0.0 if unit[0] in split else cost.columns(rows, n))
    return total


def _pack(
    parts: Parts,
    shapes: Mapping[str, tuple[int, int]],
    split: list[str],
    world: int,
    cost: SolveCost,
    groups: int,
    unit: int,
) -> GroupPlan:
    """Owners by greedy packing of whole parts and split modules' factors; split slices run after, on all ranks."""
    work = [part_seconds(part, shapes, cost, groups, split) for part in parts]
    owners = {n: r for part, r in zip(parts, assign_owners(work, world)) for u in part for n in u}
    seconds = max(sum(w for w, part in zip(work, parts) if owners[part[0][0]] == r) for r in range(world))
    slices = {}
    for n in split:
        out_f, in_f = shapes[n]
        slices[n] = row_slices(out_f, world, unit)
        seconds += cost.move(4 * in_f * in_f) + max(cost.columns(len(s), in_f) for s in slices[n])
    seconds += sum(cost.move(3 * o * i) for o, i in shapes.values())  # codes (int8) and weights (bf16) back
    return GroupPlan(owners, slices, seconds)


def plan_group(
    parts: Parts,
    shapes: Mapping[str, tuple[int, int]],
    world_size: int,
    *,
    split: bool = True,
    groups: int = 1,
    cost: SolveCost | None = None,
    unit: int = ROW_UNIT,
) -> GroupPlan:
    """The schedule of one group's solves: split the costliest lone module over every rank while that lowers the
    group's predicted time (``parts``: see :data:`Parts`, in the group's order; ``shapes``: name -> ``(out, in)``;
    ``groups``: Hessians per module, each factored; ``split=False``: whole parts only)."""
    cost = cost or DEFAULT_COST
    if unit < MIN_ROWS:
        raise ValueError(f"Row slices need at least {MIN_ROWS} rows to match the unsplit solve, got unit={unit}.")
    names = [n for part in parts for u in part for n in u]
    if sorted(names) != sorted(shapes) or len(set(names)) != len(names):
        raise ValueError(f"plan_group: the parts {list(parts)} must name each module of {sorted(shapes)} once.")
    if world_size == 1:
        return GroupPlan(dict.fromkeys(names, 0), {}, _pack(parts, shapes, [], 1, cost, groups, unit).seconds)
    lone = [p[0][0] for p in parts if len(p) == 1 and len(p[0]) == 1] if split and groups == 1 else []
    chosen: list[str] = []
    best = _pack(parts, shapes, chosen, world_size, cost, groups, unit)
    while True:
        whole = [n for n in lone if n not in chosen and shapes[n][0] >= world_size * unit]
        if not whole:
            break
        largest = max(whole, key=lambda n: cost.factor(shapes[n][1]) + cost.columns(*shapes[n]))
        trial = _pack(parts, shapes, [*chosen, largest], world_size, cost, groups, unit)
        if trial.seconds >= best.seconds:
            break
        chosen, best = [*chosen, largest], trial
    return best


def empty_result(weight: Tensor, spec: Any) -> ModuleResult:
    """Buffers for one module's result (quantized weight, codes, scales, zero points) that a broadcast fills."""
    out_f, in_f = weight.shape
    groups = spec.n_groups(in_f)
    return ModuleResult(
        torch.empty_like(weight),
        torch.empty(out_f, in_f, dtype=spec.code_dtype, device=weight.device),
        torch.empty(out_f, groups, dtype=torch.float32, device=weight.device),
        torch.empty(out_f, groups, dtype=torch.float32, device=weight.device),
    )


def solve_split(
    name: str,
    weight: Tensor,
    stats: ModuleStatistics,
    quant: Any,
    plan: GroupPlan,
    collective: Collective,
    where: str,
    errors: Callable[[Tensor, Tensor, ModuleStatistics], dict[str, Any]],
    lean: bool = False,
) -> tuple[ModuleResult, dict[str, Any]]:
    """Every rank's part of a split module's solve; returns the whole result and record (same on every rank).

    Only the leader holds the reduced statistics: it checks them, factors, and reports the errors (``errors`` of
    the original and the whole quantized weight). ``lean``: the leader factors with the least memory
    (``memory.profile=low``, same factor).
    """
    start = time.perf_counter()
    leader, rows, rank = plan.owners[name], plan.slices[name], collective.rank
    out_f, in_f = weight.shape
    spec, device = quant.spec, weight.device
    kw = {"block_size": quant.block_size, "damp": quant.damp, "act_order": quant.act_order, "name": where}
    if rank == leader:
        s = stats.for_solve(lean)
        _check_tokens(s, where)
        parts = gptq_factor(weight, s.H, spec, cross=s.cross, lean=s.lean, reuse_h=s.reuse_h, **kw).tensors()
    else:  # shapes only
        perm = torch.empty(in_f if quant.act_order else 0, dtype=torch.long, device=device)
        cross = torch.empty((in_f, in_f) if quant.target == "fp" else (0, 0), device=device)
        u8 = torch.empty(in_f, dtype=torch.uint8, device=device)
        parts = [torch.empty(in_f, in_f, device=device), u8, perm, cross, torch.empty(2, dtype=torch.float64)]
    # every rank knows which parts are empty (no act-order, no cross term): those are not sent
    factor = GPTQFactor.from_tensors([collective.broadcast(t, leader).to(device) if t.numel() else t for t in parts])
    mine = rows[rank]
    loop = _column_loop(quant.kernel, weight, quant.block_size, where)
    part = gptq_rows(weight[mine.start : mine.stop], factor, spec, block_size=quant.block_size, name=where, loop=loop)
    whole = empty_result(weight, spec)
    for r, sl in enumerate(rows):  # each slice from its rank, into place
        for key in ("weight", "codes", "scale", "zero"):
            dst = getattr(whole, key)[sl.start : sl.stop]
            dst.copy_(collective.broadcast(getattr(part, key) if r == rank else dst, r))
    record: dict[str, Any] = {"damp": factor.damp, "retries": factor.retries, "shared": 1}
    if rank == leader:
        record["tokens"] = stats.solve.tokens if stats.solve is not None else 0
        record.update(errors(weight, whole.weight, stats))
    record["seconds"] = time.perf_counter() - start
    return whole, record
