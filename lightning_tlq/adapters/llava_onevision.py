"""Adapter for LLaVA-OneVision (``model_type="llava_onevision"``): SigLIP with anyres tiling, Qwen2 decoder."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import VLMAdapter, register_adapter


@register_adapter
class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision models.

    ``pixel_values`` are ``(B, crops, 3, H, W)`` anyres tiles and the forward needs ``image_sizes`` to unpad and
    lay them out; the number of image tokens per image depends on that size. The SigLIP pooling head
    (``vision_tower.head``) is never used and ``image_newline`` is a raw parameter; both sit in the full-precision
    vision part. The Qwen2 decoder is Llama-like, so the default module groups apply.
    """

    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    forward_keys: ClassVar[tuple[str, ...]] = (
        *VLMAdapter.forward_keys,
        "image_sizes",
        "pixel_values_videos",
        "image_sizes_videos",
        "batch_num_images",
    )
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_tower", "model.multi_modal_projector")
