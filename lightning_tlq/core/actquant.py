"""Per-token dynamic symmetric integer fake-quantization of activations (the ``A8`` of W4A8).

Convention (the compressed-tensors ``QuantizationArgs(type="int", symmetric=True, strategy="token",
dynamic=True)`` rule, so that a model exported in that format computes what calibration saw):

* a *token* is one row of the last dimension: ``x [..., C]`` has one scale per index of ``x[..., 0]``;
* ``qmin, qmax = -2^(b-1), 2^(b-1) - 1`` (``-128, 127`` at 8 bits);
* ``scale = max(absmax(row) / ((qmax - qmin) / 2), eps)`` with ``eps = torch.finfo(float32).eps``, i.e.
  ``absmax / 127.5`` at 8 bits. All-zero rows therefore get ``scale = eps`` and quantize to exact zeros;
* ``code = clamp(round(x / scale), qmin, qmax)`` with round half to even; ``x_hat = code * scale``.

Every value lies within ``scale / 2`` of ``x_hat``: ``|x / scale| <= 127.5``, and the only value that rounds
outside the code range is ``+127.5``, which is clamped to 127, again half a step away.

Scales and codes are computed in float32 and ``x_hat`` is cast back to the input dtype (compressed-tensors
computes in the input dtype; for float32 models the two agree exactly). Note that some runtime int8 kernels
(e.g. vLLM's ``scaled_int8_quant``) use ``absmax / 127`` instead: their grids differ from this one by 0.4 %.
NaN in a row makes that row's scale and output NaN; callers check finiteness where it matters.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIN_BITS = 2
_MAX_BITS = 8
_EPS = torch.finfo(torch.float32).eps


def check_act_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported activation bit width (an integer in 2..8), else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f"Activation bits must be an integer in {_MIN_BITS}..{_MAX_BITS}, got {bits!r}.")
    return bits


def token_activation_args(bits: int) -> dict[str, object]:
    """Dynamic symmetric per-token activations as compressed-tensors ``QuantizationArgs`` fields (the
    ``input_activations`` entry of a config group); the one place that encodes them for ``config.json``."""
    return {
        "num_bits": check_act_bits(bits),
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "token",
        "block_structure": None,
        "dynamic": True,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None,
    }


def act_range(bits: int) -> tuple[int, int]:
    """Signed code range ``(qmin, qmax)`` of ``bits``-bit activations."""
    check_act_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Activation quantization needs a floating-point tensor, got {kind}.")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"Activation quantization needs a tensor [..., C] with C >= 1, got {tuple(x.shape)}.")


def per_token_scale(x: Tensor, bits: int = 8) -> Tensor:
    """Per-token scales ``[..., 1]`` (float32) of ``x [..., C]``."""
    _check_input(x)
    qmin, qmax = act_range(bits)
    absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return (absmax / ((qmax - qmin) / 2)).clamp_min(_EPS)


def quantize_per_token(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Quantize activations to integer codes.

    Args:
        x: Activations ``[..., C]``, any float dtype.
        bits: Code width (8 for W4A8).

    Returns:
        ``(codes, scale)``: codes ``[..., C]`` as ``int8`` and scales ``[..., 1]`` float32, with
        ``x ~= codes * scale``.
    """
    scale = per_token_scale(x, bits)
    qmin, qmax = act_range(bits)
    codes = torch.round(x.float() / scale).clamp_(qmin, qmax)
    return codes.to(torch.int8), scale


def fake_quantize_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Quantize-dequantize ``x [..., C]`` per token; the result has ``x``'s dtype, shape and device.

    The rounding has zero gradient almost everywhere: this is for calibration and evaluation forwards, not for
    training through the quantizer.
    """
    scale = per_token_scale(x, bits)
    qmin, qmax = act_range(bits)
    return (torch.round(x.float() / scale).clamp_(qmin, qmax) * scale).to(x.dtype)
