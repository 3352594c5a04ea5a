"""The Fabric calibration loop: importance pass, token set, then quantization-exposed layer-wise stages."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.adapters.base import move_to
from lightning_tlq.config import ImportanceArgs, QuantArgs, TokenSetArgs
from lightning_tlq.core.importance import postprocess
from lightning_tlq.core.tokenset import select_tokens, token_uniforms
from lightning_tlq.data import TokenMasks, token_masks
from lightning_tlq.importance import TokenImportance
from lightning_tlq.module import TLQModule
from lightning_tlq.stage import LayerStage, TokenWeights

log = logging.getLogger(__name__)


class CalibrationLoop:
    """Calibrates the decoder layers of ``module``'s VLM in place, layer by layer on the quantized path.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``; its device runs the work, its collectives sum statistics,
            and ``fabric.call`` emits ``on_importance_*``, ``on_layer_start(fabric, index)`` and
            ``on_layer_end(fabric, index, record)`` to its callbacks. When importance is needed (``tlq``, or
            ``metrics``), one of its callbacks must be a :class:`TokenImportance`, which collects the scores.
        module: the wrapped model (``configure_model`` already called).
        quant, importance, token_set: settings.
        metrics: accumulate the statistics needed to report every module's (weighted) output error.
    """

    def __init__(
        self,
        fabric: Any,
        module: TLQModule,
        quant: QuantArgs,
        importance: ImportanceArgs,
        token_set: TokenSetArgs,
        *,
        metrics: bool = True,
    ) -> None:
        self.fabric = fabric
        self.module = module
        self.adapter = module.adapter
        self.quant, self.importance_args, self.token_set = quant, importance, token_set
        self.collector = self._find_collector(fabric)
        self.metrics = metrics
        self.results: dict[str, Any] = {}
        self.phase_seconds: dict[str, float] = {}

    # --- driver ------------------------------------------------------------------------------------------------
    def run(self, batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Any]]:
        """Calibrate; returns one record per decoder layer."""
        if not batches:
            raise ValueError("Calibration got no batches: the dataset is empty.")
        device = self.fabric.device
        self.module.model.to(device)
        batches = [move_to(b, device) for b in batches]
        masks = [token_masks(b, self.adapter.image_token_id) for b in batches]
        sample_ids = self._sample_ids(batches)

        t = time.perf_counter()
        importance = self._importance(batches, masks)
        self.phase_seconds["importance"] = time.perf_counter() - t

        t = time.perf_counter()
        with torch.no_grad():
            captured = [self.adapter.capture(self.adapter.forward_inputs(b)) for b in batches]
        hidden = [c.hidden for c in captured]
        self.phase_seconds["capture"] = time.perf_counter() - t

        t = time.perf_counter()
        records = []
        for index, layer in enumerate(self.adapter.decoder_layers()):
            self.fabric.call("on_layer_start", fabric=self.fabric, index=index)
            start = time.perf_counter()
            weights, set_record = self._token_weights(index, importance, masks, sample_ids)
            stage = LayerStage(
                index,
                layer,
                self.adapter.module_groups(index),
                self.quant,
                reduce_sum=self._reduce_sum,
                metrics=self.metrics,
                groups=self.importance_args.groups,
            )

            def forward(b: int, h: Tensor, index: int = index) -> Tensor:
                return self.adapter.run_layer(index, h, captured[b].layer_kwargs[index])

            hidden = stage.run(forward, hidden, weights)
            self._check_finite(index, hidden)
            for name, result in stage.results.items():
                self.results[f"{index}.{name}"] = result
            record = {"index": index, **set_record, "seconds": time.perf_counter() - start}
            record["modules"] = {name: r.record for name, r in stage.results.items()}
            records.append(record)
            self.fabric.call("on_layer_end", fabric=self.fabric, index=index, record=record)
        self.phase_seconds["layers"] = time.perf_counter() - t
        return records

    # --- importance --------------------------------------------------------------------------------------------
    def _needs_importance(self) -> bool:
        if self.importance_args.mode == "none":
            return False
        return self.quant.method == "tlq" or self.metrics

    def _targets(self) -> dict[str, torch.nn.Module]:
        layers = self.adapter.decoder_layers()
        return {
            f"{i}.{name}": layers[i].get_submodule(name)
            for i in range(len(layers))
            for group in self.adapter.module_groups(i)
            for name in group
        }

    def _importance(self, batches: Sequence[dict[str, Tensor]], masks: Sequence[TokenMasks]) -> dict[str, list]:
        """Per module, post-processed token weights ``[B, S, G]`` per batch (empty when not needed)."""
        if not self._needs_importance():
            return {}
        self.fabric.call("on_importance_start", fabric=self.fabric, targets=self._targets())
        try:
            for batch_idx, batch in enumerate(batches):
                with torch.enable_grad():
                    loss = self.module.sft_loss(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"The SFT loss of calibration batch {batch_idx} is {loss.item()}.")
                    loss.backward()
                self.fabric.call("on_importance_batch_end", fabric=self.fabric, batch_idx=batch_idx)
        finally:
            self.fabric.call("on_importance_end", fabric=self.fabric)
        args = self.importance_args
        valid = [~m.pad for m in masks]
        vision = [m.image for m in masks]
        return {
            name: postprocess(scores, valid, vision, floor=args.floor, clip_quantile=args.clip_quantile, mode=args.mode)
            for name, scores in self.collector.scores.items()
        }

    # --- token set ---------------------------------------------------------------------------------------------
    def _token_weights(
        self, index: int, importance: dict[str, list], masks: Sequence[TokenMasks], sample_ids: Sequence[Tensor]
    ) -> tuple[list[TokenWeights], dict[str, Any]]:
        names = [n for g in self.adapter.module_groups(index) for n in g]
        per_module = {n: importance[f"{index}.{n}"] for n in names} if importance else None
        valid = [(~m.pad).cpu() for m in masks]
        n_batches = len(masks)
        layer_imp = [{n: per_module[n][b] for n in names} if per_module else None for b in range(n_batches)]
        record: dict[str, Any] = {"tokens_total": int(sum(int(v.sum()) for v in valid))}
        multipliers: list[Tensor | None] = [None] * n_batches
        if self.quant.method == "tlq":
            multipliers, set_record = self._select(index, layer_imp, masks, valid, sample_ids)
            record.update(set_record)
        weights = [TokenWeights(valid[b], layer_imp[b], multipliers[b]) for b in range(n_batches)]
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
        uniforms = torch.cat(
            [token_uniforms(self.token_set.seed, index, ids, v.shape[1])[v] for ids, v in zip(sample_ids, valid)]
        )
        sel = select_tokens(flat, uniforms, self.token_set.keep_mass, self.token_set.p_rest)
        kept = sel.kept
        image = torch.cat([m.image.cpu()[v] for m, v in zip(masks, valid)])
        answer = torch.cat([m.answer.cpu()[v] for m, v in zip(masks, valid)])
        n_kept = int(kept.sum())
        record = {
            "tokens_kept": n_kept,
            "tokens_by_mass": int(sel.by_mass.sum()),
            "mass_covered": sel.mass_covered,
            "kept_share": {
                "vision": float(image[kept].sum()) / max(n_kept, 1),
                "text": float((~image[kept]).sum()) / max(n_kept, 1),
                "answer": float(answer[kept].sum()) / max(n_kept, 1),
            },
        }
        out, start = [], 0
        for v in valid:
            full = torch.zeros(v.shape)
            n = int(v.sum())
            full[v] = sel.multiplier[start : start + n]
            out.append(full)
            start += n
        return out, record

    # --- helpers -----------------------------------------------------------------------------------------------
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

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(tensor, reduce_op="sum")

    @staticmethod
    def _check_finite(index: int, hidden: Sequence[Tensor]) -> None:
        for b, h in enumerate(hidden):
            if not torch.isfinite(h).all():
                raise FloatingPointError(
                    f"Decoder layer {index} produced NaN/Inf activations on calibration batch {b} after quantization."
                )
