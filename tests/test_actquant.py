"""Per-token activation fake-quant (core), its hooks, and W4A8 on the quantized calibration path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tlq.actquant import (
    CONFIG_KEY,
    apply_activation_quant,
    apply_saved_activation_quant,
    quantization_record,
    saved_quantization_config,
)
from lightning_tlq.config import QuantArgs
from lightning_tlq.core.actquant import (
    act_range,
    fake_quantize_per_token,
    per_token_scale,
    quantize_per_token,
)
from lightning_tlq.stage import LayerStage
from lightning_tlq.tokenweights import TokenWeights


def _acts(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., ::5] *= 20.0  # outlier channels, as in real LLM activations
    return x


# ----------------------------------------------------------------------------------------------- core quantizer
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_in_range_and_error_within_half_step(bits: int) -> None:
    x = _acts(3, 7, 64, seed=bits)
    codes, scale = quantize_per_token(x, bits)
    qmin, qmax = act_range(bits)
    assert codes.dtype == torch.int8
    assert scale.shape == (3, 7, 1)
    assert int(codes.min()) >= qmin
    assert int(codes.max()) <= qmax
    x_hat = fake_quantize_per_token(x, bits)
    assert torch.equal(x_hat, codes.float() * scale)
    rounding = 4 * torch.finfo(torch.float32).eps * x.abs()  # float32 error of x / scale and of x - x_hat
    assert ((x - x_hat).abs() <= scale / 2 + rounding).all()
    # both ends of the grid are used: the row's absmax lands on +-(qmax - qmin) / 2 before rounding
    assert (codes.int().abs().amax(-1) >= qmax).all()


def test_compressed_tensors_scale_convention() -> None:
    # scale = absmax / 127.5 (compressed-tensors: absmax / (bit_range / 2)), not absmax / 127
    x = torch.tensor([[-127.5, 3.2, 64.4, 2.5], [0.0, 0.0, 0.0, 0.0], [255.0, -1.0, 2.0, 3.0]])
    scale = per_token_scale(x, 8)
    expected = torch.tensor([1.0, torch.finfo(torch.float32).eps, 2.0])
    assert torch.equal(scale.squeeze(-1), expected)
    codes, _ = quantize_per_token(x, 8)
    assert codes[0].tolist() == [-128, 3, 64, 2]  # -127.5 and 2.5 round half to even
    assert codes[1].tolist() == [0, 0, 0, 0]
    assert codes[2].tolist() == [127, 0, 1, 2]  # +127.5 steps rounds to 128 and is clamped to 127
    assert fake_quantize_per_token(x)[2, 0] == 254.0  # within half a step (1.0) of 255


def test_scales_are_per_token() -> None:
    x = _acts(4, 32)
    y = x.clone()
    y[2] *= 1000.0  # one token with a huge range leaves every other token's grid unchanged
    qx, qy = fake_quantize_per_token(x), fake_quantize_per_token(y)
    keep = [0, 1, 3]
    assert torch.equal(qx[keep], qy[keep])
    torch.testing.assert_close(qy[2], qx[2] * 1000.0, rtol=1e-6, atol=0)
    # and a token's result does not depend on the others in its batch
    assert torch.equal(fake_quantize_per_token(x[1:2]), qx[1:2])


def test_zero_rows_stay_exact_zero_and_no_nan() -> None:
    x = _acts(3, 16)
    x[1] = 0.0
    out = fake_quantize_per_token(x)
    assert torch.equal(out[1], torch.zeros(16))
    assert torch.isfinite(out).all()
    tiny = torch.full((1, 8), 1e-30)
    assert torch.isfinite(fake_quantize_per_token(tiny)).all()


def test_keeps_dtype_and_shape() -> None:
    x = _acts(2, 5, 32).to(torch.bfloat16)
    out = fake_quantize_per_token(x)
    assert out.dtype == torch.bfloat16
    assert out.shape == x.shape
    assert not torch.equal(out, x)


@pytest.mark.parametrize("bits", [1, 9, 16, True, 8.0])
def test_invalid_bits_raise(bits: object) -> None:
    with pytest.raises(ValueError, match=r"2\.\.8"):
        fake_quantize_per_token(torch.randn(2, 4), bits)  # type: ignore[arg-type]


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize_per_token(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"C >= 1"):
        fake_quantize_per_token(torch.ones(2, 0))


@pytest.mark.parametrize("act_bits", [0, 16, 1])
def test_quant_args_validate_act_bits(act_bits: int) -> None:
    with pytest.raises(ValueError, match="quant.act_bits"):
        QuantArgs(act_bits=act_bits)
    assert QuantArgs(act_bits=8).act_bits == 8
    assert QuantArgs().act_bits is None


# ------------------------------------------------------------------------------------------------------ hooks
class _Block(nn.Module):
    """A tiny Llama-like layer: the target modules of one stage."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.up_proj, self.down_proj = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.o_proj(torch.tanh(self.q_proj(x)))
        return h + self.down_proj(torch.relu(self.up_proj(h)))


GROUPS = [["q_proj"], ["o_proj"], ["up_proj"], ["down_proj"]]


def _manual_forward(block: _Block, x: torch.Tensor, bits: int) -> torch.Tensor:
    fq = fake_quantize_per_token
    h = x + block.o_proj(fq(torch.tanh(block.q_proj(fq(x, bits))), bits))
    return h + block.down_proj(fq(torch.relu(block.up_proj(fq(h, bits))), bits))


