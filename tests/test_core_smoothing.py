"""Tests for lightning_tlq.core.smoothing: scale formulas, the grid search's losses, clip search, folding."""

from __future__ import annotations

import pytest
import torch

from lightning_tlq.core.actquant import fake_quantize_per_token
from lightning_tlq.core.quantizer import QuantSpec, rtn
from lightning_tlq.core.smoothing import (
    ScaleSearch,
    alpha_grid,
    awq_scales,
    block_gram,
    clip_ratios,
    clip_weight,
    column_absmax,
    floor_at_median,
    fold_into_norm_,
    fold_into_rows_,
    scale_columns_,
    search_clip,
    smoothquant_scales,
)

SPEC = QuantSpec(bits=3, group_size=32)


def _data(n=200, inp=64, outs=(48, 16), seed=0):
    """Inputs with a few outlier channels (what AWQ / SmoothQuant exploit) and a group of two weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g)
    x[:, ::9] *= 8.0
    weights = [torch.randn(o, inp, generator=g) for o in outs]
    return x, weights


def _rel_mse(x, w, wq, s, act_bits=None):
    xs = x / s
    if act_bits is not None:
        xs = fake_quantize_per_token(xs, act_bits)
    ref = x @ w.T
    return float((xs @ wq.T - ref).square().sum() / ref.square().sum())


def test_alpha_grid_and_awq_scales():
    assert alpha_grid(1) == [0.0]
    assert alpha_grid(4) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="at least one point"):
        alpha_grid(0)
    mean_abs = torch.tensor([0.0, 0.5, 2.0, 8.0])
    assert torch.equal(awq_scales(mean_abs, 0.0), torch.ones(4))  # 0^0 = 1: alpha 0 is exactly round to nearest
    s = awq_scales(mean_abs, 0.5)
    raw = torch.tensor([1e-4, 0.5**0.5, 2**0.5, 8**0.5])  # clamped at 1e-4, then normalised by sqrt(max * min)
    torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))


def test_smoothquant_scales_match_the_formula_elementwise():
    x, weights = _data()
    act_max = x.abs().amax(0)
    w_max = column_absmax(weights)
    for j in range(x.shape[1]):  # the max over every row of every weight of the group
        assert w_max[j] == max(float(w[:, j].abs().max()) for w in weights)
    for alpha in (0.0, 0.5, 0.85, 1.0):
        s = smoothquant_scales(act_max, w_max, alpha)
        for j in (0, 1, 9, 63):
            want = max(float(act_max[j]) ** alpha / max(float(w_max[j]), 1e-5) ** (1 - alpha), 1e-5)
            assert s[j].item() == pytest.approx(want, rel=1e-5)
    # clamps: a dead channel and a zero weight column
    s = smoothquant_scales(torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0]), 0.5)
    assert s.tolist() == pytest.approx([1e-5, 2.0 / 1e-5**0.5], rel=1e-5)


def test_scale_search_losses_are_the_direct_output_errors_and_awq_beats_rtn():
    x, weights = _data()
    w = torch.cat(weights)
    grid = alpha_grid(10)
    cands = torch.stack([awq_scales(x.abs().mean(0), a) for a in grid])
    search = ScaleSearch(weights, cands, SPEC)
    search.add(x[:120])
    search.add(x[120:])  # batches add up
    losses = search.losses()
    for k in (0, 3, 9):
        s = cands[k]
        direct = _rel_mse(x, w, rtn(w * s, SPEC).weight, s)
        assert losses[k].item() == pytest.approx(direct, rel=1e-5)
    rtn_loss = _rel_mse(x, w, rtn(w, SPEC).weight, torch.ones(w.shape[1]))
    assert losses[0].item() == pytest.approx(rtn_loss, rel=1e-6)  # alpha = 0 is round to nearest
    assert losses.min().item() <= rtn_loss
    assert losses.min().item() < 0.9 * rtn_loss  # with outlier channels the search really helps
    assert search.counts.tolist() == [200.0, 0.0, 0.0]
    uncached = ScaleSearch(weights, cands, SPEC, cache_bytes=0)  # re-quantizes per batch: the same sums
    uncached.add(x[:120])
    uncached.add(x[120:])
    assert torch.equal(uncached.state(), search.state())


def test_scale_search_with_activation_quant_and_split_state_reduction():
    x, weights = _data(seed=1)
    w = torch.cat(weights)
    cands = torch.stack([smoothquant_scales(x.abs().amax(0), column_absmax(weights), a) for a in (0.25, 0.5)])
    whole = ScaleSearch(weights, cands, SPEC, act_bits=8)
    whole.add(x)
    parts = [ScaleSearch(weights, cands, SPEC, act_bits=8) for _ in range(2)]
    parts[0].add(x[:77])
    parts[1].add(x[77:])
    merged = ScaleSearch(weights, cands, SPEC, act_bits=8)
    merged.load_state(parts[0].state() + parts[1].state())  # what an all-reduce over two ranks does
    torch.testing.assert_close(merged.losses(), whole.losses(), rtol=1e-12, atol=0)
    s = cands[1]
    direct = _rel_mse(x, w, rtn(w * s, SPEC).weight, s, act_bits=8)
    assert whole.losses()[1].item() == pytest.approx(direct, rel=1e-5)


def test_mbq_objective_is_the_modality_weighted_mae():
    x, weights = _data(seed=2)
    w = torch.cat(weights)
    g = torch.Generator().manual_seed(3)
    answer = torch.rand(x.shape[0], generator=g) < 0.2
    vision = ~answer & (torch.rand(x.shape[0], generator=g) < 0.6)  # the rest: prompt text, not in the loss
    cands = torch.stack([torch.ones(x.shape[1]), awq_scales(x.abs().mean(0), 0.5)])
    search = ScaleSearch(weights, cands, SPEC, objective="mbq")
    search.add(x, answer, vision)
    rho = 0.3
    for k, s in enumerate(cands):
        d = (x / s) @ rtn(w * s, SPEC).weight.T - x @ w.T
        ref = x @ w.T
        n = answer.sum() + vision.sum()
        j = (d[answer].abs().sum() + rho * d[vision].abs().sum()) / n
        j_ref = (ref[answer].abs().sum() + rho * ref[vision].abs().sum()) / n
        assert search.losses(rho)[k].item() == pytest.approx(float(j / j_ref), rel=1e-5)
    with pytest.raises(ValueError, match="answer and vision masks"):
        search.add(x)
    with pytest.raises(ValueError, match="rho"):
        search.losses()


def test_clip_search_is_never_worse_than_no_clip_and_matches_the_direct_error():
    x, weights = _data(seed=4)
    w = weights[0]
    w[3, 5] = 12.0  # an outlier weight that clipping should cut
    gram = block_gram(x[:100], SPEC) + block_gram(x[100:], SPEC)
    max_val, ratio = search_clip(w, gram, SPEC)
    assert ratio.shape == (w.shape[0], 2)
    grid = torch.tensor(clip_ratios())
    assert all((grid - r).abs().min() < 1e-6 for r in ratio.unique())
    clipped = rtn(clip_weight(w, max_val, SPEC), SPEC).weight
    plain = rtn(w, SPEC).weight

    def err(q):  # per (row, group): sum_t (dW_g x_tg)^2, computed directly
        d = (q - w).reshape(w.shape[0], 2, 32)
        xg = x.reshape(x.shape[0], 2, 32)
        return torch.einsum("ogc,ngc->nog", d, xg).square().sum(0)

    assert (err(clipped) <= err(plain) * (1 + 1e-5)).all()
    assert err(clipped).sum() < err(plain).sum()
    assert ratio[3, 0] < 1.0  # the outlier's group is clipped


def test_fold_helpers_preserve_the_function():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 16, generator=g)
    s = torch.rand(16, generator=g) + 0.5
    n = x / x.square().mean(-1, keepdim=True).sqrt()
    for offset in (0.0, 1.0):  # (offset + w) * n(x) + b, then a linear on top
        w, b = torch.rand(16, generator=g), torch.randn(16, generator=g)
        lin = torch.randn(5, 16, generator=g)
        before = ((offset + w) * n + b) @ lin.T
        fold_into_norm_(w, b, s, offset)
        scale_columns_(lin, s)
        torch.testing.assert_close(((offset + w) * n + b) @ lin.T, before, rtol=1e-5, atol=1e-5)
    up, bias, down = torch.randn(16, 8, generator=g), torch.randn(16, generator=g), torch.randn(4, 16, generator=g)
    h = torch.randn(3, 8, generator=g)
    before = (h @ up.T + bias) @ down.T
    fold_into_rows_(up, bias, s)
    scale_columns_(down, s)
    torch.testing.assert_close((h @ up.T + bias) @ down.T, before, rtol=1e-5, atol=1e-5)


def test_floor_at_median():
    assert floor_at_median([0.1, 0.4, 0.2]) == [0.2, 0.4, 0.2]
    assert floor_at_median([0.1, 0.3]) == pytest.approx([0.2, 0.3])  # even count: mean of the middle two
    assert floor_at_median([]) == []
