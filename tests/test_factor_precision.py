"""The inverse-Hessian factor's product precision (``quant.factor_precision``): the TF32 split is exact, the
three-product matmul equals a float32 one to float32 accuracy, and on CUDA the ``tf32x3`` factor is as accurate as
the ``fp32`` one against a float64 reference (those tests need a GPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_tlq.config import QuantArgs
from lightning_tlq.core import factor
from lightning_tlq.core.factor import (
    cholesky_inverse_tf32x3,
    inverse_upper_factor,
    lower_triangular_inverse,
    matmul_tf32x3,
    resolve_precision,
    split_tf32_,
)
from lightning_tlq.core.gptq import gptq_quantize
from lightning_tlq.core.quantizer import QuantSpec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _hessian(n: int, tokens: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """A Hessian with activation-like spread: columns scaled over four decades, 1% damping."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, n, dtype=torch.float64)
    H = x.T @ x
    H += 0.01 * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    return H.to(device)


def test_split_is_exact_and_restores_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 129, generator=g) * torch.logspace(-30, 30, 129)
    x[0, :4] = torch.tensor([0.0, -0.0, 1.0, -3.5])
    original = x.clone()
    tail = split_tf32_(x)
    assert int((x.view(torch.int32) & ((1 << 13) - 1)).abs().sum()) == 0  # heads have TF32's 10 mantissa bits
    assert bool(((tail.abs() <= original.abs() * 2.0**-11) | (tail == 0)).all())  # rounded to nearest
    x.add_(tail)
    assert torch.equal(x, original)  # every value back (a -0.0 returns as +0.0)
    nonzero = original != 0
    assert torch.equal(x.view(torch.int32)[nonzero], original.view(torch.int32)[nonzero])


def test_split_of_a_strided_view_leaves_the_rest_alone() -> None:
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    view = x[8:40, 16:48]
    tail = split_tf32_(view)
    assert torch.equal(x[:8], before[:8])
    assert torch.equal(x[:, :16], before[:, :16])
    view.add_(tail)
    assert torch.equal(x, before)


@pytest.mark.parametrize("block", [7, 2048])
def test_three_product_matmul_matches_float32(block: int) -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(50, 300, generator=g), torch.randn(300, 40, generator=g) * 1e3
    b_before = b.clone()
    exact = a.double() @ b.double()
    got = matmul_tf32x3(a, b, block=block)
    assert torch.equal(b, b_before)  # b is split in place and restored exactly
    scale = a.double().abs() @ b.double().abs()
    # on the CPU (no TF32 rounding) only a_t b_t (< 2^-22 of each term) and float32 summation are lost
    assert float(((got.double() - exact).abs() / scale).max()) < 2e-6


def test_blocked_inverse_in_tf32x3_matches_fp32_on_the_cpu() -> None:
    H = _hessian(96, 400, 3).float()
    L = torch.linalg.cholesky(H)
    fp32 = lower_triangular_inverse(L, leaf=16, precision="fp32")
    tf32x3 = lower_triangular_inverse(L, leaf=16, precision="tf32x3")
    assert torch.allclose(tf32x3, fp32, rtol=1e-4, atol=1e-6 * float(fp32.abs().max()))
    assert torch.equal(tf32x3.triu(1), torch.zeros_like(tf32x3).triu(1))


def test_auto_is_tf32x3_on_cuda_only_and_bad_values_are_refused() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "tf32x3"
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    with pytest.raises(ValueError, match="factor precision 'fp16' is not supported"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="quant.factor_precision"):
        QuantArgs(method="gptq", factor_precision="fp16")
    with pytest.raises(ValueError, match="factor_precision='bf16' is not supported"):
        gptq_quantize(torch.randn(8, 16), torch.eye(16), QuantSpec(bits=4, group_size=-1), factor_precision="bf16")


def test_cpu_codes_do_not_depend_on_the_setting() -> None:
    """On the CPU ``auto`` is fp32 and the inverse is one triangular solve: every setting gives the same codes."""
    H = _hessian(128, 600, 4).float()
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(bits=3, group_size=32)
    codes = [gptq_quantize(W, H, spec, factor_precision=p).codes for p in ("auto", "fp32", "tf32x3")]
    assert torch.equal(codes[0], codes[1])
    assert torch.equal(codes[0], codes[2])


def _relative_error(U: torch.Tensor, reference: torch.Tensor) -> float:
    return float((U.double() - reference).norm() / reference.norm())


@cuda
@pytest.mark.parametrize("cholesky", [False, True], ids=["inverse", "inverse-and-cholesky"])
@pytest.mark.parametrize("n", [3584, 8192])
def test_cuda_tf32x3_factor_is_as_accurate_as_fp32(n: int, cholesky: bool, monkeypatch) -> None:
    monkeypatch.setattr(factor, "CHOLESKY_IN_TF32X3", cholesky)
    H = _hessian(n, 2 * n, 6, "cuda")
    reference, ok = inverse_upper_factor(H, "fp32")  # float64 in, float64 products
    assert ok
    errors = {}
    for precision in ("fp32", "tf32x3"):
        U, ok = inverse_upper_factor(H.float(), precision)
        assert ok
        errors[precision] = _relative_error(U, reference)
    # both are dominated by the float32 Cholesky; the emulated products may add at most a little
    assert errors["tf32x3"] <= 2.0 * errors["fp32"] + 1e-6, errors


@cuda
def test_cuda_tf32x3_codes_and_error_match_fp32() -> None:
    n = 4096
    H = _hessian(n, 2 * n, 7, "cuda").float()
    W = torch.randn(512, n, generator=torch.Generator().manual_seed(8)).cuda()
    spec = QuantSpec(bits=4, group_size=128)
    fp32 = gptq_quantize(W, H, spec, factor_precision="fp32")
    tf32x3 = gptq_quantize(W, H, spec, factor_precision="tf32x3")

    def err(r):
        d = r.weight.double() - W.double()
        return float(((d @ H.double()) * d).sum())

    assert float((fp32.codes == tf32x3.codes).double().mean()) > 0.995
    assert abs(err(tf32x3) / err(fp32) - 1) < 0.01


@pytest.mark.parametrize("n", [40, 97])
def test_recursive_cholesky_inverse_matches_float64(n: int) -> None:
    """The tf32x3 recursion (here on the CPU, where its products are plain float32) gives L^-1 to float32 accuracy,
    zero above the diagonal, and reports a matrix that is not positive definite."""
    H = _hessian(n, 3 * n, 9)
    reference = torch.linalg.inv(torch.linalg.cholesky(H))
    got, ok = cholesky_inverse_tf32x3(H.float().clone(), leaf=8)
    assert ok
    assert torch.equal(got.triu(1), torch.zeros_like(got))
    assert float((got.double() - reference).norm() / reference.norm()) < 1e-4
    indefinite = H.float().clone()
    indefinite[n - 1, n - 1] = -1.0
    assert not cholesky_inverse_tf32x3(indefinite, leaf=8)[1]


def test_inverse_upper_factor_in_tf32x3_is_the_factor_of_the_inverse(monkeypatch) -> None:
    monkeypatch.setattr(factor, "CHOLESKY_IN_TF32X3", True)
    H = _hessian(2100, 2500, 10)  # above the 2048-column leaf: one level of recursion
    U, ok = inverse_upper_factor(H.float(), "tf32x3")
    assert ok
    assert torch.equal(U.tril(-1), torch.zeros_like(U))
    inverse = torch.linalg.inv(H)
    assert float((U.double().T @ U.double() - inverse).norm() / inverse.norm()) < 1e-3
