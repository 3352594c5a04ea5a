"""The events a calibration emits, declared in one place.

:class:`CalibrationObserver` lists every hook the calibration loop calls, with its arguments; subclass it and
override what you need, then register the instance as a Fabric callback (``Fabric(callbacks=[...])``; with the
Trainer, :class:`~lightning_tlq.callbacks.TLQCallback` forwards them). The loop emits only these names
(:func:`emit` refuses others), through ``fabric.call``, which passes each hook the keyword arguments it accepts.
Every hook runs on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_tlq.keys import ModuleKey


class CalibrationObserver:
    """No-op base: every hook of a calibration run, in the order they fire."""

    def on_calibration_start(
        self, fabric: Any, num_layers: int, batch_sizes: Sequence[int], importance_passes: int, start_layer: int
    ) -> None:
        """Before any work; ``start_layer > 0`` when resuming, ``importance_passes`` backward sweeps per batch."""

    def on_importance_start(self, fabric: Any, targets: Mapping[ModuleKey, nn.Module]) -> None:
        """The importance backward starts; ``targets`` are the modules whose output gradients are scored."""

    def on_importance_batch_start(self, fabric: Any, batch_idx: int) -> None:
        """One backward sweep over batch ``batch_idx`` starts (once per layer and batch when layer-wise)."""

    def on_importance_batch_end(self, fabric: Any, batch_idx: int) -> None:
        """That sweep ended."""

    def on_importance_end(self, fabric: Any) -> None:
        """The importance backward is done."""

    def on_importance_ready(
        self,
        fabric: Any,
        importance: Mapping[ModuleKey, Sequence[Tensor]],
        vision_scores: Mapping[ModuleKey, Sequence[Tensor]],
        method_state: Mapping[ModuleKey, float],
    ) -> None:
        """Post-processed decoder token weights, raw vision scores and the method's per-run values (mbq: vision
        weights) are final (not called when a run resumes after them)."""

    def on_vision_stage_start(self, fabric: Any, name: str) -> None:
        """A vision-tower stage (``vision.<i>`` or ``projector``) starts (``quant.vision``)."""

    def on_vision_stage_end(self, fabric: Any, name: str, record: Mapping[str, Any]) -> None:
        """That stage is calibrated; ``record`` as in the report."""

    def on_vision_end(
        self,
        fabric: Any,
        modules: Mapping[ModuleKey, nn.Module],
        results: Mapping[ModuleKey, Any],
        records: Sequence[Any],
    ) -> None:
        """The whole vision tower is calibrated."""

    def on_layer_start(self, fabric: Any, index: int) -> None:
        """Decoder layer ``index`` starts."""

    def on_layer_fp_hidden(self, fabric: Any, index: int, fp_hidden: Sequence[Tensor]) -> None:
        """``quant.target=fp``: the full-precision stream after layer ``index`` (before ``on_layer_end``)."""

    def on_layer_end(
        self,
        fabric: Any,
        index: int,
        record: Mapping[str, Any],
        layer: nn.Module,
        results: Mapping[str, Any],
        hidden: Sequence[Tensor],
    ) -> None:
        """Layer ``index`` is quantized in place (``results`` keyed by module name in the layer); ``hidden`` are its
        quantized-path outputs (next layer's inputs)."""

    def on_calibration_end(self, fabric: Any, records: Sequence[Mapping[str, Any]]) -> None:
        """Every layer is done; ``records`` as in the report."""


HOOKS: frozenset[str] = frozenset(n for n in vars(CalibrationObserver) if n.startswith("on_"))
"""The names :func:`emit` accepts."""


def emit(fabric: Any, hook: str, **kwargs: Any) -> None:
    """Call ``hook`` on ``fabric``'s callbacks (each gets the keyword arguments it accepts)."""
    if hook not in HOOKS:
        raise ValueError(f"{hook!r} is not a declared calibration hook; declare it on CalibrationObserver.")
    fabric.call(hook, fabric=fabric, **kwargs)
