"""The calibration report (``tlq_report.json``), its summary table, output names and atomic output directories.

Output names: without ``--output_dir`` every run writes a directory of its own under ``tlq_out/``, named by what
it did (:func:`run_name`: model, method, scheme), and ``evaluate`` writes beside the model it scores
(:func:`eval_output_dir`). ``overwrite`` replaces only such a directory of ours (:func:`check_output_dir`): never a
folder holding other runs, a model that was not written here, or anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning_tlq.output_lock import OutputLock, make_temp_dir, temp_name
from lightning_tlq.outputs import wrap_write_error, write_error

REPORT_NAME = "tlq_report.json"
METRICS_NAME = "metrics.json"
OUTPUT_ROOT = "tlq_out"
"""Parent of the default output directories (``.gitignore`` lists it)."""


def model_tag(model: str | os.PathLike) -> str:
    """A short name of a model source: the last path component (``/ckpt/llava-7b/`` -> ``llava-7b``)."""
    text = str(model).rstrip("/\\")
    return Path(text).name or text or "model"


def run_name(model: str | os.PathLike, quant: Any) -> str:
    """The default name of a calibration's output: model, method and scheme, e.g. ``scenes-llava-tlq-w4a16-g128``.

    ``quant`` is a :class:`~lightning_tlq.config.QuantArgs`; settings that change the result beyond method and
    scheme add a suffix (``-asym``, ``-vision``, ``-clip``, ``-fptarget``), so two runs that differ in them never
    share a directory.
    """
    group = "ch" if quant.group_size == -1 else str(quant.group_size)
    name = f"{model_tag(model)}-{quant.method}-w{quant.bits}a{quant.act_bits or 16}-g{group}"
    suffixes = (
        ("-asym", not quant.symmetric),
        ("-vision", quant.vision),
        ("-clip", getattr(quant, "awq_clip", False)),
        ("-fptarget", getattr(quant, "target", "quantized") == "fp"),
    )
    return name + "".join(suffix for suffix, on in suffixes if on)


def default_output_dir(model: str | os.PathLike, quant: Any) -> str:
    """``tlq_out/<run_name>``: where ``calibrate`` writes when no ``output_dir`` is given."""
    return f"{OUTPUT_ROOT}/{run_name(model, quant)}"


def eval_output_dir(
    model: str | os.PathLike,
    data: Any,
    reference_model: str | None = None,
    exact_match: str = "greedy",
    split: str = "test",
) -> str:
    """Where ``evaluate`` writes when no ``output_dir`` is given: beside the model it scores.

    ``<model dir>-eval-<data>[-vs-<reference>][-tf]`` for a local directory (``tlq_out/scenes-llava-tlq-w4a16-g128``
    -> ``tlq_out/scenes-llava-tlq-w4a16-g128-eval-test``), ``tlq_out/<name>-eval-...`` for a built-in model name.
    ``<data>`` is the JSONL's stem or the built-in task's split, so evaluations on other data, against another
    reference or with the other exact-match mode never share a directory.
    """
    source = Path(str(model).rstrip("/\\"))
    parent = source.parent if source.is_dir() else Path(OUTPUT_ROOT)
    what = Path(data.path).stem if getattr(data, "path", None) else (getattr(data, "split", None) or split)
    name = f"{model_tag(model)}-eval-{what}"
    if reference_model is not None:
        name += f"-vs-{model_tag(reference_model)}"
    if exact_match != "greedy":
        name += "-tf"
    return str(parent / name)


def is_own_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an empty directory or one that lightning-tlq wrote (a calibrated model with
    ``tlq_report.json``, an evaluation with ``metrics.json``, or an exported compressed-tensors checkpoint)."""
    path = Path(path)
    if not path.is_dir() or not any(path.iterdir()):
        return path.is_dir()
    if (path / REPORT_NAME).is_file() or (path / METRICS_NAME).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "quantization_config" in config and "tlq_quantization" in config


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over modules of the per-module errors, plus per-layer means added to each record (in place)."""
    all_w, all_u = [], []
    for rec in records:
        mods = rec["modules"].values()
        rec["mean_weighted_rel_error"] = _mean([m["weighted_rel_error"] for m in mods])
        rec["mean_rel_error"] = _mean([m["rel_error"] for m in mods])
        all_w += [m["weighted_rel_error"] for m in mods]
        all_u += [m["rel_error"] for m in mods]
    return {
        "mean_weighted_rel_error": _mean(all_w),
        "mean_rel_error": _mean(all_u),
        "max_damp_retries": max((m["retries"] for r in records for m in r["modules"].values()), default=0),
    }


def _fmt(value: float | None, spec: str = ".3e") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _row(rec: dict[str, Any], label: Any) -> str:
    kept = f"{rec.get('tokens_kept', rec.get('tokens_total', '-'))}/{rec.get('tokens_total', '-')}"
    damps = [m["damp"] for m in rec["modules"].values() if m["damp"] is not None]
    return (
        f"{label:>5} {kept:>13} {_fmt(rec['mean_weighted_rel_error']):>13} "
        f"{_fmt(rec['mean_rel_error']):>11} {_fmt(max(damps) if damps else None, '.2g'):>9} {rec['seconds']:>6.2f}"
    )


def format_summary(report: dict[str, Any]) -> str:
    """A readable table: one line per layer, then the totals."""
    s = report["settings"]["quant"]
    head = (
        f"lightning-tlq: {s['method']} W{s['bits']}A{s.get('act_bits') or 16} g{s['group_size']} "
        f"{'sym' if s['symmetric'] else 'asym'} on {report['model']} "
        f"({report['data']['samples']} samples, {report['data']['tokens']} tokens)"
    )
    lines = [head, f"{'layer':>5} {'kept/tokens':>13} {'weighted err':>13} {'plain err':>11} {'max damp':>9} {'s':>6}"]
    vision = report.get("vision")
    if vision:  # vision stages are labelled v0, v1, ... and proj
        labels = [str(rec["index"]).replace("vision.", "v").replace("projector", "proj") for rec in vision["layers"]]
        lines += [_row(rec, label) for rec, label in zip(vision["layers"], labels)]
        vs = vision["summary"]
        lines.append(
            f"vision mean relative output error: weighted {_fmt(vs['mean_weighted_rel_error'])}, "
            f"plain {_fmt(vs['mean_rel_error'])}"
        )
    lines += [_row(rec, rec["index"]) for rec in report["layers"]]
    summ, secs = report["summary"], report["seconds"]
    vision_s = f"vision {secs['vision']:.1f} s, " if "vision" in secs else ""
    lines.append(
        f"mean relative output error: weighted {_fmt(summ['mean_weighted_rel_error'])}, "
        f"plain {_fmt(summ['mean_rel_error'])}; wall {secs['total']:.1f} s "
        f"(importance {secs.get('importance', 0):.1f} s, {vision_s}layers {secs.get('layers', 0):.1f} s)"
    )
    lines.append(f"saved to {report['output_dir']}")
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_report(report: dict[str, Any], directory: Path) -> Path:
    """Write ``tlq_report.json`` into ``directory``; non-finite numbers are refused."""
    path = Path(directory) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=False) + "\n")
    return path


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if ``path`` exists and ``overwrite`` is not set, or if ``overwrite`` would replace a
    directory that is not a lightning-tlq output (see :func:`is_own_output`)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"Output path {path} exists and is not a directory; choose another --output_dir.")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {path} already exists; pass --overwrite true to replace it or choose another "
            "--output_dir."
        )
    if path.exists() and not is_own_output(path):
        raise FileExistsError(
            f"--overwrite true would replace {path}, which is not the output of one lightning-tlq run (no "
            f"{REPORT_NAME} or {METRICS_NAME} in it); it is left alone. Choose another --output_dir."
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; put it at ``path`` only if the block succeeds.

    Nothing half-written is ever left at ``path``: on error the temporary directory is removed, and an existing
    ``path`` is swapped with the new one atomically (``renameat2(RENAME_EXCHANGE)`` on Linux). The output's
    :class:`~lightning_tlq.output_lock.OutputLock` is held meanwhile (re-entrant: ``calibrate`` already holds it), and
    the temporary directory, named after this process, follows the umask.

    Raises:
        OutputWriteError: If the filesystem fails the write (full, quota, read-only, permissions), with a one-line
            message; any other error of the block propagates unchanged.
    """
    path = Path(os.path.abspath(check_output_dir(path, overwrite)))
    with OutputLock(path):
        tmp: Path | None = None
        try:
            tmp = make_temp_dir(path)
            yield tmp
            _swap_into(tmp, path)
        except BaseException as err:
            code = write_error(err, tmp or path)  # probed while the partial copy still occupies the disk
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if code is None:
                raise
            partial = path.with_name(path.name + ".partial")
            hint = (
                f"nothing was written there; the checkpoint {partial} is kept: rerun with --resume true"
                if (partial.is_dir())
                else "nothing was written there (the partial copy was removed)"
            )
            raise wrap_write_error(err, path, "the output", hint, code) from err  # type: ignore[misc]
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _swap_into(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` to ``path``; an existing ``path`` ends up at ``tmp`` (removed by the caller)."""
    if not path.exists():
        tmp.rename(path)
        return
    if _exchange(tmp, path):
        return
    old = temp_name(path, "old")  # without an atomic exchange: a kill in between leaves `old`, restored later
    path.rename(old)
    tmp.rename(path)
    old.rename(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(b))
