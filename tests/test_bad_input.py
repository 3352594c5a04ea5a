"""Bad input through the ``lightning-tlq calibrate`` command line: each fails fast, says what to fix and leaves
nothing behind (no output directory, no temporary copy, no checkpoint)."""

import errno
import json

import pytest
import torch
from conftest import leftovers
from PIL import Image
from transformers import AutoModelForImageTextToText, LlamaConfig, PreTrainedModel

from lightning_tlq.adapters import UnsupportedModelError
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.module import TLQModule


def _jsonl(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _image(tmp_path, name="img.png"):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / name)
    return name


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if the model's weights get loaded: the check must come before that."""

    def refuse(self):
        raise AssertionError("weights were loaded before the bad input was detected")

    monkeypatch.setattr(TLQModule, "configure_model", refuse)


def _fails(calibrate_cli, out, error, match, *flags):
    with pytest.raises(error, match=match):
        calibrate_cli(out, *flags)
    assert leftovers(out) == [], "a failed run must leave nothing behind"


def test_missing_image(tmp_path, calibrate_cli, no_weights_loaded):
    data = _jsonl(tmp_path, [{"image": "nowhere.png", "question": "what color is it ?", "answer": "red"}])
    _fails(calibrate_cli, tmp_path / "out", FileNotFoundError, r"data.jsonl:1: image file .*nowhere.png does not exist",
           "--data.path", str(data))  # fmt: skip


def test_corrupt_image(tmp_path, calibrate_cli, no_weights_loaded):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [{"image": _image(tmp_path), "question": "what color ?", "answer": "red"}]
    data = _jsonl(tmp_path, [*records, {"image": "bad.png", "question": "what color ?", "answer": "red"}])
    _fails(calibrate_cli, tmp_path / "out", ValueError, r"data.jsonl:2: cannot read image .*bad.png.*valid image",
           "--data.path", str(data))  # fmt: skip


def test_empty_dataset(tmp_path, calibrate_cli, no_weights_loaded):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    _fails(calibrate_cli, tmp_path / "out", ValueError, "contains no samples", "--data.path", str(data))


def test_sample_without_answer(tmp_path, calibrate_cli, no_weights_loaded):
    data = _jsonl(tmp_path, [{"image": _image(tmp_path), "question": "what color ?", "answer": "  "}])
    _fails(calibrate_cli, tmp_path / "out", ValueError, "'answer' must be a non-empty string",
           "--data.path", str(data))  # fmt: skip


def test_sequence_longer_than_the_model_limit(tmp_path, calibrate_cli, no_weights_loaded):
    long_question = " ".join(["what"] * 600)  # the tiny models have 512 positions
    data = _jsonl(tmp_path, [{"image": _image(tmp_path), "question": long_question, "answer": "red"}])
    _fails(calibrate_cli, tmp_path / "out", ValueError, r"sample 0 .*tokens exceed the limit of 512.*never truncated",
           "--data.path", str(data))  # fmt: skip
    _fails(calibrate_cli, tmp_path / "out", ValueError, r"data.max_length=1000 exceeds the model's limit of 512",
           "--data.max_length", "1000")  # fmt: skip


def test_group_size_must_divide_in_features(tmp_path, calibrate_cli, no_weights_loaded):
    _fails(calibrate_cli, tmp_path / "out", ValueError,
           r"group_size=96 does not fit .*decoder layer 0 self_attn.q_proj.*in_features=128.*\[32, 64, 128, -1\]",
           "--quant.group_size", "96")  # fmt: skip


def test_group_size_must_fit_the_vision_tower_when_it_is_quantized(tmp_path, calibrate_cli, no_weights_loaded):
    _fails(calibrate_cli, tmp_path / "out", ValueError,
           r"group_size=64 does not fit .*vision.*in_features=32.*alternatively use quant.vision=false",
           "--quant.group_size", "64", "--quant.vision", "true")  # fmt: skip


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range(tmp_path, calibrate_cli, no_weights_loaded, bits):
    _fails(calibrate_cli, tmp_path / "out", ValueError, rf"bits must be an integer in 2..8, got {bits}",
           "--quant.bits", bits)  # fmt: skip


def test_smoothquant_needs_activation_bits(tmp_path, calibrate_cli, no_weights_loaded):
    _fails(calibrate_cli, tmp_path / "out", ValueError,
           r"quant.method=smoothquant .* needs quant.act_bits \(e.g. 8 for W4A8\); for weight-only settings use "
           r"quant.method=awq or mbq", "--quant.method", "smoothquant")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--quant.method", "awq", "--quant.vision", "true"], r"quant.vision=true is not supported with awq"),
        (["--quant.method", "gptq", "--quant.awq_clip", "true"], r"quant.awq_clip=true applies to .*awq or mbq"),
        (["--quant.method", "mbq", "--quant.scale_grid", "0"], r"quant.scale_grid=0 must be a positive integer"),
        (["--quant.method", "smoothquant", "--quant.act_bits", "8", "--quant.smoothquant_alpha", "1.5"],
         r"quant.smoothquant_alpha=1.5 is out of range"),
        (["--quant.kernel", "triton", "--quant.block_size", "256"],
         r"quant.kernel='triton' runs blocks of at most 128 columns, got quant.block_size=256"),
    ],
)  # fmt: skip
def test_bad_baseline_settings(tmp_path, calibrate_cli, no_weights_loaded, flags, match):
    _fails(calibrate_cli, tmp_path / "out", ValueError, match, *flags)


