"""The fused Triton GPTQ block step equals the eager column loop (interpreted on CPU, compiled on CUDA)."""

import pytest
import torch

from lightning_tlq.core import gptq_triton
from lightning_tlq.core.gptq import gptq_quantize
from lightning_tlq.core.quantizer import QuantSpec, codes_to_values, compute_qparams, expand_qparams, round_to_grid

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _eager(W1, U1, S1, Z1, spec):
    W = W1.clone()
    codes, errs = torch.empty_like(W), torch.empty_like(W)
    for i in range(W.shape[1]):
        s, z = S1[:, i], Z1[:, i]
        c = round_to_grid(W[:, i], s, z, spec)
        err = (W[:, i] - codes_to_values(c, s, z)) / U1[i, i]
        W[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
        codes[:, i], errs[:, i] = c, err
    return codes, errs


def _problem(rows, cols, spec, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(1, cols, generator=g).add(0.1)
    A = torch.randn(cols, 2 * cols, generator=g)
    H = A @ A.T / cols + 0.01 * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, zero = compute_qparams(W, spec)
    return [t.to(DEVICE) for t in (W, U, expand_qparams(scale, cols, spec), expand_qparams(zero, cols, spec))]


@pytest.mark.parametrize(("rows", "cols"), [(16, 128), (40, 77), (3, 128)])
@pytest.mark.parametrize(("bits", "symmetric", "group"), [(2, True, 32), (3, False, -1), (4, True, 64), (8, False, 32)])
def test_block_step_equals_eager_loop(rows, cols, bits, symmetric, group):
    spec = QuantSpec(bits=bits, group_size=group if cols % max(group, 1) == 0 else -1, symmetric=symmetric)
    W, U, S, Z = _problem(rows, cols, spec, seed=rows * 1000 + cols + bits)
    codes, errs = gptq_triton.block_step(W, U, S, Z, spec.qmin, spec.qmax)
    ref_codes, ref_errs = _eager(W, U, S, Z, spec)
    if DEVICE == "cpu":  # the interpreter runs the same IEEE operations in the same order: bit-identical
        assert torch.equal(codes, ref_codes)
        assert torch.equal(errs, ref_errs)
    else:  # compiled code may contract a multiply-add: rare one-step code flips, errors agree closely
        assert (codes == ref_codes).float().mean() >= 0.999
        assert ((codes - ref_codes).abs() <= 1).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused path is used on CUDA tensors only")
def test_gptq_on_cuda_uses_fused_path_and_matches_eager(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 384, generator=g).cuda()
    X = torch.randn(2048, 384, generator=g).cuda() @ torch.randn(384, 384, generator=g).cuda()
    H = X.T @ X
    spec = QuantSpec(bits=4, group_size=128)
    steps = []
    real_step = gptq_triton.block_step
    monkeypatch.setattr(gptq_triton, "block_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    fused = gptq_quantize(W, H, spec, kernel="triton")  # the fused step, run eagerly
    assert len(steps) == 3  # 384 columns in blocks of 128
    assert torch.equal(fused.codes, gptq_quantize(W, H, spec).codes)  # kernel="auto": replayed from a CUDA graph
    before = len(steps)
    eager = gptq_quantize(W, H, spec, kernel="torch")
    assert len(steps) == before  # the torch kernel ran no fused step
    assert (fused.codes == eager.codes).float().mean() >= 0.999
    torch.testing.assert_close(fused.scale, eager.scale)


def test_block_step_reads_views_and_writes_results_in_place():
    spec = QuantSpec(bits=4, group_size=32)
    W, U, S, Z = _problem(40, 256, spec, seed=7)
    before = W.clone()
    cols = slice(128, 256)
    codes = torch.full_like(W, -1.0)
    errors = torch.zeros(40, 200, device=W.device)  # wider than the block: a row-strided view receives them
    out_codes, out_errors = gptq_triton.block_step(
        W[:, cols], U[cols, cols], S[:, cols], Z[:, cols], spec.qmin, spec.qmax,
        codes=codes[:, cols], errors=errors[:, :128],
    )  # fmt: skip
    ref_codes, ref_errors = gptq_triton.block_step(
        *(t.contiguous() for t in (W[:, cols], U[cols, cols], S[:, cols], Z[:, cols])), spec.qmin, spec.qmax
    )
    assert out_codes.data_ptr() == codes[:, cols].data_ptr()
    assert torch.equal(codes[:, cols], ref_codes)
    assert torch.equal(errors[:, :128], ref_errors)
    assert torch.equal(codes[:, :128], torch.full_like(ref_codes, -1.0))  # nothing outside the block written
    assert torch.equal(errors[:, 128:], torch.zeros(40, 72, device=W.device))
    assert torch.equal(W, before)  # the block's weights are only read
    with pytest.raises(ValueError, match="codes must be float32"):
        gptq_triton.block_step(W[:, cols], U[cols, cols], S[:, cols], Z[:, cols], spec.qmin, spec.qmax,
                               codes=codes[:, cols].T.contiguous().T)  # fmt: skip
