"""Real faults lose nothing: disk full (a real, small tmpfs filled up) at each write, read-only output, concurrent
runs, orphans of killed runs, SIGINT and out-of-memory. After each, the checkpoint survives and ``--resume true``
finishes bit-identical to an uninterrupted run. The rows of docs/reliability.md name these tests."""

import contextlib
import errno
import gc
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL, leftovers
from safetensors.torch import load_file

from lightning_tlq import outputs
from lightning_tlq.errors import error_message
from lightning_tlq.output_lock import OutputLock, OutputLockedError, lock_path
from lightning_tlq.outputs import OutputWriteError, free_bytes
from lightning_tlq.resume import STATE_NAME, LayerCheckpoint

ROOT = Path(__file__).resolve().parents[1]
_DIST_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RANK")
_HINT = "rerun with --resume true"


pytestmark = pytest.mark.usefixtures("one_thread")  # exact codes compared: one intra-op thread (conftest)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size, name)`` mounts a real tmpfs of ``size`` (e.g. "8m") and returns its directory; skipped where
    mounting is not permitted (needs root / CAP_SYS_ADMIN)."""
    mounted = []

    def mount(size, name="fs"):
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory, keep=0):
    """Fill the filesystem of ``directory`` up to ``keep`` free bytes with a real file; returns the file."""
    filler = Path(directory) / "filler"
    with open(filler, "ab") as file:
        try:
            while free_bytes(directory) > keep:
                file.write(b"\0" * max(4096, min(1 << 20, free_bytes(directory) - keep)))
                file.flush()
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    return filler


def _remount(where, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def _flags(model_dir):
    return ["--model.model_name_or_path", str(model_dir), "--quant.bits", "4", "--quant.group_size", "64"]


def _assert_bit_identical(a, b):
    for name in ("model.safetensors", "tlq_qparams.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        assert not [k for k in wa if not torch.equal(wa[k], wb[k])], name


def _state(out):
    return json.loads((out.with_name(out.name + ".partial") / STATE_NAME).read_text())


def _on_layer_start(monkeypatch, layer, action):
    def hook(self, fabric=None, index=0):
        if index == layer:
            action()

    monkeypatch.setattr(LayerCheckpoint, "on_layer_start", hook)


def _writers():
    """Every kind of writer the package uses, each writing ~2 MB to ``path``."""
    from safetensors.torch import save_file

    tensors = {"w": torch.zeros(1 << 19)}
    return {
        "torch.save to a path": lambda path: torch.save(tensors, path),
        "torch.save to a file": lambda path: _save_to_file(tensors, path),
        "safetensors save_file": lambda path: save_file(tensors, str(path)),
        "json write_text": lambda path: path.write_text(json.dumps([0.5] * (1 << 18))),
        "save_pretrained": lambda path: _tiny_model().save_pretrained(path),
    }


def _save_to_file(obj, path):
    with open(path, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())


def _tiny_model():
    from lightning_tlq.models import build_tiny_vlm

    return build_tiny_vlm("llava")[0]


@pytest.mark.parametrize("writer", list(_writers()))
def test_every_writer_s_real_write_errors_are_recognised(tmpfs, writer):
    """On a real full (256 KB) and a real read-only tmpfs, each writer's own exception -- OSError, SafetensorError,
    torch's errno-less RuntimeError -- is recognised and becomes a one-line OutputWriteError."""
    fs, write = tmpfs("256k"), _writers()[writer]
    target = fs / "file"
    for mode, code, start in (("rw", errno.ENOSPC, "disk full"), ("ro", errno.EROFS, "read-only file system")):
        _remount(fs, mode)
        found, wrapped = _fail(write, target)
        assert found == code
        assert isinstance(wrapped, OutputWriteError)
        assert wrapped.errno == code
        assert str(wrapped).startswith(f"{start} while writing the test file {target}")
        assert "\n" not in str(wrapped)
        gc.collect()  # a writer's file object, kept alive by the traceback, would keep the filesystem busy
        _remount(fs, "rw")
        for leftover in fs.iterdir():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _fail(write, target):
    from lightning_tlq.outputs import wrap_write_error, write_error

    try:
        write(target)
    except Exception as err:  # each writer raises its own type
        return write_error(err, target), wrap_write_error(err, target, "the test file")
    pytest.fail("the write succeeded")


