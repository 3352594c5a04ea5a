"""Factorisations behind GPTQ: the upper Cholesky factor of a damped inverse Hessian.

``damped_inverse_factor`` returns ``U`` with ``U^T U = (H + d I)^-1``, raising the damping tenfold on failure
(:func:`retry_damping`, the schedule the low-memory solve shares);
``inverse_upper_factor`` computes it from one Cholesky and one triangular inverse, and
``lower_triangular_inverse`` is that inverse by block recursion (mostly matrix products on a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("lightning_tlq.core.gptq")


class GPTQError(RuntimeError):
    """Raised when GPTQ cannot factorise the (damped) Hessian of a module."""


def label(name: str) -> str:
    return name or "<unnamed>"


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 2048, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of a lower-triangular ``L`` by 2 x 2 block recursion down to ``leaf`` columns, written into ``out``
    (None: a new tensor).

    ``[[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``: about ``n^3/3`` multiply-adds, nearly all in plain
    matrix products (TF32 kept off), where a triangular solve against the identity does ``n^3``. Blocks of at
    most ``leaf`` columns are solved directly, so matrices up to ``leaf`` take exactly that path.
    """
    n = L.shape[0]
    if n <= leaf:
        inverse = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
        return inverse if out is None else out.copy_(inverse)
    h = n // 2
    out = torch.zeros_like(L) if out is None else out.zero_()
    out[:h, :h] = lower_triangular_inverse(L[:h, :h], leaf)
    out[h:, h:] = lower_triangular_inverse(L[h:, h:], leaf)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out[h:, :h] = -(out[h:, h:] @ (L[h:, :h] @ out[:h, :h]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def triangular_inverse(L: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``L^-1`` as GPTQ computes it, into ``out`` (None: a new tensor): blocked on a GPU
    (:func:`lower_triangular_inverse`, mostly matrix products), one triangular solve against the identity on the CPU
    (the blocked form's ``leaf``-sized case)."""
    return lower_triangular_inverse(L, 2048 if L.is_cuda else L.shape[0], out)


def inverse_upper_factor(H: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Upper-triangular ``U`` with ``U^T U = H^-1``, from one Cholesky and one triangular inverse.

    With ``J`` the index reversal and ``J H J = L L^T``: ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper
    triangular. That is ``2n^3/3`` flops instead of ``5n^3/3`` for factor -> ``cholesky_inverse`` -> factor again.
    The triangular inverse is :func:`triangular_inverse` (blocked on a GPU, one solve on the CPU).
    Returns ``(U, ok)``; ``ok`` is False (and ``U`` meaningless) when ``H`` is not numerically positive definite.
    """
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return H, False
    U = triangular_inverse(L).flip(0, 1)
    return U, bool(torch.isfinite(U).all())


def retry_damping(
    attempt: Callable[[float], torch.Tensor | None], damp: float, max_retries: int, name: str
) -> tuple[torch.Tensor, float, int]:
    """The damping schedule: ``attempt(rel)`` with ``rel = damp, 10 damp, ...`` until it returns a factor (None on
    failure), each retry logged as a WARNING. Returns ``(U, damp_used, retries)``.

    Raises:
        GPTQError: If every attempt fails (``max_retries`` tenfold damping increases).
    """
    rel = damp
    for retry in range(max_retries + 1):
        U = attempt(rel)
        if U is not None:
            return U, rel, retry
        if retry < max_retries:
            logger.warning(
                "GPTQ module %s: Cholesky factorisation failed with relative damping %g; "
                "retrying with %g (retry %d/%d).",
                label(name),
                rel,
                rel * 10,
                retry + 1,
                max_retries,
            )
            rel *= 10
    raise GPTQError(
        f"Module {label(name)}: Hessian is not positive definite even with relative damping {rel:g} after "
        f"{max_retries} retries. Check the calibration data (NaN/Inf activations, too few tokens, all-zero token "
        f"weights), or raise `damp` / `max_retries`. GPTQ does not fall back to round-to-nearest."
    )


def damped_inverse_factor(H: torch.Tensor, damp: float, max_retries: int, name: str) -> tuple[torch.Tensor, float, int]:
    """Return ``(U, damp_used, retries)`` with ``U`` the upper Cholesky factor of ``(H + d I)^-1``.

    Raises:
        GPTQError: If factorisation fails after ``max_retries`` tenfold damping increases.
    """
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

    def attempt(rel: float) -> torch.Tensor | None:
        U, ok = inverse_upper_factor(H + (rel * mean_diag) * eye)
        return U if ok else None

    return retry_damping(attempt, damp, max_retries, name)
