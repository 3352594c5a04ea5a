"""GPTQ's column loop replayed from CUDA graphs gives the eager fused loop's codes bit for bit, keeps its static
memory within the budget and frees it on clear (skipped without CUDA and Triton; on the GPU machine:
``pytest tests/test_gptq_graph_cuda.py``). The bookkeeping alone is tested on the CPU (``tests/test_gptq_graph.py``).
"""

from __future__ import annotations

import pytest
import torch

from lightning_tlq.core import gptq_graph, gptq_triton
from lightning_tlq.core.gptq import gptq_quantize, gptq_quantize_shared
from lightning_tlq.core.gptq_graph import GraphCache, static_bytes
from lightning_tlq.core.gptq_lean import gptq_quantize_lean
from lightning_tlq.core.quantizer import QuantSpec

pytestmark = pytest.mark.skipif(not gptq_triton.available(), reason="needs CUDA and Triton (CUDA graphs)")


def _problem(rows: int, n: int, group: int, seed: int):
    """Permuted weights, an upper inverse-Hessian factor, per-group scale/zero and each column's group (CUDA)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g) * torch.rand(1, n, generator=g).add(0.1)
    A = torch.randn(n, n + 64, generator=g)
    H = A @ A.T / n + 0.01 * torch.eye(n)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).float()
    n_groups = -(-n // group)
    scale = torch.rand(rows, n_groups, generator=g).add(0.05) * 0.3
    zero = torch.randint(0, 16, (rows, n_groups), generator=g).float()
    perm = torch.randperm(n, generator=g)
    groups = (torch.arange(n) // group)[perm].to(torch.int32)
    return [t.cuda() for t in (W[:, perm].contiguous(), U, scale, zero, groups)]


def _eager(W, U, scale, zero, groups, qmin, qmax, block):
    errors = torch.empty(W.shape[0], min(block, W.shape[1]), device=W.device)
    return gptq_graph.fused_loop(W.clone(), U, scale, zero, groups, qmin, qmax, block, errors)


SHAPES = [(256, 384, 128, 128), (100, 77, 77, 128), (37, 200, 32, 64), (512, 1000, 128, 128), (16, 129, 64, 128)]


@pytest.mark.parametrize("u_columns", [True, False])
@pytest.mark.parametrize(("rows", "n", "group", "block"), SHAPES)
def test_replayed_graph_equals_eager_fused_loop(rows, n, group, block, u_columns) -> None:
    """Bit-identical codes on the capture call (the warm-up) and on replays with new data of the same shape, for
    ``U`` column-major (as the factorisations give it) or row-major."""
    cache = GraphCache(1 << 30)
    for seed in range(3):
        W, U, scale, zero, groups = _problem(rows, n, group, seed=seed)
        U = U.T.contiguous().T if u_columns else U.contiguous()
        ref = _eager(W, U, scale, zero, groups, 0, 15, block)
        before = W.clone()
        codes = cache.run(W, U, scale, zero, groups, 0, 15, block)
        torch.cuda.synchronize()
        assert torch.equal(codes, ref), f"call {seed}"
        assert torch.equal(W, before)  # the inputs are copied in, not modified
    assert (cache.captures, cache.replays, cache.eager) == (1, 2, 0)
    # a symmetric grid is another graph (qmin, qmax are captured)
    W, U, scale, zero, groups = _problem(rows, n, group, seed=9)
    U = U.T.contiguous().T if u_columns else U.contiguous()
    assert torch.equal(
        cache.run(W, U, scale, zero, groups, -8, 7, block), _eager(W, U, scale, zero, groups, -8, 7, block)
    )
    assert cache.captures == 2


def test_eviction_under_a_tiny_budget_keeps_results_exact() -> None:
    """One graph at a time: new shapes evict, a dropped shape comes back eagerly (no free room), all codes exact."""
    a, b, c = (64, 256, 128, 128), (96, 256, 128, 128), (80, 256, 128, 128)
    cache = GraphCache(max(static_bytes(s[0], s[1], 2, s[3]) for s in (a, b, c)))
    for i, shape in enumerate([a, b, c, a, c, c]):
        rows, n, group, block = shape
        W, U, scale, zero, groups = _problem(rows, n, group, seed=i)
        ref = _eager(W, U, scale, zero, groups, 0, 15, block)
        codes = cache.run(W, U, scale, zero, groups, 0, 15, block)
        assert torch.equal(codes, ref), f"call {i}"
        assert cache.bytes <= cache.budget_bytes
    assert (cache.captures, cache.evictions, cache.eager, cache.replays) == (3, 2, 1, 2)
    assert [k.rows for k in cache.lru_keys()] == [80]
    cache.set_budget(static_bytes(64, 256, 2, 128) - 1)  # nothing fits: the eager loop, exact too
    assert cache.lru_keys() == []
    W, U, scale, zero, groups = _problem(*a[:3], seed=7)
    ref = _eager(W, U, scale, zero, groups, 0, 15, 128)
    assert torch.equal(cache.run(W, U, scale, zero, groups, 0, 15, 128), ref)
    assert cache.eager == 2


def test_static_memory_stays_within_the_budget_and_is_freed() -> None:
    """``memory_allocated`` grows by the static buffers (plus at most one cuBLAS workspace) and shrinks back."""
    cache = GraphCache(64 << 20)
    cache.run(*_problem(16, 128, 128, seed=0), 0, 15, 128)  # the side stream's cuBLAS workspace, made once
    cache.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    shapes = [(1024, 1024, 128), (256, 1024, 128), (2048, 768, 128)]
    sizes = [static_bytes(rows, n, -(-n // group), 128) for rows, n, group in shapes]
    assert sum(sizes) <= cache.budget_bytes
    for i, (rows, n, group) in enumerate(shapes):
        inputs = _problem(rows, n, group, seed=i)
        codes = cache.run(*inputs, 0, 15, 128)
        assert codes.data_ptr() != inputs[0].data_ptr()
        del inputs, codes
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - base
    assert cache.bytes == sum(sizes)
    assert sum(sizes) <= grown <= cache.budget_bytes
    extra = grown - sum(sizes)  # on the H200 (2026-12-04): exactly 32 MiB, the size of one cuBLAS workspace
    assert extra < (32 << 20) + (1 << 20), extra  # not per graph: three graphs, one workspace
    cache.set_budget(sizes[0] + sizes[2])  # the least recently used graph (1024 rows) has to go
    assert [k.rows for k in cache.lru_keys()] == [256, 2048]
    assert torch.cuda.memory_allocated() - base - (sizes[1] + sizes[2]) <= extra
    eager = cache.eager
    cache.run(*_problem(1024, 1024, 128, seed=5), 0, 15, 128)  # dropped, no free room: eager, nothing captured
    assert cache.eager == eager + 1
    assert [k.rows for k in cache.lru_keys()] == [256, 2048]
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base <= cache.budget_bytes + extra
    cache.clear()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base <= extra  # every static buffer is freed


def _hessian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) @ torch.randn(n, n, generator=g)
    return (X.T @ X).cuda()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_quantize_graph_equals_triton_kernel(act_order) -> None:
    """The public solve: ``auto`` replays graphs on CUDA; the codes are those of the eager fused loop, for plain
    GPTQ, the asymmetric (``cross``) target, shared rows and the lean factor, over repeated calls of one shape."""
    gptq_graph.clear()
    captures, replays = gptq_graph.cache.captures, gptq_graph.cache.replays
    spec = QuantSpec(bits=4, group_size=64)
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        W = torch.randn(192, 320, generator=g).cuda().to(torch.bfloat16)
        H = _hessian(320, seed)
        C = 0.01 * _hessian(320, 50 + seed)
        kw = {"act_order": act_order}
        for extra in ({}, {"cross": C}):
            ref = gptq_quantize(W, H, spec, kernel="triton", **kw, **extra)
            for kernel in ("auto", "graph"):
                out = gptq_quantize(W, H, spec, kernel=kernel, **kw, **extra)
                assert torch.equal(out.codes, ref.codes), (seed, kernel, extra.keys())
                assert torch.equal(out.weight, ref.weight)
        lean = gptq_quantize_lean(W, H, spec, kernel="graph", **kw)
        assert torch.equal(lean.codes, gptq_quantize_lean(W, H, spec, kernel="triton", **kw).codes)
        parts = [W[:64], W[64:]]
        shared = gptq_quantize_shared(parts, H, spec, kernel="graph", **kw)
        shared_ref = gptq_quantize_shared(parts, H, spec, kernel="triton", **kw)
        assert all(torch.equal(a.codes, b.codes) for a, b in zip(shared, shared_ref))
    assert gptq_graph.cache.captures == captures + 1  # one shape: 192 rows (the shared solve concatenates 64 + 128)
    assert gptq_graph.cache.replays > replays
    gptq_graph.clear()
    assert gptq_graph.cache.bytes == 0


def test_grouped_hessian_and_tf32_setting_are_separate_graphs() -> None:
    gptq_graph.clear()
    captures, replays = gptq_graph.cache.captures, gptq_graph.cache.replays
    spec = QuantSpec(bits=3, group_size=32, symmetric=False)
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)).cuda()
    H = torch.stack([_hessian(256, 1), _hessian(256, 2)])
    ref = gptq_quantize(W, H, spec, kernel="triton")
    assert torch.equal(gptq_quantize(W, H, spec, kernel="graph").codes, ref.codes)  # two row blocks, one shape
    assert gptq_graph.cache.captures == captures + 1
    assert gptq_graph.cache.replays == replays + 1
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not previous
    try:
        ref2 = gptq_quantize(W, H, spec, kernel="triton")
        assert torch.equal(gptq_quantize(W, H, spec, kernel="graph").codes, ref2.codes)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert gptq_graph.cache.captures == captures + 2
    gptq_graph.clear()
