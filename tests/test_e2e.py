"""End to end through the CLI for both families: rtn, gptq and tlq, reload, generate, compare errors."""

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_tlq.cli import main
from lightning_tlq.data import encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.report import REPORT_NAME

METHODS = ("rtn", "gptq", "tlq")


def _calibrate(out, family, method, *extra):
    main([
        "calibrate", "--model.model_name_or_path", f"tiny-{family}", "--data.num_samples", "16",
        "--data.batch_size", "4", "--quant.method", method, "--quant.bits", "3", "--quant.group_size", "64",
        "--trainer.accelerator", "cpu",
        "--output_dir", str(out), "--quiet", "true", "--weighted_metrics", "true", *extra,
    ])  # fmt: skip
    return json.loads((out / REPORT_NAME).read_text())


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def runs(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    return request.param, {m: (base / m, _calibrate(base / m, request.param, m)) for m in METHODS}


def _finite(value):
    return value is None or math.isfinite(value)


def test_reports_are_complete_and_finite(runs):
    family, results = runs
    for method, (_, report) in results.items():
        assert report["settings"]["quant"]["method"] == method
        assert len(report["layers"]) == 2
        for layer in report["layers"]:
            assert layer["modules"], "every layer reports its modules"
            for name, mod in layer["modules"].items():
                for key in ("rel_error", "weighted_rel_error"):
                    assert _finite(mod[key]), name
                    assert mod[key] >= 0, name
                assert mod["seconds"] >= 0
                if method != "rtn":
                    assert mod["tokens"] > 0, name
                    assert mod["damp"] > 0, name
            if method == "tlq":
                assert 0 < layer["tokens_kept"] <= layer["tokens_total"]
                assert layer["mass_covered"] >= 0.99 - 1e-6
                shares = layer["kept_share"]
                assert shares["vision"] + shares["text"] == pytest.approx(1.0)


def test_tlq_beats_gptq_beats_rtn_on_weighted_error(runs):
    _, results = runs
    mean = {m: results[m][1]["summary"]["mean_weighted_rel_error"] for m in METHODS}
    assert mean["tlq"] <= mean["gptq"] <= mean["rtn"], mean
    # and layer by layer on average
    per_layer = {m: [r["mean_weighted_rel_error"] for r in results[m][1]["layers"]] for m in METHODS}
    assert sum(per_layer["tlq"]) <= sum(per_layer["gptq"]) <= sum(per_layer["rtn"])


def test_output_reloads_generates_and_is_on_the_grid(runs):
    family, results = runs
    out = results["tlq"][0]
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    sample = synthetic_samples(1, seed=5)[0]
    enc = encode_sample(processor, sample)
    inputs = prompt_inputs(enc)
    prompt_len = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt_len
    # every quantized row group holds at most 2^3 distinct values; the vision tower is untouched
    q = model.get_decoder().layers[0].self_attn.q_proj.weight.detach()
    groups = q.reshape(q.shape[0], -1, 64)
    assert max(len(torch.unique(groups[r, g])) for r in range(8) for g in range(groups.shape[1])) <= 8
    ref = AutoModelForImageTextToText.from_pretrained(results["rtn"][0], local_files_only=True)
    vision = [n for n, _ in model.named_parameters() if "vision" in n or "visual" in n]
    assert vision
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    assert all(torch.equal(params[n], ref_params[n]) for n in vision)


def test_print_config_and_yaml_round_trip(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--quant.bits", "3", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["quant"]["bits"] == 3
    assert printed["quant"]["method"] == "tlq"
    cfg = tmp_path / "cfg.yaml"
    printed["output_dir"] = str(tmp_path / "out")
    printed["data"]["num_samples"] = 4
    printed["quant"]["method"] = "rtn"
    printed["quiet"] = True
    cfg.write_text(yaml.safe_dump(printed))
    main(["calibrate", "--config", str(cfg), "--quant.group_size", "32"])  # CLI overrides the file
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["settings"]["quant"] == {**printed["quant"], "group_size": 32}


def test_existing_output_dir_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _calibrate(out, "llava", "rtn")
    assert (out / "keep.txt").read_text() == "mine"
