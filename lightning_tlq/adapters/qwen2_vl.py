"""Adapter for Qwen2-VL (``model_type="qwen2_vl"``): ViT with patch merger, Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from lightning_tlq.adapters.base import VLMAdapter, register_adapter
from lightning_tlq.adapters.vision import VisionAdapter

# Values of ``mm_token_type_ids`` expected by Qwen2-VL's M-RoPE index computation.
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


@register_adapter
class Qwen2VLAdapter(VisionAdapter):
    """Qwen2-VL models.

    The forward needs ``image_grid_thw`` with the pixels and, in transformers 5.x, ``mm_token_type_ids``
    (0 text, 1 image, 2 video) to build the 3-D M-RoPE positions; it is derived from ``input_ids`` when the
    batch lacks it. Decoder layers receive per-sample ``position_embeddings`` of shape ``(B, S, head_dim)``
    (M-RoPE already applied), ``position_ids=None`` and a 4-D mask only when the batch is padded.

    Vision: the ViT blocks take every image's patches packed as ``(patches, C)`` with ``cu_seqlens`` (per-image
    attention) and a fused ``attn.qkv``; the patch merger (``ln_q`` then ``mlp.0 -> GELU -> mlp.2``) turns
    each 2x2 window of patches into one image token, so its rows map 4:1 from patches to image tokens.
    """

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    forward_keys: ClassVar[tuple[str, ...]] = (
        *VLMAdapter.forward_keys,
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "mm_token_type_ids",
    )
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.visual",)
    vision_layers_name: ClassVar[str] = "model.visual.blocks"
    vision_embedding_name: ClassVar[str] = "model.visual.patch_embed"
    projector_name: ClassVar[str] = "model.visual.merger"
    vision_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("attn.qkv",),
        ("attn.proj",),
        ("mlp.fc1",),
        ("mlp.fc2",),
    )
    projector_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = (("mlp.0",), ("mlp.2",))

    def forward_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Build forward kwargs, adding ``mm_token_type_ids`` from ``input_ids`` if the batch has none.

        Args:
            batch: Collated batch with at least ``input_ids``.

        Returns:
            Keyword arguments for ``model(**kwargs)``.
        """
        inputs = super().forward_inputs(batch)
        if "mm_token_type_ids" not in inputs:
            inputs["mm_token_type_ids"] = self.mm_token_type_ids(inputs["input_ids"])
        return inputs

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the modality of each token: 0 text, 1 image, 2 video.

        Args:
            input_ids: ``(B, S)`` token ids.

        Returns:
            ``(B, S)`` int32 tensor.
        """
        types = torch.full_like(input_ids, _TEXT, dtype=torch.int32)
        types[input_ids == self.image_token_id] = _IMAGE
        video_token_id = getattr(self.model.config, "video_token_id", None)
        if video_token_id is not None:
            types[input_ids == video_token_id] = _VIDEO
        return types

    def image_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """``model.get_image_features`` on the packed patches, images concatenated: ``[image_tokens, D]``."""
        if batch.get("pixel_values_videos") is not None:
            raise ValueError("Vision calibration of Qwen2-VL supports images only; the batch has videos.")
        out = self.model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
        )
        return torch.cat(list(out.pooler_output))

    def image_patch_counts(self, batch: Mapping[str, Any]) -> list[int]:
        """Patches per image, ``t * h * w`` of ``image_grid_thw``."""
        return [int(n) for n in batch["image_grid_thw"].prod(-1)]
