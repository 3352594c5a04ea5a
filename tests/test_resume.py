"""Resume: a run killed (SIGKILL) in the middle of a layer continues from its checkpoint to a bit-identical result."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, leftovers
from safetensors.torch import load_file

from lightning_tlq import checkpoint_files
from lightning_tlq.report import REPORT_NAME
from lightning_tlq.resume import STATE_NAME, LayerCheckpoint

ROOT = Path(__file__).resolve().parents[1]
_DIST_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RANK")


def _flags(model_dir, out, *extra):
    return [*SMALL, "--model.model_name_or_path", str(model_dir), "--quant.bits", "3", "--quant.group_size", "64",
            "--output_dir", str(out), *extra]  # fmt: skip


def _assert_bit_identical(a, b):
    for name in ("model.safetensors", "tlq_qparams.safetensors"):  # the weights, and the codes export reads
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not different, (name, different[:5])


def _crash_at_layer(layer, model_dir, out, **settings):
    """Run ``calibrate`` with the ``_flags`` settings in a fresh process that SIGKILLs itself (every rank) when
    decoder layer ``layer`` starts (:class:`crash_callback.CrashAtLayer`)."""
    kwargs = {"model": str(model_dir), "data": {"num_samples": 8, "batch_size": 4}, "accelerator": "cpu",
              "quiet": True, "quant": {"bits": 3, "group_size": 64}, "output_dir": str(out), **settings}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    script = Path(__file__).with_name("crash_callback.py")
    return subprocess.run(
        [sys.executable, str(script), str(layer), json.dumps(kwargs)],
        env=env, cwd=out.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _strip_times(records):
    return [{**r, "seconds": 0, "modules": {n: {**m, "seconds": 0} for n, m in r["modules"].items()}} for r in records]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_everywhere():
    """Every run of this module (in process, and the crashing subprocesses) on one intra-op thread: bit-identical
    comparisons need one thread count, whatever the machine's default or an earlier test left."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny4_dir, tmp_path_factory):
    """An uninterrupted run on the 4-layer model."""
    from lightning_tlq.cli import main

    out = tmp_path_factory.mktemp("reference") / "out"
    main(["calibrate", *_flags(tiny4_dir, out)])
    return out


