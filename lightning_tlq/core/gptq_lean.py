"""GPTQ with the least solver memory, same codes: :func:`gptq_quantize_lean` (``memory.profile=low``).

:func:`~lightning_tlq.core.gptq.gptq_quantize` converts the whole Hessian to float32, clones it, permutes it
(two more copies), adds ``d I`` (an identity and a sum) and flips it before the Cholesky factorisation, then flips
the inverse: up to eight ``in x in`` float32 matrices beside the caller's float64 ``H`` (for the 7B shape's
``down_proj``, 18944^2, that is 8 x 1.34 GiB). This path computes the same IEEE operations on the same values in
the same layouts and keeps at most three:

* the act-order permuted float32 Hessian ``A`` is gathered from ``H`` (float64 or float32) in row chunks:
  conversion commutes with the gather, so ``A`` equals ``H.float()[perm][:, perm]`` bit for bit;
* dead inputs and the damping are written into ``A`` in place (``A + 0.0`` off the diagonal, ``A_ii + d`` on it,
  exactly what ``A + d * I`` computes) and ``A`` is flipped in place for the factorisation;
* ``L^-1`` is flipped in place into ``U``;
* by default ``H`` is only read, and ``A`` is freed once its Cholesky factor ``L`` exists (gathered again if a
  retry needs it); with ``reuse_h=True`` (the caller never reads ``H`` again) ``L`` and ``L^-1`` are written into
  the storage of the float64 ``H`` once ``A`` is gathered (two float32 ``n x n`` fill it exactly), and ``A`` is
  kept for retries.

Peak beyond the caller's ``H``, in ``n^2`` floats: with ``reuse_h``, ``A`` and the blocked inverse's temporaries
(1 + 1/2 at most); without, ``L``, ``L^-1`` and those temporaries (2 + 1/2). Then ``U`` and the ``[out, in]`` float32
working copies of GPTQ's column loop. ``tests/test_lowmem.py`` checks equality with :func:`gptq_quantize` on the
CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from lightning_tlq.core.factor import retry_damping, triangular_inverse
from lightning_tlq.core.gptq import GPTQOptions, GPTQResult, _Factor, gptq_quantize_shared
from lightning_tlq.core.quantizer import QuantSpec

__all__ = ["CHUNK_BYTES", "flip_", "gathered", "gptq_quantize_lean", "gptq_quantize_shared_lean"]

CHUNK_BYTES = 64 << 20
"""Temporaries of the chunked gathers and flips are at most about this many bytes."""


def _rows_per_chunk(n: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, n * itemsize))


def gathered(source: torch.Tensor, order: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``source.float()[order][:, order]`` on ``device``, built in row chunks (``source`` is not modified)."""
    n = order.numel()
    out = torch.empty(n, n, dtype=torch.float32, device=device)
    order_src = order.to(source.device)
    step = _rows_per_chunk(n, source.element_size())
    for r0 in range(0, n, step):
        rows = source.index_select(0, order_src[r0 : r0 + step]).index_select(1, order_src)
        out[r0 : r0 + step].copy_(rows)  # float64 -> float32 rounding, elementwise as in .float()
    return out


