"""``mbq``: modality-balanced scale search (MBQ). AWQ scales (weight-only) or SmoothQuant scales over the alpha grid
(with ``quant.act_bits``) are judged by a vision/answer-weighted MAE, the vision tokens of each layer's attention
and MLP block weighted by ``rho`` = mean ``|dL/dy|`` over vision tokens / over answer tokens at the block's output,
floored at the median of that block's ratios over layers. Always collects ``grad_abs`` importance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_tlq.core.importance import modality_sums, vision_weight
from lightning_tlq.core.smoothing import floor_at_median
from lightning_tlq.keys import ModuleKey
from lightning_tlq.methods.base import Method, SmoothingRecipe
from lightning_tlq.methods.registry import register_method

if TYPE_CHECKING:
    from lightning_tlq.config import ImportanceArgs


@register_method
class MBQ(Method):
    name = "mbq"
    importance_score = "grad_abs"
    supports_vision = False
    smoothing = SmoothingRecipe(weight_only="awq", with_act_bits="smoothquant", grid=True, objective="mbq", clip=True)

    def needs_importance(self, importance: ImportanceArgs) -> bool:
        return True  # its vision weights come from the gradients, whatever importance.mode says

    def after_importance(
        self, scores: Mapping[ModuleKey, Sequence[Tensor]], masks: Sequence[Any], collective: Any, adapter: Any
    ) -> dict[ModuleKey, float]:
        """``(layer, block output module)`` -> the vision weight rho of that layer's attention / MLP block, from
        every rank's tokens."""
        n_layers = adapter.num_layers
        blocks = list(dict.fromkeys(f.block_output for f in adapter.smoothing_plan(0)))
        keys = [ModuleKey(i, block) for block in blocks for i in range(n_layers)]
        vision, answer = [m.image for m in masks], [m.answer & ~m.pad for m in masks]
        local = torch.stack([modality_sums(scores[k], vision, answer) for k in keys])
        totals = collective.all_reduce(local)
        ratios = [vision_weight(t, f"mbq: decoder layer {k}") for k, t in zip(keys, totals)]
        out: dict[ModuleKey, float] = {}
        for b in range(len(blocks)):
            floored = floor_at_median(ratios[b * n_layers : (b + 1) * n_layers])
            out.update(zip(keys[b * n_layers : (b + 1) * n_layers], floored))
        return out

    def scale_search_weights(
        self, state: Mapping[ModuleKey, float], index: int, plan: Sequence[Any]
    ) -> dict[str, float] | None:
        return {f.block_output: state[ModuleKey(index, f.block_output)] for f in plan}
