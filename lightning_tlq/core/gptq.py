"""GPTQ solver: error-feedback quantization of one weight matrix against a (weighted) Hessian.

Minimises ``tr((Q - W) H (Q - W)^T)`` column by column (Frantar et al., 2023), with:

* static groups: per-group scales/zeros are computed once from the original column order of ``W``
  (after zeroing dead inputs), so no runtime ``g_idx`` is needed;
* act-order: columns are processed by decreasing ``diag(H)``, each using its original group's
  scale/zero; codes/scale/zero are returned in the original column order;
* lazy block updates of ``block_size`` columns;
* relative damping ``damp * mean(diag H)``, multiplied by 10 on Cholesky failure up to
  ``max_retries`` times (each retry logged as a WARNING), then :class:`GPTQError`;
* dead inputs (``H_ii == 0``): ``H_ii := 1`` and the weight column is zeroed.

A grouped Hessian ``[G, in, in]`` (GuidedQuant-style output-channel groups) splits the rows of ``W``
into ``G`` contiguous equal blocks, each solved independently with its own Hessian.

Asymmetric calibration (GPTAQ, ``cross=C``): with ``X~`` the inputs the module sees on the quantized path, ``X``
those of the full-precision model and token weights ``w``, ``H = X~ w X~^T`` and ``C = (X - X~) w X~^T``,

    ||Q X~ - W X||_w^2 = tr((Q - W*) H (Q - W*)^T) + const,   W* = W + W C H^-1,

since ``Q X~ - W X = E X~ - W (X - X~)`` with ``E = Q - W``, so the objective is ``tr(E H E^T) - 2 tr(E C^T W^T)
+ const``, and completing the square (``D = W C H^-1``, ``H D^T = C^T W^T``) gives ``tr((E - D) H (E - D)^T) -
tr(D H D^T)``, where ``E - D = Q - W*``. GPTQ on the target ``W*`` with ``H`` therefore minimises the asymmetric
objective. With the damped ``H_d = H + d I`` used throughout (``W* = W + W C H_d^-1``) it minimises
``||Q X~ - W X||_w^2 + d ||Q - W||^2``, the damped objective pulling ``Q`` toward ``W``. ``W*`` is formed once from
the same factor ``U`` (``U^T U = H_d^-1``) the column loop uses. The grid (static group scales and zero points)
stays that of ``W``: it does not depend on the data, so last-bit differences in ``H`` or ``C`` (summation order,
thread count) can only flip codes near a rounding boundary, never move every scale (the measurements behind this
choice: ``docs/performance.md``, "Measurements behind design choices").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_tlq.core import gptq_graph
from lightning_tlq.core.factor import FactorPrecision, GPTQError, damped_inverse_factor
from lightning_tlq.core.factor import label as _label
from lightning_tlq.core.gptq_checks import KERNELS, GPTQOptions, Kernel, Loop, _check_cross, _check_shared, _column_loop
from lightning_tlq.core.quantizer import QuantSpec, codes_to_values, compute_qparams, dequantize, round_to_grid

logger = logging.getLogger(__name__)
__all__ = [
    "GPTQError",
    "GPTQOptions",
    "GPTQResult",
    "KERNELS",
    "Kernel",
    "asymmetric_target",
    "gptq_quantize",
    "gptq_quantize_shared",
]


@dataclass
class GPTQResult:
    """Result of :func:`gptq_quantize`.

    Attributes:
        weight: Quantized weight ``[out, in]`` in the input dtype/device; equals
            ``dequantize(codes, scale, zero, spec, dtype=W.dtype)`` exactly.
        codes: Integer codes ``[out, in]`` (``spec.code_dtype``), original column order.
        scale: Per-group scales ``[out, n_groups]``, float32.
        zero: Per-group zero points ``[out, n_groups]``, float32.
        damp: Relative damping finally used (the largest over row blocks for a grouped Hessian).
        retries: Number of damping increases needed (the largest over row blocks).
        perm: Act-order column permutation ``[in]`` (``[G, in]`` for a grouped Hessian), or None.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    damp: float
    retries: int
    perm: torch.Tensor | None


