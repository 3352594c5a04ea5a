"""Integer weight quantization grids: specs, per-group parameters and round-to-nearest.

Conventions (shared by RTN, GPTQ and the exporters):

* Weights are 2-D ``[out_features, in_features]``; groups run along ``in_features`` and
  ``group_size == -1`` means one group per output channel (the whole row).
* ``scale`` and ``zero`` have shape ``[out_features, n_groups]`` and dtype ``float32``; ``zero``
  holds integer values.
* Symmetric: signed codes in ``[-2^(b-1), 2^(b-1) - 1]``, ``zero == 0`` and
  ``scale = absmax / ((qmax - qmin) / 2)`` (the compressed-tensors convention, e.g. ``absmax / 7.5``
  at 4 bits). Every weight of the group then lies within ``scale / 2`` of a grid point.
* Asymmetric: unsigned codes in ``[0, 2^b - 1]``, ``lo = min(w.min(), 0)``, ``hi = max(w.max(), 0)``,
  ``scale = (hi - lo) / qmax`` and ``zero = round(-lo / scale)`` (an integer inside the code range).
* Quantize: ``code = clamp(round(w / scale) + zero, qmin, qmax)`` (round half to even);
  dequantize: ``(code - zero) * scale`` computed in float32.
* Groups whose scale would be zero (all-zero groups) get ``scale = 1`` and ``zero = 0``, so they
  quantize to exact zeros without NaN.
* Codes are ``int8`` for symmetric specs and ``int32`` for asymmetric ones (8-bit unsigned codes
  do not fit ``int8``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_MIN_BITS = 2
_MAX_BITS = 8


@dataclass(frozen=True)
class QuantSpec:
    """Describes an integer weight-quantization grid.

    Attributes:
        bits: Bits per weight code, between 2 and 8.
        group_size: Number of consecutive input columns sharing one scale/zero, or -1 for one
            group per output channel.
        symmetric: Signed codes with zero point 0 if True; unsigned codes with an integer zero
            point if False.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        """Validate the fields.

        Raises:
            ValueError: If ``bits`` or ``group_size`` is out of range.
        """
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not _MIN_BITS <= self.bits <= _MAX_BITS:
            raise ValueError(f"QuantSpec.bits must be an integer in {_MIN_BITS}..{_MAX_BITS}, got {self.bits!r}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"QuantSpec.group_size must be an integer, got {self.group_size!r}.")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(
                f"QuantSpec.group_size must be -1 (one group per output channel) or a positive integer, "
                f"got {self.group_size}."
            )

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """Integer dtype used for codes: ``int8`` if symmetric, ``int32`` otherwise."""
        return torch.int8 if self.symmetric else torch.int32

    def compressed_tensors_args(self, *, act_order: bool = False) -> dict[str, object]:
        """This grid as compressed-tensors ``QuantizationArgs`` fields: the ``weights`` entry of a config group.

        The one place that encodes a weight grid for ``config.json`` (the compressed-tensors export and the
        ``tlq_quantization`` record of calibrated directories both use it). Fields and their order are those
        llm-compressor 0.14 / compressed-tensors 0.19 write, without the observer settings (how scales were found,
        not how to read them).

        Args:
            act_order: GPTQ ran with act-order; declared as ``actorder: static`` (static groups, so no ``g_idx``).
        """
        channel = self.group_size == -1
        return {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.symmetric,
            "group_size": None if channel else self.group_size,
            "strategy": "channel" if channel else "group",
            "block_structure": None,
            "dynamic": False,
            "actorder": "static" if act_order else None,
            "scale_dtype": None,  # the model dtype
            "zp_dtype": None if self.symmetric else "torch.int8",  # signed, as compressed-tensors keeps them
        }

    def group_len(self, in_features: int) -> int:
        """Return the number of columns per group for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int, name: str = "") -> int:
        """Return the number of groups per row, after checking that the group size fits."""
        self.check_shape(in_features, name)
        return in_features // self.group_len(in_features)

    def check_shape(self, in_features: int, name: str = "") -> None:
        """Check that ``group_size`` divides ``in_features``.

        Args:
            in_features: Number of input columns of the weight.
            name: Module name used in the error message.

        Raises:
            ValueError: If the group size does not divide ``in_features``; the message lists
                valid group sizes.
        """
        if in_features <= 0:
            raise ValueError(f"Module {name or '<unnamed>'}: in_features must be positive, got {in_features}.")
        if self.group_size == -1 or in_features % self.group_size == 0:
            return
        suggestions = [g for g in (32, 64, 128, 256) if in_features % g == 0] + [-1]
        raise ValueError(
            f"Module {name or '<unnamed>'}: group_size={self.group_size} does not divide in_features={in_features}. "
            f"Use a group size that divides it, e.g. one of {suggestions} (-1 = one group per output channel), "
            f"or exclude this module from quantization."
        )


@dataclass
class QuantResult:
    """Result of quantizing one weight matrix.

    Attributes:
        weight: Dequantized weight ``[out, in]`` in the input weight's dtype and device.
        codes: Integer codes ``[out, in]`` (dtype ``spec.code_dtype``), original column order.
        scale: Per-group scales ``[out, n_groups]``, float32.
        zero: Per-group integer zero points ``[out, n_groups]``, float32.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"Expected a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}.")
    if not w.is_floating_point():
        raise ValueError(f"Expected a floating-point weight, got dtype {w.dtype}.")


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape ``[out, in]`` to ``[out, n_groups, group_len]`` in float32."""
    out_features, in_features = w.shape
    glen = spec.group_len(in_features)
    return w.float().reshape(out_features, in_features // glen, glen)


def compute_qparams(
    w: torch.Tensor, spec: QuantSpec, name: str = "", scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute per-group scales and zero points with a min-max (absmax) observer.

    Args:
        w: Weight ``[out, in]``, any float dtype.
        spec: Quantization grid.
        name: Module name used in error messages.
        scale_dtype: the dtype the scales will be stored in (checkpoints keep them in the model dtype). Scales
            are rounded to it *before* codes are chosen, so codes, scales and the dequantized weight agree
            exactly after export. Default: ``w``'s dtype.

    Returns:
        ``(scale, zero)``, each ``[out, n_groups]`` float32 on ``w``'s device.

    Raises:
        ValueError: If ``w`` is not 2-D float, holds NaN/Inf, or the group size does not divide ``in``.
    """
    _check_weight(w)
    spec.check_shape(w.shape[1], name)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"Module {name or '<unnamed>'}: weight contains NaN or Inf; cannot compute quantization scales."
        )
    g = _grouped(w, spec)
    representable = _representable(scale_dtype or w.dtype)
    return _symmetric_qparams(g, spec, representable) if spec.symmetric else _asymmetric_qparams(g, spec, representable)


