"""Tests for lightning_tlq.core.hessian (weighted Hessian accumulation and output error)."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_tlq.core.hessian import HessianAccumulator, output_error, relative_output_error


def _data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return (x64.T * w.double()) @ x64


def test_unweighted_matches_direct() -> None:
    x = _data(50, 12)
    acc = HessianAccumulator(12)
    acc.add(x)
    assert acc.H.dtype == torch.float64
    assert acc.H.shape == (12, 12)
    torch.testing.assert_close(acc.H.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
    assert acc.tokens == 50
    assert acc.weight_sum == 50.0


def test_per_token_weights_match_direct() -> None:
    x = _data(40, 8, seed=1)
    w = torch.rand(40, generator=torch.Generator().manual_seed(2)) * 3
    w[5] = 0.0
    acc = HessianAccumulator(8)
    acc.add(x, w)
    torch.testing.assert_close(acc.H.double(), _reference(x, w), rtol=1e-5, atol=1e-4)
    assert acc.tokens == 40
    assert acc.weight_sum == pytest.approx(float(w.double().sum()))


def test_grouped_weights_match_direct_per_group() -> None:
    x = _data(30, 6, seed=3)
    w = torch.rand(30, 3, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator(6, groups=3)
    acc.add(x, w)
    assert acc.H.shape == (3, 6, 6)
    for g in range(3):
        torch.testing.assert_close(acc.H[g].double(), _reference(x, w[:, g]), rtol=1e-5, atol=1e-4)
    assert acc.weight_sum == pytest.approx(float(w.double().sum()) / 3)  # mean over groups
    # a per-token weight vector is shared by all groups
    shared = HessianAccumulator(6, groups=3)
    shared.add(x, w[:, 0])
    for g in range(3):
        assert torch.equal(shared.H[g], acc.H[0])


def test_leading_dims_and_low_precision_inputs() -> None:
    x = _data(24, 8, seed=5).to(torch.bfloat16)
    w = torch.rand(24, generator=torch.Generator().manual_seed(6))
    flat = HessianAccumulator(8)
    flat.add(x, w)
    batched = HessianAccumulator(8)
    batched.add(x.reshape(2, 12, 8), w.reshape(2, 12))
    assert torch.equal(flat.H, batched.H)
    assert batched.tokens == 24
    torch.testing.assert_close(flat.H.double(), _reference(x.float(), w), rtol=1e-5, atol=1e-4)


def test_ones_weight_is_bit_identical_to_none() -> None:
    x = _data(64, 16, seed=7)
    a, b = HessianAccumulator(16), HessianAccumulator(16)
    a.add(x)
    b.add(x, torch.ones(64))
    assert torch.equal(a.H, b.H)


def test_token_counting_over_adds() -> None:
    acc = HessianAccumulator(4)
    acc.add(_data(3, 4), torch.tensor([1.0, 0.0, 3.0]))
    acc.add(_data(5, 4, seed=1))
    acc.add(torch.empty(0, 4))
    assert acc.tokens == 8
    assert acc.weight_sum == 9.0
    acc.reset()
    assert acc.tokens == 0
    assert acc.weight_sum == 0.0
    assert torch.count_nonzero(acc.H) == 0


def test_merge_equals_one_big_add() -> None:
    x = _data(60, 10, seed=8)
    w = torch.rand(60, 2, generator=torch.Generator().manual_seed(9))
    big = HessianAccumulator(10, groups=2)
    big.add(x, w)
    a, b = HessianAccumulator(10, groups=2), HessianAccumulator(10, groups=2)
    a.add(x[:25], w[:25])
    b.add(x[25:], w[25:])
    assert a.merge_(b) is a
    torch.testing.assert_close(a.H, big.H, rtol=1e-5, atol=1e-4)
    assert a.tokens == 60
    assert a.weight_sum == pytest.approx(big.weight_sum)
    with pytest.raises(ValueError, match="shape mismatch"):
        a.merge_(HessianAccumulator(10))


def test_float64_sum_of_batch_partials_is_grouping_invariant() -> None:
    """One running sum over 12 batches vs per-"rank" partial sums (5 + 7 batches) merged: same float32 Hessian.

    This is what makes calibration rank-count invariant (batches are global, so each batch's float32 partial is
    bit-identical); a float32 running sum differs in the last bits, which GPTQ amplifies into flipped codes.
    """
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(37, 48, generator=g) * 10, torch.rand(37, generator=g) * 3) for _ in range(12)]

    def run(dtype, splits):
        parts = []
        for lo, hi in splits:
            acc = HessianAccumulator(48, dtype=dtype)
            for x, w in batches[lo:hi]:
                acc.add(x, w)
            parts.append(acc)
        return parts[0] if len(parts) == 1 else parts[0].merge_(parts[1])

    one, two = run(torch.float64, [(0, 12)]), run(torch.float64, [(0, 5), (5, 12)])
    assert one.H.dtype == torch.float64
    assert torch.equal(one.H.float(), two.H.float())
    assert (one.tokens, one.weight_sum) == (two.tokens, pytest.approx(two.weight_sum))
    one32, two32 = run(torch.float32, [(0, 12)]), run(torch.float32, [(0, 5), (5, 12)])
    assert one32.H.dtype == torch.float32
    torch.testing.assert_close(one32.H, one.H.float(), rtol=1e-5, atol=1e-3)
    assert not torch.equal(one32.H, two32.H)  # the float32 path depends on the grouping
    with pytest.raises(ValueError, match="dtype"):
        HessianAccumulator(4, dtype=torch.float16)


def test_state_dict_round_trip() -> None:
    acc = HessianAccumulator(5, groups=2)
    acc.add(_data(7, 5), torch.rand(7, 2, generator=torch.Generator().manual_seed(1)))
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    other = HessianAccumulator(5, groups=2)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.H, acc.H)
    assert other.tokens == 7
    assert other.weight_sum == acc.weight_sum
    other.add(_data(1, 5), torch.ones(1, 2))  # loaded state is a copy
    assert not torch.equal(other.H, acc.H)
    with pytest.raises(ValueError, match="H shape"):
        HessianAccumulator(5).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        HessianAccumulator(5).load_state_dict({"H": torch.zeros(5, 5)})


def test_bad_inputs_raise() -> None:
    acc = HessianAccumulator(4, groups=2)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        acc.add(torch.randn(3, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match="non-negative"):
        acc.add(torch.randn(3, 4), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="float"):
        acc.add(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="groups"):
        HessianAccumulator(4, groups=0)


def test_output_error_matches_formula() -> None:
    x = _data(30, 6, seed=11)
    H = x.T @ x
    W = _data(4, 6, seed=12)
    Wq = W + 0.1 * _data(4, 6, seed=13)
    dW = Wq.double() - W.double()
    expected = float(torch.trace(dW @ H.double() @ dW.T))
    assert output_error(W, Wq, H) == pytest.approx(expected, rel=1e-10)
    denom = float(torch.trace(W.double() @ H.double() @ W.double().T))
    assert relative_output_error(W, Wq, H) == pytest.approx(expected / denom, rel=1e-10)
    assert output_error(W, W, H) == 0.0


def test_output_error_grouped_is_sum_over_row_blocks() -> None:
    x = _data(30, 6, seed=14)
    H = torch.stack([x.T @ x, (x[:10].T @ x[:10])])
    W = _data(4, 6, seed=15)
    Wq = W.round()
    expected = output_error(W[:2], Wq[:2], H[0]) + output_error(W[2:], Wq[2:], H[1])
    assert output_error(W, Wq, H) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="divisible"):
        output_error(W[:3], Wq[:3], H)


def test_relative_error_zero_over_zero() -> None:
    W = torch.zeros(2, 3)
    H = torch.eye(3)
    assert relative_output_error(W, W, H) == 0.0
    assert relative_output_error(W, torch.ones(2, 3), H) == float("inf")
    assert isinstance(relative_output_error(torch.ones(2, 3), torch.ones(2, 3), H), float)


def test_cross_term_matches_direct_and_is_order_invariant() -> None:
    """``add(x~, w, left=x - x~)`` sums ``w (x - x~) x~^T``; like H, the float64 sum of per-batch float32 partials
    rounds to the same float32 matrix in any order or grouping (what makes it rank-count invariant)."""
    x_q, x = _data(90, 10, seed=3), _data(90, 10, seed=4)
    w = torch.rand(90, generator=torch.Generator().manual_seed(5))
    acc = HessianAccumulator(10)
    acc.add(x_q, w, left=x - x_q)
    reference = ((x.double() - x_q.double()).T * w.double()) @ x_q.double()
    torch.testing.assert_close(acc.H, reference, rtol=1e-5, atol=1e-4)
    parts = [slice(0, 30), slice(30, 60), slice(60, 90)]
    forward, a, b = HessianAccumulator(10), HessianAccumulator(10), HessianAccumulator(10)
    for s in parts:
        forward.add(x_q[s], w[s], left=x[s] - x_q[s])
    a.add(x_q[parts[2]], w[parts[2]], left=x[parts[2]] - x_q[parts[2]])
    for s in parts[:2]:
        b.add(x_q[s], w[s], left=x[s] - x_q[s])
    assert torch.equal(forward.H.float(), a.merge_(b).H.float())
    with pytest.raises(ValueError, match="must have x's shape"):
        acc.add(x_q, left=x[:5])
