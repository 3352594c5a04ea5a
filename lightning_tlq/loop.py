"""The Fabric calibration loop: importance pass, token set, then quantization-exposed layer-wise stages.

Every rank runs this on its own shard of the calibration samples (``sample_id`` in each batch gives the global
sample index). Statistics that must be global -- importance normalisation, the token-set threshold, Hessians --
go through :class:`~lightning_tlq.distributed.Collective`, so the result does not depend on the number of ranks
beyond floating-point summation order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.actquant import apply_activation_quant
from lightning_tlq.adapters.base import CapturedInputs, move_to
from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.core.importance import (
    modality_sums,
    postprocess_flat,
    scatter_back,
    scatter_modules,
    vision_weight,
)
from lightning_tlq.core.smoothing import floor_at_median
from lightning_tlq.core.tokenset import mass_threshold, select_tokens, token_uniforms
from lightning_tlq.data import TokenMasks, token_masks
from lightning_tlq.distributed import Collective
from lightning_tlq.hostmem import HostStaging
from lightning_tlq.importance import TokenImportance
from lightning_tlq.module import TLQModule, answer_loss_from_hidden, check_has_answer
from lightning_tlq.placement import LayerPlacement
from lightning_tlq.resume import LayerCheckpoint, ResumeState
from lightning_tlq.smoothing import LayerSmoothing
from lightning_tlq.stage import LayerStage, TokenWeights
from lightning_tlq.vision import VisionCalibration, is_vision_key

log = logging.getLogger(__name__)


def _fingerprint(multiplier: Tensor, valid: Sequence[Tensor], sample_ids: Sequence[Tensor]) -> int:
    """Order-independent digest of a token set: sums of per-token hashes of (sample id, position, multiplier).

    Summed over ranks it is the same for any sharding, so 1-vs-N-rank runs can be compared exactly.
    """
    total, start = 0, 0
    for v, ids in zip(valid, sample_ids):
        n = int(v.sum())
        rows, cols = v.nonzero(as_tuple=True)
        mult = multiplier[start : start + n]
        start += n
        keep = mult > 0
        key = ids[rows[keep]].long() * 1_000_003 + cols[keep].long() * 7919 + (mult[keep] * 1000).round().long()
        total += int((key * 2_654_435_761 % 2_147_483_647).sum())
    return total % (2**50)


class CalibrationLoop:
    """Calibrates the decoder layers of ``module``'s VLM in place, layer by layer on the quantized path.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``; its device runs the work and ``fabric.call`` emits
            ``on_calibration_start(fabric, num_layers, batch_sizes, importance_passes, start_layer)``,
            ``on_importance_*``, ``on_importance_ready(fabric, importance, vision_scores)`` (with ``quant.method=mbq``
            also ``vision_weights``), with ``quant.vision``
            ``on_vision_stage_*`` and ``on_vision_end(fabric, modules, results, records)``,
            ``on_layer_start(fabric, index)``, with ``quant.target = "fp"``
            ``on_layer_fp_hidden(fabric, index, fp_hidden)`` (the full-precision stream after layer ``index``),
            ``on_layer_end(fabric, index, record, layer, results, hidden)`` and ``on_calibration_end(fabric,
            records)`` to its callbacks. When importance is needed (``tlq``, or ``metrics``), one of its callbacks
            must be a :class:`TokenImportance`, which collects the scores (``grad_abs`` scores for ``mbq``). An optional
            :class:`~lightning_tlq.resume.LayerCheckpoint` callback makes the run resumable.
        module: the wrapped model (``configure_model`` already called; weights on the CPU).
        quant, importance, token_set, memory: settings.
        metrics: accumulate the statistics needed to report every module's (weighted) output error.

    With ``quant.vision`` the importance backward continues into the vision tower, the tower and projector are
    calibrated after the importance pass (:class:`VisionCalibration`, records in :attr:`vision_records`), and
    the decoder inputs are then captured again, through the quantized tower.

    With ``quant.target = "fp"`` (GPTAQ) a second list of per-batch hidden states is kept beside the quantized
    path's: the full-precision model's layer inputs, propagated through each layer's original weights before the
    layer is quantized (kept where ``memory.offload_activations`` keeps the quantized path's, and checkpointed).
    """

    def __init__(
        self,
        fabric: Any,
        module: TLQModule,
        quant: QuantArgs,
        importance: ImportanceArgs,
        token_set: TokenSetArgs,
        *,
        memory: MemoryArgs | None = None,
        metrics: bool = True,
    ) -> None:
        self.fabric = fabric
        self.module = module
        self.adapter = module.adapter
        self.quant, self.importance_args, self.token_set = quant, importance, token_set
        self.memory = memory or MemoryArgs()
        self.metrics = metrics
        self.collector = self._find_collector(fabric)
        if quant.method == "mbq" and self.collector.score != "grad_abs":
            raise ValueError(
                f"quant.method=mbq weighs vision tokens by their mean |gradient|, but the TokenImportance callback "
                f"collects {self.collector.score!r} scores: build it with TokenImportance('grad_abs', ...) (the "
                "lightning-tlq entry points do this for mbq)."
            )
        self.collective = Collective()
        self.results: dict[str, Any] = {}
        self.phase_seconds: dict[str, float] = {}
        self.start_layer = 0
        """First layer this run calibrated (> 0 when it resumed an interrupted run)."""
        self.placement = LayerPlacement(self.adapter.decoder_layers(), fabric.device, self.memory.layerwise)
        self._staging = HostStaging()  # results to the host through one reusable page-locked buffer
        self.vision: VisionCalibration | None = None
        if quant.vision:
            self.vision = VisionCalibration(
                self.adapter,
                quant,
                importance,
                token_set,
                collective=self.collective,
                metrics=metrics,
                call=lambda event, **kw: fabric.call(event, fabric=fabric, **kw),
            )
        self.vision_records: list[dict[str, Any]] = []
        self._vision_scores: dict[str, list[Tensor]] = {}
        self.vision_weights: dict[str, float] = {}
        """mbq: ``"<layer>.<block output module>"`` -> the vision weight rho of that layer's attention / MLP."""

    # --- driver ------------------------------------------------------------------------------------------------
    def run(self, batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Calibrate on this rank's batches; returns one record per decoder layer (identical on every rank)."""
        if not batches:
            raise ValueError("Calibration got no batches on this rank: the dataset is empty or too small.")
        for batch in batches:
            check_has_answer(batch["labels"])
        layers = self.adapter.decoder_layers()
        checkpoint = self._find_callback(LayerCheckpoint)
        vision_modules = self.vision.targets() if self.vision is not None else None
        resumed = checkpoint.restore(self.fabric, layers, vision_modules) if checkpoint is not None else None
        self.start_layer = resumed.next_layer if resumed is not None else 0
        self.fabric.call(
            "on_calibration_start",
            fabric=self.fabric,
            num_layers=len(layers),
            batch_sizes=[int(b["input_ids"].shape[0]) for b in batches],
            importance_passes=len(layers) if self.placement.layerwise else 1,
            start_layer=self.start_layer,
        )
        with self.placement.rest_on_device(self.module.model):
            batches = [move_to(b, self.fabric.device) for b in batches]
            masks = [token_masks(b, self.adapter.image_token_id) for b in batches]
            sample_ids = self._sample_ids(batches)
            captured = self._capture(batches)
            if self.vision is None:  # embeddings and vision tower are done with: only the head runs from here
                self._park(modified=False)
            with self._timed("importance"):
                if resumed is None:
                    importance = self._importance(batches, masks, captured)
                    extra = {"vision_weights": self.vision_weights} if self.quant.method == "mbq" else {}
                    self.fabric.call(
                        "on_importance_ready",
                        fabric=self.fabric,
                        importance=importance,
                        vision_scores=self._vision_scores,
                        **extra,
                    )
                else:
                    importance, self._vision_scores = resumed.importance, resumed.vision_scores
                    self.vision_weights = dict(resumed.vision_weights or {})
            if self.vision is not None:
                self._calibrate_vision(batches, sample_ids, resumed)
                captured = self._capture(batches)  # the decoder now sees what the quantized tower produces
                self._park(modified=True)
            host_masks = [TokenMasks(m.image.cpu(), m.text.cpu(), m.answer.cpu(), m.pad.cpu()) for m in masks]
            with self._timed("layers"):  # the token sets are chosen on the host: its masks, copied once
                records = self._layers(captured, importance, host_masks, sample_ids, resumed)
        self.fabric.call("on_calibration_end", fabric=self.fabric, records=records)
        return records

    def _park(self, modified: bool) -> None:
        """Layer-wise on an accelerator: free the device memory of all but the decoder layers and the head."""
        if self.placement.moves:
            self.placement.park(self.adapter.head_modules(), modified=modified)

    def _calibrate_vision(
        self, batches: Sequence[dict[str, Tensor]], sample_ids: Sequence[Tensor], resumed: ResumeState | None
    ) -> None:
        assert self.vision is not None
        if resumed is not None and resumed.vision_results is not None:  # the tower was calibrated before the crash
            self.vision.results = dict(resumed.vision_results)
            self.vision_records = list(resumed.vision_records or [])
        else:
            with self._timed("vision"):
                self.vision_records = self.vision.run(batches, sample_ids, self._vision_scores)
            self.fabric.call(
                "on_vision_end",
                fabric=self.fabric,
                modules=self.vision.targets(),
                results=self.vision.results,
                records=self.vision_records,
            )
        self.results.update(self.vision.results)

    def _capture(self, batches: Sequence[dict[str, Tensor]]) -> list[CapturedInputs]:
        """Decoder inputs; a calibrated vision tower runs with its W4A8 activation quantization, as at inference."""
        vision_modules = self.vision.targets().values() if self.vision is not None and self.vision.results else ()
        with (
            self._timed("capture"),
            torch.no_grad(),
            apply_activation_quant(None, self.quant.act_bits, vision_modules),
        ):
            return [
                self.adapter.capture(self.adapter.forward_inputs(b), skip_layers=self.placement.layerwise)
                for b in batches
            ]

    def _layers(
        self,
        captured: Sequence[CapturedInputs],
        importance: dict[str, list[Tensor]],
        masks: Sequence[TokenMasks],
        sample_ids: Sequence[Tensor],
        resumed: ResumeState | None = None,
    ) -> list[dict[str, Any]]:
        hidden = [self._store(c.hidden) for c in captured]
        # target fp: the full-precision model's layer inputs; at layer 0 they are the quantized path's (the vision
        # tower stays in full precision with target fp)
        fp_hidden = list(hidden) if self.quant.target == "fp" else None
        records = []
        if resumed is not None:  # continue after the last finished layer, with its saved outputs
            records = list(resumed.records)
            self.results.update(resumed.results)
            if resumed.hidden is not None:
                hidden = [self._store(h.to(self.fabric.device)) for h in resumed.hidden]
                fp_hidden = self._resumed_fp_hidden(resumed)
        self._check_finite(self.start_layer - 1, hidden)
        for index in range(self.start_layer, self.adapter.num_layers):
            self.fabric.call("on_layer_start", fabric=self.fabric, index=index)
            start = time.perf_counter()
            layer = self.placement.onload(index)
            self.placement.prefetch(index + 1)
            with self._timed("layers.token_set"):
                weights, set_record = self._token_weights(index, importance, masks, sample_ids)
            stage = LayerStage(
                index,
                layer,
                self.adapter.module_groups(index),
                self.quant,
                collective=self.collective,
                metrics=self.metrics,
                groups=self.importance_args.groups,
                smoothing=self._smoothing(index, layer),
                staging=self._staging,
            )
            hidden = stage.run(self._layer_forward(index, captured), hidden, weights, fp_inputs=fp_hidden)
            for step, sec in stage.seconds.items():
                self.phase_seconds[f"layers.{step}"] = self.phase_seconds.get(f"layers.{step}", 0.0) + sec
            self.placement.offload(index, modified=True)
            self._check_finite(index, hidden)
            if fp_hidden is not None:
                fp_hidden = stage.fp_outputs
                assert fp_hidden is not None
                self._check_finite(index, fp_hidden, path="full-precision")
            for name, result in stage.results.items():
                self.results[f"{index}.{name}"] = result
            record = {"index": index, **set_record, "seconds": time.perf_counter() - start}
            record["modules"] = {name: r.record for name, r in stage.results.items()}
            records.append(record)
            if fp_hidden is not None:  # before on_layer_end, which commits the checkpoint
                self.fabric.call("on_layer_fp_hidden", fabric=self.fabric, index=index, fp_hidden=fp_hidden)
            self.fabric.call(
                "on_layer_end",
                fabric=self.fabric,
                index=index,
                record=record,
                layer=layer,
                results=stage.results,
                hidden=hidden,
            )
        return records

    def _smoothing(self, index: int, layer: torch.nn.Module) -> LayerSmoothing | None:
        if not self.quant.is_smoothing:
            return None
        plan = self.adapter.smoothing_plan(index)
        weights = None
        if self.quant.method == "mbq":
            weights = {f.block_output: self.vision_weights[f"{index}.{f.block_output}"] for f in plan}
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
        return [self._store(h.to(self.fabric.device)) for h in resumed.fp_hidden]

    def _layer_forward(self, index: int, captured: Sequence[CapturedInputs]) -> Callable[[int, Tensor], Tensor]:
        device = self.fabric.device

        def forward(b: int, h: Tensor) -> Tensor:
            out = self.adapter.run_layer(index, h.to(device, non_blocking=True), captured[b].layer_kwargs[index])
            return self._store(captured[b].add_residual_delta(index, out))  # e.g. Qwen3-VL deepstack features

        return forward

    def _store(self, t: Tensor) -> Tensor:
        """Where calibration activations are kept: on the device, or in pinned host memory."""
        if not self.memory.offload_activations or t.device.type != "cuda":
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)

    # --- importance --------------------------------------------------------------------------------------------
    def _needs_importance(self) -> bool:
        if self.quant.method == "mbq":  # its vision weights come from the gradients
            return True
        if self.importance_args.mode == "none":
            return False
        return self.quant.method == "tlq" or self.metrics

    def _targets(self) -> dict[str, torch.nn.Module]:
        layers = self.adapter.decoder_layers()
        targets = self.vision.targets() if self.vision is not None else {}
        targets.update(
            (f"{i}.{name}", layers[i].get_submodule(name))
            for i in range(len(layers))
            for group in self.adapter.module_groups(i)
            for name in group
        )
        return targets

    def _importance(
        self, batches: Sequence[dict[str, Tensor]], masks: Sequence[TokenMasks], captured: Sequence[CapturedInputs]
    ) -> dict[str, list[Tensor]]:
        """Per module, post-processed token weights ``[B, S, G]`` per batch (empty when not needed)."""
        if not self._needs_importance():
            return {}
        self.fabric.call("on_importance_start", fabric=self.fabric, targets=self._targets())
        try:
            if self.placement.layerwise:
                self._backward_layerwise(batches, captured)
            else:
                self._backward_whole(batches)
        finally:
            self.fabric.call("on_importance_end", fabric=self.fabric)
        scores = self.collector.scores
        self._vision_scores = {k: v for k, v in scores.items() if is_vision_key(k)}
        if self.quant.method == "mbq":
            self.vision_weights = self._modality_weights(scores, masks)
        return self._postprocess({k: v for k, v in scores.items() if not is_vision_key(k)}, masks)

    def _modality_weights(self, scores: dict[str, list[Tensor]], masks: Sequence[TokenMasks]) -> dict[str, float]:
        """MBQ's vision weight per layer and block: mean ``|dL/dy|`` at the block output (o_proj for attention,
        down_proj for the MLP) over vision tokens / over answer tokens, over all ranks' tokens, floored at the median
        of that block's ratios across layers."""
        n_layers = self.adapter.num_layers
        blocks = list(dict.fromkeys(f.block_output for f in self.adapter.smoothing_plan(0)))
        keys = [f"{i}.{block}" for block in blocks for i in range(n_layers)]
        vision, answer = [m.image for m in masks], [m.answer & ~m.pad for m in masks]
        local = torch.stack([modality_sums(scores[k], vision, answer) for k in keys])
        totals = self.collective.all_reduce(local)
        ratios = [vision_weight(t, f"mbq: decoder layer {k}") for k, t in zip(keys, totals)]
        out: dict[str, float] = {}
        for b in range(len(blocks)):
            floored = floor_at_median(ratios[b * n_layers : (b + 1) * n_layers])
            out.update(zip(keys[b * n_layers : (b + 1) * n_layers], floored))
        return out

    def _backward_whole(self, batches: Sequence[dict[str, Tensor]]) -> None:
        for batch_idx, batch in enumerate(batches):
            self.fabric.call("on_importance_batch_start", fabric=self.fabric, batch_idx=batch_idx)
            with torch.enable_grad():
                loss = self.module.sft_loss(batch, vision_grads=self.vision is not None)
                self._check_loss(loss, batch_idx)
                loss.backward()
            self.fabric.call("on_importance_batch_end", fabric=self.fabric, batch_idx=batch_idx)

    def _backward_layerwise(self, batches: Sequence[dict[str, Tensor]], captured: Sequence[CapturedInputs]) -> None:
        """Backward of the SFT loss one decoder layer at a time; equals a whole-model backward.

        Forward: store every layer's input. Head: loss and ``dL/dh_L``. Backward: for the last layer down to the
        first, recompute the layer with its input requiring grad and back-propagate the incoming gradient.
        """
        n_layers, device = self.adapter.num_layers, self.fabric.device
        inputs: list[list[Tensor]] = [[self._store(c.hidden) for c in captured]]
        for index in range(n_layers):
            self.placement.onload(index)
            self.placement.prefetch(index + 1)
            with torch.no_grad():
                forward = self._layer_forward(index, captured)
                inputs.append([forward(b, h) for b, h in enumerate(inputs[-1])])
            self.placement.offload(index)
        grads = []
        for b, batch in enumerate(inputs.pop()):
            h = batch.to(device).detach().requires_grad_(True)
            with torch.enable_grad():
                loss = answer_loss_from_hidden(self.adapter.head, h, batches[b]["labels"])
                self._check_loss(loss, b)
                (grad,) = torch.autograd.grad(loss, h)
            grads.append(grad)
        for index in reversed(range(n_layers)):
            self.placement.onload(index)
            self.placement.prefetch(index - 1)
            layer_inputs = inputs.pop()
            for b in range(len(batches)):
                self.fabric.call("on_importance_batch_start", fabric=self.fabric, batch_idx=b)
                h = layer_inputs[b].to(device).detach().requires_grad_(True)
                with torch.enable_grad():
                    out = self.adapter.run_layer(index, h, captured[b].layer_kwargs[index])
                    out.backward(grads[b])
                grads[b] = h.grad
                self.fabric.call("on_importance_batch_end", fabric=self.fabric, batch_idx=b)
            self.placement.offload(index)
        if self.vision is not None:  # dL/dh_0 at the image positions continues into the tower
            for b, batch in enumerate(batches):
                self.fabric.call("on_importance_batch_start", fabric=self.fabric, batch_idx=b)
                self.vision.backward_from_decoder_input(batch, grads[b])
                self.fabric.call("on_importance_batch_end", fabric=self.fabric, batch_idx=b)

    def _postprocess(self, scores: dict[str, list[Tensor]], masks: Sequence[TokenMasks]) -> dict[str, list[Tensor]]:
        """Normalise / floor / clip each module's scores over *all* ranks' tokens (gathered), keep this rank's.

        All modules at once: post-processing treats every column on its own, so the ``[N, modules x groups]``
        matrix of every real token's scores takes one gather and one call instead of one per module.
        """
        if not scores:
            return {}
        args = self.importance_args
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

    # --- token set ---------------------------------------------------------------------------------------------
    def _token_weights(
        self, index: int, importance: dict[str, list], masks: Sequence[TokenMasks], sample_ids: Sequence[Tensor]
    ) -> tuple[list[TokenWeights], dict[str, Any]]:
        names = [n for g in self.adapter.module_groups(index) for n in g]
        valid = [(~m.pad).cpu() for m in masks]
        n_batches = len(masks)
        layer_imp = [
            {n: importance[f"{index}.{n}"][b] for n in names} if importance else None for b in range(n_batches)
        ]
        total = self.collective.all_reduce(torch.tensor([sum(int(v.sum()) for v in valid)], dtype=torch.float64))
        record: dict[str, Any] = {"tokens_total": int(total.item())}
        multipliers: list[Tensor | None] = [None] * n_batches
        if self.quant.method == "tlq":
            multipliers, set_record = self._select(index, layer_imp, masks, valid, sample_ids)
            record.update(set_record)
        weights = [
            TokenWeights(
                valid[b],
                layer_imp[b],
                multipliers[b],
                vision=masks[b].image.cpu(),
                answer=masks[b].answer.cpu() & valid[b],
            )
            for b in range(n_batches)
        ]
        return weights, record

    def _select(
        self,
        index: int,
        layer_imp: Sequence[dict[str, Tensor] | None],
        masks: Sequence[TokenMasks],
        valid: Sequence[Tensor],
        sample_ids: Sequence[Tensor],
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """The layer's token set: layer score = mean over its modules (and groups) of the token weights."""
        scores = [
            torch.stack([w.mean(-1) for w in imp.values()]).mean(0) if imp else v.float()
            for imp, v in zip(layer_imp, valid)
        ]
        flat = torch.cat([s[v] for s, v in zip(scores, valid)])
        every = self.collective.gather_cat(flat)
        threshold = mass_threshold(every, self.token_set.keep_mass)
        uniforms = torch.cat(
            [token_uniforms(self.token_set.seed, index, ids, v.shape[1])[v] for ids, v in zip(sample_ids, valid)]
        )
        sel = select_tokens(flat, uniforms, self.token_set.keep_mass, self.token_set.p_rest, threshold=threshold)
        kept = sel.kept
        image = torch.cat([m.image.cpu()[v] for m, v in zip(masks, valid)])
        answer = torch.cat([m.answer.cpu()[v] for m, v in zip(masks, valid)])
        counts = torch.tensor(
            [
                float(_fingerprint(sel.multiplier, valid, sample_ids)),
                float(kept.sum()),
                float(sel.by_mass.sum()),
                float((kept & image).sum()),
                float((kept & answer).sum()),
                float(flat[sel.by_mass].double().sum()),
            ],
            dtype=torch.float64,
        )
        fingerprint, n_kept, by_mass, vision, answers, mass = self.collective.all_reduce(counts).tolist()
        total_mass = float(every.double().sum())
        record = {
            "token_set_fingerprint": int(fingerprint),
            "tokens_kept": int(n_kept),
            "tokens_by_mass": int(by_mass),
            "mass_covered": mass / total_mass if total_mass > 0 else 1.0,
            "kept_share": {
                "vision": vision / max(n_kept, 1),
                "text": (n_kept - vision) / max(n_kept, 1),
                "answer": answers / max(n_kept, 1),
            },
        }
        return scatter_back(sel.multiplier, [v.float() for v in valid], valid), record

    # --- helpers -----------------------------------------------------------------------------------------------
    def _find_callback(self, cls: type) -> Any:
        found = [c for c in getattr(self.fabric, "_callbacks", []) if isinstance(c, cls)]
        if len(found) > 1:
            raise ValueError(f"Fabric has several {cls.__name__} callbacks; register at most one.")
        return found[0] if found else None

    def _find_collector(self, fabric: Any) -> TokenImportance | None:
        found = [c for c in getattr(fabric, "_callbacks", []) if isinstance(c, TokenImportance)]
        if len(found) > 1:
            raise ValueError("Fabric has several TokenImportance callbacks; register exactly one.")
        if not found and self._needs_importance():
            raise ValueError(
                "Importance is needed but Fabric has no TokenImportance callback: build it with "
                "Fabric(callbacks=[TokenImportance(score, groups)])."
            )
        return found[0] if found else None

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"tlq.{phase}"):  # a named range in profiler traces
                yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    @staticmethod
    def _sample_ids(batches: Sequence[dict[str, Tensor]]) -> list[Tensor]:
        if all("sample_id" in b for b in batches):
            return [b["sample_id"].cpu() for b in batches]
        ids, start = [], 0
        for b in batches:
            n = b["input_ids"].shape[0]
            ids.append(torch.arange(start, start + n))
            start += n
        return ids

    @staticmethod
    def _check_loss(loss: Tensor, batch_idx: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"The SFT loss of calibration batch {batch_idx} is {loss.item()}: the full-precision model produces "
                "NaN/Inf activations on this data. Check the weights and inputs; in float16/bfloat16, try dtype "
                "float32."
            )

    @staticmethod
    def _check_finite(index: int, hidden: Sequence[Tensor], path: str = "quantized") -> None:
        for b, h in enumerate(hidden):
            if not torch.isfinite(h).all():
                where = f"Decoder layer {index}" if index >= 0 else "The embeddings (input of decoder layer 0)"
                raise FloatingPointError(
                    f"{where} produced NaN/Inf activations on calibration batch {b} on the {path} path. Check "
                    "the model's weights and inputs; in float16/bfloat16, try dtype float32; with very low bit "
                    "widths, try more bits or a smaller group size."
                )