def _representable(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round positive fp32 scales to values ``dtype`` can hold (kept >= its smallest normal)."""
    if dtype in (torch.float32, torch.float64) or not dtype.is_floating_point:
        return lambda scale: scale
    tiny = torch.finfo(dtype).tiny
    return lambda scale: scale.clamp_min(tiny).to(dtype).float()


def _symmetric_qparams(
    g: torch.Tensor, spec: QuantSpec, representable: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = g.abs().amax(dim=-1) / ((spec.qmax - spec.qmin) / 2)
    scale = representable(torch.where(scale > 0, scale, torch.ones_like(scale)))  # all-zero groups get scale 1
    return scale, torch.zeros_like(scale)


def _asymmetric_qparams(
    g: torch.Tensor, spec: QuantSpec, representable: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    scale = (hi - lo) / spec.qmax
    ok = scale > 0
    scale = representable(torch.where(ok, scale, torch.ones_like(scale)))  # all-zero groups: scale 1, zero 0
    zero = torch.where(ok, torch.round(-lo / scale).clamp(spec.qmin, spec.qmax), torch.zeros_like(scale))
    return scale, zero


def expand_qparams(t: torch.Tensor, in_features: int, spec: QuantSpec) -> torch.Tensor:
    """Repeat per-group parameters ``[out, n_groups]`` to per-column ``[out, in_features]``."""
    return t.repeat_interleave(spec.group_len(in_features), dim=1)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round values to integer codes, returned as float32 (elementwise, broadcasting qparams).

    This is the single rounding rule used by RTN and GPTQ: ``clamp(round(w / scale) + zero)``.
    """
    return (torch.round(w.float() / scale) + zero).clamp_(spec.qmin, spec.qmax)


def codes_to_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Map codes back to float32 values, ``(codes - zero) * scale`` (elementwise, broadcasting)."""
    return (codes.float() - zero) * scale


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize a weight to integer codes with given per-group parameters.

    Args:
        w: Weight ``[out, in]``.
        scale: Scales ``[out, n_groups]``.
        zero: Zero points ``[out, n_groups]``.
        spec: Quantization grid.

    Returns:
        Codes ``[out, in]`` of dtype ``spec.code_dtype``.
    """
    _check_weight(w)
    in_features = w.shape[1]
    codes = round_to_grid(w, expand_qparams(scale, in_features, spec), expand_qparams(zero, in_features, spec), spec)
    return codes.to(spec.code_dtype)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize integer codes.

    Args:
        codes: Codes ``[out, in]``.
        scale: Scales ``[out, n_groups]``.
        zero: Zero points ``[out, n_groups]``.
        spec: Quantization grid.
        dtype: Output dtype; values are computed in float32 and then cast.

    Returns:
        Weight ``[out, in]`` of dtype ``dtype``.
    """
    in_features = codes.shape[1]
    values = codes_to_values(codes, expand_qparams(scale, in_features, spec), expand_qparams(zero, in_features, spec))
    return values.to(dtype)


def rtn(w: torch.Tensor, spec: QuantSpec, name: str = "") -> QuantResult:
    """Round-to-nearest quantization with min-max per-group parameters.

    Args:
        w: Weight ``[out, in]``, any float dtype.
        spec: Quantization grid.
        name: Module name used in error messages.

    Returns:
        A :class:`QuantResult`; ``weight`` has ``w``'s dtype and device.
    """
    scale, zero = compute_qparams(w, spec, name)
    codes = quantize_codes(w, scale, zero, spec)
    return QuantResult(weight=dequantize(codes, scale, zero, spec, dtype=w.dtype), codes=codes, scale=scale, zero=zero)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, name: str = "") -> torch.Tensor:
    """Return the round-to-nearest quantized-dequantized weight in ``w``'s dtype."""
    return rtn(w, spec, name).weight
