"""GPTQ in two parts, so that several workers can share one factorisation: the factor of a Hessian, then any slice
of rows against it.

GPTQ's rows are independent given ``H``: the act-order permutation, the dead inputs and the inverse factor ``U``
depend on ``H`` alone, each row's static group scales on that row alone, and the column loop's arithmetic is per
row except for the lazy block update ``W[:, j:] -= E @ U[block, j:]``, a matrix product over the rows. So

    gptq_rows(W[a:b], gptq_factor(W, H, ...)) == gptq_quantize(W, H, ...)[a:b]

bit for bit wherever a matrix product's rows do not depend on how many rows it is given. On the CPU (MKL, one
intra-op thread) that holds for products of at least 4 rows (1 to 3 rows take another kernel and round
differently), hence slices of at least :data:`MIN_ROWS` rows (``tests/test_gptq_rows.py`` checks it). GPU BLAS
libraries may choose another algorithm for another row count; a slice may then flip a code where the unsplit
solve sits on a rounding boundary, as any last-bit difference in ``H`` does.

Both parts are :mod:`lightning_tlq.core.gptq`'s own (``_factor`` and ``_solve_rows``, which
:func:`~lightning_tlq.core.gptq.gptq_quantize` runs too); this module makes the factor a value that travels between
workers. Only the ungrouped Hessian ``[in, in]`` is handled (importance groups have one factor per row block).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from lightning_tlq.core.gptq import GPTQOptions, GPTQResult, _assemble, _Factor, _fast_factor, _solve_rows
from lightning_tlq.core.gptq_checks import Loop, _check_cross, _validate
from lightning_tlq.core.gptq_lean import _factor_lean
from lightning_tlq.core.quantizer import QuantSpec

__all__ = ["MIN_ROWS", "GPTQFactor", "gptq_factor", "gptq_rows"]

MIN_ROWS = 4
"""The fewest rows a slice may have for :func:`gptq_rows` to equal the unsplit solve (MKL's small-row kernels)."""


@dataclass
class GPTQFactor(_Factor):
    """What every row of one module's GPTQ solve shares (the same on every worker that receives it): the fields of
    one Hessian's factor (``U`` float32 in act order, ``perm`` or None, ``dead`` in original order, ``damp``,
    ``retries``) and the cross term."""

    cross: torch.Tensor | None = None
    """GPTAQ's cross term ``[in, in]``, float32, original column order (None for plain GPTQ)."""

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to send to other workers, in a fixed order (see :meth:`from_tensors`)."""
        perm = self.perm if self.perm is not None else torch.empty(0, dtype=torch.long, device=self.U.device)
        cross = self.cross if self.cross is not None else torch.empty(0, 0, device=self.U.device)
        meta = torch.tensor([self.damp, float(self.retries)], dtype=torch.float64, device=self.U.device)
        return [self.U, self.dead.to(torch.uint8), perm, cross, meta]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> GPTQFactor:
        U, dead, perm, cross, meta = tensors
        perm_or_none = perm if perm.numel() else None
        return cls(U, perm_or_none, dead.bool(), float(meta[0]), int(meta[1]), cross if cross.numel() else None)


def gptq_factor(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    *,
    name: str = "",
    cross: torch.Tensor | None = None,
    lean: bool = False,
    reuse_h: bool = False,
    **options: Any,
) -> GPTQFactor:
    """The shared part of :func:`~lightning_tlq.core.gptq.gptq_quantize` for ``W [out, in]`` and ``H [in, in]``
    (same arguments and errors, ``options`` those of :class:`~lightning_tlq.core.gptq.GPTQOptions`; ``W`` is only
    checked, its rows are solved by :func:`gptq_rows`). ``lean``: the same factor with the least memory
    (:mod:`lightning_tlq.core.gptq_lean`; ``reuse_h``: ``H``'s storage may hold it, the caller never reads ``H``
    again)."""
    opts = GPTQOptions(**options)
    if _validate(W, H, spec, opts, name) != 1:
        raise ValueError(f"gptq_factor takes an ungrouped Hessian [in, in], got {tuple(H.shape)}.")
    C = None if cross is None else _check_cross(cross, H, name).to(device=W.device, dtype=torch.float32)
    factor = partial(_factor_lean, reuse_h=reuse_h) if lean else _fast_factor
    f = factor(H.detach(), W.device, opts, name)
    return GPTQFactor(f.U, f.perm, f.dead, f.damp, f.retries, C)


def gptq_rows(
    W: torch.Tensor, factor: GPTQFactor, spec: QuantSpec, *, block_size: int = 128, name: str = "", loop: Loop = "torch"
) -> GPTQResult:
    """Quantize the rows ``W [rows, in]`` against a shared :class:`GPTQFactor`; the result's ``damp``/``retries``
    are the factor's. ``loop``: the column loop (``triton``/``graph`` run the fused Triton block step, eagerly or
    from a CUDA graph; the caller checked that it applies, :func:`~lightning_tlq.core.gptq_checks._column_loop`)."""
    Wf = W.detach().to(torch.float32).clone()
    kw = {"block_size": block_size, "name": name, "scale_dtype": W.dtype, "cross": factor.cross, "loop": loop}
    return _assemble([_solve_rows(Wf, factor, spec, **kw)], spec, W.dtype)
