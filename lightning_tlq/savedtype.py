"""The dtype a calibrated model is saved in: the checkpoint's own, while calibration computes in float32.

``--model.dtype auto`` (the CLI default) computes in float32 and saves in the dtype the checkpoint was stored in
(``config.json``'s ``dtype`` / ``torch_dtype``; float32 for the random tiny models). Computing in float32 matters:
on the embedded bf16 ``scenes-llava`` (TLQ W4A16 g128, 16 samples, CPU), a bf16 calibration changed 73% of the
packed code words against a float32 one, its mean relative output errors were 0.5-0.7% higher and it took twice
as long; the Hessians and the GPTQ solve are float32 either way, but activations and propagation are not.

Saving in bf16 must keep the fake-quantized weights equal to the dequantized codes, which the export and every
reader of the compressed format rely on: :func:`cast_for_save` rounds each module's scales to the saved dtype and
re-derives the weight from the integer codes (never from the float weight), so ``weight == (codes - zero) *
scale`` holds exactly in the saved dtype. The codes do not change; the scales move by at most one rounding step
of the saved dtype (a relative 2^-9 for bf16).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch

from lightning_tlq.core.quantizer import QuantSpec, dequantize
from lightning_tlq.keys import ModuleKey

AUTO = "auto"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(model: str) -> str | None:
    """The dtype a model's weights are stored in (``float32``, ``bfloat16``, ``float16``), or None if unknown."""
    from lightning_tlq.models.embedded import SCENES_MODEL, embedded_path

    path = Path(embedded_path(model) if model == SCENES_MODEL else model)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    stored = config.get("dtype") or config.get("torch_dtype")
    if stored is None:
        stored = (config.get("text_config") or {}).get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return stored if stored in _DTYPES else None


def resolve_dtypes(dtype: str, model: str) -> tuple[str, str | None]:
    """``(compute dtype, save dtype)`` for ``--model.dtype``: ``auto`` -> float32 and the checkpoint's dtype (None =
    keep float32); anything else -> that dtype for both (None: nothing to cast)."""
    if dtype != AUTO:
        return dtype, None
    stored = checkpoint_dtype(model)
    return "float32", (stored if stored not in (None, "float32") else None)


def cast_for_save(
    model: torch.nn.Module, adapter: Any, results: MutableMapping[ModuleKey, Any], spec: QuantSpec, dtype: str
) -> None:
    """Cast ``model`` to ``dtype`` in place, each quantized weight re-derived from its codes and its scales rounded
    to ``dtype`` (``results`` updated to the rounded scales, which :func:`~lightning_tlq.export.save_qparams`
    then writes)."""
    target = _DTYPES[dtype]
    vision = adapter.vision_targets() if any(k.is_vision for k in results) else {}
    for key, res in list(results.items()):
        if key.is_vision:
            module = vision[key]
        else:
            module = model.get_submodule(f"{adapter.layer_name(key.stage)}.{key.module}")
        scale = res.scale.to(target).float()
        weight = dequantize(res.codes, scale, res.zero, spec, dtype=target)
        module.weight.data = weight.to(module.weight.device)
        results[key] = dataclasses.replace(res, scale=scale) if dataclasses.is_dataclass(res) else res
        if not dataclasses.is_dataclass(res):
            res.scale = scale
    model.to(target)
