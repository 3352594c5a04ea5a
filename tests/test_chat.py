"""Chat-format samples with the tiny models' real processors: parsing, encoding (one turn equals the
``{image, question, answer}`` encoding), multi-turn / multi-image / text-only masks, batches, and bad input."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from lightning_tlq.chat import ChatSample, encode_chat, one_turn, parse_conversations, parse_messages
from lightning_tlq.config import DataArgs
from lightning_tlq.data import IGNORE_INDEX, collate, encode_sample, load_jsonl, synthetic_samples
from lightning_tlq.datamodule import load_samples
from lightning_tlq.models import build_tiny_vlm
from lightning_tlq.preflight import load_processor_for


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request):
    return build_tiny_vlm(request.param)


def _no_load(source):
    raise AssertionError("no inline image expected")


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _supervised(processor, encoded):
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    return processor.tokenizer.convert_ids_to_tokens(ids[labels != IGNORE_INDEX].tolist())


def test_one_turn_chat_encodes_like_the_question_answer_sample(tiny):
    _, processor = tiny
    for s in synthetic_samples(5):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]},
            {"role": "assistant", "content": s.answer},
        ]
        conversations = [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]
        legacy = encode_sample(processor, s)
        _equal(encode_sample(processor, parse_messages(messages, [s.image], "m", _no_load)), legacy)
        _equal(encode_sample(processor, parse_conversations(conversations, [s.image], "c")), legacy)


def test_embedded_model_one_turn_chat_encodes_like_the_question_answer_sample():
    processor = load_processor_for("scenes-llava")
    s = synthetic_samples(1)[0]
    _equal(encode_sample(processor, one_turn(s.image, s.question, s.answer)), encode_sample(processor, s))


def test_multi_turn_multi_image_supervises_every_assistant_turn(tiny):
    _, processor = tiny
    a, b = synthetic_samples(2)
    conversations = [
        {"from": "system", "value": "what is the image ?"},
        {"from": "human", "value": "<image>\nwhat color is the square ?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and here <image> how many ?"},
        {"from": "gpt", "value": "two three"},
    ]
    sample = parse_conversations(conversations, [a.image, b.image], "c")
    assert sample.messages[3]["content"] == [
        {"type": "text", "text": "and here"},
        {"type": "image"},
        {"type": "text", "text": "how many ?"},
    ]
    encoded = encode_chat(processor, sample)
    assert _supervised(processor, encoded) == ["red", "</s>", "two", "three", "</s>"]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert int((encoded["input_ids"] == image_token).sum()) == 32  # 16 per image
    single = encode_sample(processor, a)
    assert encoded["pixel_values"].shape[0] == 2 * single["pixel_values"].shape[0]


def test_text_only_samples_batch_with_image_samples(tiny):
    model, processor = tiny
    image_sample = synthetic_samples(1)[0]
    text = parse_messages(
        [{"role": "user", "content": "what color ?"}, {"role": "assistant", "content": "red"}], [], "t", _no_load
    )
    encoded = [encode_sample(processor, text), encode_sample(processor, image_sample)]
    assert "pixel_values" not in encoded[0]
    assert _supervised(processor, encoded[0]) == ["red", "</s>"]
    batch = collate(encoded, processor.tokenizer.pad_token_id)
    with_image = collate(encoded[1:], processor.tokenizer.pad_token_id)
    assert torch.equal(batch["pixel_values"], with_image["pixel_values"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        alone = model(**{k: v for k, v in with_image.items() if k != "labels"}, use_cache=False).logits
    n = with_image["input_ids"].shape[1]
    torch.testing.assert_close(logits[1, :n], alone[0])  # the image sample is unchanged by its text-only neighbour


def test_jsonl_chat_records_with_inline_and_listed_images(tmp_path):
    a, b = synthetic_samples(2)
    a.image.save(tmp_path / "a.png")
    b.image.save(tmp_path / "b.png")
    records = [
        {"image": "a.png", "question": a.question, "answer": a.answer},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "b.png"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            ],
            "images": ["a.png"],
            "kind": "pair",
        },
        {
            "conversations": [{"from": "human", "value": "<image> what ?"}, {"from": "gpt", "value": "red"}],
            "image": "a.png",
        },
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = load_jsonl(tmp_path / "d.jsonl")
    assert [type(s).__name__ for s in samples] == ["Sample", "ChatSample", "ChatSample"]
    pair = samples[1]
    assert pair.kind == "pair"
    assert [im.tobytes() for im in pair.images] == [b.image.tobytes(), a.image.tobytes()]  # inline first, in order


@pytest.mark.parametrize(
    ("turns", "images", "match"),
    [
        ([{"from": "human", "value": "<image> <image> what ?"}, {"from": "gpt", "value": "red"}], 1,
         r"c: 2 <image> marker\(s\) but 1 image\(s\) given \(more <image> marker\(s\) than images\)"),
        ([{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}], 1,
         r"c: 0 <image> marker\(s\) but 1 image\(s\) given \(fewer"),
        ([{"from": "bot", "value": "what ?"}, {"from": "gpt", "value": "red"}], 0,
         r"c: conversation turn 0 has from='bot'; use one of human, user, gpt, assistant, system"),
        ([{"from": "human", "value": "what ?"}], 0, "c: the conversation has no assistant turn"),
        ([{"from": "human", "value": "what ?"}, {"from": "gpt", "value": " "}], 0, "c: an assistant turn is empty"),
    ],
)  # fmt: skip
def test_bad_conversations(turns, images, match):
    image = synthetic_samples(1)[0].image
    with pytest.raises(ValueError, match=match):
        parse_conversations(turns, [image] * images, "c")


@pytest.mark.parametrize(
    ("turns", "images", "match"),
    [
        ([{"role": "bot", "content": "x"}], 0, "m: message 0 has role 'bot'; roles must be one of system, user, "),
        ([{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "red"}], 2,
         r"m: 1 image part\(s\) but 2 image\(s\) given \(fewer image part"),
        ([{"role": "user", "content": [{"type": "video"}]}], 0, "m: unsupported content part"),
    ],
)  # fmt: skip
def test_bad_messages(turns, images, match):
    image = synthetic_samples(1)[0].image
    with pytest.raises(ValueError, match=match):
        parse_messages(turns, [image] * images, "m", _no_load)


def test_model_without_chat_template_needs_data_chat_template(tmp_path, tiny):
    _, processor = tiny
    s = synthetic_samples(1)[0]
    template, processor.chat_template = processor.chat_template, None
    try:
        with pytest.raises(ValueError, match="has no chat template.*--data.chat_template file.jinja"):
            encode_sample(processor, one_turn(s.image, s.question, s.answer), name="sample 0")
        (tmp_path / "t.jinja").write_text(template)
        (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png", "question": s.question, "answer": s.answer}))
        s.image.save(tmp_path / "a.png")
        data = DataArgs(path=str(tmp_path / "d.jsonl"), chat_template=str(tmp_path / "t.jinja"))
        (chat,) = load_samples(data)
        assert isinstance(chat, ChatSample)
        assert chat.chat_template == template
        encoded = encode_sample(processor, chat)
    finally:
        processor.chat_template = template
    _equal(encoded, encode_sample(processor, s))
