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

Every file is written to a temporary name, fsynced and renamed (:mod:`lightning_tlq.checkpoint_files`: the files,
their names and the form of module keys on disk), so a crash at any instant leaves the last committed layer intact.
:class:`~lightning_tlq.loop.CalibrationLoop` asks it for :meth:`LayerCheckpoint.restore` before starting: the
finished layers' weights are loaded back, the importance pass is skipped and calibration continues at
``next_layer`` with the saved activations (a calibrated vision tower is loaded back instead of recalibrated), so
the result is bit-identical to an uninterrupted run. The saved settings must match the resumed run's (model, data,
quantization, importance, token set, dtype, seed, number of processes); otherwise :meth:`restore` refuses and names
the differences. For multi-node runs the directory must be on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_tlq.checkpoint_files import (
    STATE_NAME,
    VERSION,
    VISION_NAME,
    activations_file,
    atomic_save,
    importance_file,
    keys_from_disk,
    keys_to_disk,
    layer_file,
    load,
    partial_dir,
    results_from_disk,
    results_to_disk,
)
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.keys import ModuleKey
from lightning_tlq.module_stats import ModuleResult
from lightning_tlq.observers import CalibrationObserver
from lightning_tlq.output_lock import discard_dir, remove_dead_temp_files
from lightning_tlq.outputs import wrap_write_error, write_error

__all__ = [
    "STATE_NAME",
    "LayerCheckpoint",
    "ResumeState",
    "discards_checkpoint",
    "partial_dir",
    "prepare_partial_dir",
]

log = logging.getLogger(__name__)

# Errors that a rerun with the same settings would repeat (bad settings or data, NaN/Inf): only after these is the
# checkpoint this run created removed. Every other error -- a filesystem failure (whatever type the writer raised
# it as), out of memory, an interrupt, anything unknown -- keeps it, since rerunning may then succeed.
_PERMANENT = (ValueError, ArithmeticError, TypeError, NotImplementedError)


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
    def _packing(self) -> tuple[int, int] | None:
        """``(bits, qmin)`` of the run's codes, to keep restored codes packed as a running stage keeps them."""
        quant = self.settings.get("quant") or {}
        if "bits" not in quant or "symmetric" not in quant:
            return None
        spec = QuantSpec(bits=int(quant["bits"]), group_size=-1, symmetric=bool(quant["symmetric"]))
        return spec.bits, spec.qmin

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
        packing = self._packing()
        for index in range(next_layer):
            saved = load(self.directory / layer_file(index))
            layers[index].load_state_dict(saved["state"])
            records.append(saved["record"])
            results.update(results_from_disk(saved["results"], stage=index, packing=packing))
        saved_importance = load(self.directory / importance_file(rank))
        hidden = load(self.directory / activations_file("hidden", next_layer - 1, rank)) if next_layer else None
        fp_file = self.directory / activations_file("fp_hidden", next_layer - 1, rank)
        decoder, vision = (keys_from_disk(saved_importance[part]) for part in ("decoder", "vision"))
        self.restored = ResumeState(next_layer, decoder, hidden, records, results, vision)
        if saved_importance.get("method_state") is not None:
            self.restored.method_state = keys_from_disk(saved_importance["method_state"])
        if next_layer and fp_file.is_file():
            self.restored.fp_hidden = load(fp_file)
        if state.get("vision_done"):
            self._restore_vision(vision_modules)
        if fabric.is_global_zero:
            log.info("Resuming from %s: %d of %d layers already calibrated.", self.directory, next_layer, len(layers))
        return self.restored

    def _restore_vision(self, modules: Mapping[ModuleKey, nn.Module] | None) -> None:
        assert self.restored is not None
        if modules is None:
            raise ValueError(f"{self.directory} holds a calibrated vision tower, but this run has quant.vision=false.")
        saved = load(self.directory / VISION_NAME)
        for key, module in modules.items():
            module.load_state_dict(saved["state"][str(key)])
        self.restored.vision_results = results_from_disk(saved["results"])
        self.restored.vision_records = saved["records"]
        self._vision_done = True

    def _start_fresh(self, fabric: Any) -> None:
        if fabric.is_global_zero and self.directory.exists():
            discard_dir(self.directory)
        fabric.barrier()

    def _check_compatible(self, state: Mapping[str, Any], world_size: int, num_layers: int) -> None:
        if state.get("version") != VERSION:
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
            part: keys_to_disk({key: [t.detach().cpu() for t in ts] for key, ts in (scores or {}).items()})
            for part, scores in (("decoder", importance), ("vision", vision_scores))
        }
        saved["method_state"] = keys_to_disk(method_state)
        atomic_save(saved, self.directory / importance_file(fabric.global_rank), what="token importance")
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
                "state": keys_to_disk(
                    {key: {k: v.detach().cpu() for k, v in m.state_dict().items()} for key, m in modules.items()}
                ),
                "results": results_to_disk(results),
                "records": [dict(r) for r in records],
            }
            atomic_save(saved, self.directory / VISION_NAME, what="after the vision tower")
        self._vision_done = True
        self._commit(fabric, next_layer=0)

    def on_layer_fp_hidden(self, fabric: Any, index: int, fp_hidden: Sequence[Tensor]) -> None:
        """Save this rank's full-precision stream after layer ``index`` (committed by :meth:`on_layer_end`)."""
        atomic_save(
            [h.detach().cpu() for h in fp_hidden],
            self.directory / activations_file("fp_hidden", index, fabric.global_rank),
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
        atomic_save(
            [h.detach().cpu() for h in hidden],
            self.directory / activations_file("hidden", index, fabric.global_rank),
            what=what,
        )
        if fabric.is_global_zero:
            saved = {
                "state": {k: v.detach().cpu() for k, v in layer.state_dict().items()},
                "results": results_to_disk(results),
                "record": dict(record),
            }
            atomic_save(saved, self.directory / layer_file(index), what=what)
        self._commit(fabric, next_layer=index + 1)
        for stream in ("hidden", "fp_hidden"):
            (self.directory / activations_file(stream, index - 1, fabric.global_rank)).unlink(missing_ok=True)

    def _commit(self, fabric: Any, next_layer: int) -> None:
        fabric.barrier()  # every rank's files are on disk before the state points at them
        if fabric.is_global_zero:
            state = {
                "version": VERSION,
                "next_layer": next_layer,
                "num_layers": self._num_layers,
                "vision_done": self._vision_done,
                "world_size": fabric.world_size,
                "settings": self.settings,
            }
            atomic_save(json.dumps(state, indent=2) + "\n", self.directory / STATE_NAME, what="state")
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