def test_family_without_a_fold_for_its_scales(tmp_path, calibrate_cli, no_weights_loaded, monkeypatch):
    from lightning_tlq.adapters import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "smoothing_producers", None)  # e.g. a family whose norms are not w * x
    _fails(calibrate_cli, tmp_path / "out", UnsupportedModelError,
           r"LlavaAdapter declares no smoothing_producers .* awq, smoothquant and mbq cannot fold input scales",
           "--quant.method", "awq")  # fmt: skip


def test_unknown_choice_is_a_usage_error(tmp_path, calibrate_cli, capsys):
    with pytest.raises(SystemExit):
        calibrate_cli(tmp_path / "out", "--quant.method", "hqq")
    assert "hqq" in capsys.readouterr().err
    assert leftovers(tmp_path / "out") == []


def test_unsupported_architecture(tmp_path, calibrate_cli, no_weights_loaded):
    model_dir = tmp_path / "llama"
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).save_pretrained(model_dir)
    _fails(calibrate_cli, tmp_path / "out", UnsupportedModelError,
           r"model_type 'llama'.*Supported model types: .*llava.*qwen2_vl",
           "--model.model_name_or_path", str(model_dir))  # fmt: skip
    (tmp_path / "notamodel").mkdir()
    _fails(calibrate_cli, tmp_path / "out", ValueError, "not a Hugging Face model directory \\(no config.json\\)",
           "--model.model_name_or_path", str(tmp_path / "notamodel"))  # fmt: skip
    _fails(calibrate_cli, tmp_path / "out", FileNotFoundError, "neither a built-in model .* nor a Hugging Face hub id",
           "--model.model_name_or_path", str(tmp_path / "nowhere"))  # fmt: skip


def _edited_copy(src, dst, edit):
    model = AutoModelForImageTextToText.from_pretrained(src, local_files_only=True)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    for f in src.iterdir():  # processor files
        if not (dst / f.name).exists():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_nan_weights_are_refused_before_calibration(tmp_path, calibrate_cli, tiny4_dir, monkeypatch):
    bad = _edited_copy(tiny4_dir, tmp_path / "nan", lambda m: m.get_decoder().layers[2].mlp.up_proj.weight[3, 5].fill_(
        float("nan")))  # fmt: skip
    monkeypatch.setattr(CalibrationLoop, "run", lambda *a: pytest.fail("calibration started"))
    _fails(calibrate_cli, tmp_path / "out", FloatingPointError,
           r"NaN/Inf in 1 tensor\(s\), e.g. \['model.language_model.layers.2.mlp.up_proj.weight'\]",
           "--model.model_name_or_path", str(bad))  # fmt: skip


def _overflowing(model):
    # finite weights whose activations overflow float32 in layer 0's MLP
    model.get_decoder().layers[0].post_attention_layernorm.weight.fill_(1e30)


def test_nan_activations(tmp_path, calibrate_cli, tiny4_dir):
    bad = _edited_copy(tiny4_dir, tmp_path / "overflow", _overflowing)
    flags = ["--model.model_name_or_path", str(bad)]
    # tlq: the importance pass on the full-precision model sees it first
    _fails(calibrate_cli, tmp_path / "out", FloatingPointError, r"SFT loss .* NaN/Inf activations .*try dtype float32",
           *flags)  # fmt: skip
    # rtn without metrics has no importance pass: the quantized path catches it after layer 0
    _fails(calibrate_cli, tmp_path / "out", FloatingPointError, "Decoder layer 0 produced NaN/Inf activations",
           *flags, "--quant.method", "rtn", "--metrics", "false")  # fmt: skip


def test_output_dir_exists_without_overwrite(tmp_path, calibrate_cli, no_weights_loaded):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="pass --overwrite true"):
        calibrate_cli(out)
    assert (out / "mine.txt").read_text() == "keep"
    assert leftovers(out) == ["out"]


def test_disk_full_while_saving(tmp_path, calibrate_cli, monkeypatch):
    real_save = PreTrainedModel.save_pretrained

    def save_then_fill_the_disk(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # the weights are (partly) written ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fill_the_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"disk full while writing the output .*out: free .*nothing was written") as err:
        calibrate_cli(out)
    assert err.value.errno == errno.ENOSPC
    # no output and no temporary copy; the checkpoint of the finished calibration is kept to resume after freeing space
    assert leftovers(out) == ["out.partial"]
    monkeypatch.undo()
    report = calibrate_cli(out, "--resume", "true")
    assert report["resumed_from_layer"] == 2  # nothing recalibrated, only saved
    assert leftovers(out) == ["out"]
