"""awq, smoothquant and mbq end to end through the CLI for both families (weight-only and W4A8), and 1 vs 2
processes (gloo, ddp_spawn): identical codes, scales and folded weights."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_tlq.actquant import apply_saved_activation_quant
from lightning_tlq.calibrate import calibrate
from lightning_tlq.cli import main
from lightning_tlq.config import DataArgs, QuantArgs
from lightning_tlq.data import encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.export import QPARAMS_NAME
from lightning_tlq.report import REPORT_NAME

WEIGHT_ONLY = ("rtn", "awq", "mbq")  # W3A16 g64
W4A8 = ("smoothquant", "mbq")  # W4A8 g64
GRID = [i / 20 for i in range(20)]


def _calibrate(out, family, method, *extra):
    main([
        "calibrate", "--model.model_name_or_path", f"tiny-{family}", "--data.num_samples", "12",
        "--data.batch_size", "4", "--quant.method", method, "--quant.group_size", "64",
        "--trainer.accelerator", "cpu", "--output_dir", str(out), "--quiet", "true", *extra,
    ])  # fmt: skip
    return json.loads((out / REPORT_NAME).read_text())


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def runs(request, tmp_path_factory):
    family, base = request.param, tmp_path_factory.mktemp(f"baselines_{request.param}")
    out = {}
    for method in WEIGHT_ONLY:
        out[method] = (base / method, _calibrate(base / method, family, method, "--quant.bits", "3"))
    for method in W4A8:
        path = base / f"{method}_w4a8"
        out[f"{method}_w4a8"] = (path, _calibrate(path, family, method, "--quant.bits", "4", "--quant.act_bits", "8"))
    return family, out


def _modules(report):
    return [(layer["index"], name, mod) for layer in report["layers"] for name, mod in layer["modules"].items()]


def test_reports_record_the_chosen_alpha_and_losses(runs):
    _, results = runs
    for key, (_, report) in results.items():
        method = key.removesuffix("_w4a8")
        assert report["quantization"]["method"] == method
        assert report["settings"]["importance"]["score"] == ("grad_abs" if method == "mbq" else "fisher")
        for index, name, mod in _modules(report):
            assert 0 <= mod["rel_error"] < math.inf, (key, index, name)
            if method == "rtn":
                assert "alpha" not in mod
                continue
            if name == "self_attn.o_proj":  # tiny models use grouped-query attention: no exact fold for o
                assert "grouped-query attention" in mod["smoothing_skipped"]
                continue
            assert mod["alpha"] in ([0.5] if method == "smoothquant" else GRID)
            assert math.isfinite(mod["search_loss"] + mod["rtn_loss"])
            if key in ("awq", "mbq"):  # alpha = 0 (s = 1, plain rtn) is in the weight-only grid
                assert mod["search_loss"] <= mod["rtn_loss"], (key, index, name)
            assert (mod.get("vision_weight", 0) > 0) is (method == "mbq")


def test_awq_lowers_the_output_error_of_rtn(runs):
    _, results = runs
    error = {k: results[k][1]["summary"]["mean_rel_error"] for k in results}
    assert error["awq"] < error["rtn"], error
    searched = [m for _, _, m in _modules(results["awq"][1]) if "alpha" in m]
    assert any(m["alpha"] > 0 for m in searched)  # the search moved away from plain rounding somewhere


def _prompt(directory):
    return prompt_inputs(encode_sample(AutoProcessor.from_pretrained(directory), synthetic_samples(1, seed=5)[0]))


def test_saved_models_keep_their_folds_reload_and_generate(runs):
    _, results = runs
    ref = load_file(results["rtn"][0] / "model.safetensors")
    for key in ("awq", "mbq", "smoothquant_w4a8", "mbq_w4a8"):
        out = results[key][0]
        saved = load_file(out / "model.safetensors")
        norms = [k for k in saved if ".layers.0.input_layernorm" in k and "vision" not in k and "visual" not in k]
        assert norms
        assert not torch.equal(saved[norms[0]], ref[norms[0]]), key  # the folded 1/s is saved with the model
        vision = [k for k in saved if "vision_tower" in k or "visual" in k]
        assert vision
        assert all(torch.equal(saved[k], ref[k]) for k in vision), key
        model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
        handle = apply_saved_activation_quant(model)  # W4A8: per-token int8 inputs, as calibrated
        prompt = _prompt(out)
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        handle.remove()
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
        q = model.get_decoder().layers[0].self_attn.q_proj.weight.detach()
        bits = 3 if key in ("awq", "mbq") else 4
        groups = q.reshape(q.shape[0], -1, 64)
        assert max(len(torch.unique(groups[r, g])) for r in range(8) for g in range(2)) <= 2**bits


# ------------------------------------------------------------------------------------------ 1 vs 2 processes
_PARITY = {
    "awq_clip": QuantArgs(method="awq", bits=3, group_size=64, awq_clip=True),
    "mbq_w4a8": QuantArgs(method="mbq", bits=4, group_size=64, act_bits=8),
}


def _spawn_run(out, quant, devices):
    strategy = "ddp_spawn" if devices > 1 else "auto"
    return calibrate(
        model="tiny-qwen2_vl", data=DataArgs(num_samples=8, batch_size=2), quant=quant, output_dir=str(out),
        accelerator="cpu", devices=devices, strategy=strategy, quiet=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_PARITY))
def test_two_processes_give_the_codes_of_one(tmp_path, case):
    one = _spawn_run(tmp_path / "one", _PARITY[case], 1)
    two = _spawn_run(tmp_path / "two", _PARITY[case], 2)
    assert two["settings"]["world_size"] == 2
    searched = [(i, n, m.get("alpha"), m.get("vision_weight")) for i, n, m in _modules(one)]
    assert searched == [(i, n, m.get("alpha"), m.get("vision_weight")) for i, n, m in _modules(two)]
    if case == "awq_clip":  # q and k are never clipped
        clipped = {n: m.get("clip_ratio_mean") for _, n, m in _modules(one)}
        assert clipped["self_attn.q_proj"] is None
        assert 0.5 < clipped["mlp.down_proj"] <= 1
    for name in (QPARAMS_NAME, "model.safetensors"):  # codes and scales; every weight incl. the folded norms
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert different == [], different[:5]
