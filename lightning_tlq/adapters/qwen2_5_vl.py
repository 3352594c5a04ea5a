"""Adapter for Qwen2.5-VL (``model_type="qwen2_5_vl"``): windowed ViT with patch merger, Qwen2 decoder with M-RoPE."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import register_adapter
from lightning_tlq.adapters.qwen2_vl import Qwen2VLAdapter


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL models.

    The text side is Qwen2-VL's: the forward needs ``image_grid_thw`` and ``mm_token_type_ids`` (derived from
    ``input_ids`` when missing), and decoder layers receive per-sample M-RoPE ``position_embeddings``. Videos
    additionally take ``second_per_grid_ts`` (temporal spacing of the video grid).
    """

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    forward_keys: ClassVar[tuple[str, ...]] = (*Qwen2VLAdapter.forward_keys, "second_per_grid_ts")
    # the vision blocks' MLP is gated (gate_proj, up_proj -> down_proj), not Qwen2-VL's fc1 -> fc2
    vision_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("attn.qkv",),
        ("attn.proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
