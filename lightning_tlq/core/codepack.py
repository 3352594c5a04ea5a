"""Integer codes of at most 4 bits kept several to a byte in host memory while a run goes on.

A calibrated module's codes are needed only at the end (checkpoints, export); until then one byte per weight
(``int8``, or ``int32`` for asymmetric specs) is most of what a run adds to host memory: 0.5 GiB per decoder layer
of a 32B model. Codes of 3-4 bits are kept two to a byte, of 1-2 bits four to a byte, as offsets from ``qmin``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedCodes:
    """Codes ``[out, in]`` packed along ``in``: ``per`` codes of ``width`` bits to a byte, stored as code - qmin."""

    data: Tensor
    """``uint8 [out, ceil(in / per)]``."""
    in_features: int
    width: int
    qmin: int
    dtype: torch.dtype
    """The dtype :meth:`unpack` returns (the spec's code dtype)."""

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.in_features))

    def to(self, device: torch.device | str) -> PackedCodes:
        """The same codes with their bytes on ``device``."""
        return replace(self, data=self.data.to(device))

    def unpack(self) -> Tensor:
        """The codes as they were packed, on ``data``'s device."""
        per = 8 // self.width
        shifts = torch.arange(0, 8, self.width, dtype=torch.uint8, device=self.data.device)
        parts = (self.data.unsqueeze(-1) >> shifts) & ((1 << self.width) - 1)
        flat = parts.reshape(self.data.shape[0], self.data.shape[1] * per)[:, : self.in_features]
        return flat.to(self.dtype) + self.qmin


def code_width(bits: int) -> int | None:
    """Bits a packed code takes (2 or 4), or None for codes kept as they are (more than 4 bits)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else None


def pack_codes(codes: Tensor, bits: int, qmin: int) -> PackedCodes | Tensor:
    """``codes [out, in]`` (every value in ``qmin .. qmin + 2**bits - 1``) packed on their device; codes of more
    than 4 bits are returned as they are."""
    width = code_width(bits)
    if width is None:
        return codes
    if codes.dim() != 2:
        raise ValueError(f"pack_codes expects codes [out, in], got shape {tuple(codes.shape)}.")
    per, (rows, cols) = 8 // width, codes.shape
    offsets = (codes - qmin).to(torch.uint8)
    pad = -cols % per
    if pad:
        offsets = torch.nn.functional.pad(offsets, (0, pad))
    groups = offsets.view(rows, -1, per)
    data = groups[..., 0].clone()
    for j in range(1, per):
        data |= groups[..., j] << (j * width)
    return PackedCodes(data, cols, width, qmin, codes.dtype)
