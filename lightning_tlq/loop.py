"""The Fabric calibration loop: importance pass, optional vision tower, then the decoder layer by layer on the
quantized path.

Every rank runs this on its own shard of the calibration samples (``sample_id`` in each batch gives the global
sample index). Statistics that must be global -- importance normalisation, the token-set threshold, Hessians --
go through :class:`~lightning_tlq.distributed.Collective`, so the result does not depend on the number of ranks
beyond floating-point summation order. The loop only sequences the parts:

- :class:`~lightning_tlq.importance_pass.ImportancePass`: backward and token weights;
- :class:`~lightning_tlq.tokenweights.LayerWeightsAhead`: each layer's token weights and token set;
- :class:`~lightning_tlq.activations.LayerReplay`: captured inputs, single-layer replay, activation storage;
- :class:`~lightning_tlq.stage.LayerStage`: one layer's accumulate -> reduce -> solve -> propagate;
- :class:`~lightning_tlq.vision.VisionCalibration`: the vision tower's stages (``quant.vision``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.activations import LayerReplay
from lightning_tlq.adapters.base import CapturedInputs, move_to
from lightning_tlq.core import gptq_graph
from lightning_tlq.data import TokenMasks, token_masks
from lightning_tlq.distributed import Collective
from lightning_tlq.hostmem import HostStaging
from lightning_tlq.importance import TokenImportance
from lightning_tlq.importance_pass import Importance, ImportancePass
from lightning_tlq.keys import ModuleKey
from lightning_tlq.losses import check_has_answer
from lightning_tlq.lowmem import MemoryPlan
from lightning_tlq.module import TLQModule
from lightning_tlq.observers import emit
from lightning_tlq.placement import LayerPlacement
from lightning_tlq.resume import LayerCheckpoint, ResumeState
from lightning_tlq.settings import CalibrationSettings
from lightning_tlq.smoothing import LayerSmoothing
from lightning_tlq.stage import LayerStage
from lightning_tlq.tokenweights import LayerWeightsAhead
from lightning_tlq.vision import VisionCalibration


class CalibrationLoop:
    """Calibrates the decoder layers of ``module``'s VLM in place, layer by layer on the quantized path.

    Args:
        fabric: a launched ``lightning.fabric.Fabric`` (or :class:`~lightning_tlq.callbacks.TrainerFabric`): its
            device runs the work, its collectives reduce, and its callbacks receive the events declared by
            :class:`~lightning_tlq.observers.CalibrationObserver`.
        module: the wrapped model (``configure_model`` already called; weights on the CPU).
        settings: the calibration settings.
        collector: collects the importance scores (default: a :class:`TokenImportance` for ``settings.importance``).
        checkpoint: makes the run resumable (saves after each layer, restores a finished prefix).

    With ``quant.vision`` the importance backward continues into the vision tower, the tower and projector are
    calibrated after the importance pass (records in :attr:`vision_records`), and the decoder inputs are then
    captured again, through the quantized tower. With ``quant.target = "fp"`` (GPTAQ) the full-precision model's
    layer inputs are propagated beside the quantized path's (kept and checkpointed alike).
    """

    def __init__(
        self,
        fabric: Any,
        module: TLQModule,
        settings: CalibrationSettings,
        *,
        collector: TokenImportance | None = None,
        checkpoint: LayerCheckpoint | None = None,
    ) -> None:
        self.fabric, self.module, self.adapter = fabric, module, module.adapter
        self.settings, self.quant, self.method = settings, settings.quant, settings.quant.handler
        score = settings.importance.score
        self.collector = collector or TokenImportance(score, settings.importance.groups)
        if settings.needs_importance and self.collector.score != score:
            raise ValueError(
                f"quant.method={self.quant.method} needs importance.score={score!r}, but the collector collects "
                f"{self.collector.score!r} scores: pass TokenImportance({score!r}) or none."
            )
        self.checkpoint = checkpoint
        self.collective = Collective()
        self.results: dict[ModuleKey, Any] = {}
        self.phase_seconds: dict[str, float] = {}
        self.start_layer = 0
        """First layer this run calibrated (> 0 when it resumed an interrupted run)."""
        self.placement = LayerPlacement(
            self.adapter.decoder_layers(), fabric.device, settings.memory.layerwise, settings.memory.pin_layers
        )
        self.plan = MemoryPlan.from_args(settings.memory)
        self.replay = LayerReplay(self.adapter, fabric.device, self.plan.offload_activations)
        self._staging = HostStaging()  # results to the host through one reusable page-locked buffer
        self.vision: VisionCalibration | None = None
        if self.quant.vision:
            self.vision = VisionCalibration(
                self.adapter, settings, collective=self.collective, call=lambda event, **kw: emit(fabric, event, **kw)
            )
        self.vision_records: list[dict[str, Any]] = []
        self.method_state: dict[ModuleKey, float] = {}
        """The method's per-run values derived from importance (mbq: ``(layer, block output)`` -> vision weight)."""

    # --- driver ------------------------------------------------------------------------------------------------
    def run(self, batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Calibrate on this rank's batches; returns one record per decoder layer (identical on every rank)."""
        if not batches:
            raise ValueError("Calibration got no batches on this rank: the dataset is empty or too small.")
        for batch in batches:
            check_has_answer(batch["labels"])
        layers = self.adapter.decoder_layers()
        vision_modules = self.vision.targets() if self.vision is not None else None
        resumed = self.checkpoint.restore(self.fabric, layers, vision_modules) if self.checkpoint else None
        self.start_layer = resumed.next_layer if resumed is not None else 0
        emit(
            self.fabric,
            "on_calibration_start",
            num_layers=len(layers),
            batch_sizes=[int(b["input_ids"].shape[0]) for b in batches],
            importance_passes=len(layers) if self.placement.layerwise else 1,
            start_layer=self.start_layer,
        )
        with self.placement.rest_on_device(self.module.model), gptq_graph.released():  # the solver's CUDA graphs
            batches = [move_to(b, self.fabric.device) for b in batches]
            masks = [token_masks(b, self.adapter.image_token_id) for b in batches]
            sample_ids = _sample_ids(batches)
            captured = self._capture(batches)
            if self.vision is None:  # embeddings and vision tower are done with: only the head runs from here
                self._park(modified=False)
            with self._timed("importance"):
                importance = self._importance(batches, masks, captured, sample_ids, resumed)
            if self.vision is not None:
                self._calibrate_vision(batches, sample_ids, importance, resumed)
                captured = self._capture(batches)  # the decoder now sees what the quantized tower produces
                self._park(modified=True)
            host_masks = [TokenMasks(m.image.cpu(), m.text.cpu(), m.answer.cpu(), m.pad.cpu()) for m in masks]
            self.plan.before_layers(self.placement)
            with self._timed("layers"):  # the token sets are chosen on the host: its masks, copied once
                records = self._layers(captured, importance.decoder, host_masks, sample_ids, resumed)
        emit(self.fabric, "on_calibration_end", records=records)
        return records

    def _importance(
        self,
        batches: Sequence[dict[str, Tensor]],
        masks: Sequence[TokenMasks],
        captured: Sequence[CapturedInputs],
        sample_ids: Sequence[Tensor],
        resumed: ResumeState | None,
    ) -> Importance:
        if resumed is not None:
            importance = Importance(resumed.importance, resumed.vision_scores, dict(resumed.method_state or {}))
        else:
            importance = ImportancePass(
                self.fabric,
                self.module,
                self.collector,
                self.placement,
                self.replay,
                self.collective,
                self.settings,
                self.vision,
            ).run(batches, masks, captured, sample_ids)
            emit(
                self.fabric,
                "on_importance_ready",
                importance=importance.decoder,
                vision_scores=importance.vision,
                method_state=importance.method_state,
            )
        self.method_state = importance.method_state
        return importance

    def _park(self, modified: bool) -> None:
        """Layer-wise on an accelerator: free the device memory of all but the decoder layers and the head."""
        if self.placement.moves:
            self.placement.park(self.adapter.head_modules(), modified=modified)

    def _calibrate_vision(
        self,
        batches: Sequence[dict[str, Tensor]],
        sample_ids: Sequence[Tensor],
        importance: Importance,
        resumed: ResumeState | None,
    ) -> None:
        assert self.vision is not None
        if resumed is not None and resumed.vision_results is not None:  # the tower was calibrated before the crash
            self.vision.results = dict(resumed.vision_results)
            self.vision_records = list(resumed.vision_records or [])
        else:
            with self._timed("vision"):
                self.vision_records = self.vision.run(batches, sample_ids, importance.vision)
            emit(
                self.fabric,
                "on_vision_end",
                modules=self.vision.targets(),
                results=self.vision.results,
                records=self.vision_records,
            )
        self.results.update(self.vision.results)

    def _capture(self, batches: Sequence[dict[str, Tensor]]) -> list[CapturedInputs]:
        """Decoder inputs; a calibrated vision tower runs with its W4A8 activation quantization, as at inference."""
        vision_modules = self.vision.targets().values() if self.vision is not None and self.vision.results else ()
        with self._timed("capture"):
            captured = self.replay.capture(
                batches,
                act_bits=self.quant.act_bits,
                quantized_vision=vision_modules,
                skip_layers=self.placement.layerwise,
            )
            self.plan.release_captured(captured, self.replay.store)
            return captured

    # --- decoder layers ----------------------------------------------------------------------------------------
    def _layers(
        self,
        captured: Sequence[CapturedInputs],
        importance: dict[ModuleKey, list[Tensor]],
        masks: Sequence[TokenMasks],
        sample_ids: Sequence[Tensor],
        resumed: ResumeState | None = None,
    ) -> list[dict[str, Any]]:
        store = self.replay.store
        hidden = [store(c.hidden) for c in captured]
        # target fp: the full-precision model's layer inputs; at layer 0 they are the quantized path's
        fp_hidden = list(hidden) if self.quant.target == "fp" else None
        records = []
        if resumed is not None:  # continue after the last finished layer, with its saved outputs
            records = list(resumed.records)
            self.results.update(resumed.results)
            if resumed.hidden is not None:
                hidden = [store(h.to(self.fabric.device)) for h in resumed.hidden]
                fp_hidden = self._resumed_fp_hidden(resumed)
        self.replay.check_finite(self.start_layer - 1, hidden)

        ahead = LayerWeightsAhead(
            self.adapter.module_groups, importance, masks, sample_ids, select=self.method.selects_tokens,
            token_set=self.settings.token_set, collective=self.collective,
            share_inputs=self.settings.importance.granularity == "input",
        )  # fmt: skip
        with ahead as weights:
            for index in range(self.start_layer, self.adapter.num_layers):
                record, hidden, fp_hidden = self._layer(index, captured, hidden, fp_hidden, weights)
                records.append(record)
        return records

    def _layer(
        self,
        index: int,
        captured: Sequence[CapturedInputs],
        hidden: list[Tensor],
        fp_hidden: list[Tensor] | None,
        token_weights: LayerWeightsAhead,
    ) -> tuple[dict[str, Any], list[Tensor], list[Tensor] | None]:
        """Calibrate decoder layer ``index`` in place; its record and the next layer's inputs (both paths)."""
        emit(self.fabric, "on_layer_start", index=index)
        start = time.perf_counter()
        layer = self.placement.onload(index)
        if self.plan.prefetch_before_solve:
            self.placement.prefetch(index + 1)
        groups = self.adapter.module_groups(index)
        with self._timed("layers.token_set"):  # the wait for them, where they were chosen ahead
            weights, set_record = token_weights.get(index)
        if index + 1 < self.adapter.num_layers:
            token_weights.start(index + 1)
        stage = LayerStage(
            index,
            layer,
            groups,
            self.quant,
            collective=self.collective,
            metrics=self.settings.metrics,
            groups=self.settings.importance.groups,
            smoothing=self._smoothing(index, layer),
            staging=self._staging,
            lean_solve=self.plan.lean_solve,
            replay_submodules=not self.plan.offload_activations,
        )
        hidden = stage.run(self.replay.layer_forward(index, captured), hidden, weights, fp_inputs=fp_hidden)
        self.placement.prefetch(index + 1)  # no-op if issued above
        for step, sec in stage.seconds.items():
            self.phase_seconds[f"layers.{step}"] = self.phase_seconds.get(f"layers.{step}", 0.0) + sec
        self.placement.offload(index, modified=True)
        self.replay.check_finite(index, hidden)
        if fp_hidden is not None:
            fp_hidden = stage.fp_outputs
            assert fp_hidden is not None
            self.replay.check_finite(index, fp_hidden, path="full-precision")
        for name, result in stage.results.items():
            self.results[ModuleKey(index, name)] = result
        record = {"index": index, **set_record, "seconds": time.perf_counter() - start}
        record["modules"] = {name: r.record for name, r in stage.results.items()}
        if fp_hidden is not None:  # before on_layer_end, which commits the checkpoint
            emit(self.fabric, "on_layer_fp_hidden", index=index, fp_hidden=fp_hidden)
        emit(
            self.fabric,
            "on_layer_end",
            index=index,
            record=record,
            layer=layer,
            results=stage.results,
            hidden=hidden,
        )
        return record, hidden, fp_hidden

    def _smoothing(self, index: int, layer: torch.nn.Module) -> LayerSmoothing | None:
        if self.method.smoothing is None:
            return None
        plan = self.adapter.smoothing_plan(index)
        weights = self.method.scale_search_weights(self.method_state, index, plan)
        return LayerSmoothing(
            index,
            layer,
            plan,
            self.quant,
            collective=self.collective,
            vision_weights=weights,
            clip_excluded=self.adapter.clip_excluded,
        )

    def _resumed_fp_hidden(self, resumed: ResumeState) -> list[Tensor] | None:
        if self.quant.target != "fp":
            return None
        if resumed.fp_hidden is None:
            raise ValueError(
                "quant.target='fp' cannot resume this checkpoint: it holds no full-precision activations for layer "
                f"{resumed.next_layer}. Pass --resume false --overwrite true to start over."
            )
        return [self.replay.store(h.to(self.fabric.device)) for h in resumed.fp_hidden]

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"tlq.{phase}"):  # a named range in profiler traces
                yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start


def _sample_ids(batches: Sequence[dict[str, Tensor]]) -> list[Tensor]:
    """Per batch, the global ids of its samples (``sample_id``, else numbered in order)."""
    if all("sample_id" in b for b in batches):
        return [b["sample_id"].cpu() for b in batches]
    ids, start = [], 0
    for b in batches:
        n = b["input_ids"].shape[0]
        ids.append(torch.arange(start, start + n))
        start += n
    return ids
