"""Tests for samples, JSONL loading, encoding, collation and token masks."""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from lightning_tlq.data import (
    IGNORE_INDEX,
    SYNTHETIC_WORDS,
    Sample,
    collate,
    encode_sample,
    load_jsonl,
    make_batches,
    synthetic_samples,
    token_masks,
)
from lightning_tlq.models import build_tiny_vlm
from lightning_tlq.tasks.shapes import KINDS

FAMILIES = ["llava", "qwen2_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    """(model, processor) of one tiny family, shared across the module's tests."""
    return build_tiny_vlm(request.param)


def _samples_of_different_lengths() -> list[Sample]:
    image = synthetic_samples(1)[0].image
    return [
        Sample(image, "what color is the square ?", "red", "color"),
        Sample(image, "what shape is in the image ?", "circle", "shape"),
        Sample(image, "is there a red square in the image ?", "yes no", "exists"),
    ]


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_samples_are_deterministic():
    a, b = synthetic_samples(12, seed=5), synthetic_samples(12, seed=5)
    assert [(s.question, s.answer, s.kind) for s in a] == [(s.question, s.answer, s.kind) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    prefix = synthetic_samples(4, seed=5)
    assert all(x.image.tobytes() == y.image.tobytes() and x.question == y.question for x, y in zip(prefix, a))
    other = synthetic_samples(12, seed=6)
    assert [s.image.tobytes() for s in other] != [s.image.tobytes() for s in a]


def test_synthetic_samples_content():
    samples = synthetic_samples(25, seed=0)
    assert {s.kind for s in samples} == set(KINDS)
    for sample in samples:
        assert sample.image.size == (32, 32)
        assert sample.image.mode == "RGB"
        words = re.findall(r"\w+|[^\w\s]+", f"{sample.question} {sample.answer}")
        assert set(words) <= set(SYNTHETIC_WORDS), sample
    assert synthetic_samples(0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthetic_samples(-1)


# --------------------------------------------------------------------------------------------- encoding


def test_encode_sample_labels_cover_exactly_the_answer(tiny):
    model, processor = tiny
    tokenizer = processor.tokenizer
    for sample in synthetic_samples(5):
        encoded = encode_sample(processor, sample)
        labels, ids = encoded["labels"][0], encoded["input_ids"][0]
        answer = (labels != IGNORE_INDEX).nonzero().flatten()
        assert answer.tolist() == list(range(int(answer[0]), ids.numel())), "answer must be a contiguous suffix"
        assert torch.equal(labels[answer], ids[answer])
        expected = tokenizer(sample.answer + tokenizer.eos_token, add_special_tokens=False).input_ids
        assert labels[answer].tolist() == expected
        assert tokenizer.decode(labels[answer]) == f"{sample.answer} {tokenizer.eos_token}"
        assert int((ids == model.config.image_token_id).sum()) == 16
        assert tokenizer.unk_token_id not in ids.tolist()


def test_encode_sample_keys(tiny):
    model, processor = tiny
    encoded = encode_sample(processor, synthetic_samples(1)[0])
    if model.config.model_type == "llava":
        assert set(encoded) == {"input_ids", "attention_mask", "pixel_values", "labels"}
        assert encoded["pixel_values"].shape == (1, 3, 32, 32)
    else:
        assert set(encoded) == {"input_ids", "attention_mask", "pixel_values", "labels", "image_grid_thw"} | {
            "mm_token_type_ids"
        }
        assert encoded["image_grid_thw"].tolist() == [[1, 8, 8]]
        assert encoded["pixel_values"].shape == (64, 96)
        image = encoded["input_ids"] == model.config.image_token_id
        assert torch.equal(encoded["mm_token_type_ids"].bool(), image)
    assert all(v.shape[0] == 1 for k, v in encoded.items() if k != "pixel_values")


def test_encode_sample_without_chat_template_uses_plain_prompt():
    _, processor = build_tiny_vlm("llava")
    processor.chat_template = None
    sample = synthetic_samples(1)[0]
    encoded = encode_sample(processor, sample)
    labels = encoded["labels"][0]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == f"{sample.answer} {tokenizer.eos_token}"


def test_encode_sample_rejects_too_long_and_empty_answers(tiny):
    _, processor = tiny
    sample = synthetic_samples(1)[0]
    length = encode_sample(processor, sample)["input_ids"].shape[1]
    assert encode_sample(processor, sample, max_length=length)["input_ids"].shape[1] == length
    with pytest.raises(ValueError, match=rf"exceed the limit of {length - 3} by 3"):
        encode_sample(processor, sample, max_length=length - 3, name="sample #7")
    with pytest.raises(ValueError, match="sample #7"):
        encode_sample(processor, sample, max_length=length - 3, name="sample #7")
    long = Sample(sample.image, " ".join(["red"] * 600), "red")
    with pytest.raises(ValueError, match="exceed the limit of 512"):
        encode_sample(processor, long)
    with pytest.raises(ValueError, match="answer is empty"):
        encode_sample(processor, Sample(sample.image, sample.question, "  "))


# --------------------------------------------------------------------------------------------- batching


def test_padded_batch_matches_single_samples(tiny):
    model, processor = tiny
    pad_id = processor.tokenizer.pad_token_id
    encoded = [encode_sample(processor, s) for s in _samples_of_different_lengths()]
    lengths = [e["input_ids"].shape[1] for e in encoded]
    assert len(set(lengths)) == 3
    batch = collate(encoded, pad_id)
    assert batch["input_ids"].shape == (3, max(lengths))
    with torch.no_grad():
        batched = model(**batch, use_cache=False).logits
        for i, item in enumerate(encoded):
            alone = model(**item, use_cache=False).logits[0]
            torch.testing.assert_close(batched[i, : lengths[i]], alone, atol=1e-4, rtol=0)


def test_collate_padding_values(tiny):
    _, processor = tiny
    pad_id = processor.tokenizer.pad_token_id
    encoded = [encode_sample(processor, s) for s in _samples_of_different_lengths()]
    batch = collate(encoded, pad_id)
    short = min(range(3), key=lambda i: encoded[i]["input_ids"].shape[1])
    n = encoded[short]["input_ids"].shape[1]
    assert (batch["input_ids"][short, n:] == pad_id).all()
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    if "mm_token_type_ids" in batch:
        assert (batch["mm_token_type_ids"][short, n:] == 0).all()
        assert batch["image_grid_thw"].shape == (3, 3)
    assert batch["pixel_values"].shape[0] == sum(e["pixel_values"].shape[0] for e in encoded)


def test_collate_left_pads_for_generation(tiny):
    _, processor = tiny
    pad_id = processor.tokenizer.pad_token_id
    encoded = [encode_sample(processor, s) for s in _samples_of_different_lengths()]
    right, left = collate(encoded, pad_id), collate(encoded, pad_id, padding_side="left")
    for i, item in enumerate(encoded):
        n = item["input_ids"].shape[1]
        width = right["input_ids"].shape[1]
        for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
            if key in item:
                assert torch.equal(left[key][i, width - n :], item[key][0]), key
                assert torch.equal(left[key][i, : width - n], right[key][i, n:]), key  # same pad values
    assert torch.equal(left["pixel_values"], right["pixel_values"])
    with pytest.raises(ValueError, match="padding_side='middle'"):
        collate(encoded, pad_id, padding_side="middle")


def test_collate_rejects_mismatched_keys(tiny):
    _, processor = tiny
    a, b = (encode_sample(processor, s) for s in synthetic_samples(2))
    del b["labels"]
    with pytest.raises(ValueError, match="Sample 1 has keys"):
        collate([a, b], 0)
    with pytest.raises(ValueError, match="no samples"):
        collate([], 0)


def test_make_batches_keeps_order(tiny):
    _, processor = tiny
    pad_id = processor.tokenizer.pad_token_id
    encoded = [encode_sample(processor, s) for s in synthetic_samples(5)]
    batches = make_batches(encoded, 2, pad_id)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    for batch, start in zip(batches, (0, 2, 4)):
        expected = collate(encoded[start : start + 2], pad_id)
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(encoded, 0, pad_id)


def test_token_masks(tiny):
    model, processor = tiny
    encoded = [encode_sample(processor, s) for s in _samples_of_different_lengths()]
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    masks = token_masks(batch, model.config.image_token_id)
    lengths = torch.tensor([e["input_ids"].shape[1] for e in encoded])
    assert masks.image.sum(1).tolist() == [16, 16, 16]
    assert masks.pad.sum(1).tolist() == (lengths.max() - lengths).tolist()
    assert masks.answer.sum(1).tolist() == [2, 2, 3]  # answer words + eos
    assert torch.equal(masks.text, ~masks.pad & ~masks.image)
    assert not (masks.image & masks.text).any()
    assert not (masks.answer & ~masks.text).any()
    assert torch.equal(masks.image | masks.text | masks.pad, torch.ones_like(masks.pad))


# --------------------------------------------------------------------------------------------- JSONL


def _png(path, color=(200, 10, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


def _write_jsonl(path, lines: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_resolves_paths(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png", (0, 0, 255))
    Image.new("L", (8, 8), 50).save(tmp_path / "imgs" / "gray.png")
    rows = [
        {"image": "imgs/a.png", "question": "q1", "answer": "red", "kind": "color"},
        {"image": absolute, "question": "q2", "answer": "blue"},
        {"image": "imgs/gray.png", "question": "q3", "answer": "gray"},
    ]
    path = _write_jsonl(tmp_path / "data.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps(rows[2])])
    samples = load_jsonl(path)
    assert [(s.question, s.answer, s.kind) for s in samples] == [
        ("q1", "red", "color"),
        ("q2", "blue", ""),
        ("q3", "gray", ""),
    ]
    assert all(s.image.mode == "RGB" for s in samples)
    assert samples[0].image.getpixel((0, 0)) == (200, 10, 10)

    root_rows = [{"image": "a.png", "question": "q", "answer": "a"}]
    other = _write_jsonl(tmp_path / "sub" / "d.jsonl", [json.dumps(r) for r in root_rows])
    assert len(load_jsonl(other, image_root=tmp_path / "imgs")) == 1


@pytest.mark.parametrize(
    ("lines", "error", "pattern"),
    [
        (['{"image": "a.png", "question": "q", "answer": "a"}', "{not json"], ValueError, r"d\.jsonl:2: invalid JSON"),
        (['{"image": "a.png", "answer": "a"}'], ValueError, r"d\.jsonl:1: missing key 'question'"),
        (
            ['{"image": "a.png", "question": "q", "answer": ""}'],
            ValueError,
            r"d\.jsonl:1: 'answer' must be a non-empty",
        ),
        (['["a.png", "q", "a"]'], ValueError, r"d\.jsonl:1: expected a JSON object"),
        (
            ['{"image": "nope.png", "question": "q", "answer": "a"}'],
            FileNotFoundError,
            r"d\.jsonl:1: image file .*nope",
        ),
        (['{"image": "bad.png", "question": "q", "answer": "a"}'], ValueError, r"d\.jsonl:1: cannot read image .*bad"),
        (["", "   "], ValueError, r"d\.jsonl contains no samples"),
    ],
)
def test_load_jsonl_failures(tmp_path, lines, error, pattern):
    _png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    path = _write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(error, match=pattern):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Dataset file .*missing\.jsonl does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
