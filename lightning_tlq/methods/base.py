"""What a calibration method is to the pipeline: a handler that declares what it needs and does its own solve.

The loop and the layer stage never compare method names; they ask the method's handler:

- :meth:`Method.needs_importance`: run the importance backward (token weights or raw gradients) for it;
- :attr:`Method.importance_score`: the score it must collect, whatever ``importance.score`` says (or None);
- :attr:`Method.selects_tokens`: build a token-level calibration set per layer from the importance;
- :attr:`Method.solve_statistic`: which input statistic its solve needs: ``"none"`` (rounding), ``"plain"``
  (``sum_t x_t x_t^T`` over every real token) or ``"weighted"`` (importance x token-set multiplier per token);
- :attr:`Method.smoothing`: the per-input-channel scale search it runs before rounding (or None);
- :meth:`Method.after_importance`: per-run state derived from the raw scores (mbq's vision weights);
- :meth:`Method.quantize`: one module's solve, given its statistics.

Adding a method is one module that subclasses :class:`Method` (or one of the two solve mixins below), decorates it
with :func:`~lightning_tlq.methods.register_method`, and is imported in ``methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor

from lightning_tlq.core.gptq import gptq_quantize, gptq_quantize_shared
from lightning_tlq.core.gptq_lean import gptq_quantize_lean, gptq_quantize_shared_lean
from lightning_tlq.core.quantizer import QuantResult, rtn

if TYPE_CHECKING:
    from lightning_tlq.config import ImportanceArgs, QuantArgs
    from lightning_tlq.keys import ModuleKey

SolveStatistic = Literal["none", "plain", "weighted"]


@dataclass(frozen=True)
class SmoothingRecipe:
    """How a scale-search method builds and judges its candidate scales (see :mod:`lightning_tlq.smoothing`)."""

    weight_only: Literal["awq", "smoothquant"]
    """Candidate family without activation quantization: AWQ's ``mean|x|^alpha`` or SmoothQuant's formula."""
    with_act_bits: Literal["awq", "smoothquant"]
    """Candidate family with ``quant.act_bits``."""
    grid: bool
    """Search the alpha grid (``quant.scale_grid``); False uses ``quant.smoothquant_alpha`` alone."""
    objective: Literal["mse", "mbq"]
    """``mse``: output MSE over real tokens; ``mbq``: vision/answer-weighted MAE with per-layer vision weights."""
    clip: bool
    """Supports ``quant.awq_clip``."""

    def candidates(self, quant: QuantArgs) -> Literal["awq", "smoothquant"]:
        return self.with_act_bits if quant.act_bits is not None else self.weight_only


@dataclass
class ModuleStats:
    """The accumulated statistics one module's solve reads (Hessians already reduced to its owner rank)."""

    H: Tensor | None
    """The solve statistic (``[in, in]``, or ``[G, in, in]`` with importance groups); None for rounding methods."""
    tokens: int = 0
    weight_sum: float = 0.0
    cross: Tensor | None = None
    """``quant.target = fp``: the GPTAQ cross term paired with ``H``."""
    lean: bool = False
    """Solve with the least memory (``memory.profile=low``; same result: :mod:`lightning_tlq.core.gptq_lean`)."""
    reuse_h: bool = False
    """With ``lean``: nothing reads ``H`` after the solve, whose storage may hold the factorisation."""


