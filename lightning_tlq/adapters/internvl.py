"""Adapter for InternVL (``model_type="internvl"``, the HF-native InternVL3): InternViT, MLP projector, Qwen2."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import VLMAdapter, register_adapter


@register_adapter
class InternVLAdapter(VLMAdapter):
    """InternVL models.

    Smaller checkpoints tie the LM head to the input embeddings (``lm_head.weight is embed_tokens.weight``); the
    head is never a quantization target, and module validation refuses any target that shares the embedding
    weight. The Qwen2 decoder is Llama-like, so the default module groups apply.
    """

    model_types: ClassVar[tuple[str, ...]] = ("internvl",)
    forward_keys: ClassVar[tuple[str, ...]] = (*VLMAdapter.forward_keys, "image_sizes")
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_tower", "model.multi_modal_projector")
