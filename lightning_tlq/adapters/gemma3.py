"""Adapter for Gemma 3 (``model_type="gemma3"``): SigLIP, pooled projector, Gemma3 decoder with sliding layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from lightning_tlq.adapters.base import VLMAdapter, register_adapter


@register_adapter
class Gemma3Adapter(VLMAdapter):
    """Gemma 3 vision-language models.

    - Sliding-window and full-attention layers get different masks and RoPE bases; the base capture records each
      layer's own kwargs, so replay is exact (replaying with another layer's kwargs is not).
    - ``token_type_ids`` (1 on image tokens) make attention bidirectional inside each image, as the processor
      sets it at inference; it is derived from ``input_ids`` when the batch lacks it, so calibration sees the
      same masks as inference.
    - The LM head is tied to the input embeddings and is never quantized.
    - The projector applies a raw ``mm_input_projection_weight`` parameter (not an ``nn.Linear``); it stays in
      full precision with the vision tower.

    Decoder layers (q/k/v/o with ``q_norm``/``k_norm``, gate/up/down) match the default groups. Its RMSNorms compute
    ``(1 + weight) * n(x)`` and the MLP reads ``pre_feedforward_layernorm`` (``post_attention_layernorm`` normalises
    the attention output before the residual add), which is where awq / smoothquant / mbq fold the MLP scales.
    """

    model_types: ClassVar[tuple[str, ...]] = ("gemma3",)
    forward_keys: ClassVar[tuple[str, ...]] = (*VLMAdapter.forward_keys, "token_type_ids")
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_tower", "model.multi_modal_projector")
    smoothing_producers: ClassVar[tuple[str | None, ...] | None] = (
        "input_layernorm",
        "self_attn.v_proj",
        "pre_feedforward_layernorm",
        "mlp.up_proj",
    )
    norm_weight_offset: ClassVar[float] = 1.0

    def forward_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Build forward kwargs, adding ``token_type_ids`` (1 on image tokens) if the batch has none.

        Args:
            batch: Collated batch with at least ``input_ids``.

        Returns:
            Keyword arguments for ``model(**kwargs)``.
        """
        inputs = super().forward_inputs(batch)
        if "token_type_ids" not in inputs:
            inputs["token_type_ids"] = (inputs["input_ids"] == self.image_token_id).long()
        return inputs
