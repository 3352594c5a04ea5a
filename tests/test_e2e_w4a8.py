"""W4A8 end to end through the CLI for both families: reports, the saved record, reload with activation quant."""

import json
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_tlq.actquant import CONFIG_KEY, apply_saved_activation_quant
from lightning_tlq.cli import main
from lightning_tlq.core.actquant import fake_quantize_per_token
from lightning_tlq.data import encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.report import REPORT_NAME

METHODS = ("rtn", "gptq", "tlq")


def _calibrate(out, family, method, *extra):
    main([
        "calibrate", "--model.model_name_or_path", f"tiny-{family}", "--data.num_samples", "12",
        "--data.batch_size", "4",
        "--quant.method", method, "--quant.bits", "4", "--quant.group_size", "64", "--quant.act_bits", "8",
        "--trainer.accelerator", "cpu", "--output_dir", str(out), "--quiet", "true",
        "--weighted_metrics", "true", *extra,
    ])  # fmt: skip
    return json.loads((out / REPORT_NAME).read_text())


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def runs(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"w4a8_{request.param}")
    return request.param, {m: (base / m, _calibrate(base / m, request.param, m)) for m in METHODS}


def test_w4a8_reports_are_finite_and_record_the_scheme(runs):
    _, results = runs
    for method, (out, report) in results.items():
        assert report["settings"]["quant"]["act_bits"] == 8
        record = report["quantization"]
        assert record["input_activations"]["strategy"] == "token"
        assert record["input_activations"]["num_bits"] == 8
        assert record["method"] == method
        assert len(record["targets"]) == 2 * 7
        assert json.loads((out / "config.json").read_text())[CONFIG_KEY] == record
        for layer in report["layers"]:
            for name, mod in layer["modules"].items():
                assert math.isfinite(mod["rel_error"]), name
                assert math.isfinite(mod["weighted_rel_error"]), name


def test_w4a8_tlq_beats_gptq_beats_rtn_on_weighted_error(runs):
    _, results = runs
    mean = {m: results[m][1]["summary"]["mean_weighted_rel_error"] for m in METHODS}
    assert mean["tlq"] <= mean["gptq"] <= mean["rtn"], mean


def _prompt_inputs(processor):
    enc = encode_sample(processor, synthetic_samples(1, seed=5)[0])
    inputs = prompt_inputs(enc)
    prompt_len = inputs["input_ids"].shape[1]
    return inputs, prompt_len


def test_w4a8_reload_applies_activation_quant_and_generates(runs):
    _, results = runs
    out = results["tlq"][0]
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    inputs, prompt_len = _prompt_inputs(processor)
    q_proj = model.get_decoder().layers[1].self_attn.q_proj
    raw, seen = [], []
    probes = [  # registered first, so it sees the input before the activation-quant pre-hook
        q_proj.register_forward_pre_hook(lambda m, a: raw.append(a[0].detach())),
        q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach())),
    ]
    with torch.no_grad():
        weight_only = model(**inputs).logits
        handle = apply_saved_activation_quant(model)
        assert len(handle.modules) == 2 * 7
        w4a8 = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        handle.remove()
        assert torch.equal(model(**inputs).logits, weight_only)
    for probe in probes:
        probe.remove()
    assert generated.shape[1] > prompt_len
    assert torch.isfinite(w4a8).all()
    assert not torch.equal(w4a8, weight_only)
    assert torch.equal(seen[0], raw[0])  # weight-only forward: untouched input
    for before, after in zip(raw[1:-1], seen[1:-1]):  # W4A8 forwards (prefill and decode steps)
        assert torch.equal(after, fake_quantize_per_token(before))
        assert not torch.equal(after, before)


def test_vision_tower_is_untouched_without_quant_vision(runs):
    family, results = runs
    model = AutoModelForImageTextToText.from_pretrained(results["tlq"][0], local_files_only=True)
    original = dict(build_tiny_vlm(family, seed=0)[0].named_parameters())
    vision = [
        (n, p)
        for n, p in model.named_parameters()
        if n.startswith(("model.vision_tower", "model.multi_modal", "model.visual"))
    ]
    assert len(vision) > 10
    assert all(torch.equal(p, original[n]) for n, p in vision)
    assert results["tlq"][1]["vision"] is None
    assert results["tlq"][1]["quantization"]["vision"] is False
