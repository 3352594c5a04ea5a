"""GPTQ split into one shared factor and row slices equals the unsplit solve bit for bit (CPU, one thread)."""

import pytest
import torch

from lightning_tlq.core.gptq import gptq_quantize
from lightning_tlq.core.gptq_rows import MIN_ROWS, GPTQFactor, gptq_factor, gptq_rows
from lightning_tlq.core.quantizer import QuantSpec


def _problem(out_f, in_f, seed=0, dead=(3, 17)):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(3 * in_f, in_f, generator=g) * torch.linspace(0.2, 2.0, in_f)
    X[:, list(dead)] = 0.0  # dead inputs: H_ii = 0
    H = (X.T @ X).double()
    C = 0.05 * (torch.randn(3 * in_f, in_f, generator=g) * X.abs().mean()).T @ X
    return W, H, C.double()


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("target_fp", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(3, 64, symmetric=False)])
def test_row_slices_equal_the_unsplit_solve(act_order, target_fp, spec, one_thread):
    W, H, C = _problem(72, 192)
    cross = C if target_fp else None
    kw = {"block_size": 32, "damp": 0.01, "act_order": act_order}
    full = gptq_quantize(W.bfloat16(), H, spec, cross=cross, kernel="torch", **kw)
    factor = gptq_factor(W.bfloat16(), H, spec, cross=cross, **kw)
    for cuts in ([0, 72], [0, 36, 72], [0, 4, 20, 49, 72], [0, 16, 32, 48, 64, 72]):
        parts = [gptq_rows(W[a:b].bfloat16(), factor, spec, block_size=32) for a, b in zip(cuts[:-1], cuts[1:])]
        for field in ("codes", "scale", "zero", "weight"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(full, field)), (cuts, field)
        assert all(p.damp == full.damp and p.retries == full.retries for p in parts)


def test_factor_travels_as_tensors(one_thread):
    W, H, C = _problem(24, 64, seed=1)
    spec = QuantSpec(4, 32)
    for cross, act_order in ((None, True), (C, False)):
        factor = gptq_factor(W, H, spec, cross=cross, act_order=act_order)
        again = GPTQFactor.from_tensors([t.clone() for t in factor.tensors()])
        a, b = gptq_rows(W, factor, spec), gptq_rows(W, again, spec)
        assert torch.equal(a.codes, b.codes)
        assert (again.perm is None) == (not act_order)
        assert (again.cross is None) == (cross is None)
        assert again.damp == factor.damp
    assert MIN_ROWS >= 4


def test_lean_factor_is_the_factor(one_thread):
    """memory.profile=low: the lean factor (chunked gather, in place; H's storage reused) is the same factor."""
    W, H, C = _problem(24, 64, seed=2)
    spec = QuantSpec(4, 32)
    for cross, act_order in ((None, True), (C, False)):
        ref = gptq_factor(W, H, spec, cross=cross, act_order=act_order).tensors()
        for reuse_h in (False, True):
            lean = gptq_factor(W, H.clone(), spec, cross=cross, act_order=act_order, lean=True, reuse_h=reuse_h)
            assert all(torch.equal(a, b) for a, b in zip(ref, lean.tensors()))


def test_factor_rejects_grouped_and_bad_hessians():
    W, H, _ = _problem(8, 64)
    spec = QuantSpec(4, 32)
    with pytest.raises(ValueError, match="ungrouped"):
        gptq_factor(W, torch.stack([H, H]), spec)
    with pytest.raises(ValueError, match="H must be"):
        gptq_factor(W, H[:32, :32], spec)
