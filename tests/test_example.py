"""examples/finetune_then_quantize.py runs: it fine-tunes the tiny VLM, then TLQCallback quantizes it."""

import csv
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from lightning_tlq.export import export
from lightning_tlq.models import build_tiny_vlm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_then_quantize.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_then_quantize", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_then_quantize(tmp_path, capsys):
    out = tmp_path / "quantized"
    result = _load_example().main(["--max_steps", "4", "--num_samples", "8", "--output_dir", str(out),
                                   "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert len(result["report"]["layers"]) == 2
    assert "mean relative output error" in capsys.readouterr().out
    saved = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    initial, _ = build_tiny_vlm("llava")
    # fine-tuned: the (not quantized) vision tower moved away from its initialisation
    vision = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(saved.get_parameter(vision), initial.get_parameter(vision))
    # quantized: 4-bit codes per group of 64 inputs
    q = saved.get_decoder().layers[0].self_attn.q_proj.weight.detach().reshape(128, -1, 64)
    assert max(len(torch.unique(q[r, g])) for r in range(128) for g in range(2)) <= 16
    summary = export(str(out), str(tmp_path / "packed"), quiet=True)  # exportable like a calibrate output
    assert (summary["format"], summary["quantized_modules"]) == ("pack-quantized", 14)
    rows = list(csv.DictReader((Path(result["log_dir"]) / "metrics.csv").read_text().splitlines()))
    assert [r for r in rows if r.get("train_loss")], "training losses were logged"
    assert len([r for r in rows if r.get("tlq/layer/weighted_rel_error")]) == 2
