"""Token-level calibration set: mass coverage, unbiasedness of the weighted Hessian, rank invariance."""

import pytest
import torch

from lightning_tlq.core.hessian import HessianAccumulator
from lightning_tlq.core.tokenset import mass_threshold, select_tokens, token_uniforms


def _scores(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g).pow(4) * 10  # heavy-tailed importance


@pytest.mark.parametrize("keep_mass", [0.5, 0.9, 0.99])
def test_kept_by_mass_covers_keep_mass_minimally(keep_mass):
    scores = _scores()
    sel = select_tokens(scores, torch.ones_like(scores), keep_mass, p_rest=0.0)
    total = scores.sum()
    assert scores[sel.by_mass].sum() >= keep_mass * total * (1 - 1e-6)
    assert sel.mass_covered == pytest.approx(float(scores[sel.by_mass].sum() / total), rel=1e-6)
    # minimal: dropping the smallest kept token falls below keep_mass
    smallest = scores[sel.by_mass].min()
    assert scores[sel.by_mass].sum() - smallest < keep_mass * total
    # and it is the top of the ranking
    assert scores[~sel.by_mass].max() < smallest
    assert torch.equal(sel.multiplier, sel.by_mass.float())


def test_rest_kept_with_inverse_probability_weights():
    scores = _scores()
    uniforms = token_uniforms(7, 3, torch.arange(5), 100).flatten()
    sel = select_tokens(scores, uniforms, 0.8, p_rest=0.25)
    lucky = ~sel.by_mass & (uniforms < 0.25)
    assert torch.equal(sel.multiplier[lucky], torch.full((int(lucky.sum()),), 4.0))
    assert (sel.multiplier[~sel.by_mass & ~lucky] == 0).all()
    assert sel.kept.sum() == sel.by_mass.sum() + lucky.sum()


def test_weighted_hessian_is_unbiased():
    """E[sum_t m_t w_t x_t x_t^T] over the random draw equals the full weighted Hessian."""
    torch.manual_seed(0)
    n, d = 300, 6
    x = torch.randn(n, d) @ torch.randn(d, d)
    w = _scores(n, seed=1)
    full = HessianAccumulator(d)
    full.add(x, w)
    sel = select_tokens(w, torch.zeros(n), 0.7, p_rest=0.2)  # deterministic part
    det = sel.by_mass
    draws = 4000
    u = torch.rand(draws, n)
    mult = det.float() + (~det & (u < 0.2)).float() / 0.2  # [draws, n], same rule as select_tokens
    sel_check = select_tokens(w, u[0], 0.7, 0.2)
    assert torch.equal(sel_check.multiplier, mult[0])
    estimates = torch.einsum("kn,ni,nj->kij", mult * w, x, x)
    mean, stderr = estimates.mean(0), estimates.std(0) / draws**0.5
    assert ((mean - full.H).abs() <= 5 * stderr + 1e-4 * full.H.abs().max()).all()
    # a single draw is noticeably different: the test can fail if the weights were not divided by p_rest
    biased = torch.einsum("kn,ni,nj->kij", (mult > 0).float() * w, x, x).mean(0)
    assert ((biased - full.H).abs() > 5 * stderr).any()


def test_uniforms_depend_only_on_sample_id():
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    whole = token_uniforms(3, 2, ids, 16)
    split = torch.cat([token_uniforms(3, 2, ids[i::2], 16) for i in range(2)])
    order = torch.cat([ids[0::2], ids[1::2]])
    assert torch.equal(whole[order], split)
    assert not torch.equal(token_uniforms(3, 1, ids, 16), whole)  # other layer, other draw
    assert not torch.equal(token_uniforms(4, 2, ids, 16), whole)  # other seed, other draw
    assert ((whole >= 0) & (whole < 1)).all()


def test_threshold_is_order_invariant_and_validates():
    scores = _scores()
    perm = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(1))
    assert mass_threshold(scores, 0.9) == mass_threshold(scores[perm], 0.9)
    with pytest.raises(ValueError, match="no candidate"):
        mass_threshold(torch.empty(0), 0.9)
    with pytest.raises(ValueError, match="non-negative"):
        mass_threshold(torch.tensor([1.0, -1.0]), 0.9)
    sel = select_tokens(torch.zeros(4), torch.ones(4), 0.9, 0.1)
    assert sel.kept.all()  # no importance at all: keep everything rather than nothing
