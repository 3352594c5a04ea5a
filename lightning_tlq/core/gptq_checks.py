"""Argument checks of the GPTQ solver (:mod:`lightning_tlq.core.gptq`) and the choice of its column loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lightning_tlq.core import gptq_triton
from lightning_tlq.core.factor import FACTOR_PRECISIONS, FactorPrecision, GPTQError
from lightning_tlq.core.factor import label as _label
from lightning_tlq.core.quantizer import QuantSpec

__all__ = ["KERNELS", "GPTQOptions", "Kernel", "Loop"]

Kernel = Literal["auto", "triton", "torch", "graph"]
"""The GPTQ column loop: ``triton`` the fused block step (:mod:`lightning_tlq.core.gptq_triton`, CUDA tensors,
``block_size <= 128``) run eagerly, ``graph`` the same fused loop replayed from a CUDA graph per shape
(:mod:`lightning_tlq.core.gptq_graph`: same kernels, same order, same codes; shapes over its memory budget run
eagerly), ``torch`` the eager loop (any device), ``auto`` the graph-replayed fused loop where the fused step
applies, else torch."""
KERNELS: tuple[str, ...] = get_args(Kernel)

Loop = Literal["torch", "triton", "graph"]
"""How one solve runs its column loop (:func:`_column_loop`): eager torch, eager fused, or fused from a graph."""


@dataclass(frozen=True)
class GPTQOptions:
    """The solver's settings, passed as one value through the solve (the public functions take them as keywords,
    see :func:`lightning_tlq.core.gptq.gptq_quantize`)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    max_retries: int = 3
    kernel: Kernel = "auto"
    factor_precision: FactorPrecision = "auto"


def _error(kind: type[Exception], name: str, message: str) -> Exception:
    """``kind("Module <name>: <message>")``, the form of every solver error."""
    return kind(f"Module {_label(name)}: {message}")


def _validate(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, opts: GPTQOptions, name: str) -> int:
    """Check arguments and return the number of Hessian groups."""
    if W.dim() != 2 or not W.is_floating_point():
        raise _error(ValueError, name, f"W must be a 2-D float tensor [out, in], got {W.dtype} {tuple(W.shape)}.")
    out_features, in_features = W.shape
    spec.check_shape(in_features, name)
    if opts.factor_precision not in FACTOR_PRECISIONS:
        raise _error(
            ValueError,
            name,
            f"factor_precision={opts.factor_precision!r} is not supported; "
            f"choose one of {', '.join(FACTOR_PRECISIONS)}.",
        )
    if H.dim() not in (2, 3) or tuple(H.shape[-2:]) != (in_features, in_features):
        raise _error(
            ValueError, name, f"H must be [in, in] or [G, in, in] with in={in_features}, got {tuple(H.shape)}."
        )
    groups = 1 if H.dim() == 2 else H.shape[0]
    if out_features % groups != 0:
        raise _error(
            ValueError, name, f"grouped Hessian has {groups} groups, which must divide out_features={out_features}."
        )
    if opts.block_size <= 0 or opts.damp <= 0 or opts.max_retries < 0:
        raise _error(
            ValueError,
            name,
            f"need block_size > 0, damp > 0 and max_retries >= 0, got {opts.block_size}, {opts.damp} and "
            f"{opts.max_retries}.",
        )
    if not bool(torch.isfinite(H).all()):
        raise _error(GPTQError, name, "Hessian contains NaN or Inf. Check the calibration inputs and token weights.")
    return groups


def _check_shared(
    weights: Sequence[torch.Tensor], H: torch.Tensor, spec: QuantSpec, opts: GPTQOptions, names: Sequence[str] | None
) -> tuple[list[str], int]:
    """Check several weights solved against one Hessian; return their names (``""`` each by default) and the number
    of Hessian groups."""
    names = list(names) if names is not None else [""] * len(weights)
    if not weights or len(names) != len(weights):
        raise ValueError(f"gptq_quantize_shared: need one name per weight, got {len(names)} for {len(weights)}.")
    if len({(W.dtype, W.device) for W in weights}) > 1:
        raise ValueError(f"gptq_quantize_shared: {', '.join(names)} must have one dtype and device.")
    return names, max(_validate(W, H, spec, opts, n) for W, n in zip(weights, names))


def _check_cross(cross: torch.Tensor, H: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(cross.shape) != tuple(H.shape):
        raise _error(
            ValueError,
            name,
            f"the cross term must have the Hessian's shape {tuple(H.shape)}, got {tuple(cross.shape)}.",
        )
    if not bool(torch.isfinite(cross).all()):
        raise _error(GPTQError, name, "the cross term contains NaN or Inf. Check the full-precision activations.")
    return cross.detach()


def _use_triton(kernel: str, W: torch.Tensor, block_size: int, name: str) -> bool:
    """Whether the column loop runs the fused Triton block step for this ``kernel`` choice (eagerly or replayed).

    Raises:
        ValueError: For an unknown ``kernel``, or ``kernel="triton"``/``"graph"`` where the fused step cannot run.
    """
    if kernel not in KERNELS:
        raise _error(ValueError, name, f"kernel={kernel!r} is not supported; choose one of {', '.join(KERNELS)}.")
    applies = W.is_cuda and block_size <= 128 and gptq_triton.available()
    if kernel in ("triton", "graph") and not applies:
        raise _error(
            ValueError,
            name,
            f"kernel={kernel!r} needs Triton installed, a CUDA weight and block_size <= 128 "
            f"(got device {W.device.type}, block_size {block_size}, Triton "
            f"{'available' if gptq_triton.available() else 'unavailable'}); use kernel='auto' or 'torch'.",
        )
    return applies and kernel != "torch"


def _column_loop(kernel: str, W: torch.Tensor, block_size: int, name: str) -> Loop:
    """The column loop that ``kernel`` selects for weights like ``W`` (checked as :func:`_use_triton` does)."""
    if not _use_triton(kernel, W, block_size, name):
        return "torch"
    return "triton" if kernel == "triton" else "graph"
