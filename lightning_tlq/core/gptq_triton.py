"""A fused GPTQ block step for CUDA, written in Triton (optional: used only when Triton and a GPU are present).

GPTQ's inner loop quantizes the columns of a block one after another, feeding each column's error forward into
the rest of the block. Rows are independent, so one Triton program owns a tile of rows and runs the whole
sequential column loop in registers: one launch per block instead of about ten tiny launches per column, which
is where the eager loop spends its time on a GPU. The arithmetic is the eager loop's: IEEE division, round half
to even, the same clamp, the same update order.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the eager loop is used without it
    triton = None

if triton is not None:

    @triton.jit
    def _gptq_block(
        W, U, S, Z, G, Q, E,
        n_rows, n_cols, stride_w, stride_u, stride_s, stride_z, stride_q, stride_e, qmin, qmax,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GATHER: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < n_cols
        m2 = rmask[:, None] & cmask[None, :]
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=m2, other=0.0)
        if GATHER:  # per-group S, Z [rows, n_groups]: column i reads group G[i] (the same values, gathered here)
            g = tl.load(G + cols, mask=cmask, other=0)
            s = tl.load(S + rows[:, None] * stride_s + g[None, :], mask=m2, other=1.0)
            z = tl.load(Z + rows[:, None] * stride_z + g[None, :], mask=m2, other=0.0)
        else:
            s = tl.load(S + rows[:, None] * stride_s + cols[None, :], mask=m2, other=1.0)
            z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=m2, other=0.0)
        q_all = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        e_all = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for i in range(BLOCK_C):  # columns past n_cols are masked out: they change nothing
            sel = cols[None, :] == i
            wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
            si = tl.sum(tl.where(sel, s, 0.0), axis=1)
            zi = tl.sum(tl.where(sel, z, 0.0), axis=1)
            u = tl.load(U + i * stride_u + cols, mask=cmask & (cols >= i), other=0.0)
            d = tl.load(U + i * stride_u + i, mask=i < n_cols, other=1.0)
            x = tl.div_rn(wi, si)
            f = tl.floor(x)
            frac = x - f  # exact for |x| < 2^23
            half_up = (frac > 0.5) | ((frac == 0.5) & ((f - 2.0 * tl.floor(f * 0.5)) != 0.0))
            qi = tl.where(half_up, f + 1.0, f) + zi  # round half to even, like torch.round
            qi = tl.minimum(tl.maximum(qi, qmin), qmax)
            err = tl.div_rn(wi - (qi - zi) * si, d)
            w = w - err[:, None] * u[None, :]
            q_all = tl.where(sel, qi[:, None], q_all)
            e_all = tl.where(sel, err[:, None], e_all)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], q_all, mask=m2)
        tl.store(E + rows[:, None] * stride_e + cols[None, :], e_all, mask=m2)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when Triton imports and a CUDA GPU is present."""
    return triton is not None and torch.cuda.is_available()


def block_step(
    W1: torch.Tensor,
    U1: torch.Tensor,
    S1: torch.Tensor,
    Z1: torch.Tensor,
    qmin: int,
    qmax: int,
    codes: torch.Tensor | None = None,
    errors: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the columns of block ``W1 [rows, c]`` (c <= 128) in order; return ``(codes, errors)``.

    ``U1 [c, c]`` is the block of the upper Cholesky factor of ``H^-1``; ``S1``/``Z1`` are per-column scales and
    zero points ``[rows, c]``. Equivalent to the eager loop in :mod:`lightning_tlq.core.gptq`. ``W1`` is only read.

    Inputs may be row-strided views of larger float32 matrices (columns contiguous), and ``codes`` / ``errors``
    (float32 ``[rows, c]``, columns contiguous) receive the results in place: the column loop then copies
    nothing per block. Other inputs are made contiguous float32 first. ``codes`` may be ``W1`` itself: each
    program reads its rows of ``W1`` before it writes any code of them (the codes depend on the whole row).

    ``groups`` (int32 ``[c]``, contiguous): ``S1``/``Z1`` are then per-group ``[rows, n_groups]`` and column ``i``
    uses ``S1[:, groups[i]]``, gathered in the kernel (the same values as the expanded ``[rows, c]`` ones, so the
    same results) instead of materialising per-column parameters.
    """
    rows, cols = W1.shape
    if cols > 128:
        raise ValueError(f"block_step handles at most 128 columns, got {cols}.")
    W1, U1, S1, Z1 = (_strided(t) for t in (W1, U1, S1, Z1))
    codes = torch.empty_like(W1) if codes is None else codes
    errors = torch.empty_like(W1) if errors is None else errors
    for out, label in ((codes, "codes"), (errors, "errors")):
        if out.shape != W1.shape or out.dtype != torch.float32 or (cols > 1 and out.stride(1) != 1):
            raise ValueError(f"block_step: {label} must be float32 {tuple(W1.shape)} with contiguous columns.")
    if groups is not None and (groups.dtype != torch.int32 or groups.shape != (cols,) or groups.stride(0) != 1):
        raise ValueError(f"block_step: groups must be a contiguous int32 tensor of {cols} group indices.")
    block_r = 16
    grid = (triton_cdiv(rows, block_r),)
    _gptq_block[grid](
        W1, U1, S1, Z1, S1 if groups is None else groups, codes, errors, rows, cols, W1.stride(0), U1.stride(0),
        S1.stride(0), Z1.stride(0), codes.stride(0), errors.stride(0), float(qmin), float(qmax),
        BLOCK_R=block_r, BLOCK_C=128, GATHER=groups is not None, num_warps=4,
    )  # fmt: skip
    return codes, errors


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 with contiguous columns (a view when it already is one)."""
    t = t.float()
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)
