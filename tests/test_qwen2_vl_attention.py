"""Qwen2-VL's batched vision attention (capture of equal-size images): the stock results, stock forwards after."""

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

from lightning_tlq.activations import LayerReplay
from lightning_tlq.adapters import get_adapter
from lightning_tlq.adapters.qwen2_vl_attention import batched_vision_attention
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.models.tiny import build_tiny_vlm


@pytest.fixture(scope="module")
def qwen():
    model, processor = build_tiny_vlm("qwen2_vl", seed=0)
    return model.eval(), processor


def _attention_call(module, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, dim = sum(lengths), module.dim
    hidden = torch.randn(n, dim, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    angles = torch.randn(n, module.head_dim, generator=g)
    return hidden, cu, (angles.cos(), angles.sin())


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16], [16, 8, 16]])
def test_attention_equals_the_stock_forward(qwen, lengths):
    """Equal sizes take the batched path, others the stock one; either way the stock result, bit for bit."""
    model, _ = qwen
    module = next(m for m in model.modules() if isinstance(m, VisionAttention))
    hidden, cu, pos = _attention_call(module, lengths)
    with torch.no_grad():
        stock = module(hidden, cu, pos)
        with batched_vision_attention(model) as patched:
            assert patched == sum(isinstance(m, VisionAttention) for m in model.modules()) > 0
            fast = module(hidden, cu, pos)
    assert torch.equal(fast, stock)
    assert "forward" not in module.__dict__  # the class's forward again


def test_capture_is_unchanged(qwen):
    """The decoder inputs captured with the adapter's fast vision path equal those of the stock tower."""
    model, processor = qwen
    adapter = get_adapter(model)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(4, seed=2)]
    batch = make_batches(encoded, 4, adapter.pad_token_id)[0]
    assert len(set(batch["image_grid_thw"].prod(-1).tolist())) == 1  # equal-size images: the batched path runs
    replay = LayerReplay(adapter, torch.device("cpu"))
    fast = replay.capture([batch])[0].hidden  # inside adapter.fast_vision()
    with torch.no_grad():
        stock = adapter.capture(adapter.forward_inputs(batch)).hidden
    assert torch.equal(fast, stock)


def test_other_attention_implementations_are_left_alone(qwen):
    model, _ = qwen
    modules = [m for m in model.modules() if isinstance(m, VisionAttention)]
    before = [m.config._attn_implementation for m in modules]
    try:
        for m in modules:
            m.config._attn_implementation = "eager"
        with batched_vision_attention(model) as patched:
            assert patched == 0
            assert all("forward" not in m.__dict__ for m in modules)
    finally:
        for m, b in zip(modules, before):
            m.config._attn_implementation = b