def test_killed_run_resumes_bit_identical(tiny4_dir, tmp_path, reference, calibrate_cli):
    out = tmp_path / "out"
    proc = _crash_at_layer(2, tiny4_dir, out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = tmp_path / "out.partial"
    assert leftovers(out) == ["out.lock", "out.partial"], "the lock file of a killed run stays (taken over next)"
    state = json.loads((partial / STATE_NAME).read_text())
    assert state["next_layer"] == 2
    assert state["num_layers"] == 4
    files = sorted(p.name for p in partial.iterdir())
    assert files == ["hidden_0001.rank0.pt", "importance.rank0.pt", "layer_0000.pt", "layer_0001.pt", STATE_NAME]

    report = calibrate_cli(out, "--model.model_name_or_path", str(tiny4_dir), "--quant.bits", "3",
                           "--quant.group_size", "64", "--resume", "true")  # fmt: skip
    assert report["resumed_from_layer"] == 2
    assert leftovers(out) == ["out"], "the checkpoint is removed once the output is written"
    _assert_bit_identical(out, reference)
    ref_report = json.loads((reference / REPORT_NAME).read_text())
    assert _strip_times(report["layers"]) == _strip_times(ref_report["layers"])


def _interrupt_at(monkeypatch, layer, error):
    def on_layer_start(self, fabric=None, index=0):
        if index == layer:
            raise error

    monkeypatch.setattr(LayerCheckpoint, "on_layer_start", on_layer_start)


def test_resume_checks_settings_and_existing_checkpoints(tiny4_dir, tmp_path, calibrate_cli, monkeypatch, reference):
    out = tmp_path / "out"
    flags = ["--model.model_name_or_path", str(tiny4_dir), "--quant.bits", "3", "--quant.group_size", "64"]
    _interrupt_at(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        calibrate_cli(out, *flags)
    monkeypatch.undo()
    assert json.loads((tmp_path / "out.partial" / STATE_NAME).read_text())["next_layer"] == 3

    with pytest.raises(ValueError, match=r"other settings \(quant.bits: 3 -> 4\).*original settings"):
        calibrate_cli(out, *flags, "--quant.bits", "4", "--resume", "true")
    with pytest.raises(FileExistsError, match="interrupted run. Pass --resume true to continue it, or --overwrite"):
        calibrate_cli(out, *flags)
    assert leftovers(out) == ["out.partial"], "refusing to resume must not touch the checkpoint"

    report = calibrate_cli(out, *flags, "--resume", "true")
    assert report["resumed_from_layer"] == 3
    _assert_bit_identical(out, reference)


def test_deterministic_errors_remove_the_checkpoint(tiny4_dir, tmp_path, calibrate_cli, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 1, FloatingPointError("simulated NaN"))
    with pytest.raises(FloatingPointError):
        calibrate_cli(out, "--model.model_name_or_path", str(tiny4_dir))
    assert leftovers(out) == [], "resuming would only repeat the error: no checkpoint is kept"


def test_disk_full_while_checkpointing(tiny4_dir, tmp_path, calibrate_cli, monkeypatch, reference):
    out = tmp_path / "out"
    flags = ["--model.model_name_or_path", str(tiny4_dir), "--quant.bits", "3", "--quant.group_size", "64"]
    real_save = torch.save

    def save(obj, file, *args, **kwargs):
        if Path(file.name).name.startswith(".layer_0002.pt"):
            file.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_files.torch, "save", save)  # the checkpoint writer
    full = r"disk full while writing the calibration checkpoint \(after layer 2\) .*layer_0002.pt.*--resume"
    with pytest.raises(OSError, match=full):
        calibrate_cli(out, *flags)
    monkeypatch.undo()
    partial = tmp_path / "out.partial"
    assert leftovers(out) == ["out.partial"]
    assert not [p.name for p in partial.iterdir() if p.name.startswith(".")], "no temporary file is left"
    assert json.loads((partial / STATE_NAME).read_text())["next_layer"] == 2
    report = calibrate_cli(out, *flags, "--resume", "true")
    assert report["resumed_from_layer"] == 2
    _assert_bit_identical(out, reference)


def test_no_checkpoint_when_disabled(tmp_path, calibrate_cli, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 1, KeyboardInterrupt())  # never called: no checkpoint callback
    report = calibrate_cli(out, "--checkpoint", "false")
    assert report["resumed_from_layer"] == 0
    assert leftovers(out) == ["out"]


@pytest.mark.slow
def test_two_process_run_resumes_bit_identical(tiny4_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned reference ranks: one thread, as the crashing run
    """Each rank checkpoints its own shard of activations; a killed 2-process run resumes exactly."""
    from lightning_tlq.cli import main

    two = ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]
    reference, out = tmp_path / "reference", tmp_path / "out"
    main(["calibrate", *_flags(tiny4_dir, reference), *two])
    proc = _crash_at_layer(2, tiny4_dir, out, devices=2, strategy="ddp_spawn")
    assert proc.returncode != 0
    assert "never started" not in proc.stderr
    partial = tmp_path / "out.partial"
    assert json.loads((partial / STATE_NAME).read_text())["world_size"] == 2
    assert {p.name for p in partial.glob("hidden_*")} == {"hidden_0001.rank0.pt", "hidden_0001.rank1.pt"}
    with pytest.raises(ValueError, match="written by 2 process\\(es\\), this run has 1"):
        main(["calibrate", *_flags(tiny4_dir, out), "--resume", "true"])
    main(["calibrate", *_flags(tiny4_dir, out), *two, "--resume", "true"])
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["resumed_from_layer"] == 2
    _assert_bit_identical(out, reference)


VISION = ["--model.model_name_or_path", "tiny-qwen2_vl", "--quant.group_size", "32", "--quant.act_bits", "8",
          "--quant.vision", "true"]  # fmt: skip


def test_resume_with_the_vision_tower(tmp_path, calibrate_cli, monkeypatch):
    """Interrupted after the tower (loaded back, not recalibrated) or inside it (recalibrated from the saved scores):
    both resume to the uninterrupted result."""
    from lightning_tlq.vision import VisionCalibration

    reference = calibrate_cli(tmp_path / "reference", *VISION)
    _interrupt_at(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        calibrate_cli(tmp_path / "after", *VISION)
    monkeypatch.undo()
    state = json.loads((tmp_path / "after.partial" / STATE_NAME).read_text())
    assert (state["next_layer"], state["vision_done"]) == (1, True)
    monkeypatch.setattr(VisionCalibration, "run", lambda *a, **k: pytest.fail("the tower was recalibrated"))
    report = calibrate_cli(tmp_path / "after", *VISION, "--resume", "true")
    monkeypatch.undo()
    assert report["resumed_from_layer"] == 1
    assert report["vision"] == reference["vision"] | {"layers": report["vision"]["layers"]}
    _assert_bit_identical(tmp_path / "after", tmp_path / "reference")

    real_stage, calls = VisionCalibration._stage, []

    def stage_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_stage(self, *args, **kwargs)

    monkeypatch.setattr(VisionCalibration, "_stage", stage_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        calibrate_cli(tmp_path / "inside", *VISION)
    monkeypatch.undo()
    state = json.loads((tmp_path / "inside.partial" / STATE_NAME).read_text())
    assert (state["next_layer"], state["vision_done"]) == (0, False)
    report = calibrate_cli(tmp_path / "inside", *VISION, "--resume", "true")
    assert report["resumed_from_layer"] == 0
    _assert_bit_identical(tmp_path / "inside", tmp_path / "reference")


def test_interrupted_mbq_run_resumes_with_its_vision_weights(tiny4_dir, tmp_path, calibrate_cli, monkeypatch):
    """mbq's per-layer vision weights come from the importance pass, which a resumed run does not repeat: they are
    checkpointed with the importance; the folded norms travel in the layer states."""
    flags = ["--model.model_name_or_path", str(tiny4_dir), "--quant.method", "mbq", "--quant.bits", "3",
             "--quant.group_size", "64", "--quant.scale_grid", "4"]  # fmt: skip
    whole = calibrate_cli(tmp_path / "whole", *flags)
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        calibrate_cli(out, *flags)
    monkeypatch.undo()
    report = calibrate_cli(out, *flags, "--resume", "true")
    assert report["resumed_from_layer"] == 2
    _assert_bit_identical(out, tmp_path / "whole")
    assert _strip_times(report["layers"]) == _strip_times(whole["layers"])  # incl. alpha and vision_weight
    assert report["layers"][3]["modules"]["mlp.down_proj"]["vision_weight"] > 0
