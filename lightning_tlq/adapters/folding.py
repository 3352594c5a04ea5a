"""Where the scale-search methods (awq, smoothquant, mbq) fold each module group's input scales: the plan an adapter
derives from its declared producers, each norm checked numerically."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_tlq.adapters.registry import UnsupportedModelError


@dataclass(frozen=True)
class ScaleFold:
    """How one module group's per-input-channel scales are folded (awq / smoothquant / mbq).

    Attributes:
        modules: The group's linear modules (names relative to the decoder layer), all reading one input.
        producer: The op whose output is that input, into which ``1 / s`` is folded; None when no exact fold
            exists (the group is then not smoothed, see :attr:`skipped`).
        kind: ``norm`` (an elementwise-affine norm: ``(offset + weight) * n(x) + bias``) or ``linear`` (divide the
            producer's output rows), None when skipped.
        offset: The norm's weight offset: 0 for ``weight * n(x)``, 1 for Gemma's ``(1 + weight) * n(x)``.
        block_output: The module whose output gradient weighs this group's vision tokens under mbq (o_proj for
            the attention groups, down_proj for the MLP groups).
        skipped: Why the group is not smoothed (None when it is).
    """

    modules: tuple[str, ...]
    producer: str | None
    kind: str | None
    offset: float
    block_output: str
    skipped: str | None = None


class SmoothingPlanMixin:
    """:meth:`smoothing_plan` for :class:`~lightning_tlq.adapters.base.VLMAdapter` (reads its
    ``smoothing_producers``, ``block_outputs``, ``norm_weight_offset``, ``module_groups`` and ``_layer``)."""

    def smoothing_plan(self, layer_index: int) -> list[ScaleFold]:
        """Return, per module group of a decoder layer, where awq / smoothquant / mbq fold its input scales.

        A linear producer whose output width differs from the group's input width (``v_proj`` -> ``o_proj`` under
        grouped-query attention) has no exact per-channel fold: that group is skipped, as AWQ does. Each norm is
        checked numerically (on a float32 CPU copy with random weights, so this also works on the ``meta``
        device): dividing its weight as :attr:`norm_weight_offset` says must divide its output.

        Raises:
            UnsupportedModelError: If the family declares no producers, a producer is missing, or a norm does not
                behave like ``(offset + weight) * n(x)``.
        """
        groups = self.module_groups(layer_index)
        name = type(self).__name__
        if self.smoothing_producers is None or len(self.smoothing_producers) != len(groups):
            raise UnsupportedModelError(
                f"{name} declares no smoothing_producers for its {len(groups)} module groups, so awq, smoothquant and "
                "mbq cannot fold input scales in this family; use rtn, gptq or tlq, or set smoothing_producers (and "
                "block_outputs, norm_weight_offset) in the adapter."
            )
        layer = self._layer(layer_index)
        plan = []
        for group, producer, block in zip(groups, self.smoothing_producers, self.block_outputs):
            modules = [layer.get_submodule(n) for n in group]
            width = modules[0].in_features
            if any(m.in_features != width for m in modules):
                raise UnsupportedModelError(f"{name}: the modules {group} do not share one input width.")
            if producer is None:
                plan.append(ScaleFold(tuple(group), None, None, 0.0, block, "the family declares no producer op"))
                continue
            try:
                op = layer.get_submodule(producer)
            except AttributeError:
                raise UnsupportedModelError(
                    f"{name}.smoothing_producers names '{producer}', which decoder layer {layer_index} "
                    f"({type(layer).__name__}) does not have; fix smoothing_producers for this family."
                ) from None
            if isinstance(op, nn.Linear):
                skipped = None
                if op.out_features != width:
                    skipped = (
                        f"{producer} has {op.out_features} outputs but {group[0]} {width} inputs (grouped-query "
                        "attention): no exact per-channel fold"
                    )
                plan.append(ScaleFold(tuple(group), producer, "linear", 0.0, block, skipped))
                continue
            self._check_norm_fold(op, width, f"decoder layer {layer_index} {producer}")
            plan.append(ScaleFold(tuple(group), producer, "norm", self.norm_weight_offset, block))
        return plan

    def _check_norm_fold(self, norm: nn.Module, width: int, where: str) -> None:
        from lightning_tlq.core.smoothing import fold_into_norm_

        weight = getattr(norm, "weight", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (width,):
            raise UnsupportedModelError(
                f"{where} ({type(norm).__name__}) has no per-channel weight of width {width} to fold scales into; "
                f"awq, smoothquant and mbq do not support {type(self).__name__} as it is."
            )
        probe = copy.deepcopy(norm)
        probe = probe.to_empty(device="cpu") if weight.is_meta else probe.to("cpu")
        probe = probe.float()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in probe.parameters():
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            x = torch.randn(3, width, generator=gen)
            s = torch.rand(width, generator=gen) + 0.5
            expected = probe(x) / s
            fold_into_norm_(probe.weight, getattr(probe, "bias", None), s, self.norm_weight_offset)
            ok = torch.allclose(probe(x), expected, rtol=1e-4, atol=1e-6)
        if not ok:
            form = "(1 + weight) * n(x)" if self.norm_weight_offset else "weight * n(x)"
            raise UnsupportedModelError(
                f"{where} ({type(norm).__name__}) does not compute {form}: dividing its weight by s does not divide "
                f"its output by s, so awq, smoothquant and mbq cannot fold scales into it. Set norm_weight_offset "
                f"in {type(self).__name__} to the norm's form (1 for Gemma-style (1 + weight) norms), or use rtn, "
                "gptq or tlq."
            )
