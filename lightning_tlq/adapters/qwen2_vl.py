"""Adapter for Qwen2-VL (``model_type="qwen2_vl"``): ViT with patch merger, Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from lightning_tlq.adapters.base import VLMAdapter, register_adapter

# Values of ``mm_token_type_ids`` expected by Qwen2-VL's M-RoPE index computation.
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


@register_adapter
class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL models.

    The forward needs ``image_grid_thw`` with the pixels and, in transformers 5.x, ``mm_token_type_ids``
    (0 text, 1 image, 2 video) to build the 3-D M-RoPE positions; it is derived from ``input_ids`` when the
    batch lacks it. Decoder layers receive per-sample ``position_embeddings`` of shape ``(B, S, head_dim)``
    (M-RoPE already applied), ``position_ids=None`` and a 4-D mask only when the batch is padded.
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
