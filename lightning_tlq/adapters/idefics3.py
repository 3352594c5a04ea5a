"""Adapter for Idefics3 (``model_type="idefics3"``): SigLIP vision, pixel-shuffle connector, Llama decoder."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import VLMAdapter, register_adapter


@register_adapter
class Idefics3Adapter(VLMAdapter):
    """Idefics3 models.

    The text decoder is ``model.text_model`` (not ``language_model``) and is Llama-like. ``pixel_values`` are
    ``(B, crops, 3, H, W)`` with an optional ``pixel_attention_mask`` marking real pixels of padded crops; the
    vision model and the pixel-shuffle ``connector`` stay in full precision.
    """

    model_types: ClassVar[tuple[str, ...]] = ("idefics3",)
    forward_keys: ClassVar[tuple[str, ...]] = (*VLMAdapter.forward_keys, "pixel_attention_mask")
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_model", "model.connector")
