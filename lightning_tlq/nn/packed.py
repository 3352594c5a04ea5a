"""``PackedLinear``: a linear layer that keeps its weight as packed integer codes and dequantizes on the fly.

The buffers mirror the compressed-tensors ``pack-quantized`` tensors of one module (``weight_packed``,
``weight_scale``, ``weight_zero_point`` for asymmetric grids, ``weight_shape``), so a layer loads straight from
an exported checkpoint and holds about ``bits / 16`` of the bf16 weight plus its scales.

Forward paths:

* ``dequant`` (CPU default): unpack, ``(code - zero) * scale`` in the scale dtype (exactly what compressed-tensors
  computes), then ``F.linear``. Only one layer's dense weight exists at a time.
* ``int4``: torch's tiled int4 matmul (``torch._weight_int4pack_mm`` on CUDA, ``_weight_int4pack_mm_for_cpu`` on
  CPU) for 4-bit grids with group sizes 32..256; the tiled weight is built once per device and cached (it does not
  enter the state dict). ``auto`` picks it on CUDA for bf16 inputs where torch provides it, else ``dequant``.

With ``act_bits=8`` the input is first fake-quantized per token (dynamic, symmetric int8), the activation scheme
the exporter declares for W4A8/W8A8.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tlq.core.pack import pack_int32, packed_length, unpack_int32

__all__ = ["Kernel", "PackedLinear", "fake_quantize_tokens"]

Kernel = Literal["auto", "dequant", "int4"]
_KERNELS = ("auto", "dequant", "int4")
_INT4_GROUPS = (32, 64, 128, 256)


def fake_quantize_tokens(x: Tensor, bits: int = 8) -> Tensor:
    """Dynamic symmetric per-token fake quantization over the last dimension (compressed-tensors' convention).

    ``scale = absmax / ((qmax - qmin) / 2)`` per token (zero scales replaced by the dtype's eps), codes
    ``clamp(round(x / scale), qmin, qmax)``, result ``codes * scale``; computed in ``x``'s dtype.
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    scale = x.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return torch.clamp(x / scale, qmin, qmax).round() * scale


class PackedLinear(nn.Module):
    """A linear layer with a packed integer weight (compressed-tensors ``pack-quantized`` buffers).

    Args:
        in_features: input size.
        out_features: output size.
        bits: bits per weight code, 1..8.
        group_size: input columns per scale, or -1 for one scale per output channel.
        symmetric: signed codes and no zero point; else unsigned codes with a packed integer zero point.
        bias: whether the layer has a bias.
        act_bits: None, or 8 to fake-quantize inputs per token (dynamic int8).
        dtype: dtype of the scales, bias and output.
        device: where the buffers live.
        kernel: ``auto``, ``dequant`` or ``int4`` (see the module docstring).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int = 128,
        symmetric: bool = True,
        bias: bool = True,
        act_bits: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: Any = None,
        kernel: Kernel = "auto",
    ) -> None:
        super().__init__()
        if group_size != -1 and (group_size <= 0 or in_features % group_size):
            raise ValueError(f"group_size={group_size} must be -1 or divide in_features={in_features}.")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits!r}.")
        if kernel not in _KERNELS:
            raise ValueError(f"kernel={kernel!r} is not one of {_KERNELS}.")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.act_bits, self.kernel = act_bits, kernel
        groups = 1 if group_size == -1 else in_features // group_size
        words = packed_length(in_features, bits)  # also validates bits
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            zp_rows = packed_length(out_features, bits)
            self.register_buffer("weight_zero_point", torch.zeros(zp_rows, groups, dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._int4: tuple[torch.device, Tensor, Tensor, int] | None = None

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scale: Tensor,
        zero: Tensor | None,
        *,
        bits: int,
        group_size: int,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> PackedLinear:
        """Build a layer from unsigned codes ``[out, in]``, scales ``[out, groups]`` and zero points (None if the
        grid is symmetric: the codes then carry the offset ``2^(bits-1)``)."""
        out_features, in_features = codes.shape
        dtype = dtype or scale.dtype
        layer = cls(
            in_features,
            out_features,
            bits=bits,
            group_size=group_size,
            symmetric=zero is None,
            bias=bias is not None,
            dtype=dtype,
            **kwargs,
        )
        layer.weight_packed.copy_(pack_int32(codes, bits))
        layer.weight_scale.copy_(scale.to(dtype))
        if zero is not None:
            layer.weight_zero_point.copy_(pack_int32(zero.round().to(torch.int32), bits, dim=0))
        if bias is not None:
            layer.bias.data.copy_(bias.to(dtype))
        return layer

    def extra_repr(self) -> str:
        grid = "sym" if self.symmetric else "asym"
        act = f", act_bits={self.act_bits}" if self.act_bits else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, {grid}, bias={self.bias is not None}{act}, kernel={self.kernel}"
        )

    # --------------------------------------------------------------------------------------------- weights
    def codes(self) -> Tensor:
        """Unsigned codes ``[out, in]`` (int32)."""
        return unpack_int32(self.weight_packed, self.bits, self.in_features).to(torch.int32)

    def zero_points(self) -> Tensor:
        """Integer zero points ``[out, groups]`` (int32) in the unsigned code domain."""
        if self.symmetric:
            return torch.full_like(self.weight_scale, 1 << (self.bits - 1), dtype=torch.int32)
        return unpack_int32(self.weight_zero_point, self.bits, self.out_features, dim=0).to(torch.int32)

    def dequantize_weight(self) -> Tensor:
        """The dense weight ``[out, in]`` in the scale dtype: ``(code - zero) * scale``.

        Computed like compressed-tensors, in the scale dtype: codes and zero points are integers below 256, exact
        in every float dtype, so only the product rounds. Transient memory: 1 + 2 bytes per weight (bf16).
        """
        dtype, groups = self.weight_scale.dtype, self.weight_scale.shape[1]
        codes = unpack_int32(self.weight_packed, self.bits, self.in_features)  # uint8
        w = codes.view(self.out_features, groups, -1).to(dtype)
        del codes
        w.sub_(self.zero_points().to(dtype).unsqueeze(-1)).mul_(self.weight_scale.unsqueeze(-1))
        return w.view(self.out_features, self.in_features)

    def memory_bytes(self) -> int:
        """Bytes held by the quantized weight (packed codes, scales, zero points), bias excluded."""
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n in names)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._int4 = None  # new codes: rebuild the tiled weight on the next int4 forward
        super()._load_from_state_dict(*args, **kwargs)

    # --------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            x = fake_quantize_tokens(x, self.act_bits)
        if self._use_int4(x):
            return self._int4_forward(x)
        w = self.dequantize_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def int4_supported(self, device: torch.device | str) -> bool:
        """Whether the tiled int4 matmul can run this layer on ``device``'s type."""
        device = torch.device(device)
        op = "_weight_int4pack_mm" if device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
        glen = self.in_features if self.group_size == -1 else self.group_size
        return (
            device.type in ("cuda", "cpu")
            and hasattr(torch.ops.aten, op)
            and self.bits == 4
            and glen in _INT4_GROUPS
            and self.out_features % 8 == 0
            and self._inner_k_tiles() is not None
        )

    def _inner_k_tiles(self) -> int | None:
        return next((t for t in (8, 4, 2) if self.in_features % (t * 16) == 0), None)

    def _use_int4(self, x: Tensor) -> bool:
        if self.kernel == "dequant":
            return False
        if self.kernel == "int4":
            if not self.int4_supported(x.device):
                raise RuntimeError(
                    f"kernel='int4' cannot run this layer ({self.extra_repr()}) on {x.device.type}: it needs 4-bit "
                    f"codes, a group size in {_INT4_GROUPS}, out_features % 8 == 0, in_features % 32 == 0 and "
                    "torch's int4pack ops. Use kernel='dequant'."
                )
            return True
        return x.is_cuda and x.dtype == torch.bfloat16 and self.int4_supported(x.device)

    def _int4_weight(self, device: torch.device) -> tuple[Tensor, Tensor, int]:
        if self._int4 is not None and self._int4[0] == device:
            return self._int4[1:]
        tiles = self._inner_k_tiles()
        codes = self.codes().to(device)
        if device.type == "cuda":  # two codes per byte, high nibble first
            tiled = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), tiles)
        else:
            tiled = torch._convert_weight_to_int4pack_for_cpu(codes, tiles)
        # torch's int4 kernels compute (q - 8) * scale + zero: fold our integer zero point into a float offset
        scale = self.weight_scale.to(device)
        offset = (8 - self.zero_points().to(device)).to(scale.dtype) * scale
        scales_and_zeros = torch.stack([scale.t(), offset.t()], dim=-1).contiguous()
        self._int4 = (device, tiled, scales_and_zeros, self.in_features if self.group_size == -1 else self.group_size)
        return self._int4[1:]

    def _int4_forward(self, x: Tensor) -> Tensor:
        tiled, scales_and_zeros, glen = self._int4_weight(x.device)
        flat = x.reshape(-1, self.in_features)
        if x.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(flat, tiled, glen, scales_and_zeros.to(x.dtype))
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, tiled, glen, scales_and_zeros.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)
