"""The scenes task (splits, balance, determinism), its fast encoder, and the embedded model trained on it."""

import collections
import hashlib

import numpy as np
import pytest
import torch

from lightning_tlq.config import DataArgs
from lightning_tlq.data import Sample, encode_sample
from lightning_tlq.datamodule import load_samples
from lightning_tlq.models.embedded import SCENES_MODEL, embedded_path
from lightning_tlq.models.scenes import FastEncoder, build_scenes_processor, model_task, pixel_values
from lightning_tlq.tasks import font, scenes


def _content(e):
    return hashlib.sha256(e.image.tobytes() + f"{e.question}|{e.answer}".encode()).hexdigest()


def test_splits_are_disjoint():
    seen = {}
    for split in scenes.SPLITS:
        seen[split] = {_content(e) for e in scenes.take(split, 240, seed=3)}
        assert len(seen[split]) == 240
    assert not (seen["train"] & seen["test"])
    assert not (seen["train"] & seen["validation"])
    assert not (seen["validation"] & seen["test"])


def test_streams_are_deterministic_and_seeds_differ():
    a, b = scenes.take("train", 30, seed=1), scenes.take("train", 30, seed=1)
    assert [_content(x) for x in a] == [_content(x) for x in b]
    assert {_content(x) for x in a}.isdisjoint(_content(x) for x in scenes.take("train", 30, seed=2))


def test_rendering_is_frozen():
    """The shipped model was trained on these exact pixels: a renderer change must be deliberate."""
    digest = hashlib.sha256(b"".join(e.image.tobytes() for e in scenes.take("test", 12))).hexdigest()
    assert digest == "958234ed90dcbf4ce92ba533e01636444968f50748b6278da1fe516256d60bc4"


def _chi2(counts):
    expected = sum(counts.values()) / len(counts)
    return sum((c - expected) ** 2 / expected for c in counts.values())


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_answers_are_balanced(kind):
    """Uniform answers (chi-square far below the 1e-4 critical value; ``read``: uniform characters)."""
    answers = collections.Counter(e.answer for e in scenes.take("validation", 600, kinds=[kind]))
    if kind == "read":
        answers = collections.Counter(c for a in answers.elements() for c in a.split())
        assert set(answers) == set(font.CHARACTERS)
    else:
        assert len(answers) == {"sum": 19, "count": 6, "compare": 2, "position": 4, "color": 6}[kind]
    critical = {1: 15.1, 3: 21.1, 5: 25.7, 18: 45.3, 19: 46.8}[len(answers) - 1]
    assert _chi2(answers) < critical, answers


def test_every_word_is_in_the_vocabulary_and_glyphs_differ():
    vocab = set(build_scenes_processor().tokenizer.get_vocab())
    for e in scenes.take("train", 120):
        assert set(e.question.split()) | set(e.answer.split()) <= vocab
    masks = [font.GLYPHS[c].tobytes() for c in font.CHARACTERS]
    assert len(set(masks)) == len(masks)
    with pytest.raises(ValueError, match="no glyph"):
        font.text_mask("z")


def test_bad_split_or_kind_is_refused():
    with pytest.raises(ValueError, match="split='dev'"):
        next(scenes.examples("dev"))
    with pytest.raises(ValueError, match="Unknown scenes kinds"):
        next(scenes.examples("train", kinds=["colour"]))
    with pytest.raises(ValueError, match="data.split"):
        DataArgs(split="train")


def test_fast_encoder_equals_the_processor_path():
    processor = build_scenes_processor()
    encoder = FastEncoder(processor.tokenizer)
    examples = scenes.take("train", 24)
    batch = encoder.batch(examples)
    for i, e in enumerate(examples):
        ref = encode_sample(processor, Sample(e.pil(), e.question, e.answer, e.kind))
        n = ref["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, :n], ref["input_ids"][0])
        assert torch.equal(batch["labels"][i, :n], ref["labels"][0])
        assert not batch["attention_mask"][i, n:].any()
        torch.testing.assert_close(pixel_values(batch["images"][i : i + 1]), ref["pixel_values"], atol=1e-6, rtol=0)


def test_load_samples_draws_the_requested_split():
    data = DataArgs(num_samples=6, seed=4)
    calib = load_samples(data, task="scenes")
    assert [s.question for s in calib] == [e.question for e in scenes.take("train", 6, seed=4)]
    test = load_samples(DataArgs(num_samples=6, seed=4, split="test"), task="scenes")
    assert [np.asarray(s.image).tobytes() for s in test] == [e.image.tobytes() for e in scenes.take("test", 6, seed=4)]
    assert load_samples(data, task="scenes", default_split="test")[0].question == test[0].question


@torch.no_grad()
def test_embedded_model_answers_the_validation_split():
    """The shipped checkpoint loads offline and answers held-out questions (teacher-forced exact match)."""
    from lightning_tlq.models.tiny import resolve_model

    model, processor = resolve_model(SCENES_MODEL)
    assert model_task(model.config) == "scenes"
    assert embedded_path(SCENES_MODEL).endswith("scenes-llava")
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 20e6 * 2  # fp32 in memory, bf16 on disk
    encoder = FastEncoder(processor.tokenizer)
    batch = encoder.batch(scenes.take("validation", 120))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=pixel_values(batch["images"])).logits  # fmt: skip
    labels = batch["labels"][:, 1:]
    correct = ((logits[:, :-1].argmax(-1) == labels) | (labels == -100)).all(1)
    assert correct.float().mean() >= 0.95
