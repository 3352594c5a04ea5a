"""Scale search and folding for one decoder layer (``awq``, ``smoothquant``, ``mbq``), before its weights are rounded.

:class:`LayerSmoothing` runs as the first step of a :class:`~lightning_tlq.stage.LayerStage`. As AWQ does, every
scale of the layer is searched on the layer's full-precision weights (its inputs come from the quantized path of
the earlier layers, as for every method here), then all scales are folded and the stage rounds the weights:

1. **statistics**: per module group, ``sum_t |x_t|`` and ``max_t |x_t|`` per input channel over the real (non-pad)
   tokens, reduced over ranks (float64 sums then divided by the global token count; maxima by a max-reduction).
   Float64 matters: a one-ulp change of ``s`` can flip the code of a group's absmax weight, which sits exactly on
   a rounding tie (``|w| / scale = 2^(b-1) - 1/2``), so ``s`` must not depend on the summation order;
2. **candidates**: AWQ scales over the alpha grid (``awq``; weight-only ``mbq``), SmoothQuant scales over the grid
   (``mbq`` with ``act_bits``) or at ``quant.smoothquant_alpha`` (``smoothquant``), and ``s = 1`` for reference;
3. **losses**: one more pass adds every candidate's output error (:class:`~lightning_tlq.core.smoothing.ScaleSearch`,
   activation fake-quant applied in the loss under ``act_bits``); the sums are reduced over ranks, so every rank
   picks the same alpha (rank 0's choice and scales are broadcast as a guard);
4. **fold**: ``1 / s`` into the producing op (norm weight, or the rows of v_proj / up_proj), ``s`` into the weights;
5. with ``quant.awq_clip``, AWQ's clip search per (row, weight group) on the folded layer.

The chosen alpha, the searched loss and the loss of ``s = 1`` (plain round to nearest) go into each module's record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.adapters.base import ScaleFold
from lightning_tlq.config import QuantArgs
from lightning_tlq.core.actquant import fake_quantize_per_token
from lightning_tlq.core.smoothing import (
    ScaleSearch,
    alpha_grid,
    awq_scales,
    block_gram,
    clip_weight,
    column_absmax,
    fold_into_norm_,
    fold_into_rows_,
    scale_columns_,
    search_clip,
    smoothquant_scales,
)
from lightning_tlq.distributed import Collective
from lightning_tlq.tokenweights import TokenWeights

__all__ = ["LayerSmoothing", "apply_fold"]

Forward = Callable[[int, Tensor], Tensor]


def apply_fold(layer: nn.Module, fold: ScaleFold, s: Tensor) -> None:
    """Migrate the scales ``s`` of one module group in place: ``1 / s`` into the producing op, ``s`` into the group's
    weights. The layer computes the same function (up to rounding in the weights' dtype)."""
    if fold.skipped is not None or fold.producer is None:
        raise ValueError(f"The group {fold.modules} has no exact fold: {fold.skipped}.")
    with torch.no_grad():
        producer = layer.get_submodule(fold.producer)
        bias = getattr(producer, "bias", None)
        bias = bias.data if isinstance(bias, Tensor) else None
        if fold.kind == "norm":
            fold_into_norm_(producer.weight.data, bias, s, fold.offset)
        else:
            fold_into_rows_(producer.weight.data, bias, s)
        for name in fold.modules:
            scale_columns_(layer.get_submodule(name).weight.data, s)


class LayerSmoothing:
    """Searches and folds the per-input-channel scales of one decoder layer in place.

    Args:
        index: decoder layer index (for messages).
        layer: the decoder layer (on the compute device).
        plan: per module group, where its scales fold (:meth:`~lightning_tlq.adapters.VLMAdapter.smoothing_plan`).
        quant: settings (``method``, whose handler's :class:`~lightning_tlq.methods.SmoothingRecipe` says how to
            search, ``scale_grid``, ``smoothquant_alpha``, ``awq_clip``, ``act_bits``).
        collective: reductions over ranks (no-ops on one process).
        vision_weights: for the ``mbq`` objective: block-output module name (relative to the layer) -> the vision
            weight ``rho``.
        clip_excluded: modules the clip search leaves alone.

    Attributes:
        records: module name -> what to add to its record (``alpha``, ``search_loss``, ``rtn_loss``, ...).
        scales: first module of each smoothed group -> the folded scale vector ``s`` (float32, CPU).
        clip: module name -> per (row, weight group) clipping bound ``[out, G]`` (``awq_clip`` only).
    """

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        plan: Sequence[ScaleFold],
        quant: QuantArgs,
        *,
        collective: Collective | None = None,
        vision_weights: Mapping[str, float] | None = None,
        clip_excluded: Sequence[str] = (),
    ) -> None:
        recipe = quant.handler.smoothing
        if recipe is None:
            raise ValueError(f"quant.method={quant.method!r} searches no scales: LayerSmoothing does not apply.")
        if recipe.objective == "mbq" and vision_weights is None:
            raise ValueError(
                f"quant.method={quant.method} needs the per-layer vision weights (from the importance pass)."
            )
        self.recipe = recipe
        self.index, self.layer, self.plan, self.quant = index, layer, list(plan), quant
        self.collective = collective or Collective()
        self.vision_weights = dict(vision_weights or {})
        self.clip_excluded = set(clip_excluded)
        self.records: dict[str, dict[str, Any]] = {}
        self.scales: dict[str, Tensor] = {}
        self.clip: dict[str, Tensor] = {}

    # --- driver ----------------------------------------------------------------------------------------------
    def run(self, forward: Forward, inputs: Sequence[Tensor], weights: Sequence[TokenWeights]) -> None:
        """Search every group's scales on the full-precision layer, fold them, then (``awq_clip``) search clipping."""
        active = [fold for fold in self.plan if fold.skipped is None]
        for fold in self.plan:
            if fold.skipped is not None:
                for name in fold.modules:
                    self.records[name] = {"smoothing_skipped": fold.skipped}
        if active:
            stats = self._statistics(active, forward, inputs, weights)
            searches = {fold.modules[0]: self._search(fold, *stats[fold.modules[0]]) for fold in active}
            self._losses(active, searches, forward, inputs, weights)
            for fold in active:
                self._choose_and_fold(fold, *searches[fold.modules[0]])
        if self.quant.awq_clip:
            self._clip(forward, inputs, weights)

    def clipped(self, name: str, weight: Tensor) -> Tensor:
        """``weight`` clipped as the clip search chose for module ``name`` (unchanged without a clip)."""
        if name not in self.clip:
            return weight
        return clip_weight(weight, self.clip[name], self.quant.spec)

    # --- passes ----------------------------------------------------------------------------------------------
    def _pass(
        self,
        first_modules: Sequence[str],
        fn: Callable[[str, Tensor, Tensor | None, Tensor | None], None],
        forward: Forward,
        inputs: Sequence[Tensor],
        weights: Sequence[TokenWeights],
    ) -> None:
        """Run the layer over every batch, calling ``fn(group, rows, answer, vision)`` with the real tokens' inputs of
        each group (hooked on its first module; every module of a group reads the same input)."""
        current: dict[str, TokenWeights] = {}

        def hook(name: str, module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            tw = current["w"]
            every = tw.valid is None
            valid = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if every else tw.valid.to(x.device)
            answer = tw.answer.to(x.device)[valid] if tw.answer is not None else None
            vision = tw.vision.to(x.device)[valid] if tw.vision is not None else None
            fn(name, x[valid], answer, vision)

        handles = [
            self.layer.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(n, m, a, o))
            for n in first_modules
        ]
        try:
            with torch.no_grad():
                for b, hidden in enumerate(inputs):
                    current["w"] = weights[b]
                    forward(b, hidden)
        finally:
            for handle in handles:
                handle.remove()

    def _statistics(
        self, active: Sequence[ScaleFold], forward: Forward, inputs: Sequence[Tensor], weights: Sequence[TokenWeights]
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per group: global mean and max of ``|x|`` per input channel over real tokens."""
        sums: dict[str, Tensor] = {}
        maxima: dict[str, Tensor] = {}

        def add(name: str, rows: Tensor, answer: Tensor | None, vision: Tensor | None) -> None:
            a = rows.float().abs()
            count = torch.tensor([a.shape[0]], dtype=torch.float64, device=a.device)
            part = torch.cat([a.sum(0, dtype=torch.float64), count])
            sums[name] = sums[name] + part if name in sums else part
            peak = a.amax(0) if a.shape[0] else torch.zeros(a.shape[1], device=a.device)
            maxima[name] = torch.maximum(maxima[name], peak) if name in maxima else peak

        names = [fold.modules[0] for fold in active]
        self._pass(names, add, forward, inputs, weights)
        out = {}
        for name in names:
            if name not in sums:
                raise RuntimeError(f"Layer {self.index} {name}: no calibration token reached this module.")
            total = self.collective.all_reduce(sums[name])
            peak = self.collective.all_reduce(maxima[name], op="max")
            count = float(total[-1])
            if count == 0:
                raise RuntimeError(f"Layer {self.index} {name}: no real (non-pad) calibration token reached it.")
            out[name] = ((total[:-1] / count).float(), peak.float())
        return out

    def _search(self, fold: ScaleFold, mean_abs: Tensor, abs_max: Tensor) -> tuple[ScaleSearch, list[float], int]:
        """The group's candidates: ``(search, selectable alphas, index of s = 1)``."""
        quant = self.quant
        modules = [self.layer.get_submodule(n) for n in fold.modules]
        grid = alpha_grid(quant.scale_grid)
        if self.recipe.candidates(quant) == "awq":
            alphas, candidates, identity = grid, [awq_scales(mean_abs, a) for a in grid], 0  # alpha 0 is s = 1
        else:
            alphas = grid if self.recipe.grid else [quant.smoothquant_alpha]
            weight_max = column_absmax([m.weight for m in modules]).to(abs_max.device)
            candidates = [smoothquant_scales(abs_max, weight_max, a) for a in alphas] + [torch.ones_like(abs_max)]
            identity = len(alphas)
        search = ScaleSearch(
            [m.weight for m in modules],
            torch.stack(candidates),
            quant.spec,
            act_bits=quant.act_bits,
            objective=self.recipe.objective,
        )
        return search, alphas, identity

    def _losses(
        self,
        active: Sequence[ScaleFold],
        searches: Mapping[str, tuple[ScaleSearch, list[float], int]],
        forward: Forward,
        inputs: Sequence[Tensor],
        weights: Sequence[TokenWeights],
    ) -> None:
        def add(name: str, rows: Tensor, answer: Tensor | None, vision: Tensor | None) -> None:
            searches[name][0].add(rows, answer, vision)

        self._pass([fold.modules[0] for fold in active], add, forward, inputs, weights)
        for fold in active:
            search = searches[fold.modules[0]][0]
            search.load_state(self.collective.all_reduce(search.state()))

    def _choose_and_fold(self, fold: ScaleFold, search: ScaleSearch, alphas: list[float], identity: int) -> None:
        mbq = self.recipe.objective == "mbq"
        rho = self.vision_weights.get(fold.block_output) if mbq else None
        if mbq and rho is None:
            raise ValueError(f"Layer {self.index}: no mbq vision weight for {fold.block_output}.")
        losses = search.losses(rho)
        k = int(torch.argmin(losses[: len(alphas)]))
        k = int(self.collective.broadcast(torch.tensor([k], device=losses.device), 0)[0])
        s = self.collective.broadcast(search.candidates[k].contiguous(), 0)
        record: dict[str, Any] = {"alpha": alphas[k], "search_loss": float(losses[k])}
        record["rtn_loss"] = float(losses[identity])
        if rho is not None:
            record["vision_weight"] = float(rho)
        apply_fold(self.layer, fold, s)
        for name in fold.modules:
            self.records[name] = dict(record)
        self.scales[fold.modules[0]] = s.detach().float().cpu()

    def _clip(self, forward: Forward, inputs: Sequence[Tensor], weights: Sequence[TokenWeights]) -> None:
        """AWQ's clip search on the folded full-precision layer: per-group Gram matrices of each group's input
        (activation fake-quant applied to them under ``act_bits``), reduced over ranks, then a closed-form search."""
        spec, bits = self.quant.spec, self.quant.act_bits
        groups = {fold.modules[0]: [n for n in fold.modules if n not in self.clip_excluded] for fold in self.plan}
        groups = {first: names for first, names in groups.items() if names}
        grams: dict[str, Tensor] = {}

        def add(name: str, rows: Tensor, answer: Tensor | None, vision: Tensor | None) -> None:
            rows = fake_quantize_per_token(rows, bits) if bits is not None else rows
            gram = block_gram(rows, spec)
            grams[name] = grams[name] + gram if name in grams else gram

        self._pass(list(groups), add, forward, inputs, weights)
        for first, names in groups.items():
            gram = self.collective.all_reduce(grams[first])
            for name in names:
                weight = self.layer.get_submodule(name).weight.detach()
                max_val, ratio = search_clip(weight, gram, spec)
                self.clip[name] = self.collective.broadcast(max_val.contiguous(), 0)
                self.records.setdefault(name, {})["clip_ratio_mean"] = float(ratio.mean())
