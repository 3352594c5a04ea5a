"""Packed quantized layers."""

from lightning_tlq.nn.packed import PackedLinear, fake_quantize_tokens

__all__ = ["PackedLinear", "fake_quantize_tokens"]
