"""Resumable calibration: the loop's state after every finished layer, kept in ``<output_dir>.partial/``.

:class:`LayerCheckpoint` is a Fabric-style callback. Registered with ``Fabric(callbacks=[...])``, it saves

- after the importance pass: each rank's post-processed token importance, and with ``quant.vision`` the raw
  scores of the vision tower (``importance.rank{r}.pt``);
- with ``quant.vision``, after the vision tower and projector are calibrated: their quantized weights, codes and
  records (``vision.pt``, rank 0);
- after decoder layer ``k``: the layer's quantized state and its modules' codes / scales / zero points and report
  record (``layer_{k}.pt``, rank 0), each rank's propagated activations on the quantized path
  (``hidden_{k}.rank{r}.pt``), with ``quant.target = fp`` also those of the full-precision stream
  (``fp_hidden_{k}.rank{r}.pt``), then, last, ``state.json`` with ``next_layer = k + 1`` (the commit point).

Every file is written to a temporary name, fsynced and renamed, so a crash at any instant leaves the last committed
layer intact. :class:`~lightning_tlq.loop.CalibrationLoop` asks it for :meth:`LayerCheckpoint.restore` before
starting: the finished layers' weights are loaded back, the importance pass is skipped and calibration continues at
``next_layer`` with the saved activations (a calibrated vision tower is loaded back instead of recalibrated), so
the result is bit-identical to an uninterrupted run. The saved
settings must match the resumed run's (model, data, quantization, importance, token set, dtype, seed, number of
processes); otherwise :meth:`restore` refuses and names the differences. For multi-node runs the directory must
be on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.keys import ModuleKey
from lightning_tlq.module_stats import ModuleResult
from lightning_tlq.observers import CalibrationObserver
from lightning_tlq.output_lock import discard_dir, remove_dead_temp_files
from lightning_tlq.outputs import wrap_write_error, write_error

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
_VERSION = 1
# Errors that a rerun with the same settings would repeat (bad settings or data, NaN/Inf): only after these is the
# checkpoint this run created removed. Every other error -- a filesystem failure (whatever type the writer raised
# it as), out of memory, an interrupt, anything unknown -- keeps it, since rerunning may then succeed.
_PERMANENT = (ValueError, ArithmeticError, TypeError, NotImplementedError)


def partial_dir(output_dir: str | os.PathLike) -> Path:
    """Where the checkpoint of a run writing ``output_dir`` lives: ``<output_dir>.partial`` beside it."""
    path = Path(output_dir)
    return path.with_name(path.name + ".partial")


def prepare_partial_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Check (before any work) what to do with an existing checkpoint; returns its path.

    Raises:
        FileExistsError: If a checkpoint exists and neither ``resume`` nor ``overwrite`` says what to do with it.
    """
    path = partial_dir(output_dir)
    if not path.exists():
        if resume:
            log.warning("--resume true, but there is no checkpoint at %s: starting from the first layer.", path)
        return path
    if resume:
        return path
    if not overwrite:
        raise FileExistsError(
            f"Found {path}, the checkpoint of an interrupted run. Pass --resume true to continue it, or "
            "--overwrite true to discard it and start over."
        )
    return path


@dataclass
class ResumeState:
    """What an interrupted run had finished."""

    next_layer: int
    importance: dict[ModuleKey, list[Tensor]]
    hidden: list[Tensor] | None
    """This rank's inputs of ``next_layer`` on the quantized path (None when no layer had finished)."""
    records: list[dict[str, Any]]
    results: dict[ModuleKey, ModuleResult]
    vision_scores: dict[ModuleKey, list[Tensor]]
    """Raw importance scores of the vision tower (empty without ``quant.vision``)."""
    vision_results: dict[ModuleKey, ModuleResult] | None = None
    """The calibrated vision tower's results (None: not calibrated yet, or no ``quant.vision``)."""
    vision_records: list[dict[str, Any]] | None = None
    method_state: dict[ModuleKey, float] | None = None
    """The method's per-run values derived from importance (mbq: vision weights), see ``Method.after_importance``."""
    fp_hidden: list[Tensor] | None = None
    """With ``quant.target = fp``: this rank's full-precision inputs of ``next_layer`` (None if none were saved)."""


