"""examples/importance_breakdown.py: on a tiny LLaVA, every module's image / text / answer shares of the importance
mass are fractions that sum to 1, as are the token shares, and the token-set records are complete."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from importance_breakdown import KINDS, breakdown, markdown

from lightning_tlq import QuantArgs, TLQModule
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.models.tiny import build_tiny_vlm


def test_shares_are_fractions_that_sum_to_one():
    model, processor = build_tiny_vlm("llava", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(6, seed=1)]
    batches = make_batches(encoded, 3, module.adapter.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        result = breakdown(module, batches, QuantArgs(method="tlq", bits=3, group_size=16))
    assert sum(result["token_share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert all(result["tokens"][k] > 0 for k in KINDS)
    modules = [(i, n, s) for i, layer in result["modules"].items() for n, s in layer.items()]
    assert len(modules) == 2 * 7  # two layers of q, k, v, o, gate, up, down
    for i, name, shares in modules:
        assert sum(shares[k] for k in KINDS) == pytest.approx(1.0, abs=1e-6), (i, name)
        assert 0.0 <= shares["pre_answer"] <= shares["text"]
        assert 0.0 < shares["half_samples"] <= 1.0
        assert all(0.0 <= shares[k] <= 1.0 for k in KINDS), (i, name, shares)
    assert [r["index"] for r in result["layers"]] == [0, 1]
    for r in result["layers"]:
        assert 0 < r["tokens_kept"] <= r["tokens_total"] == sum(result["tokens"][k] for k in KINDS)
    assert "| layer |" in markdown(result)
