"""Tests for lightning_tlq.core.gptq (GPTQ solver against a weighted Hessian)."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from lightning_tlq.core import gptq
from lightning_tlq.core.gptq import GPTQError, gptq_quantize
from lightning_tlq.core.hessian import HessianAccumulator, output_error
from lightning_tlq.core.quantizer import QuantSpec, compute_qparams, dequantize, rtn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs x = z @ A with a random mixing matrix and a few large-magnitude channels."""
    g = _gen(seed)
    z = torch.randn(n, d, generator=g)
    A = torch.randn(d, d, generator=g) / d**0.5 + 0.5 * torch.eye(d)
    x = z @ A
    x[:, torch.randperm(d, generator=g)[: max(1, d // 16)]] *= 8.0
    return x


def _hessian(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x, weight)
    return acc.H


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The Hessian GPTQ actually factorises: H + damp * mean(diag H) * I."""
    return H + damp * float(torch.diagonal(H).mean()) * torch.eye(H.shape[0])


def _assert_same(a, b) -> None:
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero, b.zero)


def test_ones_weighted_hessian_is_bit_identical_to_unweighted() -> None:
    x = _correlated_inputs(256, 64, seed=0)
    W = torch.randn(32, 64, generator=_gen(1))
    spec = QuantSpec(bits=4, group_size=32)
    plain = gptq_quantize(W, _hessian(x), spec, block_size=16)
    weighted = gptq_quantize(W, _hessian(x, torch.ones(256)), spec, block_size=16)
    _assert_same(plain, weighted)
    assert torch.equal(plain.perm, weighted.perm)


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"),
    [(4, 32, True), (3, 64, False), (2, 16, True), (4, -1, False), (8, 32, True)],
)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    x = _correlated_inputs(512, 64, seed=bits)
    H = _hessian(x)
    W = torch.randn(48, 64, generator=_gen(10 + bits))
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    res = gptq_quantize(W, H, spec, block_size=16, act_order=act_order)
    gptq_err = output_error(W, res.weight, H)
    rtn_err = output_error(W, rtn(W, spec).weight, H)
    assert gptq_err < 0.8 * rtn_err
    assert torch.equal(res.weight, dequantize(res.codes, res.scale, res.zero, spec))
    assert (res.perm is not None) == act_order


def test_weighted_gptq_wins_on_weighted_objective() -> None:
    d = 48
    # two token populations with different correlations; the weights favour the small one
    xa = _correlated_inputs(600, d, seed=20)
    xb = _correlated_inputs(60, d, seed=21)
    x = torch.cat([xa, xb])
    w = torch.cat([torch.full((600,), 0.05), torch.full((60,), 5.0)])
    H_plain, H_weighted = _hessian(x), _hessian(x, w)
    W = torch.randn(40, d, generator=_gen(22))
    spec = QuantSpec(bits=3, group_size=16)
    weighted = gptq_quantize(W, H_weighted, spec, block_size=16)
    plain = gptq_quantize(W, H_plain, spec, block_size=16)
    assert output_error(W, weighted.weight, H_weighted) < 0.95 * output_error(W, plain.weight, H_weighted)
    assert output_error(W, plain.weight, H_plain) < output_error(W, weighted.weight, H_plain)


def _brute_force_errors(W: torch.Tensor, H: torch.Tensor, scale_cols, zero_cols, spec: QuantSpec) -> tuple:
    n = W.shape[1]
    grid = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float64)
    codes = torch.cartesian_prod(*[grid] * n)  # [levels^n, n]
    dW = (codes - zero_cols.double()) * scale_cols.double() - W.double()
    errors = ((dW @ H.double()) * dW).sum(dim=1)
    return codes, errors


@pytest.mark.parametrize(("n_cols", "group_size"), [(5, -1), (6, 3)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_tiny_problem_against_exhaustive_search(n_cols: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    spec = QuantSpec(bits=2, group_size=group_size, symmetric=symmetric)
    damp = 0.01
    x = _correlated_inputs(40, n_cols, seed=30 + n_cols)
    H = _hessian(x)
    Hd = _damped(H, damp)  # GPTQ minimises tr(dW Hd dW^T)
    W = torch.randn(1, n_cols, generator=_gen(31))
    res = gptq_quantize(W, H, spec, damp=damp, act_order=act_order)

    scale, zero = compute_qparams(W, spec)
    assert torch.equal(res.scale, scale)
    glen = spec.group_len(n_cols)
    scale_cols, zero_cols = scale.repeat_interleave(glen, 1)[0], zero.repeat_interleave(glen, 1)[0]
    all_codes, errors = _brute_force_errors(W, Hd, scale_cols, zero_cols, spec)

    gptq_err = output_error(W, res.weight, Hd)
    rtn_err = output_error(W, rtn(W, spec).weight, Hd)
    assert float(errors.min()) <= gptq_err + 1e-9
    assert gptq_err <= rtn_err + 1e-9
    assert gptq_err == pytest.approx(float(errors[_code_index(all_codes, res.codes[0])]), rel=1e-6)

    # the last column processed minimises the objective given all other columns' codes
    last = int(res.perm[-1]) if act_order else n_cols - 1
    candidates = res.codes[0].double().repeat(spec.qmax - spec.qmin + 1, 1)
    candidates[:, last] = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float64)
    dW = (candidates - zero_cols.double()) * scale_cols.double() - W.double()
    cand_err = ((dW @ Hd.double()) * dW).sum(dim=1)
    assert int(res.codes[0, last]) == spec.qmin + int(cand_err.argmin())


def _code_index(all_codes: torch.Tensor, codes: torch.Tensor) -> int:
    matches = (all_codes == codes.double()).all(dim=1).nonzero()
    assert matches.numel() == 1
    return int(matches[0, 0])


def _reference_gptq_codes(W: torch.Tensor, Hd: torch.Tensor, scale_cols, zero_cols, spec: QuantSpec) -> torch.Tensor:
    """Greedy sequential solution in float64 with explicit inverses (OBQ update, fixed column order)."""
    W = W.double().clone()
    codes = torch.empty_like(W)
    for j in range(W.shape[1]):
        Hinv = torch.linalg.inv(Hd[j:, j:].double())
        s, z = scale_cols[:, j].double(), zero_cols[:, j].double()
        codes[:, j] = (torch.round(W[:, j] / s) + z).clamp(spec.qmin, spec.qmax)
        err = W[:, j] - (codes[:, j] - z) * s
        W[:, j:] -= err[:, None] * Hinv[0][None, :] / Hinv[0, 0]
    return codes


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_float64_reference_solution(act_order: bool, symmetric: bool) -> None:
    x = _correlated_inputs(200, 24, seed=35)
    H = _hessian(x)
    W = torch.randn(12, 24, generator=_gen(36))
    spec = QuantSpec(bits=3, group_size=8, symmetric=symmetric)
    res = gptq_quantize(W, H, spec, block_size=5, damp=0.01, act_order=act_order)
    order = res.perm if act_order else torch.arange(24)
    scale_cols = res.scale.repeat_interleave(8, 1)[:, order]
    zero_cols = res.zero.repeat_interleave(8, 1)[:, order]
    Hd = _damped(H, 0.01)[order][:, order]
    ref = _reference_gptq_codes(W[:, order], Hd, scale_cols, zero_cols, spec)
    assert torch.equal(res.codes[:, order].double(), ref)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), list(itertools.product([2, 4], [8, -1], [True, False])))
@pytest.mark.parametrize("act_order", [True, False])
def test_diagonal_hessian_equals_rtn(bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    H = torch.diag(torch.rand(32, generator=_gen(40)) * 10 + 0.1)
    W = torch.randn(12, 32, generator=_gen(41)).to(torch.bfloat16)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    res = gptq_quantize(W, H, spec, block_size=8, act_order=act_order)
    _assert_same(res, rtn(W, spec))
    assert res.weight.dtype == torch.bfloat16


def test_act_order_uses_static_groups_in_original_order() -> None:
    x = _correlated_inputs(256, 64, seed=50)
    H = _hessian(x)
    W = torch.randn(16, 64, generator=_gen(51))
    spec = QuantSpec(bits=3, group_size=16, symmetric=False)
    res = gptq_quantize(W, H, spec, block_size=16, act_order=True)
    scale, zero = compute_qparams(W, spec)
    assert torch.equal(res.scale, scale)
    assert torch.equal(res.zero, zero)
    assert torch.equal(res.weight, dequantize(res.codes, scale, zero, spec))
    assert torch.equal(res.perm, torch.argsort(torch.diagonal(H), descending=True, stable=True))
    assert not torch.equal(res.perm, torch.arange(64))


def test_act_order_equals_solving_the_permuted_problem() -> None:
    # integer-valued inputs make H (and mean(diag H)) exact, so permuting changes no rounding
    x = torch.randint(-3, 4, (64, 24), generator=_gen(60)).float()
    x[:, 5] *= 4
    H = x.T @ x
    W = torch.randn(8, 24, generator=_gen(61))
    spec = QuantSpec(bits=3, group_size=-1)  # per-row params are invariant to column order
    res = gptq_quantize(W, H, spec, block_size=8, act_order=True)
    perm = res.perm
    ref = gptq_quantize(W[:, perm], H[perm][:, perm], spec, block_size=8, act_order=False)
    inv = torch.argsort(perm)
    assert torch.equal(res.codes, ref.codes[:, inv])
    assert torch.equal(res.weight, ref.weight[:, inv])


def test_dead_input_column_is_zeroed() -> None:
    x = _correlated_inputs(128, 32, seed=70)
    x[:, 3] = 0.0
    H = _hessian(x)
    assert H[3, 3] == 0
    W = torch.randn(8, 32, generator=_gen(71))
    spec = QuantSpec(bits=4, group_size=8)
    res = gptq_quantize(W, H, spec, block_size=8)
    assert torch.isfinite(res.weight).all()
    assert torch.equal(res.weight[:, 3], torch.zeros(8))
    W_dead = W.clone()
    W_dead[:, 3] = 0.0
    assert torch.equal(res.scale, compute_qparams(W_dead, spec)[0])
    assert res.retries == 0


def test_negative_definite_hessian_raises_after_logged_retries(caplog: pytest.LogCaptureFixture) -> None:
    H = -_hessian(_correlated_inputs(64, 16, seed=80))
    W = torch.randn(4, 16, generator=_gen(81))
    with (
        caplog.at_level(logging.WARNING, logger="lightning_tlq.core.gptq"),
        pytest.raises(GPTQError, match=r"layers\.3\.self_attn\.q_proj.*damp"),
    ):
        gptq_quantize(W, H, QuantSpec(bits=4, group_size=-1), max_retries=3, name="layers.3.self_attn.q_proj")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("layers.3.self_attn.q_proj" in r.getMessage() for r in warnings)


def test_barely_indefinite_hessian_succeeds_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    d = 16
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(90), dtype=torch.float64))
    eig = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    eig[0] = -0.05 * float(eig[1:].sum() - 0.05) / d  # slightly negative: damp 0.01 fails, 0.1 works
    H = (Q * eig) @ Q.T
    W = torch.randn(4, d, generator=_gen(91))
    with caplog.at_level(logging.WARNING, logger="lightning_tlq.core.gptq"):
        res = gptq_quantize(W, H.float(), QuantSpec(bits=4, group_size=-1), damp=0.01, name="mlp.down_proj")
    assert res.retries == 1
    assert res.damp == pytest.approx(0.1)
    assert torch.isfinite(res.weight).all()
    assert len(caplog.records) == 1
    assert "mlp.down_proj" in caplog.records[0].getMessage()


def test_rank_deficient_hessian_needs_no_retry() -> None:
    x = _correlated_inputs(8, 32, seed=95)  # 8 tokens, 32 inputs: H has rank 8
    res = gptq_quantize(torch.randn(4, 32, generator=_gen(96)), _hessian(x), QuantSpec(bits=4, group_size=8))
    assert res.retries == 0
    assert res.damp == 0.01
    assert torch.isfinite(res.weight).all()


def test_non_finite_hessian_raises() -> None:
    H = torch.eye(8)
    H[2, 2] = float("nan")
    with pytest.raises(GPTQError, match="NaN"):
        gptq_quantize(torch.randn(2, 8), H, QuantSpec(group_size=-1), name="proj")


def test_grouped_hessian_equals_separate_row_blocks() -> None:
    d, rows = 32, 6
    H0 = _hessian(_correlated_inputs(128, d, seed=100))
    H1 = _hessian(_correlated_inputs(128, d, seed=101))
    W = torch.randn(2 * rows, d, generator=_gen(102))
    spec = QuantSpec(bits=3, group_size=8, symmetric=False)
    res = gptq_quantize(W, torch.stack([H0, H1]), spec, block_size=8)
    top = gptq_quantize(W[:rows], H0, spec, block_size=8)
    bottom = gptq_quantize(W[rows:], H1, spec, block_size=8)
    assert torch.equal(res.codes, torch.cat([top.codes, bottom.codes]))
    assert torch.equal(res.weight, torch.cat([top.weight, bottom.weight]))
    assert torch.equal(res.scale, torch.cat([top.scale, bottom.scale]))
    assert torch.equal(res.perm, torch.stack([top.perm, bottom.perm]))
    with pytest.raises(ValueError, match="must divide out_features"):
        gptq_quantize(W[:7], torch.stack([H0, H1]), spec)


def test_block_size_does_not_change_result_beyond_rounding() -> None:
    x = _correlated_inputs(256, 64, seed=110)
    H = _hessian(x)
    W = torch.randn(16, 64, generator=_gen(111))
    spec = QuantSpec(bits=4, group_size=16)
    a = gptq_quantize(W, H, spec, block_size=64)
    b = gptq_quantize(W, H, spec, block_size=7)
    assert (a.codes != b.codes).float().mean() < 0.01
    assert output_error(W, b.weight, H) == pytest.approx(output_error(W, a.weight, H), rel=1e-2)


def test_low_precision_weight_keeps_dtype_and_exact_dequant() -> None:
    H = _hessian(_correlated_inputs(128, 32, seed=120))
    W = torch.randn(8, 32, generator=_gen(121)).to(torch.float16)
    spec = QuantSpec(bits=4, group_size=16)
    res = gptq_quantize(W, H, spec)
    assert res.weight.dtype == torch.float16
    assert res.codes.dtype == torch.int8
    assert torch.equal(res.weight, dequantize(res.codes, res.scale, res.zero, spec, dtype=torch.float16))
    assert torch.equal(res.scale, compute_qparams(W, spec)[0])


def test_kernel_choice_on_the_cpu(monkeypatch) -> None:
    """The eager loop runs for ``auto`` and ``torch`` on CPU tensors; ``triton`` refuses where the fused step cannot
    run (CPU tensors, or blocks wider than it handles), and unknown kernels are refused."""
    from lightning_tlq.core import gptq_triton

    H = _hessian(_correlated_inputs(128, 32, seed=122))
    W = torch.randn(8, 32, generator=_gen(123))
    spec = QuantSpec(bits=3, group_size=16)
    _assert_same(gptq_quantize(W, H, spec, block_size=8, kernel="auto"), gptq_quantize(W, H, spec, block_size=8))
    _assert_same(gptq_quantize(W, H, spec, block_size=8, kernel="torch"), gptq_quantize(W, H, spec, block_size=8))
    with pytest.raises(ValueError, match=r"o_proj: kernel='triton' needs Triton .* device cpu.*use kernel='auto'"):
        gptq_quantize(W, H, spec, kernel="triton", name="o_proj")
    with pytest.raises(ValueError, match=r"kernel='cuda' is not supported; choose one of auto, triton, torch, graph"):
        gptq_quantize(W, H, spec, kernel="cuda")
    monkeypatch.setattr(gptq_triton, "available", lambda: True)  # a GPU host: still no fused step for these
    with pytest.raises(ValueError, match=r"kernel='triton' needs .*device cpu, block_size 128"):
        gptq_quantize(W, H, spec, kernel="triton")


def test_bad_shapes_raise() -> None:
    spec = QuantSpec(bits=4, group_size=16)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(torch.randn(4, 32), torch.eye(16), spec)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(4, 24), torch.eye(24), spec, name="o_proj")


@pytest.mark.parametrize("n", [1, 7, 130])
def test_inverse_upper_factor_is_the_upper_cholesky_factor_of_the_inverse(n):
    from lightning_tlq.core.factor import inverse_upper_factor as _inverse_upper_factor

    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    H = A @ A.T + 0.1 * torch.eye(n, dtype=torch.float64)
    U, ok = _inverse_upper_factor(H)
    assert ok
    assert torch.equal(U, U.triu())
    assert (torch.diagonal(U) > 0).all()
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H), rtol=1e-9, atol=1e-12)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    torch.testing.assert_close(U, ref, rtol=1e-9, atol=1e-12)
    _, ok = _inverse_upper_factor(-H)
    assert not ok


# --- asymmetric calibration (GPTAQ): cross term C = (X - X~) w X~^T, target W* = W + W C H^-1 ----------------------
def _asymmetric_case(n: int = 400, d: int = 32, out: int = 24, seed: int = 30, drift: float = 0.1):
    """Quantized-path inputs X~ and full-precision inputs X = X~ + a correlated drift, token weights, a weight."""
    g = _gen(seed)
    x_q = _correlated_inputs(n, d, seed=seed).double()
    shift = x_q @ (drift * torch.randn(d, d, generator=g, dtype=torch.float64))
    shift += drift / 2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return x_q, x_q + shift, w, torch.randn(out, d, generator=g, dtype=torch.float64)


def _asymmetric_error(Q: torch.Tensor, W: torch.Tensor, x_q: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """``sum_t w_t ||Q x~_t - W x_t||^2`` in float64."""
    r = x_q @ Q.double().T - x @ W.double().T
    return float((w[:, None] * r**2).sum())


def _gram(x_q: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (x_q.T * w) @ x_q, ((x - x_q).T * w) @ x_q


def test_asymmetric_objective_is_gptq_objective_on_the_target() -> None:
    """||Q X~ - W X||^2 = tr((Q - W*) H (Q - W*)^T) + const for every Q; damped: + d||Q - W||^2 with H + d I."""
    x_q, x, w, W = _asymmetric_case()
    H, C = _gram(x_q, x, w)
    lam = 0.01 * float(torch.diagonal(H).mean())
    Hd = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
    for hess, reg in ((H, 0.0), (Hd, lam)):
        target = W + W @ C @ torch.linalg.inv(hess)
        gaps = []
        for seed in range(4):
            Q = W + torch.randn(W.shape, generator=_gen(seed), dtype=torch.float64)
            lhs = _asymmetric_error(Q, W, x_q, x, w) + reg * float(((Q - W) ** 2).sum())
            gaps.append(lhs - output_error(target, Q, hess))
        assert max(gaps) - min(gaps) <= 1e-9 * abs(gaps[0]), gaps
    # the unconstrained optimum is W*: the weighted residual is orthogonal to X~
    target = W + W @ C @ torch.linalg.inv(H)
    residual = x_q @ target.T - x @ W.T
    assert float(((residual.T * w) @ x_q).abs().max()) < 1e-8 * float(H.abs().max())


def test_zero_cross_term_is_plain_gptq_bit_for_bit() -> None:
    x = _correlated_inputs(300, 64, seed=3)
    W = torch.randn(32, 64, generator=_gen(4))
    spec = QuantSpec(bits=3, group_size=32)
    acc, cross = HessianAccumulator(64), HessianAccumulator(64)
    acc.add(x)
    cross.add(x, left=x - x)  # X = X~
    for act_order in (True, False):
        plain = gptq_quantize(W, acc.H, spec, block_size=16, act_order=act_order)
        asym = gptq_quantize(W, acc.H, spec, block_size=16, act_order=act_order, cross=cross.H)
        _assert_same(plain, asym)
    grouped = torch.stack([acc.H, 2 * acc.H])
    _assert_same(
        gptq_quantize(W, grouped, spec, block_size=16),
        gptq_quantize(W, grouped, spec, block_size=16, cross=torch.zeros_like(grouped)),
    )


def test_cross_term_solve_is_the_gptq_loop_on_the_damped_target() -> None:
    """The column loop runs on W* = W + W C H_d^-1 (the loop's own damped factor), on the static grid of W."""
    from lightning_tlq.core.factor import damped_inverse_factor as _upper_inverse_cholesky
    from lightning_tlq.core.gptq import _quantize_columns, asymmetric_target

    x_q, x, w, W64 = _asymmetric_case()
    H, C = _gram(x_q, x, w)
    W = W64.float()
    spec = QuantSpec(bits=3, group_size=16)
    U, _, _ = _upper_inverse_cholesky(H.float(), 0.01, 3, "")
    target = asymmetric_target(W, C.float(), U)
    torch.testing.assert_close(
        target.double(), W64 + W64 @ C @ torch.linalg.inv(_damped(H, 0.01)), rtol=1e-4, atol=1e-4
    )
    scale, zero = compute_qparams(W, spec)
    cols = torch.arange(W.shape[1]) // 16
    codes = _quantize_columns(target.clone(), U, scale, zero, cols, spec, block_size=8)
    asym = gptq_quantize(W, H, spec, block_size=8, act_order=False, cross=C)
    assert torch.equal(asym.codes, codes.to(spec.code_dtype))
    assert torch.equal(asym.scale, scale)
    assert torch.equal(asym.zero, zero)


def test_cross_term_with_act_order_equals_solving_the_permuted_problem() -> None:
    # integer-valued inputs make H, C (and mean(diag H)) exact, so permuting changes no rounding
    g = _gen(62)
    x_q = torch.randint(-3, 4, (64, 24), generator=g).float()
    x_q[:, 5] *= 4
    x = x_q + torch.randint(-1, 2, (64, 24), generator=g).float()
    H, C = x_q.T @ x_q, (x - x_q).T @ x_q
    W = torch.randn(8, 24, generator=_gen(63))
    spec = QuantSpec(bits=3, group_size=-1)  # per-row params are invariant to column order
    res = gptq_quantize(W, H, spec, block_size=8, act_order=True, cross=C)
    perm, inv = res.perm, torch.argsort(res.perm)
    ref = gptq_quantize(W[:, perm], H[perm][:, perm], spec, block_size=8, act_order=False, cross=C[perm][:, perm])
    assert torch.equal(res.codes, ref.codes[:, inv])
    assert not torch.equal(res.codes, gptq_quantize(W, H, spec, block_size=8, act_order=True).codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_cross_term_lowers_the_asymmetric_error(act_order: bool) -> None:
    # a drift that moves W* by ~4.5% of max|W| (about what the tiny VLMs show)
    x_q, x, w, W64 = _asymmetric_case(seed=31, drift=0.01)
    H, C = _gram(x_q, x, w)
    W = W64.float()
    keep = _asymmetric_error(W64, W64, x_q, x, w)  # keeping W: the drift's error alone
    for bits in (3, 4, 8):
        spec = QuantSpec(bits=bits, group_size=16)
        plain = gptq_quantize(W, H, spec, block_size=8, act_order=act_order)
        asym = gptq_quantize(W, H, spec, block_size=8, act_order=act_order, cross=C)
        e_plain, e_asym = (_asymmetric_error(r.weight, W64, x_q, x, w) for r in (plain, asym))
        assert e_asym < e_plain, (bits, e_asym, e_plain)
    # 8 bits: nearly unconstrained. Observed 50.6 (act-order) against 3517 for keeping W, 11.1 for the damped
    # optimum W* itself, 20.4 for GPTQ on W* with W*'s own grid (W's grid clips part of the shift)
    assert e_asym < 0.02 * keep


def test_cross_term_of_grouped_hessian_splits_rows() -> None:
    x_q, x, w, W64 = _asymmetric_case(out=16, seed=32)
    H, C = (t.float() for t in _gram(x_q, x, w))
    W = W64.float()
    spec = QuantSpec(bits=4, group_size=16)
    grouped = gptq_quantize(W, torch.stack([H, 3 * H]), spec, block_size=8, cross=torch.stack([C, 3 * C]))
    top = gptq_quantize(W[:8], H, spec, block_size=8, cross=C)
    bottom = gptq_quantize(W[8:], 3 * H, spec, block_size=8, cross=3 * C)
    assert torch.equal(grouped.codes, torch.cat([top.codes, bottom.codes]))
    with pytest.raises(ValueError, match="cross term must have the Hessian's shape"):
        gptq_quantize(W, H, spec, cross=C[:4])
    with pytest.raises(GPTQError, match="cross term contains NaN"):
        gptq_quantize(W, H, spec, cross=torch.full_like(C, float("nan")))


@pytest.mark.parametrize("concat", [True, False], ids=["one-loop", "per-weight"])
@pytest.mark.parametrize(("groups", "cross", "act_order"), [(1, False, True), (2, False, False), (1, True, True)])
def test_shared_hessian_solve_equals_each_weight_alone(one_thread, concat, groups, cross, act_order):
    """q/k/v-like weights of different heights against one Hessian (one factor, one column loop when rows are
    concatenated) give exactly the codes, scales and weights of solving each alone; dead inputs, grouped Hessians
    and a GPTAQ cross term included."""
    x = _correlated_inputs(300, 64, seed=1)
    x[:, 5] = 0.0  # a dead input
    H = torch.stack([_hessian(x, torch.rand(300, generator=_gen(g))) for g in range(groups)]).squeeze(0)
    C = 0.01 * torch.randn(H.shape, generator=_gen(3)) if cross else None
    weights = [torch.randn(rows, 64, generator=_gen(rows)) for rows in (64, 16, 32)]
    spec = QuantSpec(bits=3, group_size=32)
    kw = {"cross": C, "act_order": act_order, "block_size": 16}
    shared = gptq.gptq_quantize_shared(weights, H, spec, names=["q", "k", "v"], concat_rows=concat, **kw)
    for W, got in zip(weights, shared):
        alone = gptq_quantize(W, H, spec, **kw)
        for field in ("codes", "scale", "zero", "weight"):
            assert torch.equal(getattr(got, field), getattr(alone, field)), field
        assert (got.damp, got.retries) == (alone.damp, alone.retries)


def test_shared_hessian_solve_rejects_mixed_weights():
    H = _hessian(_correlated_inputs(100, 32, seed=0))
    spec = QuantSpec(bits=4, group_size=32)
    with pytest.raises(ValueError, match="one dtype and device"):
        gptq.gptq_quantize_shared([torch.randn(8, 32), torch.randn(8, 32).double()], H, spec, names=["a", "b"])
    with pytest.raises(ValueError, match="one name per weight"):
        gptq.gptq_quantize_shared([torch.randn(8, 32)], H, spec, names=["a", "b"])
