"""Dense bit packing of small unsigned integer codes into ``int32`` words (pure torch).

Layout (the compressed-tensors ``pack-quantized`` layout): along the packed dimension, element ``i`` occupies the
bits ``[bits * i, bits * i + bits)`` of the little-endian bit stream formed by the ``int32`` words, so ``n`` codes
take ``ceil(n * bits / 32)`` words and no bit is wasted. When ``bits`` divides 32 (1, 2, 4, 8) no code straddles
two words and word ``w`` simply holds elements ``w * 32 // bits ...`` at bit offsets ``0, bits, 2 * bits, ...``;
for other widths (3, 5, 6, 7) a code may continue in the next word.

Codes here are unsigned, in ``[0, 2^bits)``. Signed codes (symmetric quantization, ``[-2^(bits-1), 2^(bits-1))``)
are stored with the offset ``+2^(bits-1)``: see :func:`to_unsigned` / :func:`to_signed`.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

__all__ = ["pack_int32", "packed_length", "to_signed", "to_unsigned", "unpack_int32"]

_WORD = 32
_MASK32 = (1 << _WORD) - 1


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}.")


def _check_dim(t: Tensor, dim: int) -> int:
    if t.dim() != 2:
        raise ValueError(f"Expected a 2-D tensor, got shape {tuple(t.shape)}.")
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 or 1 for a 2-D tensor, got {dim}.")
    return dim % 2


def packed_length(n: int, bits: int) -> int:
    """Number of ``int32`` words holding ``n`` codes of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(n * bits / _WORD)


def to_unsigned(codes: Tensor, bits: int) -> Tensor:
    """Shift signed codes in ``[-2^(bits-1), 2^(bits-1))`` to ``[0, 2^bits)`` (returns ``int32``)."""
    _check_bits(bits)
    return codes.to(torch.int32) + (1 << (bits - 1))


def to_signed(codes: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`to_unsigned` (returns ``int32``)."""
    _check_bits(bits)
    return codes.to(torch.int32) - (1 << (bits - 1))


def _bit_positions(bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the 32 elements of one ``bits``-word block: word index and bit offset of each element."""
    start = torch.arange(_WORD, device=device, dtype=torch.int64) * bits
    return start // _WORD, start % _WORD


def pack_int32(codes: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack unsigned codes densely into ``int32`` words along ``dim``.

    Args:
        codes: 2-D integer tensor with values in ``[0, 2^bits)``.
        bits: bits per code, 1..8.
        dim: dimension to pack along (1: the input dimension of a weight; 0: e.g. zero points).

    Returns:
        ``int32`` tensor whose size along ``dim`` is ``ceil(n * bits / 32)``; the other size is unchanged.

    Raises:
        ValueError: on a float tensor, a wrong shape, bits outside 1..8 or codes outside ``[0, 2^bits)``.
    """
    _check_bits(bits)
    dim = _check_dim(codes, dim)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_int32 needs integer codes, got {codes.dtype}.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(
            f"Codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got "
            f"[{int(codes.min())}, {int(codes.max())}]; shift signed codes with to_unsigned first."
        )
    values = codes.to(torch.int64)
    if dim == 0:
        values = values.t()
    rows, n = values.shape
    words = packed_length(n, bits)
    blocks = math.ceil(n / _WORD)
    values = torch.nn.functional.pad(values, (0, blocks * _WORD - n)).reshape(rows, blocks, _WORD)
    word, offset = _bit_positions(bits, values.device)
    out = torch.zeros(rows, blocks, bits, dtype=torch.int64, device=values.device)
    out.scatter_add_(2, word.expand(rows, blocks, _WORD), (values << offset) & _MASK32)
    spill = offset + bits > _WORD  # codes continuing in the next word
    if bool(spill.any()):
        high = values[..., spill] >> (_WORD - offset[spill])
        out.scatter_add_(2, (word[spill] + 1).expand(rows, blocks, int(spill.sum())), high)
    out = out.reshape(rows, blocks * bits)[:, :words]
    out = torch.where(out >= 1 << (_WORD - 1), out - (1 << _WORD), out).to(torch.int32)  # two's complement view
    return (out.t() if dim == 0 else out).contiguous()


def unpack_int32(packed: Tensor, bits: int, length: int, dim: int = 1) -> Tensor:
    """Unpack codes written by :func:`pack_int32`.

    Args:
        packed: 2-D ``int32`` tensor.
        bits: bits per code, 1..8.
        length: number of codes along ``dim`` (the unpacked size).
        dim: dimension that was packed.

    Returns:
        ``uint8`` tensor of unsigned codes, ``length`` long along ``dim``.

    Raises:
        ValueError: on a non-``int32`` tensor or a ``length`` that does not match the number of words.
    """
    _check_bits(bits)
    dim = _check_dim(packed, dim)
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32 needs an int32 tensor, got {packed.dtype}.")
    words = packed.shape[dim]
    if length < 0 or packed_length(length, bits) != words:
        raise ValueError(
            f"{words} packed words along dim {dim} cannot hold exactly {length} codes of {bits} bits "
            f"(that needs {packed_length(max(length, 0), bits)} words)."
        )
    data = packed.t() if dim == 0 else packed
    rows = data.shape[0]
    if 8 % bits == 0 and sys.byteorder == "little":  # codes never straddle a byte: work on the bytes, 1 B/code
        data = data.contiguous().view(torch.uint8)  # byte j holds bits 8j .. 8j+7 of the row's stream
        if bits == 8:
            return (data[:, :length].t() if dim == 0 else data[:, :length]).contiguous()
        shifts = torch.arange(0, 8, bits, device=data.device, dtype=torch.uint8)
        out = ((data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :length]
        return (out.t() if dim == 0 else out).contiguous()
    if _WORD % bits == 0:  # no code straddles a word: shift every word by each slot offset
        shifts = torch.arange(0, _WORD, bits, device=data.device, dtype=torch.int32)
        out = ((data.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :length]
    else:
        blocks = math.ceil(length / _WORD)
        full = torch.nn.functional.pad(data.to(torch.int64) & _MASK32, (0, blocks * bits - words))
        full = full.reshape(rows, blocks, bits)
        word, offset = _bit_positions(bits, data.device)
        nxt = torch.nn.functional.pad(full, (0, 1))[..., word + 1] & 0xFF  # the next word's low byte suffices
        window = full[..., word] | (nxt << _WORD)
        out = ((window >> offset) & ((1 << bits) - 1)).reshape(rows, -1)[:, :length]
    out = out.to(torch.uint8)
    return (out.t() if dim == 0 else out).contiguous()
