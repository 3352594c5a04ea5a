"""Errors as the command line prints them: one message naming the file and the fix, the traceback in a log file;
weight files checked before loading (truncated shards named, pickles refused unless allowed)."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_tlq.cli import main
from lightning_tlq.data import load_jsonl
from lightning_tlq.errors import WeightFileError, check_weight_files, error_message
from lightning_tlq.models import save_tiny_vlm


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny") / "model", family="llava")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _cli_error(capsys, monkeypatch, tmp_path, *args):
    monkeypatch.setenv("TLQ_LOG_DIR", str(tmp_path / "logs"))
    with pytest.raises(SystemExit) as exit_:
        main(list(args), report_errors=True)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("traceback: ")
    assert "Traceback" in Path(lines[-1].split()[1]).read_text()
    return lines[-2]


def test_a_whole_checkpoint_passes(tiny_dir):
    check_weight_files(tiny_dir)
    check_weight_files("tiny-llava")  # a built-in name: nothing to check


def test_truncated_shard_is_named_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    broken = _copy(tiny_dir, tmp_path / "broken")
    shard = broken / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(WeightFileError, match=rf"{re.escape(str(shard))}.*truncated: 1000 bytes missing"):
        check_weight_files(broken)
    line = _cli_error(capsys, monkeypatch, tmp_path, "calibrate", "--model.model_name_or_path", str(broken))
    assert str(shard) in line
    assert "copy or download the model again" in line.lower()
    assert not (tmp_path / "tlq_out").exists()


def test_damaged_header_is_named(tiny_dir, tmp_path):
    broken = _copy(tiny_dir, tmp_path / "broken")
    shard = broken / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=r"model.safetensors cannot be loaded: its header is not valid JSON"):
        check_weight_files(broken)


def test_pickle_weights_are_refused_unless_allowed(tiny_dir, tmp_path, capsys, monkeypatch):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    with pytest.raises(WeightFileError, match=r"pytorch_model.bin.*--model.allow_pickle true"):
        check_weight_files(pickled)
    check_weight_files(pickled, allow_pickle=True)
    line = _cli_error(capsys, monkeypatch, tmp_path, "evaluate", "--model.model_name_or_path", str(pickled))
    assert "allow_pickle" in line
    assert "weights_only" not in line


def test_unpickling_errors_give_no_unsafe_advice():
    err = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only=False` will ...")
    message = error_message(err)
    assert "weights_only" not in message
    assert "safetensors" in message


def test_messages_name_flags_not_fields():
    message = error_message(ValueError("quant.damp=0.0 is out of range; data.num_samples=0 must be >= 1 (data.jsonl)"))
    assert message == "--quant.damp 0.0 is out of range; --data.num_samples 0 must be >= 1 (data.jsonl)"


def test_jsonl_parse_error_reads_cleanly(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.png", "question": "unterminated')
    with pytest.raises(ValueError, match=r"data.jsonl:1: invalid JSON at column \d+: Unterminated string\.$") as info:
        load_jsonl(path)
    assert "at at" not in str(info.value)


def test_long_question_is_cut_in_the_message(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    question = "what " * 20_000  # 100 kB, far beyond the tiny model's 512 positions
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "img.png", "question": question, "answer": "red"}))
    line = _cli_error(capsys, monkeypatch, tmp_path, "calibrate", "--model.model_name_or_path", "tiny-llava",
                      "--data.path", str(tmp_path / "data.jsonl"), "--trainer.accelerator", "cpu")  # fmt: skip
    assert "tokens exceed the limit of 512" in line
    assert "(100000 characters)" in line
    assert len(line) < 400
