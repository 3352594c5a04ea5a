"""Factorisations behind GPTQ: the upper Cholesky factor of a damped inverse Hessian.

``damped_inverse_factor`` returns ``U`` with ``U^T U = (H + d I)^-1``, raising the damping tenfold on failure
(:func:`retry_damping`, the schedule the low-memory solve shares);
``inverse_upper_factor`` computes it from one Cholesky and one triangular inverse, and
``lower_triangular_inverse`` is that inverse by block recursion (mostly matrix products on a GPU).

The recursion's products run in one of two precisions (:data:`FactorPrecision`): ``fp32``, plain float32 matrix
products (on CUDA the FFMA kernels, ~50 TFLOP/s on an H100/H200), or ``tf32x3``, float32 products emulated with
three TF32 tensor-core products (:func:`matmul_tf32x3`: each operand split into a TF32 head and a float32 tail,
``A_h B_h + (A_h B_t + A_t B_h)``), about as accurate as float32 and several times faster. ``auto`` is ``tf32x3`` on
CUDA and ``fp32`` elsewhere (a CPU has no TF32: its products would only be tripled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, get_args

import torch

logger = logging.getLogger("lightning_tlq.core.gptq")


class GPTQError(RuntimeError):
    """Raised when GPTQ cannot factorise the (damped) Hessian of a module."""


def label(name: str) -> str:
    return name or "<unnamed>"


FactorPrecision = Literal["auto", "fp32", "tf32x3"]
"""Precision of the triangular inverse's matrix products (module docstring)."""
FACTOR_PRECISIONS: tuple[str, ...] = get_args(FactorPrecision)

CHOLESKY_IN_TF32X3 = False
"""Experimental, off until measured on a GPU: ``tf32x3`` also runs the Cholesky in tf32x3 products
(:func:`cholesky_inverse_tf32x3`) instead of cuSOLVER's float32 one (``benchmark_speed.py --experimental
tf32x3-cholesky`` switches it on for an A/B run; predicted a 18944-wide factor 142 -> ~70 ms on an H200)."""

_TF32_ROUND, _TF32_MASK = 1 << 12, -(1 << 13)  # float32 bits: round to nearest at TF32's 10th mantissa bit, cut


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``tf32x3`` on CUDA, ``fp32`` elsewhere; ``fp32``/``tf32x3`` as given.

    Raises:
        ValueError: On an unknown precision.
    """
    if precision not in FACTOR_PRECISIONS:
        choices = ", ".join(FACTOR_PRECISIONS)
        raise ValueError(f"factor precision {precision!r} is not supported; choose one of {choices}.")
    if precision == "auto":
        return "tf32x3" if device.type == "cuda" else "fp32"
    return precision


def split_tf32_(x: torch.Tensor) -> torch.Tensor:
    """Split float32 ``x`` in place into its TF32 head (left in ``x``: exactly representable in TF32, so tensor cores
    read it unrounded) and return the tail ``x_old - head`` (exact, a float32 tensor); ``x += tail`` restores ``x``
    exactly (every value; a ``-0.0`` comes back as ``+0.0``)."""
    tail = x.clone()
    bits = x.view(torch.int32)
    bits.add_(_TF32_ROUND).bitwise_and_(_TF32_MASK)
    return tail.sub_(x)


def matmul_tf32x3(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, block: int = 2048) -> torch.Tensor:
    """``a @ b`` for float32 matrices from three TF32 products: ``a_h b_h + (a_h b_t + a_t b_h)``.

    Heads keep 11 significant bits, tails the next ~13, so the dropped ``a_t b_t`` and the tails' own TF32 rounding
    are below ``2^-21`` of each product term: about float32's accuracy, at tensor-core speed. The output is written
    in ``block x block`` tiles: ``b`` is split in place one column block at a time and restored
    (:func:`split_tf32_`) before the next (it must not overlap ``a`` or ``out``), ``a`` one row block at a time, so
    the scratch is three blocks of ``block`` rows or columns (3 x 75 MiB at 9472-long products), whatever the size.
    """
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device) if out is None else out
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for col in range(0, b.shape[1], block):
            b_block = b[:, col : col + block]
            b_tail = split_tf32_(b_block)
            try:  # a's row blocks are split again for each column block: the price of not keeping a whole tail
                for row in range(0, a.shape[0], block):
                    a_head = a[row : row + block].clone()
                    a_tail = split_tf32_(a_head)
                    tile = out[row : row + block, col : col + block]
                    torch.mm(a_head, b_tail, out=tile)
                    tile.addmm_(a_tail, b_block)
                    tile.addmm_(a_head, b_block)
                    del a_head, a_tail
            finally:
                b_block.add_(b_tail)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def _matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` in float32 (``fp32``: TF32 kept off) or from three TF32 products (``tf32x3``; ``b`` is restored)."""
    if precision == "tf32x3":
        return matmul_tf32x3(a, b)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return a @ b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def lower_triangular_inverse(
    L: torch.Tensor, leaf: int = 2048, out: torch.Tensor | None = None, precision: str = "fp32"
) -> torch.Tensor:
    """Inverse of a lower-triangular ``L`` by 2 x 2 block recursion down to ``leaf`` columns, written into ``out``
    (None: a new tensor).

    ``[[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]``: about ``n^3/3`` multiply-adds, nearly all in
    matrix products, where a triangular solve against the identity does ``n^3``. Blocks of at most ``leaf`` columns
    are solved directly, so matrices up to ``leaf`` take exactly that path. ``precision``: the products'
    (``fp32`` or ``tf32x3``, module docstring).
    """
    n = L.shape[0]
    if n <= leaf:
        inverse = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
        return inverse if out is None else out.copy_(inverse)
    h = n // 2
    out = torch.zeros_like(L) if out is None else out.zero_()
    out[:h, :h] = lower_triangular_inverse(L[:h, :h], leaf, precision=precision)
    out[h:, h:] = lower_triangular_inverse(L[h:, h:], leaf, precision=precision)
    product = _matmul(L[h:, :h], out[:h, :h], precision)  # C A^-1
    out[h:, :h] = _matmul(out[h:, h:], product, precision).neg_()
    return out


