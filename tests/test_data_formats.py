"""Every data format calibrates to the same codes as the equivalent ``{image, question, answer}`` JSONL (the tiny
templates render a one-turn chat exactly like the question-answer encoding): messages JSONL, conversations JSONL,
a ``save_to_disk`` dataset, parquet and JSON through ``datasets``; and bad data input fails in one line, before
the weights load, leaving nothing behind."""

from __future__ import annotations

import json
import random
import shutil
import sys

import datasets
import pytest
import torch
from conftest import leftovers
from safetensors.torch import load_file

from lightning_tlq.cli import main
from lightning_tlq.config import DataArgs
from lightning_tlq.data import synthetic_samples
from lightning_tlq.datamodule import encode_samples, load_samples
from lightning_tlq.models.tiny import build_processor
from lightning_tlq.module import TLQModule
from lightning_tlq.preflight import load_processor_for

N = 8


def _messages(s, image=None):
    first = [{"type": "image", "image": image} if image else {"type": "image"}, {"type": "text", "text": s.question}]
    return [{"role": "user", "content": first}, {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}]


def _conversations(s):
    return [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 8 samples in every format (name -> flags)."""
    root = tmp_path_factory.mktemp("formats")
    cache, datasets.config.HF_DATASETS_CACHE = datasets.config.HF_DATASETS_CACHE, str(root / "hf_cache")
    samples = synthetic_samples(N, seed=3)
    names = [f"img{i}.png" for i in range(N)]
    for s, name in zip(samples, names):
        s.image.save(root / name)
    legacy = [{"image": n, "question": s.question, "answer": s.answer} for s, n in zip(samples, names)]
    _write_jsonl(root / "legacy.jsonl", legacy)
    _write_jsonl(root / "messages.jsonl", [{"messages": _messages(s), "images": [n]} for s, n in zip(samples, names)])
    _write_jsonl(root / "inline.jsonl", [{"messages": _messages(s, n)} for s, n in zip(samples, names)])
    conversations = [{"conversations": _conversations(s), "image": n} for s, n in zip(samples, names)]
    _write_jsonl(root / "conversations.jsonl", conversations)
    images = [s.image for s in samples]
    table = {"conversations": [_conversations(s) for s in samples], "image": images}
    datasets.Dataset.from_dict(table).cast_column("image", datasets.Image()).save_to_disk(str(root / "saved"))
    table = {"messages": [_messages(s) for s in samples], "images": [[im] for im in images]}
    features = datasets.Features({"messages": datasets.Dataset.from_dict(table).features["messages"],
                                  "images": datasets.List(datasets.Image())})  # fmt: skip
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(root / "messages.parquet"))
    yield {
        "legacy": ["--data.path", str(root / "legacy.jsonl")],
        "messages_jsonl": ["--data.path", str(root / "messages.jsonl")],
        "inline_jsonl": ["--data.path", str(root / "inline.jsonl")],
        "conversations_jsonl": ["--data.path", str(root / "conversations.jsonl")],
        "save_to_disk": ["--data.dataset", str(root / "saved")],
        "parquet": ["--data.dataset", str(root / "messages.parquet"), "--data.split", "train"],
        "json_conversations": ["--data.dataset", str(root / "conversations.jsonl")],
        "json_question_answer": ["--data.dataset", str(root / "legacy.jsonl")],
    }
    datasets.config.HF_DATASETS_CACHE = cache


def _calibrate(out, method, flags):
    torch.set_num_threads(1)
    main([
        "calibrate", "--model.model_name_or_path", "tiny-llava", "--data.num_samples", str(N),
        "--data.batch_size", "4", "--quant.method", method, "--quant.bits", "3", "--quant.group_size", "64",
        "--trainer.accelerator", "cpu", "--output_dir", str(out), "--quiet", "true", *flags,
    ])  # fmt: skip
    return {**load_file(out / "model.safetensors"), **load_file(out / "tlq_qparams.safetensors")}


@pytest.fixture(scope="module")
def legacy_gptq(sources, tmp_path_factory):
    return _calibrate(tmp_path_factory.mktemp("legacy") / "out", "gptq", sources["legacy"])


FORMATS = ("messages_jsonl", "inline_jsonl", "conversations_jsonl", "save_to_disk", "parquet", "json_conversations",
           "json_question_answer")  # fmt: skip


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2_vl", "scenes-llava"])
def test_every_format_encodes_like_the_question_answer_jsonl(model, sources):
    processor = load_processor_for(model)
    args = {"--data.path": "path", "--data.dataset": "dataset", "--data.split": "split"}

    def encoded(flags):
        data = DataArgs(num_samples=N, **{args[f]: v for f, v in zip(flags[::2], flags[1::2])})
        return encode_samples(processor, load_samples(data), None)

    reference = encoded(sources["legacy"])
    for name in FORMATS:
        for got, want in zip(encoded(sources[name]), reference, strict=True):
            assert got.keys() == want.keys(), name
            assert all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.parametrize("name", ["messages_jsonl", "save_to_disk", "parquet"])
def test_every_format_calibrates_to_the_same_codes(name, sources, legacy_gptq, tmp_path):
    got = _calibrate(tmp_path / "out", "gptq", sources[name])
    assert got.keys() == legacy_gptq.keys()
    assert all(torch.equal(got[k], legacy_gptq[k]) for k in got), name


def test_tlq_on_a_dataset_equals_tlq_on_the_jsonl(sources, tmp_path):
    a = _calibrate(tmp_path / "a", "tlq", sources["legacy"])
    b = _calibrate(tmp_path / "b", "tlq", sources["save_to_disk"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shuffle_takes_a_seeded_permutation(sources):
    order = list(range(N))
    random.Random(5).shuffle(order)
    plain = load_samples(DataArgs(dataset=sources["save_to_disk"][1], num_samples=N))
    shuffled = load_samples(DataArgs(dataset=sources["save_to_disk"][1], num_samples=3, shuffle=True, seed=5))
    assert [s.question for s in shuffled] == [plain[i].question for i in order[:3]]
    jsonl = load_samples(DataArgs(path=sources["legacy"][1], num_samples=3, shuffle=True, seed=5))
    assert [s.question for s in jsonl] == [s.question for s in shuffled]


def test_split_slices(sources, tmp_path):
    saved = datasets.load_from_disk(sources["save_to_disk"][1])
    datasets.DatasetDict({"train": saved, "test": saved.select(range(4, 8))}).save_to_disk(str(tmp_path / "dict"))
    all_rows = load_samples(DataArgs(dataset=sources["save_to_disk"][1], num_samples=N))
    got = load_samples(DataArgs(dataset=str(tmp_path / "dict"), split="test[1:3]", num_samples=N))
    assert [s.question for s in got] == [s.question for s in all_rows[5:7]]
    with pytest.raises(ValueError, match=r"data.split='validation': .* has the splits \['test', 'train'\]"):
        load_samples(DataArgs(dataset=str(tmp_path / "dict"), split="validation"))


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_weights_loaded(monkeypatch):
    def refuse(self):
        raise AssertionError("weights were loaded before the bad input was detected")

    monkeypatch.setattr(TLQModule, "configure_model", refuse)


def _fails(calibrate_cli, out, error, match, *flags):
    with pytest.raises(error, match=match):
        calibrate_cli(out, *flags)
    assert leftovers(out) == [], "a failed run must leave nothing behind"


def test_dataset_column_that_does_not_exist(sources, tmp_path, calibrate_cli, no_weights_loaded):
    _fails(calibrate_cli, tmp_path / "out", ValueError,
           r"data.messages_column='turns' is not a column of the dataset; its columns are \['conversations', 'image'\]",
           *sources["save_to_disk"], "--data.messages_column", "turns")  # fmt: skip


def test_missing_datasets_package(sources, tmp_path, calibrate_cli, no_weights_loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    _fails(calibrate_cli, tmp_path / "out", ImportError,
           r"needs the Hugging Face `datasets` package: pip install 'lightning-tlq\[datasets\]'",
           *sources["save_to_disk"])  # fmt: skip


def test_model_without_chat_template(sources, tmp_path, tiny4_dir, calibrate_cli, no_weights_loaded):
    model = shutil.copytree(tiny4_dir, tmp_path / "model")
    (model / "chat_template.jinja").unlink()
    _fails(calibrate_cli, tmp_path / "out", ValueError,
           r"sample 0 .*has no chat template.*pass one with --data.chat_template file.jinja",
           "--model.model_name_or_path", str(model), *sources["messages_jsonl"])  # fmt: skip


def test_template_rendering_no_assistant_tokens(sources, tmp_path, calibrate_cli, no_weights_loaded):
    template = "{% for p in m['content'] if p['type'] == 'image' %}<image>{% endfor %}"
    template = "{% for m in messages if m['role'] != 'assistant' %}{{ m['role'] }}: " + template + "{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    _fails(calibrate_cli, tmp_path / "out", ValueError, r"sample 0 .*renders no tokens for assistant turn 1",
           *sources["messages_jsonl"], "--data.chat_template", str(tmp_path / "t.jinja"))  # fmt: skip


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"conversations": [{"from": "human", "value": "<image> <image> what ?"}, {"from": "gpt", "value": "red"}],
          "image": "img0.png"}, r"d.jsonl:1: 2 <image> marker\(s\) but 1 image\(s\) given \(more"),
        ({"conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}],
          "image": "img0.png"}, r"d.jsonl:1: 0 <image> marker\(s\) but 1 image\(s\) given \(fewer"),
        ({"conversations": [{"from": "bot", "value": "what ?"}, {"from": "gpt", "value": "red"}]},
         r"d.jsonl:1: conversation turn 0 has from='bot'"),
        ({"messages": [{"role": "model", "content": "red"}]}, r"d.jsonl:1: message 0 has role 'model'"),
    ],
)  # fmt: skip
def test_bad_chat_records(record, match, sources, tmp_path, calibrate_cli, no_weights_loaded):
    data = _write_jsonl(tmp_path / "d.jsonl", [record])
    root = sources["legacy"][1].rsplit("/", 1)[0]
    _fails(calibrate_cli, tmp_path / "out", ValueError, match, "--data.path", str(data), "--data.image_root", root)


def test_datamodule_reads_a_dataset(sources):
    from lightning_tlq.datamodule import CalibrationDataModule

    processor = build_processor("llava")
    module = CalibrationDataModule(dataset=sources["save_to_disk"][1], num_samples=N, batch_size=4)
    module.prepare(processor, processor.tokenizer.pad_token_id)
    reference = encode_samples(processor, load_samples(DataArgs(path=sources["legacy"][1], num_samples=N)), None)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(module.encoded, reference, strict=True) for k in b)
    assert [b["input_ids"].shape[0] for b in module.calibration_dataloader()] == [4, 4]


def test_hub_dataset_not_in_the_cache_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"data.dataset='org/not-cached' is no local file .*HF_HUB_OFFLINE"):
        load_samples(DataArgs(dataset="org/not-cached"))
