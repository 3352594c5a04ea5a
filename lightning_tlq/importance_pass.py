"""The importance pass: one backward of the full-precision model's SFT loss per calibration batch, whole or one
decoder layer at a time, whose output gradients :class:`~lightning_tlq.importance.TokenImportance` reduces to
per-token scores; then the scores are post-processed over every rank's tokens into token weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.activations import LayerReplay, check_loss
from lightning_tlq.adapters.base import CapturedInputs
from lightning_tlq.core.importance import postprocess_flat, scatter_modules
from lightning_tlq.data import TokenMasks
from lightning_tlq.importance import TokenImportance
from lightning_tlq.keys import ModuleKey
from lightning_tlq.losses import answer_loss_from_hidden
from lightning_tlq.observers import emit

_range = torch.profiler.record_function  # named ranges in profiler traces (benchmark_speed.py --trace)


@dataclass
class Importance:
    """What the importance pass produced (identical layout on every rank, values for this rank's tokens)."""

    decoder: dict[ModuleKey, list[Tensor]] = field(default_factory=dict)
    """``(layer, module)`` -> per batch ``[B, S, G]`` token weights (mean 1 over all ranks' real tokens)."""
    vision: dict[ModuleKey, list[Tensor]] = field(default_factory=dict)
    """Raw scores of vision-tower modules (post-processed per stage by the vision calibration)."""
    method_state: dict[ModuleKey, float] = field(default_factory=dict)
    """The method's per-run values derived from the raw scores (``Method.after_importance``)."""


class ImportancePass:
    """Runs the importance backward and post-processes the scores.

    Args:
        fabric: device, collectives and the ``on_importance_*`` events.
        module: the wrapped model (its ``sft_loss`` for a whole-model backward).
        collector: collects the raw scores from output-gradient hooks.
        placement: where the decoder layers are (a layer-wise backward moves them one at a time).
        replay: runs single decoder layers on captured inputs.
        collective: reductions over ranks.
        settings: :class:`~lightning_tlq.settings.CalibrationSettings`.
        vision: the vision calibration (``quant.vision``): the backward continues into the tower.
    """

    def __init__(
        self,
        fabric: Any,
        module: Any,
        collector: TokenImportance,
        placement: Any,
        replay: LayerReplay,
        collective: Any,
        settings: Any,
        vision: Any = None,
    ) -> None:
        self.fabric, self.module, self.collector = fabric, module, collector
        self.placement, self.replay, self.collective = placement, replay, collective
        self.settings, self.vision = settings, vision
        self.adapter = module.adapter

    def run(
        self,
        batches: Sequence[dict[str, Tensor]],
        masks: Sequence[TokenMasks],
        captured: Sequence[CapturedInputs],
        sample_ids: Sequence[Tensor],
    ) -> Importance:
        """Backward, then token weights; an empty :class:`Importance` when the run needs none. ``sample_ids``: per
        batch its samples' global ids (they seed the draws of ``importance.labels="model"``)."""
        if not self.settings.needs_importance:
            return Importance()
        emit(self.fabric, "on_importance_start", targets=self.targets())
        self.collector.on_importance_start(self.fabric, self.targets())
        try:
            draws = sample_ids if self.settings.importance.labels == "model" else [None] * len(batches)
            if self.placement.layerwise:
                self._backward_layerwise(batches, captured, draws)
            else:
                self._backward_whole(batches, draws)
        finally:
            self.collector.on_importance_end(self.fabric)
            emit(self.fabric, "on_importance_end")
        scores = self.collector.scores
        with _range("tlq.importance.postprocess"):
            state = self.settings.quant.handler.after_importance(scores, masks, self.collective, self.adapter)
            decoder = {k: v for k, v in scores.items() if not k.is_vision}
            weights = self._postprocess(decoder, masks)
        return Importance(weights, {k: v for k, v in scores.items() if k.is_vision}, state)

    def targets(self) -> dict[ModuleKey, nn.Module]:
        """Every module whose output gradient is scored: the vision tower's (with ``quant.vision``), then every
        decoder layer's target modules, keyed ``(layer, module)``."""
        layers = self.adapter.decoder_layers()
        targets = self.vision.targets() if self.vision is not None else {}
        targets.update(
            (ModuleKey(i, name), layers[i].get_submodule(name))
            for i in range(len(layers))
            for group in self.adapter.module_groups(i)
            for name in group
        )
        return targets

    def _batch(self, batch_idx: int, start: bool) -> None:
        hook = "on_importance_batch_start" if start else "on_importance_batch_end"
        getattr(self.collector, hook)(self.fabric, batch_idx)
        emit(self.fabric, hook, batch_idx=batch_idx)

    def _backward_whole(self, batches: Sequence[dict[str, Tensor]], draws: Sequence[Tensor | None]) -> None:
        for batch_idx, batch in enumerate(batches):
            self._batch(batch_idx, start=True)
            with torch.enable_grad():
                loss = self.module.sft_loss(batch, vision_grads=self.vision is not None, draw_ids=draws[batch_idx])
                check_loss(loss, batch_idx)
                loss.backward()
            self._batch(batch_idx, start=False)

    def _backward_layerwise(
        self,
        batches: Sequence[dict[str, Tensor]],
        captured: Sequence[CapturedInputs],
        draws: Sequence[Tensor | None],
    ) -> None:
        """Backward of the SFT loss one decoder layer at a time; equals a whole-model backward.

        Forward: store every layer's input. Head: loss and ``dL/dh_L``. Backward: for the last layer down to the
        first, recompute the layer with its input requiring grad and back-propagate the incoming gradient.
        """
        n_layers, device = self.adapter.num_layers, self.fabric.device
        inputs: list[list[Tensor]] = [[self.replay.store(c.hidden) for c in captured]]
        for index in range(n_layers):
            self.placement.onload(index)
            self.placement.prefetch(index + 1)
            with _range("tlq.importance.forward"):
                inputs.append(self.replay.propagate(index, captured, inputs[-1]))
            self.placement.offload(index)
        grads, last = [], inputs.pop()
        with _range("tlq.importance.head"):
            for b in range(len(last)):
                h = last[b].to(device, non_blocking=True).detach().requires_grad_(True)  # from page-locked host memory
                last[b] = None  # type: ignore[call-overload]  # each batch's gradient replaces its output
                with torch.enable_grad():
                    loss = answer_loss_from_hidden(self.adapter.head, h, batches[b]["labels"], draws[b])
                    check_loss(loss, b)
                    (grad,) = torch.autograd.grad(loss, h)
                grads.append(grad)
                del h, loss
        if self.vision is None:  # nothing needs the head on the device any more (embeddings, tower: parked)
            self.placement.park((), modified=False)
        for index in reversed(range(n_layers)):
            self.placement.onload(index)
            self.placement.prefetch(index - 1)
            layer_inputs = inputs.pop()
            for b in range(len(batches)):
                self._batch(b, start=True)
                h = layer_inputs[b].to(device, non_blocking=True).detach().requires_grad_(True)
                with torch.enable_grad(), _range("tlq.importance.backward"):
                    out = self.adapter.run_layer(index, h, captured[b].layer_kwargs[index])
                    out.backward(grads[b])
                grads[b] = h.grad
                self._batch(b, start=False)
            self.placement.offload(index)
        if self.vision is not None:  # dL/dh_0 at the image positions continues into the tower
            for b, batch in enumerate(batches):
                self._batch(b, start=True)
                self.vision.backward_from_decoder_input(batch, grads[b])
                self._batch(b, start=False)

    def _postprocess(
        self, scores: Mapping[ModuleKey, list[Tensor]], masks: Sequence[TokenMasks]
    ) -> dict[ModuleKey, list[Tensor]]:
        """Normalise / floor / clip each module's scores over *all* ranks' tokens (gathered), keep this rank's.

        Post-processing treats every column on its own, so the ``[N, modules x groups]`` matrix of every real
        token's scores takes one gather and one call for all modules.
        """
        if not scores:
            return {}
        args = self.settings.importance
        names = list(scores)
        valid = [(~m.pad).cpu() for m in masks]
        is_vision = torch.cat([m.image.cpu()[v] for m, v in zip(masks, valid)])
        n_local = int(is_vision.numel())
        offset = self.collective.exclusive_offset(n_local)
        global_vision = self.collective.gather_cat(is_vision)
        local = torch.cat([torch.stack([scores[n][b].cpu() for n in names], -2)[v] for b, v in enumerate(valid)])
        flat = postprocess_flat(
            self.collective.gather_cat(local.flatten(1)),  # [N, modules x groups]
            global_vision,
            floor=args.floor,
            clip_quantile=args.clip_quantile,
            mode=args.mode,
        )
        mine = flat[offset : offset + n_local].view(local.shape)
        per_batch = scatter_modules(mine, valid)  # per batch [modules, B, S, G]
        return {name: [full[m] for full in per_batch] for m, name in enumerate(names)}
