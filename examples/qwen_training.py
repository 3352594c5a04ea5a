"""Two speed-ups for training Qwen2-VL on batches of equal-size images (the hard benchmark's 96x96 scenes).

Stock Qwen2-VL (transformers 5.x, without flash-attention) runs vision attention once per image (a Python loop of
``batch`` small attention calls per block, forward and backward) and recomputes the 3D rope positions row by row
(``tolist()`` per row). With every image the same size and every row right-padded behind the same prompt prefix,
both can be done once per batch with identical results (``tests/test_scenes_hard.py`` checks both equalities):

- :func:`batch_vision_attention` reshapes the packed patches to ``[images, patches, ...]`` and calls attention once;
- :func:`shared_positions` computes the longest row's positions and gives them to every row (a row's positions
  depend only on the tokens before them, and pad positions are never attended).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def batch_vision_attention(model: Any, patches_per_image: int) -> int:
    """Make the vision tower's attention modules attend image by image in one batched call; returns how many."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention, apply_rotary_pos_emb_vision

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (t.reshape(n // patches_per_image, patches_per_image, self.num_heads, -1).transpose(1, 2)
                   for t in (q, k, v))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(n, -1))

    modules = [m for m in model.modules() if isinstance(m, VisionAttention)]
    for m in modules:
        m.forward = types.MethodType(forward, m)
    return len(modules)


def shared_positions(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen2-VL's 3D rope ``position_ids`` for a right-padded batch whose rows share the prompt prefix."""
    mask = inputs["attention_mask"]
    j = int(mask.sum(1).argmax())
    row = {k: inputs[k][j : j + 1] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    positions, _ = model.model.get_rope_index(image_grid_thw=inputs["image_grid_thw"][:1], **row)
    return positions.expand(-1, mask.shape[0], -1)