def _atomic_save(obj: Any, path: Path, *, what: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            if isinstance(obj, str):
                file.write(obj.encode())
            else:
                torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        code = write_error(err, tmp)  # probed while the partial file still occupies the disk
        with contextlib.suppress(OSError):  # e.g. read-only: there is no partial file
            tmp.unlink(missing_ok=True)
        hint = (
            "the checkpoint is kept: fix that, then rerun with --resume true to continue from the last finished layer "
            "(or pass --checkpoint false)"
        )
        wrapped = wrap_write_error(err, path, f"the calibration checkpoint ({what})", hint, code)
        if wrapped is None:
            raise
        raise wrapped from err


def _results_to_disk(results: Mapping[Any, ModuleResult]) -> dict[str, dict[str, Any]]:
    """Results as saved: keyed by the string form of their key (a layer file: the module name in the layer)."""
    return {
        str(key): {"codes": r.codes, "scale": r.scale, "zero": r.zero, "record": r.record} for key, r in results.items()
    }


def _results_from_disk(saved: Mapping[str, Any], stage: int | None = None) -> dict[ModuleKey, ModuleResult]:
    """Saved results back under their keys: ``"<stage>.<module>"``, or module names of decoder layer ``stage``."""
    return {
        ModuleKey(stage, name) if stage is not None else ModuleKey.parse(name): ModuleResult(
            None, r["codes"], r["scale"], r["zero"], r["record"]
        )
        for name, r in saved.items()
    }


def _keys_from_disk(saved: Mapping[str, Any]) -> dict[ModuleKey, Any]:
    """A saved mapping keyed ``"<stage>.<module>"`` back under its :class:`ModuleKey` s."""
    return {ModuleKey.parse(key): value for key, value in saved.items()}


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}


