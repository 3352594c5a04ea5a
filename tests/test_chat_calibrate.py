"""Multi-turn, multi-image and text-only chat samples, mixed in batches, calibrate end to end (TLQ) on both tiny
families; a text-only batch with ``quant.vision`` is refused before anything is written."""

from __future__ import annotations

import json

import pytest
from conftest import leftovers

from lightning_tlq.data import synthetic_samples


def _mixed_jsonl(tmp_path):
    s = synthetic_samples(4)
    for i, sample in enumerate(s):
        sample.image.save(tmp_path / f"{i}.png")
    turns = [{"from": "human", "value": f"<image>\n{s[0].question}"}, {"from": "gpt", "value": s[0].answer},
             {"from": "human", "value": "and <image> ?"}, {"from": "gpt", "value": s[1].answer}]  # fmt: skip
    records = [
        {"conversations": turns, "image": ["0.png", "1.png"]},
        *({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
          for q, a in [("what color is the square ?", "red"), ("how many ?", "two"), ("what shape ?", "circle")]),
        {"image": "2.png", "question": s[2].question, "answer": s[2].answer},
        {"image": "3.png", "question": s[3].question, "answer": s[3].answer},
    ]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_mixed_chat_samples_calibrate(family, tmp_path, calibrate_cli):
    report = calibrate_cli(tmp_path / "out", "--model.model_name_or_path", f"tiny-{family}", "--quant.method", "tlq",
                           "--data.path", str(_mixed_jsonl(tmp_path)), "--data.num_samples", "6",
                           "--data.batch_size", "2")  # fmt: skip
    assert report["data"]["samples"] == 6
    for layer in report["layers"]:
        assert all(module["tokens"] > 0 for module in layer["modules"].values())


def test_text_only_batch_with_vision_is_refused(tmp_path, calibrate_cli):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="batch 1 holds only text-only samples, but quant.vision=true"):
        calibrate_cli(out, "--data.path", str(_mixed_jsonl(tmp_path)), "--data.num_samples", "6",
                      "--data.batch_size", "2", "--quant.vision", "true", "--quant.group_size", "32")  # fmt: skip
    assert leftovers(out) == []
