"""examples/memory_model.py counts the bytes of the benchmark's model exactly, and examples/bench_probes.py scales
per-layer costs into a labelled estimate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from bench_probes import estimate, layer_work
from memory_model import DIMS, predict, shape_bytes


@pytest.mark.parametrize("shape", ["7b", "32b"])
def test_shape_bytes_match_the_benchmark_model(shape: str) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    d, m, _, heads, kv, vocab = DIMS[shape]
    text = {"hidden_size": d, "intermediate_size": m, "num_hidden_layers": 2, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}  # fmt: skip
    vision = {"depth": 1, "embed_dim": 1280, "hidden_size": d, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}  # fmt: skip
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision))
    part = shape_bytes(shape, layers=2)
    layers = model.model.language_model.layers
    assert part["layer"] == sum(2 * p.numel() for p in layers[0].parameters())
    assert part["layers"] == sum(2 * p.numel() for p in layers.parameters())
    assert part["head"] == 2 * model.lm_head.weight.numel()


def test_low_profile_predicts_less_and_the_estimate_is_labelled() -> None:
    for shape in ("2b", "7b", "32b", "72b"):
        fast, low = predict(shape, "fast"), predict(shape, "low")
        assert low["peak"] < fast["peak"]
        assert low["host_activations"] > 0 == fast["host_activations"]
    work7, work72 = layer_work("7b", 128, 514), layer_work("72b", 128, 514)
    assert all(work72[k] > work7[k] for k in work7)
    result = {"shape": "7b", "layers": 28, "samples": 128, "tokens_per_sample": 514, "wall_s": 30.0,
              "phases_s_rank0": {"importance": 7.0, "layers.solve": 14.0, "capture": 2.0}}  # fmt: skip
    est = estimate(result, "72b")
    assert est["label"].startswith("ESTIMATE")
    assert "not a measurement" in est["label"]
    assert est["non_layer_s"] == 9.0  # 30 s minus the per-layer phases
    per_layer = {k: v / 28 * work72[k] / work7[k] for k, v in result["phases_s_rank0"].items() if k in work7}
    assert est["wall_s"] == round(80 * sum(per_layer.values()) + 9.0, 1)
