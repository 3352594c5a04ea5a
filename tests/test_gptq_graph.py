"""The CUDA-graph cache of GPTQ's fused column loop, on the CPU: byte arithmetic, keys, budget and LRU eviction
(with a stand-in for the captured graph), and the fused loop with per-group parameters (Triton interpreted) equals
the fused loop on expanded per-column parameters. The graphs themselves: ``tests/test_gptq_graph_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from lightning_tlq.config import QuantArgs
from lightning_tlq.core import gptq_graph
from lightning_tlq.core.gptq_checks import _column_loop
from lightning_tlq.core.gptq_graph import GraphCache, GraphKey, static_bytes


class _FakeGraph:
    """Stands in for a captured loop: counts warm-ups, captures and replays; 'codes' are the input weights + 1."""

    def __init__(self, key: GraphKey, fail: bool = False) -> None:
        self.key, self.fail, self.graph = key, fail, None
        self.log: list[str] = []

    def warm(self, W, U, scale, zero, groups) -> torch.Tensor:
        self.log.append("warm")
        return W + 1

    def capture(self) -> None:
        self.log.append("capture")
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.graph = object()

    def replay(self, W, U, scale, zero, groups) -> torch.Tensor:
        self.log.append("replay")
        return W + 1


def _cache(budget: int, fail: bool = False) -> tuple[GraphCache, list[_FakeGraph]]:
    built: list[_FakeGraph] = []

    def build(key: GraphKey) -> _FakeGraph:
        built.append(_FakeGraph(key, fail))
        return built[-1]

    return GraphCache(budget, build=build), built  # type: ignore[arg-type]


def _inputs(rows: int, n: int, group: int = 32):
    n_groups = -(-n // group)
    W = torch.randn(rows, n)
    U = torch.eye(n)
    scale, zero = torch.ones(rows, n_groups), torch.zeros(rows, n_groups)
    groups = (torch.arange(n) // group).to(torch.int32)
    return W, U, scale, zero, groups, -8, 7, 16


def test_static_bytes_of_the_7b_shapes() -> None:
    """The arithmetic of the module docstring: W (codes), U, per-group scale and zero, group index, errors."""
    assert static_bytes(3, 5, 2, 4) == 4 * (3 * 5 + 5 * 5 + 2 * 3 * 2 + 5 + 3 * 4)
    assert static_bytes(3, 5, 2, 128) == static_bytes(3, 5, 2, 5)  # the errors buffer is at most n wide
    mb = {shape: static_bytes(*shape, in_f // 128, 128) / 1e6 for shape in [(3584, 3584), (512, 3584)]
          for in_f in [shape[1]]}  # fmt: skip
    assert round(mb[(3584, 3584)], 1) == 105.4
    assert round(mb[(512, 3584)], 1) == 59.1
    assert round(static_bytes(18944, 3584, 28, 128) / 1e6, 1) == 336.9
    together = static_bytes(3584, 3584, 28, 128) + static_bytes(512, 3584, 28, 128) + static_bytes(18944, 3584, 28, 128)
    assert together <= gptq_graph.DEFAULT_BUDGET_BYTES  # q/o, k/v and gate/up graphs are all kept
    assert static_bytes(3584, 18944, 148, 128) > gptq_graph.DEFAULT_BUDGET_BYTES  # down_proj runs eagerly


def test_key_names_everything_the_capture_fixes() -> None:
    W, U, scale, zero, groups, qmin, qmax, bs = _inputs(8, 40)
    key = GraphKey.of(W, U, scale, qmin, qmax, bs)
    assert key == GraphKey(8, 40, 2, 16, -8, 7, "cpu", bool(torch.backends.cuda.matmul.allow_tf32), False)
    assert key.bytes == static_bytes(8, 40, 2, 16)
    assert GraphKey.of(W, U, scale, 0, 15, bs) != key  # another grid
    assert GraphKey.of(W, U, scale, qmin, qmax, 32) != key  # another block size
    assert GraphKey.of(W[:4], U, scale[:4], qmin, qmax, bs) != key  # another row count
    columns = GraphKey.of(W, U.T.contiguous().T, scale, qmin, qmax, bs)  # U column-major, as factorised
    assert columns.u_columns
    assert columns != key
    assert columns.bytes == key.bytes
    torch.backends.cuda.matmul.allow_tf32 = not key.tf32
    try:
        assert GraphKey.of(W, U, scale, qmin, qmax, bs) != key  # the matmul precision the capture fixed
    finally:
        torch.backends.cuda.matmul.allow_tf32 = key.tf32


def test_first_call_warms_and_captures_later_calls_replay() -> None:
    cache, built = _cache(1 << 20)
    args = _inputs(8, 40)
    assert torch.equal(cache.run(*args), args[0] + 1)
    (graph,) = built
    assert graph.log == ["warm", "capture"]
    for _ in range(3):
        cache.run(*args)
    assert graph.log == ["warm", "capture", "replay", "replay", "replay"]
    assert (cache.captures, cache.replays, cache.eager, cache.evictions) == (1, 3, 0, 0)
    assert cache.bytes == static_bytes(8, 40, 2, 16)


def test_budget_evicts_least_recently_used_and_refuses_oversized_shapes(monkeypatch) -> None:
    a, b, c = _inputs(8, 40), _inputs(16, 40), _inputs(24, 40)
    size = {n: static_bytes(n, 40, 2, 16) for n in (8, 16, 24)}
    cache, built = _cache(size[8] + size[16] + size[24] - 1)  # any two fit, not all three
    cache.run(*a)
    cache.run(*b)
    cache.run(*a)  # a is now the most recently used
    cache.run(*c)  # a new shape: evicts b
    assert [k.rows for k in cache.lru_keys()] == [8, 24]
    assert cache.evictions == 1
    assert cache.bytes <= cache.budget_bytes
    calls = []
    monkeypatch.setattr(gptq_graph, "fused_loop", lambda *x: calls.append(x) or x[0])
    for _ in range(3):  # a dropped shape comes back only into free room: no capture per call
        for args in (a, b, c):
            cache.run(*args)
    assert [k.rows for k in cache.lru_keys()] == [8, 24]
    assert len(built) == 3
    assert len(calls) == 3  # b, eagerly
    assert calls[0][-1].shape == (16, 16)  # its own errors scratch
    cache.set_budget(size[24])  # shrinking drops the least recently used until the rest fit
    assert [k.rows for k in cache.lru_keys()] == [24]
    cache.set_budget(size[24] + size[16])
    cache.run(*b)  # dropped before, and now there is room
    assert [k.rows for k in cache.lru_keys()] == [24, 16]
    assert len(built) == 4
    big = _inputs(200, 40)  # over the budget alone: the eager fused loop, nothing captured or evicted
    assert static_bytes(200, 40, 2, 16) > cache.budget_bytes
    assert cache.run(*big) is big[0]
    assert [k.rows for k in cache.lru_keys()] == [24, 16]
    assert len(calls) == 4
    cache.clear()
    assert cache.lru_keys() == []
    assert cache.bytes == 0


def test_clear_forgets_dropped_shapes() -> None:
    a, b = _inputs(8, 40), _inputs(16, 40)
    cache, built = _cache(static_bytes(16, 40, 2, 16))  # one at a time
    cache.run(*a)
    cache.run(*b)  # new: evicts a
    assert [k.rows for k in cache.lru_keys()] == [16]
    cache.clear()
    cache.run(*a)
    assert [k.rows for k in cache.lru_keys()] == [8]
    assert len(built) == 3


def test_a_failed_capture_returns_the_warm_up_codes_and_stays_eager(caplog, monkeypatch) -> None:
    cache, built = _cache(1 << 20, fail=True)
    args = _inputs(8, 40)
    with caplog.at_level("WARNING"):
        assert torch.equal(cache.run(*args), args[0] + 1)
    assert "CUDA graph capture failed" in caplog.text
    assert cache.lru_keys() == []
    assert cache.eager == 1
    W = args[0].clone()
    monkeypatch.setattr(gptq_graph, "fused_loop", lambda *x: x[0])
    assert cache.run(W, *args[1:]) is W  # not captured again
    assert len(built) == 1
    assert cache.eager == 2
    cache.clear()  # forgets the failure too
    cache.run(*args)
    assert len(built) == 2


def test_module_level_cache_and_kernel_choice(monkeypatch) -> None:
    assert gptq_graph.cache.budget_bytes == gptq_graph.DEFAULT_BUDGET_BYTES
    gptq_graph.clear()
    assert gptq_graph.cache.bytes == 0
    W = torch.zeros(4, 256)
    assert _column_loop("auto", W, 128, "") == "torch"  # CPU weights
    with pytest.raises(ValueError, match=r"kernel='graph' needs Triton .* device cpu"):
        _column_loop("graph", W, 128, "")
    from lightning_tlq.core import gptq_triton

    monkeypatch.setattr(gptq_triton, "available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert _column_loop("auto", W, 128, "") == "graph"
    assert _column_loop("graph", W, 128, "") == "graph"
    assert _column_loop("triton", W, 128, "") == "triton"
    assert _column_loop("torch", W, 128, "") == "torch"
    assert _column_loop("auto", W, 256, "") == "torch"  # blocks wider than the fused step
    with pytest.raises(ValueError, match=r"quant.kernel='graph' runs blocks of at most 128 columns"):
        QuantArgs(kernel="graph", block_size=256)


# --- the fused loop itself, Triton interpreted on the CPU (compiled on CUDA) ------------------------------------


def _problem(rows: int, n: int, group: int, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, n, generator=g) * torch.rand(1, n, generator=g).add(0.1)
    A = torch.randn(n, 2 * n, generator=g)
    H = A @ A.T / n + 0.01 * torch.eye(n)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    n_groups = -(-n // group)
    scale = torch.rand(rows, n_groups, generator=g).add(0.05) * 0.3
    zero = torch.randint(0, 16, (rows, n_groups), generator=g).float()
    perm = torch.randperm(n, generator=g)
    groups = (torch.arange(n) // group)[perm].to(torch.int32)  # act order: groups out of order
    return [t.to(device) for t in (W[:, perm].contiguous(), U, scale, zero, groups)]


def _per_column_loop(W, U, scale, zero, groups, qmin, qmax, block_size):
    """The fused loop as it was: expanded per-column parameters, codes in their own buffer."""
    from lightning_tlq.core import gptq_triton

    W = W.clone()
    S, Z = scale[:, groups.long()], zero[:, groups.long()]
    codes = torch.empty_like(W)
    errors = torch.empty(W.shape[0], block_size, device=W.device)
    for i1 in range(0, W.shape[1], block_size):
        i2 = min(i1 + block_size, W.shape[1])
        err = errors[:, : i2 - i1]
        gptq_triton.block_step(
            W[:, i1:i2], U[i1:i2, i1:i2], S[:, i1:i2], Z[:, i1:i2], qmin, qmax, codes=codes[:, i1:i2], errors=err
        )
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)
    return codes


@pytest.mark.parametrize(("rows", "n", "group", "block"), [(24, 200, 32, 128), (5, 77, 77, 32), (40, 256, 64, 128)])
def test_fused_loop_with_group_parameters_equals_per_column_loop(rows, n, group, block) -> None:
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W, U, scale, zero, groups = _problem(rows, n, group, seed=rows + n, device=device)
    if rows % 2 == 0:
        U = U.T.contiguous().T  # column-major, as the factorisations give it
    ref = _per_column_loop(W, U, scale, zero, groups, 0, 15, block)
    Wg = W.clone()
    errors = torch.empty(rows, min(block, n), device=device)
    codes = gptq_graph.fused_loop(Wg, U, scale, zero, groups, 0, 15, block, errors)
    assert codes.data_ptr() == Wg.data_ptr()  # the codes are written over the weights
    assert torch.equal(codes, ref)
