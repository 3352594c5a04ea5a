"""Argument checks of the GPTQ solver (:mod:`lightning_tlq.core.gptq`) and the choice of its column loop."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from lightning_tlq.core import gptq_triton
from lightning_tlq.core.factor import GPTQError
from lightning_tlq.core.factor import label as _label
from lightning_tlq.core.quantizer import QuantSpec

__all__ = ["KERNELS", "Kernel"]

Kernel = Literal["auto", "triton", "torch"]
"""The GPTQ column loop: ``triton`` the fused block step (:mod:`lightning_tlq.core.gptq_triton`, CUDA tensors,
``block_size <= 128``), ``torch`` the eager loop (any device), ``auto`` the fused step where it applies, else torch."""
KERNELS: tuple[str, ...] = get_args(Kernel)


def _validate(
    W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int, damp: float, max_retries: int, name: str
) -> int:
    """Check arguments and return the number of Hessian groups."""
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(
            f"Module {_label(name)}: W must be a 2-D float tensor [out, in], got {W.dtype} {tuple(W.shape)}."
        )
    out_features, in_features = W.shape
    spec.check_shape(in_features, name)
    if H.dim() not in (2, 3) or tuple(H.shape[-2:]) != (in_features, in_features):
        raise ValueError(
            f"Module {_label(name)}: H must be [in, in] or [G, in, in] with in={in_features}, got {tuple(H.shape)}."
        )
    groups = 1 if H.dim() == 2 else H.shape[0]
    if out_features % groups != 0:
        raise ValueError(
            f"Module {_label(name)}: grouped Hessian has {groups} groups, "
            f"which must divide out_features={out_features}."
        )
    if block_size <= 0 or damp <= 0 or max_retries < 0:
        raise ValueError(
            f"Module {_label(name)}: need block_size > 0, damp > 0 and max_retries >= 0, "
            f"got {block_size}, {damp} and {max_retries}."
        )
    if not bool(torch.isfinite(H).all()):
        raise GPTQError(
            f"Module {_label(name)}: Hessian contains NaN or Inf. Check the calibration inputs and token weights."
        )
    return groups


def _check_cross(cross: torch.Tensor, H: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(cross.shape) != tuple(H.shape):
        raise ValueError(
            f"Module {_label(name)}: the cross term must have the Hessian's shape {tuple(H.shape)}, "
            f"got {tuple(cross.shape)}."
        )
    if not bool(torch.isfinite(cross).all()):
        raise GPTQError(
            f"Module {_label(name)}: the cross term contains NaN or Inf. Check the full-precision activations."
        )
    return cross.detach()


def _use_triton(kernel: str, W: torch.Tensor, block_size: int, name: str) -> bool:
    """Whether the column loop runs the fused Triton block step for this ``kernel`` choice.

    Raises:
        ValueError: For an unknown ``kernel``, or ``kernel="triton"`` where the fused step cannot run.
    """
    if kernel not in KERNELS:
        raise ValueError(
            f"Module {_label(name)}: kernel={kernel!r} is not supported; choose one of {', '.join(KERNELS)}."
        )
    applies = W.is_cuda and block_size <= 128 and gptq_triton.available()
    if kernel == "triton" and not applies:
        raise ValueError(
            f"Module {_label(name)}: kernel='triton' needs Triton installed, a CUDA weight and block_size <= 128 "
            f"(got device {W.device.type}, block_size {block_size}, Triton "
            f"{'available' if gptq_triton.available() else 'unavailable'}); use kernel='auto' or 'torch'."
        )
    return applies and kernel != "torch"
