"""Post-processing of raw importance scores (METHOD.md section 1)."""

import pytest
import torch

from lightning_tlq.core.importance import (
    _clip_quantile,
    postprocess,
    postprocess_flat,
    raw_scores,
    scatter_back,
    scatter_modules,
)


def test_raw_scores_definitions_and_groups():
    g = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    y = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    assert torch.allclose(raw_scores(g, None, "fisher"), torch.tensor([[7.5]]))
    assert torch.allclose(raw_scores(g, None, "grad_abs"), torch.tensor([[2.5]]))
    assert torch.allclose(raw_scores(g, y, "taylor"), torch.tensor([[2.25]]))
    assert torch.allclose(raw_scores(g, None, "fisher", groups=2), torch.tensor([[2.5, 12.5]]))
    with pytest.raises(ValueError, match="does not divide"):
        raw_scores(g, None, "fisher", groups=3)
    with pytest.raises(ValueError, match="choose one of"):
        raw_scores(g, None, "hessian")


def _batches():
    torch.manual_seed(0)
    scores = [torch.rand(2, 6, 1) ** 3, torch.rand(3, 4, 1) ** 3]
    valid = [torch.ones(2, 6, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]
    valid[0][1, 4:] = False
    vision = [torch.zeros(2, 6, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool)]
    vision[0][:, :3] = True
    vision[1][:, :2] = True
    scores[1][:, :2] = 0.0  # vision tokens with no gradient at all
    return scores, valid, vision


def test_postprocess_mean_one_pads_zero_floor_keeps_vision():
    scores, valid, vision = _batches()
    out = postprocess(scores, valid, vision, floor=0.1, clip_quantile=1.0)
    flat = torch.cat([o[v] for o, v in zip(out, valid)])
    assert flat.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (out[0][1, 4:] == 0).all()
    # zero-gradient vision tokens keep a floor: lam * mean over vision tokens of the normalised scores
    assert (out[1][:, :2] > 0).all()
    # without clipping, the map is affine in the score within each modality: check exactly
    norm = [s / torch.cat([t[v] for t, v in zip(scores, valid)]).mean() for s in scores]
    allv = torch.cat([n[v & m] for n, v, m in zip(norm, valid, vision)]).mean()
    allt = torch.cat([n[v & ~m] for n, v, m in zip(norm, valid, vision)]).mean()
    expect = [0.9 * n + 0.1 * torch.where(m, allv, allt).unsqueeze(-1) for n, m in zip(norm, vision)]
    scale = torch.cat([e[v] for e, v in zip(expect, valid)]).mean()
    for o, e, v in zip(out, expect, valid):
        assert torch.allclose(o[v], (e / scale)[v], atol=1e-6)


def test_postprocess_clip_and_modes():
    scores, valid, vision = _batches()
    scores[0][0, 0, 0] = 1e4  # one dominating token
    clipped = postprocess(scores, valid, vision, floor=0.0, clip_quantile=0.9)
    flat = torch.cat([o[v] for o, v in zip(clipped, valid)])
    assert flat.max() / flat.mean() < 10
    assert flat.mean().item() == pytest.approx(1.0, abs=1e-6)
    none = postprocess(scores, valid, vision, mode="none")
    assert all(torch.equal(o, v.unsqueeze(-1).float()) for o, v in zip(none, valid))
    modality = postprocess(scores, valid, vision, mode="modality")
    mv = torch.cat([o[v & m] for o, v, m in zip(modality, valid, vision)])
    assert torch.allclose(mv, mv[0].expand_as(mv))  # one weight per modality
    with pytest.raises(FloatingPointError):
        postprocess(
            [torch.full((1, 2, 1), float("nan"))],
            [torch.ones(1, 2, dtype=torch.bool)],
            [torch.zeros(1, 2, dtype=torch.bool)],
        )


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.999, 0.9999])
def test_clip_quantile_selects_exactly_the_kth_smallest_value(quantile):
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 50, (997, 4), generator=g).float()  # many ties
    k = int(round(quantile * 996)) + 1
    expected = torch.minimum(values, values.kthvalue(k, dim=0).values)
    assert torch.equal(_clip_quantile(values, quantile), expected)


def test_many_modules_at_once_equal_one_module_at_a_time():
    g = torch.Generator().manual_seed(4)
    valid = [torch.rand(3, 7, generator=g) > 0.3 for _ in range(2)]
    vision = torch.cat([(torch.rand(3, 7, generator=g) > 0.5)[v] for v in valid])
    modules = [[torch.rand(3, 7, 2, generator=g) for _ in valid] for _ in range(5)]  # 5 modules, 2 groups
    flat = torch.cat([torch.stack([m[b] for m in modules], -2)[v] for b, v in enumerate(valid)])  # [N, 5, 2]
    together = scatter_modules(postprocess_flat(flat.flatten(1), vision).view(flat.shape), valid)
    for m, per_batch in enumerate(modules):
        one = torch.cat([s[v] for s, v in zip(per_batch, valid)])
        alone = scatter_back(postprocess_flat(one, vision), per_batch, valid)
        for b, expected in enumerate(alone):
            got = together[b][m]
            assert got.is_contiguous()
            assert torch.equal(got[~valid[b]], torch.zeros_like(got[~valid[b]]))
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
