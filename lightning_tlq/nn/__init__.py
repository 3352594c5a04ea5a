"""Packed quantized layers and the loader of exported checkpoints."""

from lightning_tlq.nn.loader import PackedScheme, load_packed, packed_memory, parse_quantization_config
from lightning_tlq.nn.packed import PackedLinear, fake_quantize_tokens

__all__ = [
    "PackedLinear",
    "PackedScheme",
    "fake_quantize_tokens",
    "load_packed",
    "packed_memory",
    "parse_quantization_config",
]
