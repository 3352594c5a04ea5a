"""awq / smoothquant / mbq on real (tiny) models: exact folds, the layer search against a direct computation, the
SmoothQuant formula on a layer's inputs, MBQ's vision weights against autograd, and the alpha = 0 limit."""

from __future__ import annotations

import statistics

import pytest
import tiny_families as tf
import torch
import torch.nn.functional as F
import transformers
from lightning.fabric import Fabric

from lightning_tlq.adapters import UnsupportedModelError, get_adapter
from lightning_tlq.adapters.gemma3 import Gemma3Adapter
from lightning_tlq.config import ImportanceArgs, QuantArgs
from lightning_tlq.core.quantizer import rtn
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.importance import TokenImportance
from lightning_tlq.keys import ModuleKey
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings
from lightning_tlq.smoothing import apply_fold


def _model(family: str, mha: bool = False, seed: int = 0) -> torch.nn.Module:
    config = tf.config(family)
    if mha:  # as many key/value heads as query heads: v_proj -> o_proj has an exact fold
        text = config.get_text_config()
        text.num_key_value_heads = text.num_attention_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForImageTextToText.from_config(config).eval()


@pytest.mark.parametrize(("family", "mha"), [("llava", True), ("qwen2_vl", True), *[(f, False) for f in tf.FAMILIES]])
def test_folding_scales_without_quantization_leaves_the_model_unchanged(family, mha):
    model = _model(family, mha)
    adapter = get_adapter(model)
    inputs = adapter.forward_inputs(tf.make_batch(family, padded=True))
    with torch.no_grad():
        before = model(**inputs).logits
    g = torch.Generator().manual_seed(1)
    folded = []
    for index, layer in enumerate(adapter.decoder_layers()):
        norms = {n: p.detach().clone() for n, p in layer.named_parameters() if "norm" in n}
        for fold in adapter.smoothing_plan(index):
            if fold.skipped is None:
                width = layer.get_submodule(fold.modules[0]).in_features
                apply_fold(layer, fold, torch.exp(0.7 * torch.randn(width, generator=g)))
                folded.append(fold.producer)
        assert any(not torch.equal(p, norms[n]) for n, p in layer.named_parameters() if n in norms)
    # every group is folded; o_proj only without grouped-query attention (GQA: no exact per-channel fold)
    assert len(folded) == adapter.num_layers * (4 if mha else 3)
    assert ("self_attn.v_proj" in folded) is mha
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_norm_of_another_form_is_refused_clearly(monkeypatch):
    model = _model("gemma3")
    assert get_adapter(model).smoothing_plan(0)[2].producer == "pre_feedforward_layernorm"
    monkeypatch.setattr(Gemma3Adapter, "norm_weight_offset", 0.0)  # pretend Gemma's norms were weight * x
    with pytest.raises(UnsupportedModelError, match=r"Gemma3RMSNorm\) does not compute weight \* n\(x\)"):
        get_adapter(model).smoothing_plan(0)
    monkeypatch.setattr(Gemma3Adapter, "smoothing_producers", None)
    with pytest.raises(UnsupportedModelError, match="declares no smoothing_producers.*use rtn, gptq or tlq"):
        get_adapter(model).smoothing_plan(0)


# ------------------------------------------------------------------------------------------- calibration loop
def _run(family: str, quant: QuantArgs, score: str = "fisher", samples: int = 6):
    model, processor = build_tiny_vlm(family, seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(samples, seed=3)]
    batches = make_batches(encoded, 3, module.adapter.pad_token_id)
    fabric = Fabric(accelerator="cpu", devices=1)
    loop = CalibrationLoop(fabric, module, CalibrationSettings(quant, ImportanceArgs(score=score)))
    loop.run(batches)
    return loop, module, batches


def _fp_layer_inputs(family: str, batches, names, layer_index: int = 0):
    """Real tokens' inputs of some modules of one decoder layer, from a plain forward of the full-precision model."""
    model, _ = build_tiny_vlm(family, seed=0)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[layer_index]
    rows = {n: [] for n in names}
    current = {}
    handles = [
        layer.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: rows[n].append(a[0].detach()[current["valid"]])
        )
        for n in names
    ]
    with torch.no_grad():
        for batch in batches:
            current["valid"] = batch["attention_mask"].bool()
            model(**adapter.forward_inputs(batch))
    for h in handles:
        h.remove()
    return model, layer, {n: torch.cat(r) for n, r in rows.items()}


def _group_loss(x, weights, s):
    w = torch.cat(weights)
    ref = x @ w.T
    quantized = rtn(w * s, QuantArgs(bits=3, group_size=64).spec).weight
    return float(((x / s) @ quantized.T - ref).square().sum() / ref.square().sum())