def test_only_errors_a_rerun_would_repeat_discard_the_checkpoint():
    from lightning_tlq.resume import discards_checkpoint

    def chained(error, cause):
        try:
            try:
                raise cause
            except BaseException as inner:
                raise error from inner
        except BaseException as outer:
            return outer

    assert discards_checkpoint(ValueError("quant.bits must be ..."))
    assert discards_checkpoint(FloatingPointError("NaN in layer 1"))
    assert not discards_checkpoint(chained(ValueError("bad"), OSError(errno.ENOSPC, "No space left on device")))
    assert not discards_checkpoint(
        ValueError("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    kept = [RuntimeError("unexpected pos 576 vs 534"), OSError(errno.EIO, "I/O"), KeyboardInterrupt(), MemoryError()]
    for error in [*kept, torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("anything unknown")]:
        assert not discards_checkpoint(error), error


@pytest.fixture(scope="module")
def reference(tiny4_dir, tmp_path_factory):
    """An uninterrupted W4 g64 run on the 4-layer model (on an ordinary disk)."""
    from lightning_tlq.cli import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("faults_reference") / "out"
    main(["calibrate", *SMALL, *_flags(tiny4_dir), "--output_dir", str(out)])
    return out


# --- disk full ---------------------------------------------------------------------------------------------------
def test_disk_full_at_the_checkpoint_save_keeps_it(tiny4_dir, tmpfs, reference, calibrate_cli, monkeypatch):
    """The disk fills up (a real file takes the rest of an 8 MB tmpfs) while layer 2 runs: its checkpoint save fails
    with one line, the checkpoint of layers 0-1 survives, and the resumed run is bit-identical."""
    fs = tmpfs("8m")
    out = fs / "out"
    holder = {}
    _on_layer_start(monkeypatch, 2, lambda: holder.setdefault("filler", _fill(fs)))
    old = os.umask(0o027)
    try:
        with pytest.raises(OutputWriteError) as err:
            calibrate_cli(out, *_flags(tiny4_dir))
    finally:
        os.umask(old)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert "\n" not in message
    assert message.startswith("disk full while writing the calibration checkpoint (after layer 2) "), message
    assert "free 0.0 KB, needed ~" in message
    assert _HINT in message
    partial = fs / "out.partial"
    assert _state(out)["next_layer"] == 2
    assert not [p.name for p in partial.iterdir() if p.name.startswith(".")], "no temporary file is left"
    assert (partial.stat().st_mode & 0o777) == 0o750, "directories follow the umask"
    assert leftovers(out) == ["out.partial"]
    holder["filler"].unlink()
    report = calibrate_cli(out, *_flags(tiny4_dir), "--resume", "true")
    assert report["resumed_from_layer"] == 2
    assert leftovers(out) == ["out"]
    _assert_bit_identical(out, reference)


def test_disk_full_at_the_final_save_keeps_the_checkpoint(tiny4_dir, tmpfs, reference, calibrate_cli, monkeypatch):
    """The disk fills up after the last layer, leaving 64 KB: config.json still fits, safetensors' write of the
    weights fails (``SafetensorError``, "os error 28"). The complete checkpoint survives; resuming only saves."""
    fs = tmpfs("8m")
    out = fs / "out"
    holder = {}

    def fill(self, fabric=None, records=None):
        holder["filler"] = _fill(fs, keep=64 * 1024)

    monkeypatch.setattr(LayerCheckpoint, "on_calibration_end", fill, raising=False)
    with pytest.raises(OutputWriteError) as err:
        calibrate_cli(out, *_flags(tiny4_dir))
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert "\n" not in message
    assert message.startswith(f"disk full while writing the output {out}: free "), message
    assert f"the checkpoint {fs / 'out.partial'} is kept: {_HINT}" in message
    assert type(err.value.__cause__).__name__ == "SafetensorError", "the writer raised no OSError"
    assert error_message(err.value) == message, "the command line shows it as it is (not as a damaged file)"
    assert leftovers(out) == ["out.partial"], "no output, no temporary copy"
    assert _state(out)["next_layer"] == 4
    holder["filler"].unlink()
    report = calibrate_cli(out, *_flags(tiny4_dir), "--resume", "true")
    assert report["resumed_from_layer"] == 4
    _assert_bit_identical(out, reference)


def test_disk_full_at_export(tmpfs, reference):
    """``lightning-tlq export`` onto a 256 KB tmpfs (the packed weights are ~0.6 MB): one line, nothing left; after
    the filesystem grows, the same export succeeds and equals one written to an ordinary disk."""
    from lightning_tlq.export import export

    fs = tmpfs("256k")
    with pytest.raises(OutputWriteError) as err:
        export(str(reference), output_dir=str(fs / "packed"), quiet=True)
    assert err.value.errno == errno.ENOSPC
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"disk full while writing the output {fs / 'packed'}: free ")
    assert "nothing was written there" in str(err.value)
    assert sorted(p.name for p in fs.iterdir()) == []
    _remount(fs, "size=4m")
    export(str(reference), output_dir=str(fs / "packed"), quiet=True)
    ordinary = reference.parent / "packed_on_disk"
    if not ordinary.exists():
        export(str(reference), output_dir=str(ordinary), quiet=True)
    a, b = load_file(fs / "packed" / "model.safetensors"), load_file(ordinary / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_little_space_fails_before_the_model_loads(tiny4_dir, tmpfs, calibrate_cli, monkeypatch):
    """A 2 MB tmpfs cannot hold output (~3 MB) plus checkpoint (~3.3 MB): the run fails before loading weights."""
    from lightning_tlq.module import TLQModule

    fs = tmpfs("2m")
    out = fs / "out"
    monkeypatch.setattr(TLQModule, "configure_model", lambda self: pytest.fail("the weights were loaded"))
    with pytest.raises(OutputWriteError) as err:
        calibrate_cli(out, *_flags(tiny4_dir))
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert "\n" not in message
    assert message.startswith(f"disk full while writing {out}: free 2.1 MB, needed ~6.2 MB (output ~3.0 MB, "), message
    assert message.endswith("(or pass --checkpoint false)")
    assert leftovers(out) == []


def test_space_estimate_matches_what_is_written(tiny4_dir, tmp_path, calibrate_cli, monkeypatch):
    """The estimate is within 10% of the bytes really written (output, checkpoint at its largest, export)."""
    seen, real_check, real_end = {}, outputs.check_free_space, LayerCheckpoint.on_layer_end

    def check(out, needs, resume=False):
        seen["needs"] = needs
        return real_check(out, needs, resume=resume)

    def on_layer_end(self, fabric, index, *args, **kwargs):
        real_end(self, fabric, index, *args, **kwargs)
        seen["checkpoint"] = max(seen.get("checkpoint", 0), outputs.du(self.directory))

    monkeypatch.setattr(outputs, "check_free_space", check)
    monkeypatch.setattr(LayerCheckpoint, "on_layer_end", on_layer_end)
    out = tmp_path / "out"
    calibrate_cli(out, *_flags(tiny4_dir), "--export", "true")
    packed = outputs.du(out / "packed")
    written = {"output": outputs.du(out) - packed, "checkpoint": seen["checkpoint"], "export": packed}
    for key, value in written.items():
        assert 0.9 < seen["needs"][key] / value < 1.1, (key, seen["needs"][key], value)


# --- read-only ---------------------------------------------------------------------------------------------------
def test_read_only_output_fails_at_once_and_later_keeps_the_checkpoint(
    tiny4_dir, tmpfs, reference, calibrate_cli, monkeypatch
):
    """A read-only filesystem fails before anything is loaded; when the checkpoint turns read-only during layer 2 (a
    read-only bind mount over it), its write fails with one line and the checkpoint survives for the resume."""
    fs = tmpfs("16m")
    out = fs / "out"
    _remount(fs, "ro")
    calibrate_mod = importlib.import_module("lightning_tlq.run_calibration")
    monkeypatch.setattr(calibrate_mod, "model_on_meta", lambda *a: pytest.fail("the model was read"))
    with pytest.raises(OutputWriteError) as err:
        calibrate_cli(out, *_flags(tiny4_dir))
    assert err.value.errno == errno.EROFS
    assert (
        str(err.value)
        == f"read-only file system while writing the output {out}; fix that or choose another --output_dir"
    )
    monkeypatch.undo()

    _remount(fs, "rw")
    partial = fs / "out.partial"

    def read_only_partial():
        subprocess.run(["mount", "--bind", str(partial), str(partial)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(partial)], check=True)

    _on_layer_start(monkeypatch, 2, read_only_partial)
    with pytest.raises(OutputWriteError) as err:
        calibrate_cli(out, *_flags(tiny4_dir))
    monkeypatch.undo()
    subprocess.run(["umount", str(partial)], check=True)
    assert err.value.errno == errno.EROFS
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("read-only file system while writing the calibration checkpoint (after layer 2)")
    assert _state(out)["next_layer"] == 2
    report = calibrate_cli(out, *_flags(tiny4_dir), "--resume", "true")
    assert report["resumed_from_layer"] == 2
    _assert_bit_identical(out, reference)


# --- concurrent runs, stale locks, orphans ------------------------------------------------------------------------
def _env():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.pop("LIGHTNING_TLQ_OUTPUT_LOCK", None)
    return env


def _cli(model_dir, out, *extra):
    args = [*SMALL, *_flags(model_dir), "--output_dir", str(out), *extra]
    return [sys.executable, "-m", "lightning_tlq", "calibrate", *args]


def _wait_for(predicate, proc, what, limit=300):
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() - start < limit, f"no {what} within {limit} s"
        time.sleep(0.02)


def test_second_run_on_the_same_output_fails_at_once(tiny4_dir, tmp_path, reference, calibrate_cli, monkeypatch):
    """Run A (a real CLI process) is paused while it holds the lock; run B on the same output_dir -- even with
    --overwrite true -- fails before reading the model, naming A's pid; A then finishes untouched."""
    out = tmp_path / "out"
    lock = lock_path(out)
    proc = subprocess.Popen(_cli(tiny4_dir, out), env=_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: lock.is_file() and lock.read_text().strip(), proc, "the lock")
        os.kill(proc.pid, signal.SIGSTOP)
        calibrate_mod = importlib.import_module("lightning_tlq.run_calibration")
        monkeypatch.setattr(calibrate_mod, "model_on_meta", lambda *a: pytest.fail("the model was read"))
        for extra in ([], ["--overwrite", "true"], ["--resume", "true"]):
            with pytest.raises(OutputLockedError, match=rf"^{out} is being written by another lightning-tlq run \(pid "
                               rf"{proc.pid} on [^ ]+, since [0-9T:-]+\): wait for it"):  # fmt: skip
                calibrate_cli(out, *_flags(tiny4_dir), *extra)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert leftovers(out) == ["out"]
    _assert_bit_identical(out, reference)


def _hold_then_die(code, cwd):
    """Run ``code`` in a fresh interpreter that then SIGKILLs itself; returns its pid."""
    script = f"import os, signal\nfrom pathlib import Path\n{code}\nos.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def test_stale_lock_and_orphans_of_killed_runs_are_cleaned(tiny4_dir, tmp_path, calibrate_cli, caplog):
    """A run killed (SIGKILL) while holding the lock, inside the final write, leaves its lock file and a
    half-written ``.out.tmp-<pid>-...``; the next run takes the lock over, removes the folder, and writes an
    output whose mode follows the umask."""
    out = tmp_path / "out"
    pid = _hold_then_die(
        "from lightning_tlq.report import atomic_output_dir\n"
        f"with atomic_output_dir({str(out)!r}) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "    print(os.getpid(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)",
        tmp_path,
    )
    orphans = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out.tmp-{pid}-")]
    assert len(orphans) == 1
    assert lock_path(out).read_text().split()[0] == str(pid)
    assert (tmp_path / orphans[0]).stat().st_mode & 0o777 == 0o777 & ~_umask(), "temp folders follow the umask"
    old = os.umask(0o022)
    try:
        calibrate_cli(out, *_flags(tiny4_dir))
    finally:
        os.umask(old)
    assert leftovers(out) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o755
    assert f"Took over the lock {lock_path(out)} of a run that is gone (pid {pid} " in caplog.text
    assert f"left by a run (pid {pid}) that was killed while writing" in caplog.text


def test_previous_output_set_aside_by_a_killed_swap_is_restored(tmp_path):
    """Without an atomic exchange the swap renames the old output aside first: killed right then, the next run
    (here: taking the lock) puts the previous output back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("previous")
    _hold_then_die(
        "from lightning_tlq.output_lock import OutputLock, temp_name\n"
        f"out = Path({str(out)!r})\n"
        "OutputLock(out).acquire()\n"
        "out.rename(temp_name(out, 'old'))\n"
        "print(os.getpid(), flush=True)",
        tmp_path,
    )
    assert not out.exists()
    with OutputLock(out):
        assert (out / "weights").read_text() == "previous"
    assert leftovers(out) == ["out"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- kill -9 at random moments, SIGINT, out of memory ---------------------------------------------------------------
KILL_TRIALS = int(os.environ.get("LIGHTNING_TLQ_KILL_TRIALS", "2"))
"""Trials of the random kill test; docs/reliability.md records a run with 20."""


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).is_file()
    )


_RUNNER = """
import json, os, sys
import torch
from lightning_tlq.cli import main
torch.set_num_threads(1)
main(json.loads(sys.argv[1]))  # warm up: imports and a first run, so that forked runs start calibrating at once
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            main(json.loads(line))
        except BaseException:
            code = 1
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def test_kill_9_at_random_moments(tiny4_dir, tmp_path, reference, calibrate_cli):
    """Each trial: ``out`` holds a previous output; a CLI run with --overwrite true (a process forked from a warm
    interpreter) is SIGKILLed at a random moment of its work. Then ``out`` is the previous output or the complete
    new one (never a mix), any checkpoint is consistent, and --resume true finishes bit-identical to an
    uninterrupted run, leaving only ``out``."""
    rng = random.Random(20)
    out, previous = tmp_path / "out", tmp_path / "previous"
    calibrate_cli(previous, *_flags(tiny4_dir), "--quant.bits", "3")  # another model: tells old from new
    warm = ["calibrate", *SMALL, *_flags(tiny4_dir), "--output_dir", str(tmp_path / "warm")]
    runner = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, json.dumps(warm)],
        env=_env(), cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert runner.stdout.readline().strip() == "ready"

    partial = tmp_path / "out.partial"

    def calibrated():  # the last layer is committed: the final write is next
        return (partial / STATE_NAME).is_file() and json.loads((partial / STATE_NAME).read_text())["next_layer"] == 4

    def run(delay=None, after_last_layer=False):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(previous, out)
        runner.stdin.write(json.dumps(["calibrate", *SMALL, *_flags(tiny4_dir), "--output_dir", str(out),
                                       "--overwrite", "true"]) + "\n")  # fmt: skip
        runner.stdin.flush()
        pid, start, last = int(runner.stdout.readline()), time.monotonic(), None
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            if after_last_layer or delay is None:
                while not calibrated():
                    os.kill(pid, 0)
                    time.sleep(0.005)
                last = time.monotonic()
            if delay is not None:
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
        status, end = int(runner.stdout.readline()), time.monotonic()
        return status, end - start, end - (last or start)

    try:
        status, window, tail = run()  # uninterrupted: the windows to draw kill moments from (whole run; final write)
        assert status == 0
        _assert_bit_identical(out, reference)
        outcomes = []
        for trial in range(KILL_TRIALS):
            final = trial % 2 == 1  # every other trial: a moment after the last layer (the final write, clean-up)
            delay = rng.uniform(0, tail if final else window)
            status, _, _ = run(delay, after_last_layer=final)
            if _same_files(out, previous):
                state = "previous output intact"
            else:
                _assert_bit_identical(out, reference)
                state = "new output complete"
            if (partial / STATE_NAME).is_file():
                state += f", checkpoint at layer {json.loads((partial / STATE_NAME).read_text())['next_layer']}"
            elif partial.exists():
                state += ", checkpoint not committed yet"
            temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
            state += f", {len(temps)} orphaned temporary folder(s)" if temps else ""
            when = f"last layer + {delay:.2f}/{tail:.2f} s" if final else f"{delay:.2f}/{window:.2f} s"
            outcomes.append(f"{when}: {'killed' if status else 'finished'}, {state}")
            report = calibrate_cli(out, *_flags(tiny4_dir), "--resume", "true", "--overwrite", "true")
            assert leftovers(out) == ["out"], outcomes[-1]
            _assert_bit_identical(out, reference)
            outcomes[-1] += f"; resumed from layer {report['resumed_from_layer']}: bit-identical"
    finally:
        runner.stdin.close()
        runner.kill()
        runner.wait()
    print("\n".join(["", *outcomes]))


def test_sigint_keeps_the_checkpoint(tiny4_dir, tmp_path, reference, calibrate_cli):
    """Ctrl-C (a real SIGINT, delivered when layer 2 starts) stops the CLI process; the checkpoint is kept with a
    one-line note, and the resumed run is bit-identical."""
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from lightning_tlq.cli import main\n"
        "from lightning_tlq.resume import LayerCheckpoint\n"
        "LayerCheckpoint.on_layer_start = lambda self, fabric=None, index=0: index == 2 and os.kill(os.getpid(), "
        "signal.SIGINT)\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *_cli(tiny4_dir, out)[3:]],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    note = f"Calibration failed; its checkpoint is kept in {tmp_path / 'out.partial'} (rerun with --resume true).\n"
    assert note in proc.stderr
    assert _state(out)["next_layer"] == 2
    report = calibrate_cli(out, *_flags(tiny4_dir), "--resume", "true")
    assert report["resumed_from_layer"] == 2
    _assert_bit_identical(out, reference)


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()], ids=repr
)
def test_out_of_memory_keeps_the_checkpoint(tiny4_dir, tmp_path, reference, calibrate_cli, monkeypatch, error):
    """Decoder layer 2 runs out of memory in its forward (simulated): the checkpoint of layers 0-1 is kept and the
    resumed run is bit-identical."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    out, armed, real_forward = tmp_path / "out", [], LlamaDecoderLayer.forward

    def forward(self, *args, **kwargs):
        if armed and self.self_attn.layer_idx == 2:
            raise error
        return real_forward(self, *args, **kwargs)

    _on_layer_start(monkeypatch, 2, lambda: armed.append(True))
    monkeypatch.setattr(LlamaDecoderLayer, "forward", forward)
    with pytest.raises(type(error)):
        calibrate_cli(out, *_flags(tiny4_dir))
    monkeypatch.undo()
    assert _state(out)["next_layer"] == 2
    report = calibrate_cli(out, *_flags(tiny4_dir), "--resume", "true")
    assert report["resumed_from_layer"] == 2
    _assert_bit_identical(out, reference)