@dataclass
class _BlockSolve:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    damp: float
    retries: int
    perm: torch.Tensor | None


def _quantize_columns(
    W: torch.Tensor,
    U: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_of_col: torch.Tensor,
    spec: QuantSpec,
    block_size: int,
    loop: Loop = "torch",
) -> torch.Tensor:
    """Run the GPTQ column loop in place on ``W`` (already permuted); return float codes ``[out, in]``.

    ``scale`` / ``zero`` are per-group parameters ``[out, n_groups]``; column ``j`` of ``W`` uses group
    ``group_of_col[j]`` (``[in]``, the same permuted order). ``loop`` (the caller checked that it applies,
    :func:`~lightning_tlq.core.gptq_checks._column_loop`): ``torch`` the eager loop; ``triton`` the fused Triton
    block step per block (:func:`~lightning_tlq.core.gptq_graph.fused_loop`), ``graph`` the same replayed from a
    CUDA graph (:mod:`lightning_tlq.core.gptq_graph`). The fused loops write the codes over ``W`` and may return a
    buffer that the next call of the same shape reuses: convert the codes before solving again.
    """
    if loop != "torch":
        groups = group_of_col.to(torch.int32)
        args = (W, U, scale.float(), zero.float(), groups, spec.qmin, spec.qmax, block_size)
        if loop == "graph":
            return gptq_graph.cache.run(*args)
        errors = torch.empty(W.shape[0], min(block_size, W.shape[1]), dtype=torch.float32, device=W.device)
        return gptq_graph.fused_loop(*args, errors)
    n = W.shape[1]
    scale_cols, zero_cols = scale[:, group_of_col], zero[:, group_of_col]
    codes = torch.empty_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            s, z = scale_cols[:, i1 + i], zero_cols[:, i1 + i]
            c = round_to_grid(W1[:, i], s, z, spec)
            err = (W1[:, i] - codes_to_values(c, s, z)) / U1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            codes[:, i1 + i] = c
            Err1[:, i] = err
        W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    return codes


