"""Progress bars, per-layer log lines and per-layer metrics sent to Lightning loggers."""

import csv
import logging
import re
import sys

import pytest
from conftest import SMALL

from lightning_tlq.cli import main


def test_csv_logger_receives_per_layer_metrics(tmp_path, calibrate_cli):
    logs = tmp_path / "logs"
    report = calibrate_cli(tmp_path / "out", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(logs),
                           "--trainer.logger.name", "tlq")  # fmt: skip
    rows = list(csv.DictReader((logs / "tlq" / "version_0" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row, layer in zip(rows, report["layers"]):
        assert float(row["tlq/layer/weighted_rel_error"]) == pytest.approx(layer["mean_weighted_rel_error"])
        assert float(row["tlq/layer/rel_error"]) == pytest.approx(layer["mean_rel_error"])
        assert float(row["tlq/layer/tokens_kept"]) == layer["tokens_kept"]
        assert float(row["tlq/layer/max_damp"]) == pytest.approx(0.01)
        assert float(row["tlq/layer/seconds"]) > 0
        assert float(row["tlq/layer/memory_gib"]) > 0


def test_log_lines_and_progress_bars(tmp_path, caplog, capsys, monkeypatch):
    flags = [f for f in SMALL if f not in ("--quiet", "true")]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # bars are for terminals
    with caplog.at_level(logging.INFO, logger="lightning_tlq"):
        main(["calibrate", *flags, "--output_dir", str(tmp_path / "out")])
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_tlq.progress"]
    assert len(lines) == 2
    for i, line in enumerate(lines):  # numbered from 0, as in the table and the report
        pattern = (
            rf"layer {i} \({i + 1}/2\): 7 modules, tokens \d+/\d+, weighted err \S+, plain err \S+, max damp 0.01 "
            r"\(0 retries\), \d+\.\d\d s, RSS \d+\.\d\d GiB"
        )
        assert re.fullmatch(pattern, line), line
    captured = capsys.readouterr()
    assert "TLQ layers" in captured.err
    assert "importance:   0%|          | 0/8 samples" in captured.err  # samples, not samples x layers
    table = captured.out.splitlines()
    assert [row.split()[0] for row in table[2:4]] == ["0", "1"]


def test_no_bars_when_stderr_is_not_a_terminal(tmp_path, caplog, capsys):
    flags = [f for f in SMALL if f not in ("--quiet", "true")]
    with caplog.at_level(logging.INFO, logger="lightning_tlq"):
        main(["calibrate", *flags, "--output_dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    assert "TLQ layers" not in captured.err
    assert len([r for r in caplog.records if r.name == "lightning_tlq.progress"]) == 2
    assert "mean relative output error" in captured.out


def test_quiet_silences_bars_lines_and_summary(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="lightning_tlq"):
        main(["calibrate", *SMALL, "--output_dir", str(tmp_path / "out")])
    assert not [r for r in caplog.records if r.name.startswith("lightning_tlq")]
    captured = capsys.readouterr()
    assert "TLQ layers" not in captured.err
    assert "mean relative output error" not in captured.out
    for banner in ("GPU available", "TPU available", "Tip:", "Seed set"):
        assert banner not in captured.out + captured.err
