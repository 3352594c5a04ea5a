"""The hard scenes task (splits, balance, frozen rendering) and its benchmark models' fast encoder."""

import collections
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tlq.config import DataArgs
from lightning_tlq.data import Sample, collate, encode_sample
from lightning_tlq.datamodule import load_samples
from lightning_tlq.models import scenes_hard as models
from lightning_tlq.tasks import font, scenes_hard


def _content(e):
    return hashlib.sha256(e.image.tobytes() + f"{e.question}|{e.answer}".encode()).hexdigest()


def test_splits_are_disjoint_and_streams_deterministic():
    seen = {split: {_content(e) for e in scenes_hard.take(split, 80, seed=3)} for split in scenes_hard.SPLITS}
    assert all(len(v) == 80 for v in seen.values())
    assert not (seen["train"] & seen["test"])
    assert not (seen["train"] & seen["validation"])
    assert not (seen["validation"] & seen["test"])
    assert [_content(e) for e in scenes_hard.take("test", 80, seed=3)] == [
        _content(e) for e in scenes_hard.take("test", 80, seed=3)
    ]


def test_rendering_is_frozen():
    """The benchmark models are trained on these exact pixels and questions: a change must be deliberate."""
    ex = scenes_hard.take("test", 15)
    digest = hashlib.sha256(b"".join(e.image.tobytes() + f"{e.question}|{e.answer}".encode() for e in ex))
    assert digest.hexdigest() == "07daadcf43e807937fc014bd010717b7a5253507afddb060c1ebbd798440aa35"


def _chi2(counts):
    expected = sum(counts.values()) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts.values())


@pytest.mark.parametrize(
    ("kind", "values", "lengths"),
    [("read", font.CHARACTERS, range(6, 11)), ("colors", tuple(scenes_hard.COLORS), range(3, 7)),
     ("count", tuple(str(n) for n in range(1, 13)), None), ("relation", None, [2]), ("add", None, [2, 3])],
)  # fmt: skip
def test_answers_are_balanced_and_multi_token(kind, values, lengths):
    answers = [e.answer for e in scenes_hard.take("validation", 240, kinds=[kind])]
    if lengths is not None:
        assert {len(a.split()) for a in answers} == set(lengths)
    if kind == "relation":
        counts = collections.Counter(answers)
        assert len(counts) == 4
        assert _chi2(counts) < 21.1
    elif kind == "count":
        counts = collections.Counter(answers)
        assert set(counts) == {" ".join(v) for v in values}
        assert _chi2(counts) < 37.3
    elif values is not None:  # every token uniform over its alphabet
        counts = collections.Counter(w for a in answers for w in a.split())
        assert set(counts) == set(values)
        assert _chi2(counts) < {7: 29.9, 19: 46.8}[len(values) - 1]


@pytest.mark.parametrize("family", models.FAMILIES)
def test_fast_encoder_equals_the_processor_path(family):
    model, processor = models.build_hard_model(family, models.SMOKE_SHAPE)
    encoder = models.HardEncoder(processor, family)
    examples = scenes_hard.take("train", 5)
    batch = encoder.batch(examples)
    fast = encoder.model_inputs(batch)
    ref = collate([encode_sample(processor, Sample(e.pil(), e.question, e.answer, e.kind)) for e in examples],
                  encoder.pad)  # fmt: skip
    assert set(ref) == {*fast, "labels"}
    assert torch.equal(batch["labels"], ref["labels"])
    for key, value in fast.items():
        torch.testing.assert_close(value, ref[key].to(value.dtype), atol=1e-6, rtol=0)
    assert int((fast["input_ids"][0] == encoder.image_token).sum()) == models.IMAGE_TOKENS
    items = encoder.items(examples)
    for item, e in zip(items, examples):
        one = encode_sample(processor, Sample(e.pil(), e.question, e.answer, e.kind))
        assert set(item) == set(one)
        for key, value in item.items():
            torch.testing.assert_close(value, one[key].to(value.dtype), atol=1e-6, rtol=0)
    assert torch.isfinite(model(**fast, labels=batch["labels"], use_cache=False).loss)


