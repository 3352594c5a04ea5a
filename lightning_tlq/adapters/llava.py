"""Adapter for LLaVA (``model_type="llava"``): CLIP/SigLIP vision tower, MLP projector, Llama-like decoder."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import VLMAdapter, register_adapter


@register_adapter
class LlavaAdapter(VLMAdapter):
    """LLaVA 1.5-style models.

    The text decoder is Llama-like, so the default module groups apply. Decoder layers receive
    ``position_embeddings`` of shape ``(1, S, head_dim)``, ``position_ids`` and an ``attention_mask`` that is
    ``None`` for unpadded batches and a 4-D ``(B, 1, S, S)`` mask otherwise.
    """

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    forward_keys: ClassVar[tuple[str, ...]] = (*VLMAdapter.forward_keys, "image_sizes")
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_tower", "model.multi_modal_projector")