class Method:
    """Base handler: a method that rounds to nearest and needs nothing (override what differs)."""

    name: ClassVar[str] = ""
    importance_score: ClassVar[str | None] = None
    selects_tokens: ClassVar[bool] = False
    solve_statistic: ClassVar[SolveStatistic] = "none"
    smoothing: ClassVar[SmoothingRecipe | None] = None
    supports_target_fp: ClassVar[bool] = False
    supports_vision: ClassVar[bool] = True
    uses_act_order: ClassVar[bool] = False
    """Its solve honours ``quant.act_order`` (recorded in exported metadata)."""

    def needs_importance(self, importance: ImportanceArgs) -> bool:
        """Whether calibration must run the importance backward for this method (metrics aside)."""
        return False

    def validate(self, quant: QuantArgs) -> None:
        """Raise ``ValueError`` naming the flag when ``quant`` asks for something this method cannot do."""
        if quant.target == "fp" and not self.supports_target_fp:
            raise ValueError(
                f"quant.target='fp' needs a GPTQ-based method (gptq or tlq), not quant.method={self.name!r}."
            )
        if quant.vision and not self.supports_vision:
            raise ValueError(
                f"quant.method={self.name} quantizes the language model only: quant.vision=true is not supported "
                "with awq, smoothquant or mbq. Use quant.vision=false, or quant.method rtn, gptq or tlq."
            )
        if quant.awq_clip and not (self.smoothing is not None and self.smoothing.clip):
            raise ValueError(f"quant.awq_clip=true applies to quant.method awq or mbq, not {self.name!r}.")

    def after_importance(
        self, scores: Mapping[ModuleKey, Sequence[Tensor]], masks: Sequence[Any], collective: Any, adapter: Any
    ) -> dict[ModuleKey, float]:
        """Per-run values derived from the raw importance scores, keyed by ``(layer, module)`` (default none)."""
        return {}

    def scale_search_weights(
        self, state: Mapping[ModuleKey, float], index: int, plan: Sequence[Any]
    ) -> dict[str, float] | None:
        """Vision-token weights for layer ``index``'s scale search, ``block output module -> weight``, from
        :meth:`after_importance`'s ``state``; None weighs every token alike (default)."""
        return None

    def quantize(
        self, weight: Tensor, stats: ModuleStats, quant: QuantArgs, *, module: str, where: str, smoothing: Any = None
    ) -> QuantResult:
        """Quantize one module's full-precision ``weight`` (``[out, in]``).

        Args:
            module: the module's name inside its layer (keys the smoothing's clip bounds).
            where: how messages name the module, e.g. ``"layer 3 mlp.down_proj"``.
            smoothing: the layer's :class:`~lightning_tlq.smoothing.LayerSmoothing` for scale-search methods.
        """
        clipped = smoothing.clipped(module, weight) if smoothing is not None else weight
        return rtn(clipped, quant.spec)

    def quantize_shared(
        self,
        weights: Sequence[Tensor],
        stats: ModuleStats,
        quant: QuantArgs,
        *,
        modules: Sequence[str],
        wheres: Sequence[str],
        smoothing: Any = None,
    ) -> list[QuantResult]:
        """Quantize modules that read one input and share ``stats`` (one result each, as :meth:`quantize` gives
        it); the default solves them one by one."""
        return [
            self.quantize(w, stats, quant, module=m, where=wh, smoothing=smoothing)
            for w, m, wh in zip(weights, modules, wheres)
        ]


class GPTQSolve(Method):
    """Mixin for methods solved by GPTQ on their accumulated statistic (with GPTAQ's cross term under target fp)."""

    supports_target_fp = True
    uses_act_order = True

    def quantize(
        self, weight: Tensor, stats: ModuleStats, quant: QuantArgs, *, module: str, where: str, smoothing: Any = None
    ) -> QuantResult:
        _check_tokens(stats, where)
        solve = partial(gptq_quantize_lean, reuse_h=stats.reuse_h) if stats.lean else gptq_quantize
        return solve(weight, stats.H, quant.spec, name=where, **_solve_options(stats, quant))

    def quantize_shared(
        self,
        weights: Sequence[Tensor],
        stats: ModuleStats,
        quant: QuantArgs,
        *,
        modules: Sequence[str],
        wheres: Sequence[str],
        smoothing: Any = None,
    ) -> list[QuantResult]:
        """One factorisation of the shared Hessian, the rows of all weights in one column loop."""
        _check_tokens(stats, wheres[0])
        if len(weights) == 1:
            return [self.quantize(weights[0], stats, quant, module=modules[0], where=wheres[0])]
        shared = partial(gptq_quantize_shared_lean, reuse_h=stats.reuse_h) if stats.lean else gptq_quantize_shared
        return shared(  # type: ignore[return-value]
            weights, stats.H, quant.spec, names=wheres, **_solve_options(stats, quant)
        )


def _solve_options(stats: ModuleStats, quant: QuantArgs) -> dict[str, Any]:
    """The GPTQ solve's keyword arguments common to one module and shared modules."""
    return {
        "block_size": quant.block_size,
        "damp": quant.damp,
        "act_order": quant.act_order,
        "cross": stats.cross,
        "kernel": quant.kernel,
        "factor_precision": quant.factor_precision,
    }


def _check_tokens(stats: ModuleStats, where: str) -> None:
    if stats.H is None or stats.tokens == 0 or stats.weight_sum == 0:
        raise RuntimeError(f"{where[0].upper()}{where[1:]}: no calibration token reached this module.")