def asymmetric_target(W: torch.Tensor, cross: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """GPTAQ's target weight ``W* = W + W C H^-1``, with ``H^-1 = U^T U`` (``U`` upper triangular).

    Args:
        W: Weight ``[out, in]``.
        cross: Cross term ``C = sum_t w_t (x_t - x~_t) x~_t^T`` ``[in, in]`` (full-precision minus quantized-path
            input, times quantized-path input), in the same column order as ``W`` and ``U``.
        U: Upper-triangular factor of the (damped) inverse Hessian, as the GPTQ column loop uses it.
    """
    return W + ((W @ cross) @ U.T) @ U


@dataclass
class _Factor:
    """What the column loop needs from one Hessian ``[in, in]``, shared by every row block solved against it."""

    U: torch.Tensor
    """Upper factor of the damped inverse Hessian, in act order."""
    perm: torch.Tensor | None
    dead: torch.Tensor
    """``[in]`` bool, inputs that never fire (``H_ii == 0``), original order."""
    damp: float
    retries: int


def _factor(H: torch.Tensor, opts: GPTQOptions, name: str) -> _Factor:
    """Dead inputs, act order and the damped inverse factor of one Hessian ``H [in, in]`` (float32)."""
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if opts.act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    with torch.profiler.record_function("gptq.factor"):
        U, used, retries = damped_inverse_factor(H, opts.damp, opts.max_retries, name, opts.factor_precision)
    return _Factor(U, perm, dead, used, retries)


def _fast_factor(H: torch.Tensor, device: torch.device, opts: GPTQOptions, name: str) -> _Factor:
    """:func:`_factor` of a Hessian given in any float dtype, on any device (a :data:`FactorFn`)."""
    return _factor(H.to(device=device, dtype=torch.float32), opts, name)


FactorFn = Callable[[torch.Tensor, torch.device, GPTQOptions, str], _Factor]
"""How one Hessian ``[in, in]`` (as given: any float dtype and device) is factorised on the weights' device."""


def _solve_rows(
    W: torch.Tensor,
    f: _Factor,
    spec: QuantSpec,
    *,
    block_size: int,
    name: str,
    scale_dtype: torch.dtype,
    cross: torch.Tensor | None = None,
    loop: Loop = "torch",
) -> _BlockSolve:
    """Quantize rows ``W [rows, in]`` (float32, modified in place) against one factorised Hessian.

    With ``cross`` the column loop runs on GPTAQ's target :func:`asymmetric_target`, on the static grid of ``W``.
    ``loop``: the column loop (:func:`_quantize_columns`).
    """
    perm, dead = f.perm, f.dead
    W[:, dead] = 0.0
    scale, zero = compute_qparams(W, spec, name, scale_dtype=scale_dtype)
    in_features = W.shape[1]
    group_of_col = torch.arange(in_features, device=W.device) // spec.group_len(in_features)
    if perm is not None:
        W, group_of_col, dead = W[:, perm], group_of_col[perm], dead[perm]
    if cross is not None:
        W = asymmetric_target(W, cross[perm][:, perm] if perm is not None else cross, f.U)
        W[:, dead] = 0.0  # the quantized path never feeds these inputs
    with torch.profiler.record_function("gptq.columns"):
        codes = _quantize_columns(W, f.U, scale, zero, group_of_col, spec, block_size, loop)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return _BlockSolve(codes.to(spec.code_dtype), scale, zero, f.damp, f.retries, perm)  # a copy: codes may be reused


def _assemble(solves: list[_BlockSolve], spec: QuantSpec, dtype: torch.dtype) -> GPTQResult:
    """Concatenate per-row-block solves into one :class:`GPTQResult`."""
    codes = torch.cat([s.codes for s in solves])
    scale = torch.cat([s.scale for s in solves])
    zero = torch.cat([s.zero for s in solves])
    perms = [s.perm for s in solves if s.perm is not None]
    perm = None if not perms else perms[0] if len(solves) == 1 else torch.stack(perms)
    return GPTQResult(
        weight=dequantize(codes, scale, zero, spec, dtype=dtype),
        codes=codes,
        scale=scale,
        zero=zero,
        damp=max(s.damp for s in solves),
        retries=max(s.retries for s in solves),
        perm=perm,
    )


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    max_retries: int = 3,
    name: str = "",
    cross: torch.Tensor | None = None,
    kernel: Kernel = "auto",
    factor_precision: FactorPrecision = "auto",
) -> GPTQResult:
    """Quantize ``W`` with GPTQ against the Hessian ``H``.

    Args:
        W: Weight ``[out, in]``, any float dtype (computation runs in float32 on ``W``'s device).
        H: Hessian ``[in, in]`` or grouped ``[G, in, in]`` (rows of ``W`` split into G contiguous
            equal blocks, each solved with its own Hessian); a sum or a mean, the scale is irrelevant.
        spec: Quantization grid.
        block_size: Columns per lazy-update block.
        damp: Relative damping; ``damp * mean(diag H)`` is added to the diagonal.
        act_order: Process columns by decreasing ``diag(H)`` (static groups, so no ``g_idx``).
        max_retries: Tenfold damping increases allowed when the Cholesky factorisation fails.
        name: Module name used in log messages and errors.
        cross: GPTAQ cross term ``C = sum_t w_t (x_t - x~_t) x~_t^T``, shaped like ``H`` (same token weights and
            scale as ``H``): minimise ``||Q X~ - W X||^2`` against the full-precision inputs ``X`` instead of
            ``||(Q - W) X~||^2``, by quantizing the target ``W + W C H_d^-1`` (see the module docstring). None
            (default) is plain GPTQ.
        kernel: The column loop (:data:`Kernel`): ``auto`` (default) runs the fused Triton block step on CUDA
            weights when Triton is installed and ``block_size <= 128``, replayed from a CUDA graph per shape
            (:mod:`lightning_tlq.core.gptq_graph`, within its memory budget), else the eager torch loop; ``graph``
            requires that path, ``triton`` the fused step run eagerly (the same codes as ``graph``), ``torch``
            never uses it. Fused and torch loops compute the same IEEE operations in the same order; compiled code
            may contract a multiply-add, so codes can differ by one step in rare cases.
        factor_precision: The triangular inverse's matrix products (:data:`FactorPrecision`): ``auto`` (default)
            emulates float32 with three TF32 products on CUDA (``tf32x3``, faster, about float32's accuracy; codes
            on rounding boundaries can differ from ``fp32``'s) and uses plain float32 elsewhere.

    Returns:
        A :class:`GPTQResult` whose ``weight`` equals ``dequantize(codes, scale, zero)`` in ``W.dtype``.

    Raises:
        ValueError: On bad shapes or arguments (incl. ``kernel="triton"``/``"graph"`` where the fused step cannot
            run).
        GPTQError: If the Hessian is non-finite or cannot be factorised after all retries.
    """
    return gptq_quantize_shared(
        [W], H, spec, names=[name], cross=cross, block_size=block_size, damp=damp, act_order=act_order,
        max_retries=max_retries, kernel=kernel, factor_precision=factor_precision,
    )[0]  # fmt: skip


