"""quant.vision=true end to end through the CLI: the tower and projector land on the grid, the rest of the tower is
untouched, the report covers the vision stages, and the W4A8 result reloads and generates."""

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_tlq.actquant import apply_saved_activation_quant
from lightning_tlq.cli import main
from lightning_tlq.data import encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.models.tiny import build_tiny_vlm, save_tiny_vlm
from lightning_tlq.report import REPORT_NAME

GROUP = 32
VISION_PREFIX = {"llava": ("model.vision_tower", "model.multi_modal_projector"), "qwen2_vl": ("model.visual",)}


def _calibrate(out, model, *extra):
    main([
        "calibrate", "--model.model_name_or_path", model, "--data.num_samples", "12", "--data.batch_size", "4",
        "--quant.bits", "4", "--quant.group_size", str(GROUP), "--quant.vision", "true",
        "--trainer.accelerator", "cpu", "--output_dir", str(out), "--quiet", "true", *extra,
    ])  # fmt: skip
    return json.loads((out / REPORT_NAME).read_text())


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"vision_{request.param}") / "out"
    return request.param, out, _calibrate(out, f"tiny-{request.param}", "--quant.act_bits", "8")


def _on_grid(weight: torch.Tensor, bits: int = 4) -> bool:
    groups = weight.detach().reshape(weight.shape[0], -1, GROUP)
    return all(
        len(torch.unique(groups[r, g])) <= 2**bits for r in range(groups.shape[0]) for g in range(groups.shape[1])
    )


def _linears(model, prefixes):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)}


def test_report_covers_vision_stages(run):
    family, out, report = run
    vision = report["vision"]
    n_layers = 2
    assert [r["index"] for r in vision["layers"]] == [*(f"vision.{i}" for i in range(n_layers)), "projector"]
    for rec in vision["layers"]:
        assert 0 < rec["tokens_kept"] <= rec["tokens_total"]
        assert rec["mass_covered"] >= 0.99 - 1e-6
        for name, mod in rec["modules"].items():
            assert math.isfinite(mod["rel_error"]), name
            assert math.isfinite(mod["weighted_rel_error"]), name
            assert mod["tokens"] > 0, name
    assert math.isfinite(vision["summary"]["mean_weighted_rel_error"])
    assert math.isfinite(report["summary"]["mean_weighted_rel_error"])
    record = report["quantization"]
    assert record["vision"] is True
    vision_targets = [t for t in record["targets"] if t.startswith(VISION_PREFIX[family])]
    assert len(vision_targets) == (14 if family == "llava" else 10)
    assert len(record["targets"]) == len(vision_targets) + 2 * 7
    assert report["seconds"]["vision"] > 0


def test_vision_weights_land_on_the_grid(run):
    family, out, _ = run
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    original, _ = build_tiny_vlm(family, seed=0)
    quantized = _linears(model, VISION_PREFIX[family])
    reference = _linears(original, VISION_PREFIX[family])
    assert quantized.keys() == reference.keys()
    for name, module in quantized.items():
        assert _on_grid(module.weight), name
        assert not torch.equal(module.weight, reference[name].weight), name
        assert not _on_grid(reference[name].weight), name  # the test can tell: random weights are off the grid
    # non-Linear vision weights (patch embedding, norms) stay in full precision
    params = dict(original.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(VISION_PREFIX[family]) and ("embed" in name or "norm" in name or "ln_q" in name):
            assert torch.equal(p, params[name]), name


def test_w4a8_vision_result_reloads_and_generates(run):
    _, out, report = run
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    enc = encode_sample(processor, synthetic_samples(1, seed=5)[0])
    inputs = prompt_inputs(enc)
    prompt_len = inputs["input_ids"].shape[1]
    with apply_saved_activation_quant(model) as handle, torch.no_grad():
        assert len(handle.modules) == len(report["quantization"]["targets"])
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt_len


def test_unused_clip_layer_and_post_layernorm_stay_untouched(tmp_path):
    # LLaVA's usual vision_feature_layer=-2 leaves the last CLIP layer without effect on the output; it must be
    # neither a target (its outputs get no gradient) nor changed.
    src = save_tiny_vlm(tmp_path / "src", "llava")
    config = json.loads((src / "config.json").read_text())
    config["vision_feature_layer"] = -2
    (src / "config.json").write_text(json.dumps(config))
    report = _calibrate(tmp_path / "out", str(src))
    assert [r["index"] for r in report["vision"]["layers"]] == ["vision.0", "projector"]
    assert not any(".encoder.layers.1." in t for t in report["quantization"]["targets"])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", local_files_only=True)
    original = AutoModelForImageTextToText.from_pretrained(src, local_files_only=True)
    params = dict(original.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("model.vision_tower.encoder.layers.1.") or "post_layernorm" in name:
            assert torch.equal(p, params[name]), name
    assert _on_grid(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight)
    assert _on_grid(model.model.multi_modal_projector.linear_2.weight)


def test_w4a8_vision_recipe_parses(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--config", "configs/tiny_qwen2_vl_tlq_w4a8_vision.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert "act_bits: 8" in printed
    assert "vision: true" in printed