def test_awq_search_of_a_layer_matches_a_direct_computation():
    quant = QuantArgs(method="awq", bits=3, group_size=64, scale_grid=8)
    loop, _, batches = _run("llava", quant)
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
              ["mlp.down_proj"]]  # fmt: skip
    _, layer, rows = _fp_layer_inputs("llava", batches, [g[0] for g in groups])
    grid = [i / 8 for i in range(8)]
    for group in groups:
        x = rows[group[0]]
        weights = [layer.get_submodule(n).weight.detach() for n in group]
        losses = []
        # mean in float64 as the implementation sums it: a 1-ulp change of s can flip the code of a group's absmax
        # weight (it sits exactly on a rounding tie, |w| / scale = 3.5), which moves the loss by ~0.1% here
        mean_abs = x.double().abs().mean(0).float()
        for alpha in grid:  # AWQ: s = mean|x|^alpha, clamped, normalised by sqrt(max * min)
            s = mean_abs.pow(alpha).clamp_min(1e-4)
            losses.append(_group_loss(x, weights, s / (s.max() * s.min()).sqrt()))
        for name in group:
            record = loop.results[ModuleKey(0, name)].record
            assert record["rtn_loss"] == pytest.approx(losses[0], rel=1e-5)  # alpha = 0: round to nearest
            assert record["search_loss"] == pytest.approx(min(losses), rel=1e-5)
            assert losses[grid.index(record["alpha"])] == pytest.approx(min(losses), rel=1e-5)
            assert record["search_loss"] <= record["rtn_loss"]
    o_proj = loop.results[ModuleKey(0, "self_attn.o_proj")].record
    assert "grouped-query attention" in o_proj["smoothing_skipped"]
    assert "alpha" not in o_proj


def test_smoothquant_folds_the_formula_of_the_layer_inputs():
    alpha = 0.6
    quant = QuantArgs(method="smoothquant", bits=4, group_size=64, act_bits=8, smoothquant_alpha=alpha)
    loop, module, batches = _run("qwen2_vl", quant)
    groups = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}  # fmt: skip
    _, fp_layer, rows = _fp_layer_inputs("qwen2_vl", batches, [g[0] for g in groups.values()])
    calibrated = module.adapter.decoder_layers()[0]
    for norm, group in groups.items():
        act_max = rows[group[0]].abs().amax(0)
        w_max = torch.stack([fp_layer.get_submodule(n).weight.detach().abs().amax(0) for n in group]).amax(0)
        want = (act_max.pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
        folded = fp_layer.get_submodule(norm).weight.detach() / calibrated.get_submodule(norm).weight.detach()
        torch.testing.assert_close(folded, want, rtol=1e-5, atol=0)  # the norm now divides by s
        for name in group:
            assert loop.results[ModuleKey(0, name)].record["alpha"] == alpha


@pytest.mark.parametrize("method", ["awq", "mbq"])
def test_one_grid_point_is_exactly_round_to_nearest(method):
    """alpha = 0 gives s = 1 exactly: the same codes, scales and (unchanged) norms as rtn."""
    loop, module, _ = _run("llava", QuantArgs(method=method, bits=3, group_size=64, scale_grid=1), score="grad_abs")
    ref, ref_module, _ = _run("llava", QuantArgs(method="rtn", bits=3, group_size=64), score="grad_abs")
    assert loop.results.keys() == ref.results.keys()
    for key, result in loop.results.items():
        assert torch.equal(result.codes, ref.results[key].codes), key
        assert torch.equal(result.scale, ref.results[key].scale), key
        assert result.record.get("alpha", 0.0) == 0.0, key  # o_proj has no alpha: skipped (grouped-query attn)
    state, ref_state = module.model.state_dict(), ref_module.model.state_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)


def test_mbq_vision_weights_match_a_direct_autograd_computation():
    quant = QuantArgs(method="mbq", bits=3, group_size=64)
    loop, module, batches = _run("llava", quant, score="grad_abs")
    model, _ = build_tiny_vlm("llava", seed=0)
    adapter = get_adapter(model)
    image_id = model.config.image_token_id
    blocks = ("self_attn.o_proj", "mlp.down_proj")
    sums = {(i, b): torch.zeros(4, dtype=torch.float64) for i in range(adapter.num_layers) for b in blocks}
    for batch in batches:
        grads = {}
        handles = []
        for i, layer in enumerate(adapter.decoder_layers()):
            for b in blocks:

                def keep(m, a, out, key=(i, b)):
                    out.register_hook(lambda g: grads.__setitem__(key, g))

                handles.append(layer.get_submodule(b).register_forward_hook(keep))
        logits = model(**adapter.forward_inputs(batch)).logits
        labels = batch["labels"]  # the SFT loss: next-token cross-entropy summed over answer tokens
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        loss.backward()
        for h in handles:
            h.remove()
        real = batch["attention_mask"].bool()
        vision, answer = (batch["input_ids"] == image_id) & real, (labels != -100) & real
        for key, g in grads.items():
            per_token = g.abs().mean(-1).double()  # mean |dL/dy| over output channels
            sums[key] += torch.stack([per_token[vision].sum(), vision.sum(), per_token[answer].sum(), answer.sum()])
    for b in blocks:
        ratios = [float((sums[i, b][0] / sums[i, b][1]) / (sums[i, b][2] / sums[i, b][3])) for i in range(2)]
        median = statistics.median(ratios)
        for i, ratio in enumerate(ratios):
            assert loop.method_state[ModuleKey(i, b)] == pytest.approx(max(ratio, median), rel=1e-4)
            record = loop.results[ModuleKey(i, "mlp.gate_proj" if "mlp" in b else "self_attn.q_proj")].record
            assert record["vision_weight"] == pytest.approx(max(ratio, median), rel=1e-4)
    assert 0 < min(loop.method_state.values()) < 1  # vision tokens get much smaller gradients than answers


def test_mbq_refuses_a_collector_of_other_scores():
    model, processor = build_tiny_vlm("llava", seed=0)
    fabric = Fabric(accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match="quant.method=mbq needs importance.score='grad_abs'.*'fisher'"):
        CalibrationLoop(fabric, TLQModule().attach(model, processor), CalibrationSettings(QuantArgs(method="mbq")),
                        collector=TokenImportance("fisher"))  # fmt: skip
