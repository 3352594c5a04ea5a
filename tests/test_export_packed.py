"""PackedLinear and load_packed: packed codes in memory, outputs equal to the fake-quantized model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

import lightning_tlq.models  # noqa: F401  (registers the tiny Qwen2-VL processor for AutoProcessor)
from lightning_tlq.calibrate import calibrate
from lightning_tlq.config import DataArgs, QuantArgs
from lightning_tlq.core.pack import packed_length, to_unsigned
from lightning_tlq.core.quantizer import QuantSpec, rtn
from lightning_tlq.data import collate, encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.export import PACKED_DIRNAME, export
from lightning_tlq.models.tiny import load_processor
from lightning_tlq.nn import PackedLinear, fake_quantize_tokens, load_packed, packed_memory
from lightning_tlq.nn.loader import parse_quantization_config


def _layer(bits, group_size, symmetric, out_features=48, in_features=128, bias=True, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    spec = QuantSpec(bits, group_size, symmetric)
    res = rtn(w, spec)
    codes = to_unsigned(res.codes, bits) if symmetric else res.codes
    b = torch.randn(out_features, generator=g) if bias else None
    layer = PackedLinear.from_codes(
        codes, res.scale, None if symmetric else res.zero, bits=bits, group_size=group_size, bias=b, **kwargs
    )
    return layer, res, b


# ---------------------------------------------------------------------------------------------- PackedLinear
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize(("group_size", "symmetric"), [(32, True), (-1, True), (64, False), (-1, False)])
def test_packed_linear_equals_the_dequantized_linear(bits, group_size, symmetric):
    layer, res, b = _layer(bits, group_size, symmetric, kernel="dequant")
    assert torch.equal(layer.dequantize_weight(), res.weight)
    x = torch.randn(3, 5, 128)
    assert torch.equal(layer(x), F.linear(x, res.weight, b))
    assert layer.weight_packed.shape == (48, packed_length(128, bits))
    assert ("weight_zero_point" in dict(layer.named_buffers())) == (not symmetric)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 128, True), (4, 32, False), (8, -1, True)])
def test_memory_is_bits_over_16_of_bf16_plus_scales(bits, group_size, symmetric):
    out_features, in_features = 256, 1024
    layer, _, _ = _layer(bits, group_size, symmetric, out_features, in_features, dtype=torch.bfloat16, bias=False)
    groups = 1 if group_size == -1 else in_features // group_size
    codes = out_features * in_features * bits // 8
    scales = out_features * groups * 2
    zeros = 0 if symmetric else math.ceil(out_features * bits / 32) * groups * 4
    assert layer.memory_bytes() == codes + scales + zeros + 16  # + weight_shape (2 x int64)
    bf16 = 2 * out_features * in_features
    assert layer.memory_bytes() / bf16 == pytest.approx(bits / 16, abs=0.04)
    assert not any(p.numel() == out_features * in_features for p in layer.parameters())


def test_state_dict_round_trip_and_repr():
    layer, _, _ = _layer(4, 32, False)
    fresh = PackedLinear(128, 48, bits=4, group_size=32, symmetric=False, dtype=torch.float32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "bias"}
    assert "bits=4" in repr(layer)
    assert "asym" in repr(layer)


def test_bad_construction_fails_loudly():
    with pytest.raises(ValueError, match="divide in_features"):
        PackedLinear(100, 8, bits=4, group_size=64)
    with pytest.raises(ValueError, match="act_bits"):
        PackedLinear(64, 8, bits=4, group_size=64, act_bits=4)
    with pytest.raises(ValueError, match="1..8"):
        PackedLinear(64, 8, bits=9, group_size=64)
    with pytest.raises(ValueError, match="kernel"):
        PackedLinear(64, 8, bits=4, group_size=64, kernel="fast")


def test_activation_quantization_is_per_token_int8():
    layer, res, b = _layer(8, -1, True, act_bits=8, kernel="dequant")
    x = torch.randn(2, 7, 128) * torch.logspace(-2, 2, 7).view(1, 7, 1)  # very different token ranges
    xq = fake_quantize_tokens(x)
    step = x.abs().amax(-1, keepdim=True) / 127.5  # one scale per token
    assert not torch.equal(xq, x)
    assert ((xq - x).abs() <= step / 2 * (1 + 1e-4)).all()  # (half a step; fp32 cancellation at the absmax)
    assert len(torch.unique((xq / step).round()[0, 0])) <= 256
    assert torch.equal(layer(x), F.linear(xq, res.weight, b))
    assert torch.equal(fake_quantize_tokens(torch.zeros(1, 3)), torch.zeros(1, 3))


def test_token_fake_quantization_matches_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 9, 64) * torch.logspace(-3, 3, 9).view(1, 9, 1)).to(dtype)
        scale, zero = compute_dynamic_scales_and_zp(x, args, module=torch.nn.Identity())
        assert torch.equal(fake_quantize_tokens(x), fake_quantize(x, scale, zero, args))


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="needs torch's CPU int4 mm")
@pytest.mark.parametrize(("group_size", "symmetric"), [(32, True), (128, False), (64, False)])
def test_int4_kernel_matches_dequant(group_size, symmetric):
    """The tiled int4 path (CPU variant of the CUDA kernel, same scales-and-zeros folding) equals dequant+matmul."""
    layer, res, b = _layer(4, group_size, symmetric, out_features=64, in_features=256, kernel="int4")
    assert layer.int4_supported("cpu")
    x = torch.randn(4, 3, 256)
    ref = F.linear(x, res.weight, b)
    got = layer(x)
    assert ((got - ref).norm() / ref.norm()) < 1e-5
    layer.load_state_dict(_layer(4, group_size, symmetric, 64, 256, seed=1)[0].state_dict())  # cache dropped
    assert not torch.allclose(layer(x), got)
    with pytest.raises(RuntimeError, match="kernel='int4' cannot run"):
        _layer(8, 32, True, kernel="int4")[0](torch.randn(1, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA int4 kernel")
def test_int4_cuda_kernel_matches_dequant():
    layer, res, b = _layer(4, 128, False, out_features=256, in_features=1024, dtype=torch.bfloat16)
    layer = layer.cuda()
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    assert layer._use_int4(x)
    ref = F.linear(x.float(), res.weight.cuda(), b.cuda())
    assert ((layer(x).float() - ref).norm() / ref.norm()) < 1e-2


# ------------------------------------------------------------------------------------------------ load_packed
CASES = {  # name: (family, method, bits, group_size, symmetric, act_bits)
    "llava-w4g64-sym": ("llava", "gptq", 4, 64, True, None),
    "llava-w8ch-asym-a8": ("llava", "rtn", 8, -1, False, 8),
    "qwen-w4g32-asym": ("qwen2_vl", "rtn", 4, 32, False, None),
    "qwen-w8ch-sym-a8": ("qwen2_vl", "rtn", 8, -1, True, 8),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name, (family, method, bits, group_size, symmetric, act_bits) in CASES.items():
        src = tmp_path_factory.mktemp(name) / "run"
        calibrate(
            model=f"tiny-{family}",
            data=DataArgs(num_samples=8, batch_size=4),
            quant=QuantArgs(method=method, bits=bits, group_size=group_size, symmetric=symmetric),
            output_dir=str(src),
            accelerator="cpu",
            metrics=False,
            quiet=True,
        )
        export(str(src), act_bits=act_bits, quiet=True)
        out[name] = src
    return out


def _batch(directory):
    processor = load_processor(directory)
    batch = collate(
        [encode_sample(processor, s) for s in synthetic_samples(2, seed=4)], processor.tokenizer.pad_token_id
    )
    batch.pop("labels")
    return batch


@pytest.mark.parametrize("case", list(CASES))
def test_load_packed_matches_the_fake_quantized_model(exported, case):
    src = exported[case]
    act_bits = CASES[case][5]
    model = load_packed(src / PACKED_DIRNAME)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14  # 2 decoder layers x 7 projections; vision tower, projector and lm_head stay dense
    assert all(m.act_bits == act_bits for m in layers)
    assert not any(
        isinstance(m, torch.nn.Linear) and "layers." in n and "language" in n for n, m in model.named_modules()
    )
    ref = AutoModelForImageTextToText.from_pretrained(src, local_files_only=True).eval()
    if act_bits:
        packed_names = {n for n, m in model.named_modules() if isinstance(m, PackedLinear)}
        for name, module in ref.named_modules():
            if name in packed_names:
                module.register_forward_pre_hook(lambda m, args: (fake_quantize_tokens(args[0]),))
    batch = _batch(src)
    with torch.no_grad():
        want, got = ref(**batch).logits, model(**batch).logits
    assert ((want - got).norm() / want.norm()) <= 1e-3
    sd_ref = ref.state_dict()
    for name, tensor in model.state_dict().items():  # everything that is not a packed layer is the same tensor
        if name in sd_ref and not any(name.startswith(n + ".") for n in packed_names_of(model)):
            assert torch.equal(tensor, sd_ref[name]), name
    _, _, bits, group_size, symmetric, _ = CASES[case]
    expected = 0
    for m in layers:  # b/8 bytes per weight, one fp32 scale (the tiny models are fp32) per group, packed zeros
        groups = 1 if group_size == -1 else m.in_features // group_size
        zeros = 0 if symmetric else math.ceil(m.out_features * bits / 32) * groups * 4
        expected += m.out_features * m.in_features * bits // 8 + m.out_features * groups * 4 + zeros + 16
    mem = packed_memory(model)
    assert mem["packed_bytes"] == expected
    assert mem["bf16_bytes"] == sum(2 * m.in_features * m.out_features for m in layers)
    prompt = prompt_inputs(encode_sample(load_processor(src), synthetic_samples(1, seed=9)[0]))
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref.generate(**prompt, max_new_tokens=3, do_sample=False))


def packed_names_of(model):
    return [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]


def test_load_packed_in_bfloat16_keeps_codes_and_runs(exported):
    model = load_packed(exported["llava-w4g64-sym"] / PACKED_DIRNAME, dtype=torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    assert layer.weight_scale.dtype == torch.bfloat16
    assert layer.weight_packed.dtype == torch.int32
    with torch.no_grad():
        logits = model(**_batch(exported["llava-w4g64-sym"])).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def _corrupt(src, tmp_path, edit):
    import shutil

    dst = tmp_path / "bad"
    shutil.copytree(src / PACKED_DIRNAME, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_load_packed_refuses_incomplete_or_foreign_files(exported, tmp_path):
    src = exported["qwen-w4g32-asym"]

    def drop_zero_point(t):
        t.pop(next(k for k in t if k.endswith("layers.1.mlp.up_proj.weight_zero_point")))

    with pytest.raises(ValueError, match=r"lacks \['weight_zero_point'\] of quantized layer .*layers.1.mlp.up_proj"):
        load_packed(_corrupt(src, tmp_path / "a", drop_zero_point))

    def add_stray(t):
        t["model.layers.0.mystery.weight"] = torch.zeros(2)

    with pytest.raises(ValueError, match="mystery.weight .* has no place in the model"):
        load_packed(_corrupt(src, tmp_path / "b", add_stray))

    def drop_norm(t):
        t.pop(next(k for k in t if k.endswith("norm.weight")))

    with pytest.raises(ValueError, match="lacks 1 tensor"):
        load_packed(_corrupt(src, tmp_path / "c", drop_norm))

    def shrink_scale(t):
        k = next(k for k in t if k.endswith("q_proj.weight_scale") and "layers.0" in k)
        t[k] = t[k][:, :1].contiguous()

    with pytest.raises(ValueError, match="checkpoint shape"):
        load_packed(_corrupt(src, tmp_path / "d", shrink_scale))
    with pytest.raises(ValueError, match="no quantization_config"):
        load_packed(src)  # the fake-quantized directory itself


def test_parse_quantization_config_names_what_is_unsupported(exported):
    qc = json.loads((exported["llava-w4g64-sym"] / PACKED_DIRNAME / "config.json").read_text())["quantization_config"]
    scheme = parse_quantization_config(qc)
    assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.act_bits) == (4, 64, True, None)
    assert scheme.ignores("lm_head")
    assert not scheme.ignores("model.language_model.layers.0.mlp.up_proj")
    bad = [
        ({"quant_method": "gptq"}, "quant_method"),
        ({"format": "float-quantized"}, "format"),
        ({"quantization_status": "frozen"}, "quantization_status"),
    ]
    for patch, field in bad:
        with pytest.raises(ValueError, match=field):
            parse_quantization_config({**qc, **patch})
    group = qc["config_groups"]["group_0"]
    with pytest.raises(ValueError, match="g_idx"):
        parse_quantization_config(
            {**qc, "config_groups": {"g": {**group, "weights": {**group["weights"], "actorder": "group"}}}}
        )
    with pytest.raises(ValueError, match="exactly one"):
        parse_quantization_config({**qc, "config_groups": {"a": group, "b": group}})
    act = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True}
    with pytest.raises(ValueError, match="input_activations"):
        parse_quantization_config({**qc, "config_groups": {"g": {**group, "input_activations": act}}})