def triangular_inverse(L: torch.Tensor, out: torch.Tensor | None = None, precision: str = "auto") -> torch.Tensor:
    """``L^-1`` as GPTQ computes it, into ``out`` (None: a new tensor): blocked on a GPU
    (:func:`lower_triangular_inverse`, mostly matrix products, in ``precision``: :data:`FactorPrecision`), one
    triangular solve against the identity on the CPU (the blocked form's ``leaf``-sized case)."""
    precision = resolve_precision(precision, L.device)
    return lower_triangular_inverse(L, 2048 if L.is_cuda else L.shape[0], out, precision)


def _gram_update_tf32x3_(S: torch.Tensor, a: torch.Tensor) -> None:
    """``S -= a a^T`` from three TF32 products (``a`` split in place and restored; ``S`` must not overlap it)."""
    tail = split_tf32_(a)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        S.addmm_(a, tail.T, alpha=-1.0)
        S.addmm_(tail, a.T, alpha=-1.0)
        S.addmm_(a, a.T, alpha=-1.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
        a.add_(tail)


def cholesky_inverse_tf32x3(
    A: torch.Tensor, leaf: int = 2048, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """``L^-1`` for the lower Cholesky factor ``L`` of a symmetric positive definite ``A``, by 2 x 2 block recursion
    whose products are three TF32 products each (:func:`matmul_tf32x3`); ``A`` is overwritten (scratch).

    ``L11^-1`` from the first half; ``L21 = A21 L11^-T``; the second half is the same recursion on the Schur complement
    ``A22 - L21 L21^T``; ``L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]]``. Blocks of at most ``leaf`` columns
    take cuSOLVER's Cholesky and one triangular solve. About ``4n^3/3`` flops in tensor-core products, where
    :func:`inverse_upper_factor`'s ``fp32`` path runs ``n^3/3`` in the Cholesky and ``n^3/3`` in float32 products.
    Only lower triangles are read. Returns ``(L^-1, ok)``; ``ok`` is False when a block is not positive definite.
    """
    n = A.shape[0]
    out = torch.zeros_like(A) if out is None else out
    if n <= leaf:
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            return out, False
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=A.dtype, device=A.device), upper=False))
        return out, True
    h = n // 2
    inv11, ok = cholesky_inverse_tf32x3(A[:h, :h], leaf, out[:h, :h])
    if not ok:
        return out, False
    L21 = matmul_tf32x3(A[h:, :h], inv11.T)
    _gram_update_tf32x3_(A[h:, h:], L21)
    inv22, ok = cholesky_inverse_tf32x3(A[h:, h:], leaf, out[h:, h:])
    if not ok:
        return out, False
    product = matmul_tf32x3(L21, inv11)  # L21 L11^-1
    del L21
    out[h:, :h] = matmul_tf32x3(inv22, product).neg_()
    return out, True


def inverse_upper_factor(H: torch.Tensor, precision: str = "auto") -> tuple[torch.Tensor, bool]:
    """Upper-triangular ``U`` with ``U^T U = H^-1``, from one Cholesky and one triangular inverse.

    With ``J`` the index reversal and ``J H J = L L^T``: ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper
    triangular. That is ``2n^3/3`` flops instead of ``5n^3/3`` for factor -> ``cholesky_inverse`` -> factor again.
    cuSOLVER's Cholesky, then :func:`triangular_inverse` (blocked on a GPU, one solve on the CPU; its products in
    ``precision``); with :data:`CHOLESKY_IN_TF32X3` and ``tf32x3`` both in one recursion of emulated-float32
    tensor-core products (:func:`cholesky_inverse_tf32x3`).
    Returns ``(U, ok)``; ``ok`` is False (and ``U`` meaningless) when ``H`` is not numerically positive definite.
    """
    if CHOLESKY_IN_TF32X3 and resolve_precision(precision, H.device) == "tf32x3" and H.dtype == torch.float32:
        inverse, ok = cholesky_inverse_tf32x3(H.flip(0, 1), 2048)
        if not ok:
            return H, False
        U = inverse.flip(0, 1)
        return U, bool(torch.isfinite(U).all())
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return H, False
    U = triangular_inverse(L, precision=precision).flip(0, 1)
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


def damped_inverse_factor(
    H: torch.Tensor, damp: float, max_retries: int, name: str, precision: str = "auto"
) -> tuple[torch.Tensor, float, int]:
    """Return ``(U, damp_used, retries)`` with ``U`` the upper Cholesky factor of ``(H + d I)^-1`` (its triangular
    inverse's products in ``precision``, :data:`FactorPrecision`).

    Raises:
        GPTQError: If factorisation fails after ``max_retries`` tenfold damping increases.
    """
    mean_diag = float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

    def attempt(rel: float) -> torch.Tensor | None:
        U, ok = inverse_upper_factor(H + (rel * mean_diag) * eye, precision)
        return U if ok else None

    return retry_damping(attempt, damp, max_retries, name)
