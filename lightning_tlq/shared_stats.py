"""One statistic per distinct input: the Hessian accumulators of a layer's modules, shared where they coincide.

The modules of one adapter module group read one input (q/k/v the normed hidden states, gate/up the normed
residual). A statistic that does not depend on the module -- the plain ``sum_t x_t x_t^T``, and the weighted one when
the modules' token weights are equal (``gptq``, ``tlq`` with ``importance.granularity=input`` or ``mode=none``) -- is
accumulated once for the group, reduced once, and its modules are solved together (one factorisation,
:meth:`~lightning_tlq.methods.Method.quantize_shared`). The results are those of one statistic per module: the
rows added are the same tensors, so the sums are the same.

That the modules really read one tensor is checked on the first batch (a pre-hook sees each module's input before
activation quantization); a module that reads another input gets statistics of its own there, and one whose input
stops being shared later is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.config import QuantArgs
from lightning_tlq.core.hessian import HessianAccumulator
from lightning_tlq.module_stats import ModuleStatistics, RowSelection
from lightning_tlq.tokenweights import TokenWeights

_KINDS = ("plain", "weighted", "solve", "cross")


def _same_importance(weights: Sequence[TokenWeights], members: Sequence[str]) -> bool:
    """Whether the modules' token weights are one tensor in every batch (``importance.granularity=input``): decided
    by identity, not by value, so that every rank decides alike."""
    return all(
        tw.importance is None or all(tw.importance[m] is tw.importance[members[0]] for m in members[1:])
        for tw in weights
    )


def _key(t: Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


class LayerStatistics:
    """The statistics of one accumulate pass over ``names``, shared within each input group where they coincide.

    Args:
        modules: the stage's modules by name.
        names: the modules of this pass.
        input_groups: the stage's module groups (modules of a group read one input).
        quant, metrics, groups: as :class:`~lightning_tlq.stage.LayerStage` takes them.
        weights: per batch, the layer's token weights.
        selects_tokens: the method keeps a token set (its multipliers weigh the solve statistic).
        row_cache: per batch, its row selection (the stage keeps one for all its passes).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        names: Sequence[str],
        input_groups: Sequence[Sequence[str]],
        quant: QuantArgs,
        metrics: bool,
        groups: int,
        weights: Sequence[TokenWeights],
        selects_tokens: bool,
        row_cache: dict[int, RowSelection] | None = None,
    ) -> None:
        self.quant, self.metrics, self.groups, self.selects_tokens = quant, metrics, groups, selects_tokens
        self.statistic = quant.handler.solve_statistic
        self.has_importance = weights[0].importance is not None
        self.modules = modules
        self.stats: dict[str, ModuleStatistics] = {n: self._new(n) for n in names}
        same = set(names)
        for group in input_groups:
            members = [n for n in group if n in same]
            if len(members) > 1:
                self._share(members, _same_importance(weights, members))
        self._rows = row_cache if row_cache is not None else {}
        self._raw: dict[str, Tensor] = {}  # this batch: each module's input before activation quantization
        self._added: dict[int, str] = {}  # this batch: accumulator id -> the module that added its rows
        self._batch = -1

    def _new(self, name: str) -> ModuleStatistics:
        module = self.modules[name]
        return ModuleStatistics(
            module.in_features, self.groups, self.quant, self.metrics, self.has_importance, module.weight.device
        )

    def _share(self, members: list[str], same_importance: bool) -> None:
        """Point the members' module-independent accumulators at the first member's."""
        lead = self.stats[members[0]]
        kinds = ["plain"]
        if same_importance:
            kinds += ["weighted", "solve", "cross"]
        elif self.statistic == "plain":
            kinds += ["solve", "cross"]
        for name in members[1:]:
            st = self.stats[name]
            for kind in kinds:
                if getattr(lead, kind) is not None:
                    setattr(st, kind, getattr(lead, kind))

    # --- which modules share what -------------------------------------------------------------------------------
    def accumulators(self, names: Sequence[str]) -> list[HessianAccumulator]:
        """Every distinct accumulator of ``names``, in order."""
        out = {id(a): a for n in names for a in self.stats[n].accumulators()}
        return list(out.values())

    def components(self, names: Sequence[str]) -> list[list[str]]:
        """``names`` grouped by shared accumulators (one owner rank each), in order."""
        return self._partition(names, lambda n: {id(a) for a in self.stats[n].accumulators()})

    def solve_groups(self, names: Sequence[str]) -> list[list[str]]:
        """``names`` grouped by their solve statistic (solved together, one factorisation), in order."""
        return self._partition(names, lambda n: {id(self.stats[n].solve)} if self.stats[n].solve is not None else {n})

    @staticmethod
    def _partition(names: Sequence[str], keys: Any) -> list[list[str]]:
        out: list[tuple[set, list[str]]] = []
        for name in names:
            k = keys(name)
            hit = [o for o in out if o[0] & k]
            if not hit:
                out.append((set(k), [name]))
                continue
            target = hit[0]
            for other in hit[1:]:  # name joins several: merge them
                target[0].update(other[0])
                target[1].extend(other[1])
                out.remove(other)
            target[0].update(k)
            target[1].append(name)
        return [sorted(members, key=list(names).index) for _, members in out]

    # --- adding one batch ---------------------------------------------------------------------------------------
    def raw_input(self, name: str, x: Tensor) -> None:
        """A module's input as the layer passes it (a pre-hook that runs before activation quantization)."""
        self._raw[name] = x

    def add(self, name: str, x: Tensor, tw: TokenWeights, fp: Tensor | None, b: int, where: str) -> None:
        """Add module ``name``'s inputs of batch ``b``; an accumulator a module of its input group has already added
        this batch is skipped (the same rows)."""
        if b != self._batch:
            self._batch, self._added = b, {}
        stats = self.stats[name]
        done = [a for a in stats.accumulators() if id(a) in self._added]
        if done:
            first = self._added[id(done[0])]
            if _key(self._raw.get(name, x)) != _key(self._raw.get(first, x)):
                if b != 0:
                    raise RuntimeError(
                        f"{where}: {name} and {first} read one input in the first batch but not in batch {b}."
                    )
                stats = self.stats[name] = self._new(name)  # another input: statistics of its own
                done = []
        skip = {id(a) for a in done}
        for acc in stats.accumulators():
            self._added.setdefault(id(acc), name)
        if len(skip) < len(stats.accumulators()):
            with torch.profiler.record_function("tlq.hessian.add"):
                self._add(name, x, tw, fp, b, skip, where)

    def end_batch(self) -> None:
        self._raw = {}

    def _rows_of(self, b: int, tw: TokenWeights, device: torch.device) -> RowSelection:
        """Batch ``b``'s row selection on ``device``, computed once per pass (index tensors: no device waits)."""
        sel = self._rows.get(b)
        if sel is not None:
            return sel
        valid = tw.valid.reshape(-1).cpu() if tw.valid is not None else None
        keep = multiplier = None
        if self.selects_tokens and tw.multiplier is not None:
            m = tw.multiplier.reshape(-1).cpu()
            m = m[valid] if valid is not None else m
            positions = (m > 0).nonzero().squeeze(1)
            keep, multiplier = positions.to(device), m[positions].to(device, torch.float32)
        valid_idx = valid.nonzero().squeeze(1).to(device) if valid is not None else None
        sel = self._rows[b] = RowSelection(valid_idx, keep, multiplier)
        return sel

    def _add(self, name: str, x: Tensor, tw: TokenWeights, fp: Tensor | None, b: int, skip: set, where: str) -> None:
        """Every real token to the report Hessians (and the ``plain`` solve statistic), the token set with importance
        x multiplier weights to a ``weighted`` solve statistic; tokens outside the set are left out, in-set tokens of
        zero importance enter with weight 0 (adding nothing). Accumulators in ``skip`` are left alone."""
        stats, x = self.stats[name], x.detach()
        sel = self._rows_of(b, tw, x.device)
        rows = sel.take(x)  # [N, in]
        fp_rows = sel.take(fp) if stats.cross is not None and fp is not None else None
        if stats.cross is not None and (fp_rows is None or fp_rows.shape != rows.shape):
            raise RuntimeError(f"{where}: no full-precision input matches the quantized path's.")
        cross = stats.cross if stats.cross is not None and id(stats.cross) not in skip else None
        if stats.plain is not None and id(stats.plain) not in skip:
            stats.plain.add(rows)
            if self.statistic == "plain" and fp_rows is not None and cross is not None:
                cross.add(rows, left=fp_rows.float() - rows.float())
        imp = None
        if tw.importance is not None:
            imp = sel.take(tw.importance[name].to(x.device, non_blocking=True))
        if stats.weighted is not None and id(stats.weighted) not in skip:
            stats.weighted.add(rows, imp, validate=False)
        if self.statistic == "weighted" and id(stats.solve) not in skip:
            w = imp if imp is not None else torch.ones(rows.shape[0], self.groups, device=x.device)
            if sel.keep is not None:
                rows, w = rows.index_select(0, sel.keep), w.index_select(0, sel.keep) * sel.multiplier.unsqueeze(-1)
                fp_rows = fp_rows.index_select(0, sel.keep) if fp_rows is not None else None
            stats.solve.add(rows, w, validate=False)
            if fp_rows is not None and cross is not None:
                cross.add(rows, w, left=fp_rows.float() - rows.float(), validate=False)