class LayerCheckpoint(CalibrationObserver):
    """Saves the calibration loop's state after every finished layer and restores it on resume.

    Args:
        directory: The checkpoint directory (see :func:`partial_dir`).
        settings: JSON-serialisable settings that determine the result; a resumed run must have the same.
        resume: Continue from ``directory`` if it holds a checkpoint (otherwise it is replaced).
    """

    def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any], resume: bool = False) -> None:
        self.directory = Path(directory)
        self.settings = json.loads(json.dumps(dict(settings)))  # normalise (tuples -> lists) and check JSON-ability
        self.resume = resume
        self.restored: ResumeState | None = None
        self._created = False
        self._num_layers = 0
        self._vision_done = False

    # --- restore ------------------------------------------------------------------------------------------------
    def restore(
        self, fabric: Any, layers: Sequence[nn.Module], vision_modules: Mapping[ModuleKey, nn.Module] | None = None
    ) -> ResumeState | None:
        """Load the finished layers (and a calibrated vision tower) in place; return the rest; None if fresh.

        Raises:
            ValueError: If the checkpoint was made with other settings or another number of processes.
            FileNotFoundError: If a file the checkpoint refers to is missing.
        """
        self._num_layers = len(layers)
        state_file = self.directory / STATE_NAME
        if not self.resume or not state_file.is_file():
            self._start_fresh(fabric)
            return None
        state = json.loads(state_file.read_text())
        if fabric.is_global_zero:
            remove_dead_temp_files(self.directory)  # `.<file>.tmp-<pid>` of a run killed while saving
        self._check_compatible(state, fabric.world_size, len(layers))
        rank, next_layer = fabric.global_rank, int(state["next_layer"])
        records: list[dict[str, Any]] = []
        results: dict[ModuleKey, ModuleResult] = {}
        for index in range(next_layer):
            saved = self._load(self.directory / f"layer_{index:04d}.pt")
            layers[index].load_state_dict(saved["state"])
            records.append(saved["record"])
            results.update(_results_from_disk(saved["results"], stage=index))
        saved_importance = self._load(self.directory / f"importance.rank{rank}.pt")
        hidden = self._load(self.directory / f"hidden_{next_layer - 1:04d}.rank{rank}.pt") if next_layer else None
        fp_file = self.directory / f"fp_hidden_{next_layer - 1:04d}.rank{rank}.pt"
        decoder, vision = (_keys_from_disk(saved_importance[part]) for part in ("decoder", "vision"))
        self.restored = ResumeState(next_layer, decoder, hidden, records, results, vision)
        if saved_importance.get("method_state") is not None:
            self.restored.method_state = _keys_from_disk(saved_importance["method_state"])
        if next_layer and fp_file.is_file():
            self.restored.fp_hidden = self._load(fp_file)
        if state.get("vision_done"):
            self._restore_vision(vision_modules)
        if fabric.is_global_zero:
            log.info("Resuming from %s: %d of %d layers already calibrated.", self.directory, next_layer, len(layers))
        return self.restored

    def _restore_vision(self, modules: Mapping[ModuleKey, nn.Module] | None) -> None:
        assert self.restored is not None
        if modules is None:
            raise ValueError(f"{self.directory} holds a calibrated vision tower, but this run has quant.vision=false.")
        saved = self._load(self.directory / "vision.pt")
        for key, module in modules.items():
            module.load_state_dict(saved["state"][str(key)])
        self.restored.vision_results = _results_from_disk(saved["results"])
        self.restored.vision_records = saved["records"]
        self._vision_done = True

    def _start_fresh(self, fabric: Any) -> None:
        if fabric.is_global_zero and self.directory.exists():
            discard_dir(self.directory)
        fabric.barrier()

    def _check_compatible(self, state: Mapping[str, Any], world_size: int, num_layers: int) -> None:
        if state.get("version") != _VERSION:
            raise ValueError(f"{self.directory} was written by another lightning_tlq version; pass --overwrite true.")
        if state["world_size"] != world_size:
            raise ValueError(
                f"{self.directory} was written by {state['world_size']} process(es), this run has {world_size}: "
                "resume with the same devices and nodes (each process saved its own shard of activations)."
            )
        if state["num_layers"] != num_layers:
            raise ValueError(f"{self.directory} is for a model with {state['num_layers']} layers, not {num_layers}.")
        old, new = _flatten("", state["settings"]), _flatten("", self.settings)
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:8])
            raise ValueError(
                f"Cannot resume from {self.directory}: it was made with other settings ({changes}). Rerun with the "
                "original settings, or pass --resume false --overwrite true to start over."
            )

    def _load(self, path: Path) -> Any:
        if not path.is_file():
            raise FileNotFoundError(
                f"The checkpoint in {self.directory} is incomplete ({path.name} is missing); pass --resume false "
                "--overwrite true to start over."
            )
        return torch.load(path, map_location="cpu", weights_only=True)

    # --- Fabric-style hooks -------------------------------------------------------------------------------------
    def on_importance_ready(
        self,
        fabric: Any,
        importance: Mapping[ModuleKey, list[Tensor]],
        vision_scores: Mapping[ModuleKey, list[Tensor]] | None = None,
        method_state: Mapping[ModuleKey, float] | None = None,
    ) -> None:
        """Save this rank's post-processed importance (raw vision scores, the method's per-run values such as mbq's
        vision weights), then commit ``next_layer = 0``."""
        if fabric.is_global_zero:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise wrap_write_error(err, self.directory, "the calibration checkpoint") or err
        fabric.barrier()
        self._created = True
        saved = {
            part: {str(key): [t.detach().cpu() for t in ts] for key, ts in (scores or {}).items()}
            for part, scores in (("decoder", importance), ("vision", vision_scores))
        }
        saved["method_state"] = {str(key): value for key, value in (method_state or {}).items()}
        _atomic_save(saved, self.directory / f"importance.rank{fabric.global_rank}.pt", what="token importance")
        self._commit(fabric, next_layer=0)

    def on_vision_end(
        self,
        fabric: Any,
        modules: Mapping[ModuleKey, nn.Module],
        results: Mapping[ModuleKey, ModuleResult],
        records: Sequence[Mapping[str, Any]],
    ) -> None:
        """Save the calibrated vision tower and projector (rank 0), then commit."""
        if fabric.is_global_zero:
            saved = {
                "state": {
                    str(key): {k: v.detach().cpu() for k, v in m.state_dict().items()} for key, m in modules.items()
                },
                "results": _results_to_disk(results),
                "records": [dict(r) for r in records],
            }
            _atomic_save(saved, self.directory / "vision.pt", what="after the vision tower")
        self._vision_done = True
        self._commit(fabric, next_layer=0)

    def on_layer_fp_hidden(self, fabric: Any, index: int, fp_hidden: Sequence[Tensor]) -> None:
        """Save this rank's full-precision stream after layer ``index`` (committed by :meth:`on_layer_end`)."""
        _atomic_save(
            [h.detach().cpu() for h in fp_hidden],
            self.directory / f"fp_hidden_{index:04d}.rank{fabric.global_rank}.pt",
            what=f"after layer {index}",
        )

    def on_layer_end(
        self,
        fabric: Any,
        index: int,
        record: Mapping[str, Any],
        layer: nn.Module,
        results: Mapping[str, ModuleResult],
        hidden: Sequence[Tensor],
    ) -> None:
        """Save layer ``index`` (rank 0) and this rank's activations, commit, then drop the previous activations."""
        what = f"after layer {index}"
        _atomic_save(
            [h.detach().cpu() for h in hidden],
            self.directory / f"hidden_{index:04d}.rank{fabric.global_rank}.pt",
            what=what,
        )
        if fabric.is_global_zero:
            saved = {
                "state": {k: v.detach().cpu() for k, v in layer.state_dict().items()},
                "results": _results_to_disk(results),
                "record": dict(record),
            }
            _atomic_save(saved, self.directory / f"layer_{index:04d}.pt", what=what)
        self._commit(fabric, next_layer=index + 1)
        for stream in ("hidden", "fp_hidden"):
            (self.directory / f"{stream}_{index - 1:04d}.rank{fabric.global_rank}.pt").unlink(missing_ok=True)

    def _commit(self, fabric: Any, next_layer: int) -> None:
        fabric.barrier()  # every rank's files are on disk before the state points at them
        if fabric.is_global_zero:
            state = {
                "version": _VERSION,
                "next_layer": next_layer,
                "num_layers": self._num_layers,
                "vision_done": self._vision_done,
                "world_size": fabric.world_size,
                "settings": self.settings,
            }
            _atomic_save(json.dumps(state, indent=2) + "\n", self.directory / STATE_NAME, what="state")
        fabric.barrier()

    # --- end of run ---------------------------------------------------------------------------------------------
    def remove(self, fabric: Any) -> None:
        """Delete the checkpoint (after the final output was written)."""
        if fabric.is_global_zero and self.directory.exists():
            discard_dir(self.directory)

    def on_failure(self, fabric: Any, error: BaseException) -> None:
        """After an error: remove the checkpoint this run made only if a rerun would repeat the error (bad settings,
        NaN); keep it after anything else (filesystem, memory, interrupt, unknown)."""
        if not self.directory.exists() or not fabric.is_global_zero:
            return
        if self._created and discards_checkpoint(error):
            discard_dir(self.directory)
        else:
            log.warning("Calibration failed; its checkpoint is kept in %s (rerun with --resume true).", self.directory)


def discards_checkpoint(error: BaseException) -> bool:
    """Whether rerunning after ``error`` would only repeat it, so that its checkpoint is useless.

    True only for errors of the settings or data (``ValueError`` & co., NaN/Inf) that no filesystem failure is
    behind; write errors in any disguise (``SafetensorError``, torch's ``RuntimeError``), out of memory,
    interrupts and unknown errors keep the checkpoint.
    """
    return isinstance(error, _PERMANENT) and write_error(error) is None