def gptq_quantize_shared(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    names: Sequence[str] | None = None,
    cross: torch.Tensor | None = None,
    concat_rows: bool = True,
    factor: FactorFn = _fast_factor,
    **options: Any,
) -> list[GPTQResult]:
    """:func:`gptq_quantize` for several weights that read one input and so share one Hessian (q/k/v, gate/up).

    GPTQ's rows are independent given ``H``: each Hessian (group) is factorised once for all of them, and with
    ``concat_rows`` their rows run through one column loop (fewer, larger launches). The results are those of
    :func:`gptq_quantize` on each weight alone (same codes, scales and zero points) where the lazy update's matrix
    product rounds each row alike for any number of rows (the CPU's does, ``tests/test_gptq.py``); ``concat_rows=False``
    runs one loop per weight.

    Args:
        weights: the weights ``[out_i, in]``, one dtype and device.
        names: one per weight (messages); a shared factor is named by all of them.
        H, cross: as in :func:`gptq_quantize`.
        factor: how each Hessian (group) is factorised (:data:`FactorFn`): by default as :func:`gptq_quantize`
            does; :mod:`lightning_tlq.core.gptq_lean` passes the same factor built with the least memory.
        options: ``block_size``, ``damp``, ``act_order``, ``max_retries``, ``kernel`` (:class:`GPTQOptions`), as in
            :func:`gptq_quantize`.
    """
    opts = GPTQOptions(**options)
    names, groups = _check_shared(weights, H, spec, opts, names)
    loop = _column_loop(opts.kernel, weights[0], opts.block_size, names[0])
    device, in_features = weights[0].device, weights[0].shape[1]
    Wfs = [W.detach().to(torch.float32, copy=True) for W in weights]
    Hg = H.detach().reshape(groups, in_features, in_features)
    Cg = None
    if cross is not None:
        Cg = _check_cross(cross, H, names[0]).to(device=device, dtype=torch.float32).reshape(Hg.shape)
    rows = [W.shape[0] // groups for W in weights]
    joint = ", ".join(_label(n) for n in names)
    solves: list[list[_BlockSolve]] = [[] for _ in weights]
    for g in range(groups):
        tag = "" if groups == 1 else f"[group {g}]"
        f = factor(Hg[g], device, opts, joint + tag)
        blocks = [Wf[g * r : (g + 1) * r] for Wf, r in zip(Wfs, rows)]
        kw = {"block_size": opts.block_size, "scale_dtype": weights[0].dtype, "loop": loop}
        kw["cross"] = None if Cg is None else Cg[g]
        if concat_rows and len(blocks) > 1:
            s = _solve_rows(torch.cat(blocks), f, spec, name=joint + tag, **kw)
            parts = zip(s.codes.split(rows), s.scale.split(rows), s.zero.split(rows))
            for out, (c, sc, z) in zip(solves, parts):
                out.append(_BlockSolve(c, sc, z, s.damp, s.retries, s.perm))
        else:
            for out, block, n in zip(solves, blocks, names):
                out.append(_solve_rows(block, f, spec, name=n if groups == 1 else f"{_label(n)}{tag}", **kw))
        del f
    return [_assemble(s, spec, W.dtype) for s, W in zip(solves, weights)]
