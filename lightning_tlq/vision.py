"""Vision-tower calibration (``quant.vision=true``): the used vision encoder layers, then the projector.

Runs before the language model is captured, so the language model is calibrated on what the *quantized* vision
tower produces. Each used vision encoder layer is a :class:`~lightning_tlq.stage.LayerStage` fed with the
quantized previous layer's output (inputs captured at vision layer 0, per-layer kwargs such as Qwen2-VL's
``cu_seqlens`` replayed), and the projector's linears form a final stage whose input is formed from the
quantized encoder hidden states exactly as the model forms it.

Token importance comes from the same SFT backward pass as the language model's, continued into the tower
(:meth:`lightning_tlq.module.TLQModule.sft_loss` with ``vision_grads``): each vision module gets one score per
input row, i.e. per patch position (CLIP: ``[images, 1 + patches]``; Qwen2-VL blocks: packed patches, and the
merger: one row per 2x2 patch window = per image token). Every row is a real vision token, so the modality floor
mixes with the mean over all of them. With ``quant.method=tlq`` each stage keeps its own token set; the random
draw of a row depends on ``(seed, stage, sample id, row within the sample's image)`` only, and normalisation and
the mass threshold are computed over all ranks' rows, so the set does not depend on the number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.adapters.base import VLMAdapter
from lightning_tlq.adapters.vision import vision_adapter
from lightning_tlq.core.importance import postprocess_flat
from lightning_tlq.core.tokenset import token_uniforms
from lightning_tlq.distributed import Collective
from lightning_tlq.importance import enable_activation_grads
from lightning_tlq.keys import PROJECTOR, ModuleKey, vision_stage
from lightning_tlq.module_stats import ModuleResult
from lightning_tlq.stage import LayerStage
from lightning_tlq.tokenweights import TokenWeights, input_weights, select_token_set, stage_scores

__all__ = ["VisionCalibration"]


class VisionCalibration:
    """Calibrates the vision tower and projector of a VLM in place, stage by stage on the quantized path.

    Args:
        adapter: the model's adapter; its family must support vision (:class:`VisionAdapter`).
        settings: :class:`~lightning_tlq.settings.CalibrationSettings` (shared with the language model).
        collective: reductions, gathers and broadcasts over ranks (no-ops on one process).
        call: ``call(event, **kwargs)`` emits ``on_vision_stage_start(name)`` / ``on_vision_stage_end(name,
            record)``; e.g. ``partial(emit, fabric)``.
    """

    def __init__(
        self,
        adapter: VLMAdapter,
        settings: Any,
        *,
        collective: Collective | None = None,
        call: Callable[..., Any] | None = None,
    ) -> None:
        self.adapter = vision_adapter(adapter)
        self.quant, self.importance_args, self.token_set = settings.quant, settings.importance, settings.token_set
        quant = self.quant
        self.collective, self.metrics = collective or Collective(), settings.metrics
        self.call = call or (lambda event, **kwargs: None)
        self.results: dict[ModuleKey, ModuleResult] = {}
        self.outputs: list[Tensor] = []
        """Per batch, the quantized projector's output (what the language model receives), after :meth:`run`."""
        targets = self.targets()  # validates the structure before any work
        for key, module in targets.items():
            try:
                quant.spec.check_shape(module.in_features, name=str(key))
            except ValueError as err:
                raise ValueError(f"{err} For the vision tower, alternatively use quant.vision=false.") from err

    def targets(self) -> dict[ModuleKey, nn.Module]:
        """Vision linears to quantize, keyed by stage (``vision.<i>`` / ``projector``) and module (importance
        targets)."""
        return self.adapter.vision_targets()

    def run(
        self,
        batches: Sequence[Mapping[str, Any]],
        sample_ids: Sequence[Tensor],
        scores: Mapping[ModuleKey, Sequence[Tensor]] | None = None,
    ) -> list[dict[str, Any]]:
        """Calibrate every used vision layer, then the projector; returns one record per stage.

        Args:
            batches: calibration batches on the compute device.
            sample_ids: per batch, ``[B]`` global sample ids (one image per sample).
            scores: raw importance scores per vision module (from :class:`~lightning_tlq.importance.TokenImportance`),
                or None / empty for uniform token weights.
        """
        weights = self._postprocess(scores or {})
        with torch.no_grad():
            captured = [self.adapter.vision_capture(b) for b in batches]
        hidden = [c.hidden for c in captured]
        keep = set(self.adapter.vision_feature_indices())
        states: list[dict[int, Tensor]] = [{0: h} if 0 in keep else {} for h in hidden]
        records = []
        for i, layer in enumerate(self.adapter.vision_layers()):

            def forward(b: int, h: Tensor, i: int = i) -> Tensor:
                return self.adapter.run_vision_layer(i, h, captured[b].layer_kwargs[i])

            groups = self.adapter.vision_module_groups(i)
            hidden, record = self._stage(
                vision_stage(i), -1 - i, layer, groups, forward, hidden, batches, sample_ids, weights
            )
            for b, h in enumerate(hidden):
                if i + 1 in keep:
                    states[b][i + 1] = h
            records.append(record)
        features = [self.adapter.projector_input(s) for s in states]
        del hidden, states

        def project(b: int, x: Tensor) -> Tensor:
            return self.adapter.run_projector(x)

        key = -1 - len(self.adapter.vision_layers())
        groups = self.adapter.projector_module_groups()
        self.outputs, record = self._stage(
            PROJECTOR, key, self.adapter.projector(), groups, project, features, batches, sample_ids, weights
        )
        records.append(record)
        return records

    def backward_from_decoder_input(self, batch: Mapping[str, Any], grad: Tensor) -> None:
        """Continue a layer-by-layer backward into the tower: ``grad`` is ``dL/dh_0`` of the decoder's input.

        The decoder's input holds the image features at the image-token positions, so their gradient is
        ``grad`` there; running the tower with its patch embeddings requiring grad and back-propagating it gives
        every vision module the output gradient a whole-model backward would (hooks collect them).
        """
        positions = self.adapter.image_feature_positions(batch)
        with torch.enable_grad():
            handle = enable_activation_grads(self.adapter.model, [self.adapter.vision_embedding()])
            try:
                features = self.adapter.image_features(batch)
            finally:
                handle.remove()
            target = grad[positions.to(grad.device)]
            if target.shape != features.shape:
                raise RuntimeError(
                    f"Image features {tuple(features.shape)} do not match the decoder input's image positions "
                    f"{tuple(target.shape)}; override image_feature_positions() for this family."
                )
            features.backward(target.to(features.dtype))

    # --- one stage -----------------------------------------------------------------------------------------
    def _stage(
        self,
        name: str,
        key: int,
        layer: nn.Module,
        groups: list[list[str]],
        forward: Callable[[int, Tensor], Tensor],
        inputs: list[Tensor],
        batches: Sequence[Mapping[str, Any]],
        sample_ids: Sequence[Tensor],
        weights: Mapping[ModuleKey, list[Tensor]],
    ) -> tuple[list[Tensor], dict[str, Any]]:
        self.call("on_vision_stage_start", name=name)
        start = time.perf_counter()
        names = [n for g in groups for n in g]
        token_weights, set_record = self._token_weights(name, key, names, batches, sample_ids, weights)
        if self.importance_args.granularity == "input":  # after the token set, chosen from the modules' own weights
            for tw in token_weights:
                tw.importance = input_weights(tw.importance, groups) if tw.importance else tw.importance
        stage = LayerStage(
            name,
            layer,
            groups,
            self.quant,
            collective=self.collective,
            metrics=self.metrics,
            groups=self.importance_args.groups,
        )
        outputs = stage.run(forward, inputs, token_weights)
        for b, h in enumerate(outputs):
            if not torch.isfinite(h).all():
                raise FloatingPointError(f"Vision stage {name} produced NaN/Inf on calibration batch {b}.")
        for module, result in stage.results.items():
            self.results[ModuleKey(name, module)] = result
        record = {"index": name, **set_record, "seconds": time.perf_counter() - start}
        record["modules"] = {module: r.record for module, r in stage.results.items()}
        self.call("on_vision_stage_end", name=name, record=record)
        return outputs, record

    def _postprocess(self, scores: Mapping[ModuleKey, Sequence[Tensor]]) -> dict[ModuleKey, list[Tensor]]:
        """Token weights (mean 1 per module over all ranks' rows) from raw scores; every row is a vision token."""
        a, coll = self.importance_args, self.collective
        out = {}
        for name, per_batch in scores.items():
            local = torch.cat([s.cpu().reshape(-1, s.shape[-1]) for s in per_batch])
            offset = coll.exclusive_offset(local.shape[0])
            every = coll.gather_cat(local)
            flat = postprocess_flat(
                every,
                torch.ones(every.shape[0], dtype=torch.bool),
                floor=a.floor,
                clip_quantile=a.clip_quantile,
                mode=a.mode,
            )[offset : offset + local.shape[0]]
            sizes = [s.shape[:-1].numel() for s in per_batch]
            out[name] = [f.reshape(s.shape) for f, s in zip(flat.split(sizes), per_batch)]
        return out

    def _token_weights(
        self,
        name: str,
        key: int,
        modules: Sequence[str],
        batches: Sequence[Mapping[str, Any]],
        sample_ids: Sequence[Tensor],
        weights: Mapping[ModuleKey, list[Tensor]],
    ) -> tuple[list[TokenWeights], dict[str, Any]]:
        if not weights:  # no importance: every row of every module counts with weight 1
            return [TokenWeights(valid=None) for _ in batches], {}
        missing = [m for m in modules if ModuleKey(name, m) not in weights]
        if missing:
            raise RuntimeError(f"No importance was collected for vision stage {name} modules {missing}.")
        per_batch = [{m: weights[ModuleKey(name, m)][b] for m in modules} for b in range(len(batches))]
        for b, imp in enumerate(per_batch):
            shapes = {tuple(w.shape[:-1]) for w in imp.values()}
            if len(shapes) != 1:
                raise RuntimeError(f"Vision stage {name}: its modules see different rows {shapes} in batch {b}.")
        local = sum(next(iter(i.values())).shape[:-1].numel() for i in per_batch)
        total = self.collective.all_reduce(torch.tensor([float(local)], dtype=torch.float64))
        record: dict[str, Any] = {"tokens_total": int(total.item())}
        multipliers: list[Tensor | None] = [None] * len(batches)
        if self.quant.handler.selects_tokens:
            scores = [stage_scores(imp) for imp in per_batch]
            uniforms = [self._uniforms(key, b, ids, s.numel()) for b, ids, s in zip(batches, sample_ids, scores)]
            flat, set_record = select_token_set(
                torch.cat([s.reshape(-1) for s in scores]), torch.cat(uniforms), self.token_set, self.collective
            )
            multipliers = [m.reshape(s.shape) for m, s in zip(flat.split([s.numel() for s in scores]), scores)]
            record.update(set_record)
        return [TokenWeights(None, per_batch[b], multipliers[b]) for b in range(len(batches))], record

    def _uniforms(self, key: int, batch: Mapping[str, Any], ids: Tensor, n_rows: int) -> Tensor:
        rows = self.adapter.vision_rows_per_image(batch, n_rows)
        if len(rows) != len(ids):
            raise ValueError(
                f"Vision calibration needs exactly one image per sample; a batch has {len(rows)} images for "
                f"{len(ids)} samples."
            )
        seed = self.token_set.seed
        return torch.cat([token_uniforms(seed, key, ids[j : j + 1], r)[0] for j, r in enumerate(rows)])
