"""Tests for lightning_tlq.core.quantizer (grids, per-group parameters, RTN)."""

from __future__ import annotations

import pytest
import torch

from lightning_tlq.core.quantizer import (
    QuantSpec,
    compute_qparams,
    dequantize,
    expand_qparams,
    fake_quantize,
    quantize_codes,
    rtn,
)


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[:, ::7] *= 5.0  # a few large columns so groups have different ranges
    return w


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_invalid_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_invalid_group_size_raise(group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=group_size)


def test_non_dividing_group_size_names_module_and_suggests() -> None:
    spec = QuantSpec(bits=4, group_size=128)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*does not divide in_features=320") as info:
        spec.check_shape(320, name="model.layers.0.mlp.down_proj")
    assert "[32, 64, -1]" in str(info.value)
    with pytest.raises(ValueError, match="does not divide"):
        compute_qparams(torch.randn(4, 100), spec, name="proj")
    spec.check_shape(256)  # divides: no error
    QuantSpec(group_size=-1).check_shape(321)


def test_code_range_properties() -> None:
    assert (QuantSpec(4, symmetric=True).qmin, QuantSpec(4, symmetric=True).qmax) == (-8, 7)
    assert (QuantSpec(4, symmetric=False).qmin, QuantSpec(4, symmetric=False).qmax) == (0, 15)
    assert (QuantSpec(2, symmetric=True).qmin, QuantSpec(8, symmetric=False).qmax) == (-2, 255)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 8, 32])
def test_round_trip_codes_in_range_and_error_bounded(bits: int, symmetric: bool, group_size: int) -> None:
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    w = _weight(6, 64, seed=bits)
    scale, zero = compute_qparams(w, spec)
    n_groups = 1 if group_size == -1 else 64 // group_size
    assert scale.shape == zero.shape == (6, n_groups)
    assert scale.dtype == zero.dtype == torch.float32
    assert torch.all(scale > 0)
    assert torch.equal(zero, zero.round())
    assert torch.all((zero >= spec.qmin) & (zero <= spec.qmax))
    if symmetric:
        assert torch.all(zero == 0)

    codes = quantize_codes(w, scale, zero, spec)
    assert codes.dtype == spec.code_dtype
    assert int(codes.min()) >= spec.qmin
    assert int(codes.max()) <= spec.qmax
    deq = dequantize(codes, scale, zero, spec)
    # every weight lies inside the clip range, so the rounding error is at most half a step
    step = expand_qparams(scale, 64, spec)
    assert torch.all((w - deq).abs() <= step / 2 + 1e-6 * w.abs())  # slack: fp32 rounding of w
    # round trip: re-quantizing the dequantized weight gives back the same codes
    assert torch.equal(quantize_codes(deq, scale, zero, spec), codes)
    assert torch.equal(dequantize(quantize_codes(deq, scale, zero, spec), scale, zero, spec), deq)


def test_symmetric_scale_convention_is_compressed_tensors() -> None:
    spec = QuantSpec(bits=4, group_size=4, symmetric=True)
    w = torch.tensor([[0.5, -3.0, 1.0, 2.0, 0.1, 0.2, -0.3, 0.15]])
    scale, _ = compute_qparams(w, spec)
    assert torch.equal(scale, torch.tensor([[3.0, 0.3]]) / 7.5)  # absmax / ((qmax - qmin) / 2)


def test_hand_computed_symmetric_2bit() -> None:
    spec = QuantSpec(bits=2, group_size=-1, symmetric=True)
    w = torch.tensor([[-1.5, 0.0, 0.75, 1.5]])  # absmax 1.5 -> scale 1.5 / 1.5 = 1
    res = rtn(w, spec)
    assert torch.equal(res.scale, torch.tensor([[1.0]]))
    assert res.codes.tolist() == [[-2, 0, 1, 1]]
    assert torch.equal(res.weight, torch.tensor([[-2.0, 0.0, 1.0, 1.0]]))


def test_hand_computed_asymmetric_2bit() -> None:
    spec = QuantSpec(bits=2, group_size=-1, symmetric=False)
    res = rtn(torch.tensor([[-1.0, 0.5, 2.0]]), spec)  # range [-1, 2] -> scale 1, zero 1
    assert torch.equal(res.scale, torch.tensor([[1.0]]))
    assert torch.equal(res.zero, torch.tensor([[1.0]]))
    assert res.codes.tolist() == [[0, 1, 3]]
    assert torch.equal(res.weight, torch.tensor([[-1.0, 0.0, 2.0]]))
    # all-positive group: the range is extended to include 0, so zero point is 0
    pos = rtn(torch.tensor([[1.0, 2.0, 3.0]]), spec)
    assert torch.equal(pos.zero, torch.tensor([[0.0]]))
    assert torch.equal(pos.scale, torch.tensor([[1.0]]))
    assert pos.codes.tolist() == [[1, 2, 3]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_gives_zeros_without_nan(symmetric: bool) -> None:
    spec = QuantSpec(bits=4, group_size=4, symmetric=symmetric)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 3.0, 0.5], [0.0] * 8])
    res = rtn(w, spec)
    assert torch.isfinite(res.scale).all()
    assert torch.isfinite(res.weight).all()
    assert torch.equal(res.weight[0, :4], torch.zeros(4))
    assert torch.equal(res.weight[1], torch.zeros(8))
    assert torch.equal(res.scale[1], torch.ones(2))
    assert torch.equal(res.zero[1], torch.zeros(2))


def test_non_finite_weight_raises() -> None:
    w = torch.ones(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"proj.*NaN"):
        compute_qparams(w, QuantSpec(group_size=-1), name="proj")


def test_rtn_keeps_dtype_and_matches_dequantize() -> None:
    spec = QuantSpec(bits=3, group_size=16, symmetric=False)
    w = _weight(8, 32).to(torch.bfloat16)
    res = rtn(w, spec)
    assert res.weight.dtype == torch.bfloat16
    assert res.codes.dtype == torch.int32
    assert torch.equal(res.weight, dequantize(res.codes, res.scale, res.zero, spec, dtype=torch.bfloat16))
    assert torch.equal(fake_quantize(w, spec), res.weight)
    # scales are rounded to the model dtype before codes are chosen (checkpoints store them in that dtype) ...
    assert torch.equal(res.scale, compute_qparams(w.float(), spec, scale_dtype=torch.bfloat16)[0])
    assert torch.equal(res.scale, res.scale.bfloat16().float())
    # ... so dequantizing with the stored bf16 scales in bf16 arithmetic gives back exactly the same weight
    stored = (
        res.codes.bfloat16() - res.zero.bfloat16().repeat_interleave(16, 1)
    ) * res.scale.bfloat16().repeat_interleave(16, 1)
    assert torch.equal(stored, res.weight)
    # fp32 weights keep fp32 scales
    assert not torch.equal(compute_qparams(w.float(), spec)[0], res.scale)


def test_rejects_non_2d_weight() -> None:
    with pytest.raises(ValueError, match="2-D"):
        compute_qparams(torch.randn(2, 3, 4), QuantSpec(group_size=-1))
