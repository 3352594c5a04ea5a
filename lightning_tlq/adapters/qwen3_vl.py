"""Adapter for Qwen3-VL (``model_type="qwen3_vl"``): ViT with deepstack mergers, Qwen3 decoder with M-RoPE."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import register_adapter
from lightning_tlq.adapters.qwen2_vl import Qwen2VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (dense) models.

    Deepstack: the vision tower also emits features from some of its intermediate layers, and the text model adds
    them at the image positions right after its first decoder layers. The input of layer ``i + 1`` is therefore
    not the output of layer ``i``; :attr:`injects_residuals` makes :meth:`capture` record the added features as
    :attr:`~lightning_tlq.adapters.base.CapturedInputs.residual_delta`, which layer-by-layer callers add back.
    The features come from the full-precision vision tower, so they are the same on the quantized path.

    Decoder layers (q/k/v/o with per-head ``q_norm``/``k_norm``, gate/up/down) match the default groups.
    """

    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    injects_residuals: ClassVar[bool] = True