def flip_(m: torch.Tensor) -> torch.Tensor:
    """``m.flip(0, 1)`` written into the square ``m`` itself, in row chunks; returns ``m``."""
    n = m.shape[0]
    step = _rows_per_chunk(n, m.element_size())
    i = 0
    while (c := min(step, (n - 2 * i) // 2)) > 0:
        top, bottom = m[i : i + c], m[n - i - c : n - i]
        upper = top.flip(0, 1)  # a copy
        top.copy_(bottom.flip(0, 1))
        bottom.copy_(upper)
        i += c
    if n - 2 * i == 1:
        m[i].copy_(m[i].flip(0))
    return m


def _workspace(H: torch.Tensor, n: int, reuse: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two column-major ``n x n`` float32 matrices in the storage of a float64 ``H`` (exactly its size), for the
    Cholesky factor and its inverse, when the caller lets the solve overwrite ``H``; else None."""
    if not (reuse and H.dtype == torch.float64 and H.is_contiguous() and H.shape[-2:] == (n, n)):
        return None
    if (n * n * 4) % 256:  # the inverse's half would start off the 256-byte alignment a fresh tensor has
        return None
    flat = H.view(-1).view(torch.float32)
    return flat[: n * n].view(n, n).mT, flat[n * n :].view(n, n).mT  # the strides cholesky_ex gives its result


def _damped_factor(
    given: list[torch.Tensor],
    rebuild: Callable[[], torch.Tensor],
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
    n: int,
    mean_diag: float,
    damp: float,
    max_retries: int,
    name: str,
    precision: str = "auto",
) -> tuple[torch.Tensor, float, int]:
    """:func:`~lightning_tlq.core.factor.damped_inverse_factor` on ``A = given.pop()`` (its only reference): the
    flipped (``J A J``), undamped, permuted Hessian, damped in place. ``workspace``: where the factor and its
    inverse are written (:func:`_workspace`; ``A`` is then kept for retries), else new tensors (``A`` is freed
    once factorised and ``rebuild()`` makes it again if a retry needs it)."""
    A: torch.Tensor | None = given.pop()
    assert A is not None
    undamped = A.diagonal().clone()

    def attempt(rel: float) -> torch.Tensor | None:
        nonlocal A
        if A is None:
            A = rebuild()
        A.add_(0.0)  # what adding d * I does off the diagonal (-0.0 becomes +0.0)
        A.diagonal().copy_(undamped).add_(rel * mean_diag)
        if workspace is None:
            L, info = torch.linalg.cholesky_ex(A)
        else:
            L, info = workspace[0], torch.empty((), dtype=torch.int32, device=A.device)
            torch.linalg.cholesky_ex(A, out=(L, info))
        if int(info) != 0:
            return None
        if workspace is None:
            A = None  # only L is needed from here on
        U = flip_(triangular_inverse(L, None if workspace is None else workspace[1], precision))
        del L
        return U if bool(torch.isfinite(U).all()) else None

    return retry_damping(attempt, damp, max_retries, name)


def _factor_lean(H: torch.Tensor, device: torch.device, opts: GPTQOptions, name: str, reuse_h: bool = False) -> _Factor:
    """``core.gptq._factor`` with ``H`` (any float dtype, any device) gathered in chunks; read only unless
    ``reuse_h`` (a float64 ``H``'s storage then holds the factor and its inverse once it is gathered)."""
    n = H.shape[-1]
    diag = torch.diagonal(H).to(device=device, dtype=torch.float32, copy=True)
    dead = diag == 0
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if opts.act_order else None
    order = perm if perm is not None else torch.arange(n, device=device)

    def build() -> torch.Tensor:  # the permuted Hessian, dead inputs' H_ii := 1
        A = gathered(H, order, device)
        A.diagonal().copy_(diag.index_select(0, order))
        return A

    with torch.profiler.record_function("gptq.factor"):
        A = build()
        # the damping's mean, read as the fast path reads it (a reduction over the same strided view)
        mean_diag = float(torch.diagonal(A).mean())
        workspace = _workspace(H, n, reuse_h)
        given = [flip_(A)]
        del A
        U, used, retries = _damped_factor(
            given,
            lambda: flip_(build()),
            workspace,
            n,
            mean_diag,
            opts.damp,
            opts.max_retries,
            name,
            opts.factor_precision,
        )
    return _Factor(U, perm, dead, used, retries)


def gptq_quantize_shared_lean(
    weights: Sequence[torch.Tensor], H: torch.Tensor, spec: QuantSpec, *, reuse_h: bool = False, **kw: Any
) -> list[GPTQResult]:
    """:func:`~lightning_tlq.core.gptq.gptq_quantize_shared` (same arguments, same results) with the least memory.

    ``H`` is read, never converted as a whole; with ``reuse_h`` a float64 ``H`` is overwritten (its storage holds
    the Cholesky factor and its inverse): for a caller that never reads it again. ``cross`` (GPTAQ) is converted and
    permuted as the fast path does.
    """
    return gptq_quantize_shared(weights, H, spec, factor=partial(_factor_lean, reuse_h=reuse_h), **kw)


def gptq_quantize_lean(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, name: str = "", **kw) -> GPTQResult:
    """:func:`~lightning_tlq.core.gptq.gptq_quantize` with the least memory (:func:`gptq_quantize_shared_lean`)."""
    return gptq_quantize_shared_lean([W], H, spec, names=[name], **kw)[0]
