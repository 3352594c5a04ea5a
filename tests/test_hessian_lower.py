"""Wide Hessians accumulated by lower block rows (on CUDA from 8192 inputs; forced here on the CPU): the same sums
as whole adds up to float32 rounding of the partial products, exactly mirrored, as independent of how batches are
grouped (ranks) as before, and whole adds again once a non-symmetric (cross) term has been added."""

from __future__ import annotations

import pytest
import torch

from lightning_tlq.core import hessian
from lightning_tlq.core.hessian import HessianAccumulator

N = 64
BOUNDS = [0, 16, 40, N]


def _batches(k: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(30, N, generator=g), torch.rand(30, 2, generator=g)) for _ in range(k)]


@pytest.fixture
def lower(monkeypatch):
    monkeypatch.setattr(hessian, "_lower_blocks", lambda n, device: BOUNDS if n == N else None)


def _accumulate(batches, groups: int = 1) -> HessianAccumulator:
    acc = HessianAccumulator(N, groups)
    for x, w in batches:
        acc.add(x, w[:, 0] if groups == 1 else w)
    return acc


def test_blocks_cover_the_width_in_multiples_of_128(monkeypatch) -> None:
    assert hessian._lower_blocks(18944, torch.device("cuda", 0)) is None  # experimental: off by default
    monkeypatch.setattr(hessian, "_LOWER_MIN_WIDTH", 8192)
    assert hessian._lower_blocks(18944, torch.device("cuda", 0)) == [0, 4736, 9472, 14208, 18944]
    assert hessian._lower_blocks(3584, torch.device("cuda", 0)) is None
    assert hessian._lower_blocks(18944, torch.device("cpu")) is None
    assert hessian._lower_blocks(8200, torch.device("cuda", 0)) == [0, 2176, 4352, 6528, 8200]


@pytest.mark.parametrize("groups", [1, 2])
def test_lower_blocks_give_the_whole_sum_mirrored(lower, groups: int) -> None:
    batches = _batches()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(hessian, "_lower_blocks", lambda n, device: None)
        whole = _accumulate(batches, groups).H
    acc = _accumulate(batches, groups)
    assert acc._mirror == BOUNDS  # pending until read
    H = acc.H
    assert acc._mirror is None
    torch.testing.assert_close(H, whole, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))
    for h in H.reshape(-1, N, N):
        for i in range(3):
            for j in range(i + 1, 3):
                rows, cols = slice(BOUNDS[i], BOUNDS[i + 1]), slice(BOUNDS[j], BOUNDS[j + 1])
                assert torch.equal(h[rows, cols], h[cols, rows].mT)


def test_grouping_of_batches_does_not_change_the_float32_hessian(lower) -> None:
    batches = _batches(8)
    one = _accumulate(batches)
    a, b = _accumulate(batches[:3]), _accumulate(batches[3:])
    merged = a.merge_(b)
    assert torch.equal(one.H.float(), merged.H.float())


def test_a_cross_term_switches_to_whole_adds(lower) -> None:
    batches = _batches(4)
    left = torch.randn(30, N, generator=torch.Generator().manual_seed(3))
    acc, ref = HessianAccumulator(N), HessianAccumulator(N)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(hessian, "_lower_blocks", lambda n, device: None)
        for i, (x, _) in enumerate(batches):
            ref.add(x, left=left if i == 2 else None)
    for i, (x, _) in enumerate(batches):
        acc.add(x, left=left if i == 2 else None)
    assert not acc._symmetric
    torch.testing.assert_close(acc.H, ref.H, rtol=1e-6, atol=1e-6 * float(ref.H.abs().max()))
    assert not torch.equal(acc.H, acc.H.mT)


def test_state_round_trip_keeps_the_mirrored_sum(lower) -> None:
    acc = _accumulate(_batches())
    state = acc.state_dict()
    other = HessianAccumulator(N)
    other.load_state_dict(state)
    assert torch.equal(other.H, acc.H)
    assert other._symmetric
    other.add(*_batches(1, seed=5)[0][:1])
    assert other._mirror == BOUNDS