def test_hooks_quantize_linear_inputs_and_remove_cleanly() -> None:
    block = _Block()
    x = _acts(2, 6, 32)
    with torch.no_grad():
        fp = block(x)
        with apply_activation_quant(block, 8, ["q_proj", "o_proj", "up_proj", "down_proj"]):
            quantized = block(x)
        assert torch.equal(block(x), fp)  # removed on exit
    torch.testing.assert_close(quantized, _manual_forward(block, x, 8), rtol=0, atol=0)
    assert not torch.equal(quantized, fp)
    assert all(len(m._forward_pre_hooks) == 0 for m in block.modules())


def test_hooks_accept_keyword_input_and_reject_double_application() -> None:
    lin = nn.Linear(8, 4)
    x = _acts(3, 8)
    with apply_activation_quant(None, 8, [lin]), torch.no_grad():
        assert torch.equal(lin(input=x), nn.functional.linear(fake_quantize_per_token(x), lin.weight, lin.bias))
        with pytest.raises(RuntimeError, match="already have activation quantization"):
            apply_activation_quant(None, 8, [lin])
    assert apply_activation_quant(None, None, [lin]).modules == []  # weight-only: nothing installed


def test_hooks_reject_bad_targets() -> None:
    block = _Block()
    with pytest.raises(ValueError, match="no module 'k_proj'"):
        apply_activation_quant(block, 8, ["k_proj"])
    with pytest.raises(TypeError, match="nn.Linear"):
        apply_activation_quant(None, 8, [nn.LayerNorm(4)])
    with pytest.raises(ValueError, match=r"2\.\.8"):
        apply_activation_quant(block, 12, ["q_proj"])
    with pytest.raises(ValueError, match="needs the model"):
        apply_activation_quant(None, 8, ["q_proj"])


# ------------------------------------------------------------------------------------------- quantized path
def _run_stage(act_bits: int | None, method: str, inputs: list[torch.Tensor]) -> tuple[_Block, LayerStage, list]:
    block = _Block(seed=1)
    quant = QuantArgs(method=method, bits=4, group_size=16, act_bits=act_bits)
    stage = LayerStage(0, block, GROUPS, quant, metrics=True)
    weights = [TokenWeights(valid=torch.ones(x.shape[:2], dtype=torch.bool)) for x in inputs]
    out = stage.run(lambda b, h: block(h), inputs, weights)
    return block, stage, out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4a8_propagation_is_the_hooked_quantized_layer(method: str) -> None:
    inputs = [_acts(2, 10, 32, seed=s) for s in range(3)]
    block8, _, out8 = _run_stage(8, method, inputs)
    block16, _, out16 = _run_stage(None, method, inputs)
    with torch.no_grad():
        for x, y in zip(inputs, out8):
            # exactly the quantized layer run with the inference hooks of the saved model
            torch.testing.assert_close(y, _manual_forward(block8, x, 8), rtol=0, atol=0)
            with apply_activation_quant(block8, 8, ["q_proj", "o_proj", "up_proj", "down_proj"]):
                assert torch.equal(y, block8(x))
    # and not the weight-only path
    assert max((a - b).abs().max().item() for a, b in zip(out8, out16)) > 1e-3
    if method == "rtn":  # rtn weights do not depend on the data: the difference is the activation quantization
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(block8.children(), block16.children()))


def test_w4a8_hessian_uses_quantized_inputs() -> None:
    # H of the first module is the Gram matrix of its fake-quantized inputs: the inputs it will see at inference
    inputs = [_acts(2, 10, 32, seed=s) for s in range(2)]
    block = _Block(seed=1)
    stage = LayerStage(0, block, GROUPS, QuantArgs(method="gptq", bits=4, group_size=16, act_bits=8), metrics=True)
    stage.accumulate(["q_proj"], lambda b, h: block(h), inputs, [TokenWeights(valid=None) for _ in inputs])
    rows = torch.cat([fake_quantize_per_token(x).reshape(-1, 32) for x in inputs])
    torch.testing.assert_close(stage._stats.stats["q_proj"].plain.H.float(), rows.T @ rows, rtol=1e-4, atol=1e-3)
    fp_rows = torch.cat([x.reshape(-1, 32) for x in inputs])
    assert not torch.allclose(stage._stats.stats["q_proj"].plain.H.float(), fp_rows.T @ fp_rows)
    assert len(block.q_proj._forward_pre_hooks) == 0  # hooks only while the layer runs


# ------------------------------------------------------------------------------------------------ saved record
def test_quantization_config_round_trip_through_model_config() -> None:
    block = _Block()
    block.config = type("Cfg", (), {})()
    record = quantization_record(QuantArgs(bits=4, group_size=16, act_bits=8), ["q_proj", "down_proj"])
    assert record["input_activations"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
        "block_structure": None, "dynamic": True, "actorder": None, "scale_dtype": None, "zp_dtype": None,
        "scale": "absmax / 127.5",
    }  # fmt: skip
    assert record["weights"]["group_size"] == 16
    with pytest.raises(ValueError, match="not saved by lightning-tlq"):
        saved_quantization_config(block)
    setattr(block.config, CONFIG_KEY, record)
    handle = apply_saved_activation_quant(block)
    assert {id(m) for m in handle.modules} == {id(block.q_proj), id(block.down_proj)}
    handle.remove()
    setattr(block.config, CONFIG_KEY, quantization_record(QuantArgs(), ["q_proj"]))
    assert apply_saved_activation_quant(block).modules == []  # weight-only
    setattr(block.config, CONFIG_KEY, {**record, "targets": ["missing"]})
    with pytest.raises(ValueError, match="no module 'missing'"):
        apply_saved_activation_quant(block)