def test_load_samples_draws_the_hard_task_and_shapes_are_checked():
    test = load_samples(DataArgs(num_samples=4, seed=2, split="test"), task="scenes_hard")
    assert [np.asarray(s.image).tobytes() for s in test] == [e.image.tobytes() for e in scenes_hard.take("test", 4, 2)]
    with pytest.raises(ValueError, match="head dim 64"):
        models.HardModelShape(hidden_size=512, num_attention_heads=4)
    with pytest.raises(ValueError, match="choose one of llava, qwen2_vl"):
        models.build_hard_processor("gemma3")


def test_qwen_training_speedups_give_the_stock_logits():
    """Batched vision attention and shared rope positions (examples/qwen_training.py) change no real token's logit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from qwen_training import batch_vision_attention, shared_positions

    torch.manual_seed(0)
    model, processor = models.build_hard_model("qwen2_vl", models.SMOKE_SHAPE)
    encoder = models.HardEncoder(processor, "qwen2_vl")
    batch = encoder.batch(scenes_hard.take("train", 6))
    inputs = encoder.model_inputs(batch)
    real = batch["attention_mask"].bool()
    assert len(set(real.sum(1).tolist())) > 1  # rows of different lengths: the shared positions are exercised
    with torch.no_grad():
        stock = model(**inputs, use_cache=False).logits[real]
        shared = model(**inputs, position_ids=shared_positions(model, inputs), use_cache=False).logits[real]
        assert batch_vision_attention(model, (scenes_hard.IMAGE_SIZE // 4) ** 2) == models.SMOKE_SHAPE.vision_layers
        fast = model(**inputs, position_ids=shared_positions(model, inputs), use_cache=False).logits[real]
    assert torch.equal(shared, stock)
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)  # one attention call per batch, not per image


@pytest.mark.parametrize(("kind", "levels"), [("shades", scenes_hard.SHADES), ("fine_shades", scenes_hard.FINE_SHADES)])
def test_shades_answers_are_balanced_and_drawn_in_their_shade(kind, levels):
    examples = scenes_hard.take("validation", 240, kinds=[kind])
    answers = [e.answer.split() for e in examples]
    assert {len(a) for a in answers} == {6, 8, 10}  # 3-5 objects, colour and shade each
    colors = collections.Counter(w for a in answers for w in a[0::2])
    shades = collections.Counter(w for a in answers for w in a[1::2])
    assert set(colors) == set(scenes_hard.COLORS)
    assert set(shades) == set(levels)
    assert _chi2(colors) < 29.9
    assert _chi2(shades) < {3: 13.8, 4: 16.3}[len(levels)]
    for e, words in zip(examples, answers):
        drawn = {tuple(p) for p in e.image.reshape(-1, 3).tolist()}
        named = [f"{c}@{levels[s]}" for c, s in zip(words[0::2], words[1::2])]
        assert {scenes_hard.rgb(n) for n in named} == drawn - {scenes_hard.BACKGROUND}
    assert scenes_hard.rgb("red 2") == tuple(round(v * 0.85) for v in scenes_hard.COLORS["red"])
    assert scenes_hard.rgb("red") == scenes_hard.rgb("red 1") == scenes_hard.rgb("red@1.0") == scenes_hard.COLORS["red"]
    assert scenes_hard.rgb("red@0.94") == tuple(round(v * 0.94) for v in scenes_hard.COLORS["red"])
    assert not ({w for a in answers for w in a} - set(scenes_hard.WORDS))  # no new words: same vocabulary


def test_the_fine_variant_is_named_in_the_config_and_drawn_by_calibration():
    processor = models.build_hard_processor("llava")
    config = models.build_hard_config("llava", processor, models.SMOKE_SHAPE, task="scenes_fine")
    assert config.tlq_task == "scenes_fine"
    samples = load_samples(DataArgs(num_samples=8, seed=1, split="calibration"), task="scenes_fine")
    expected = scenes_hard.take("train", 8, seed=1, kinds=scenes_hard.FINE_KINDS)
    assert [s.kind for s in samples] == [e.kind for e in expected] == [*scenes_hard.FINE_KINDS] * 2
    assert [np.asarray(s.image).tobytes() for s in samples] == [e.image.tobytes() for e in expected]
    assert load_samples(DataArgs(num_samples=4, split="test"), task="scenes_finer")[0].kind == "fine_shades"
    with pytest.raises(ValueError, match="choose one of scenes_hard, scenes_fine, scenes_finer"):
        models.build_hard_config("llava", processor, models.SMOKE_SHAPE, task="scenes_easy")
