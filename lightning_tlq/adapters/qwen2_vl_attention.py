"""Qwen2-VL's vision attention for images of one size: one attention call per block instead of one per image.

Stock Qwen2-VL (transformers 5.x, without flash-attention) packs every image's patches into one sequence and
runs attention image by image, a Python loop of small calls per block: for calibration batches of equal-size
images (8 images x 32 blocks x 16 batches at 7B) that loop is host-bound. When every image of the call has the
same number of patches and the model's attention is SDPA, :func:`batched_vision_attention` reshapes the patches
to ``[images, heads, patches, dim]`` and calls SDPA once: the same arithmetic per image
(``tests/test_adapters.py`` checks the capture is identical). Anything else (other attention implementations,
images of different sizes) takes the stock path.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn


def _forward(stock):
    def forward(self, hidden_states: Tensor, cu_seqlens: Tensor, position_embeddings=None, **kwargs) -> Tensor:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the stock path synchronises here too
        if position_embeddings is None or self.training or len(set(lengths)) != 1:
            return stock(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        n, per = hidden_states.shape[0], lengths[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (t.reshape(n // per, per, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(n, -1))

    return forward


@contextlib.contextmanager
def batched_vision_attention(model: nn.Module) -> Iterator[int]:
    """Within: Qwen2-VL vision attention modules of ``model`` batch equal-size images (yields how many modules);
    their stock forwards are restored on exit. A no-op unless the vision config asks for SDPA."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

    modules = [
        m
        for m in model.modules()
        if type(m) is VisionAttention and getattr(m.config, "_attn_implementation", None) == "sdpa"
    ]
    before = [m.__dict__.get("forward") for m in modules]  # an instance's own forward, if it had one
    for m in modules:
        m.forward = types.MethodType(_forward(m.forward), m)
    try:
        yield len(modules)
    finally:
        for m, own in zip(modules, before):
            if own is None:
                del m.forward  # the class's forward again
            else:
                m.forward = own
