"""The files of the per-layer calibration checkpoint (:class:`~lightning_tlq.resume.LayerCheckpoint`): where the
checkpoint lives, the name of each file, atomic writes and loads, and the form module keys take on disk.

Layout of ``<output_dir>.partial/``: ``state.json`` (the commit point), ``importance.rank{r}.pt``, ``vision.pt``,
``layer_{k:04d}.pt``, ``hidden_{k:04d}.rank{r}.pt`` and ``fp_hidden_{k:04d}.rank{r}.pt``. Every file is written to
``.<name>.tmp-<pid>``, fsynced and renamed. Module keys are stored in their string form (``str(ModuleKey)``, e.g.
``"3.mlp.down_proj"``; a layer file: the module name in the layer), as every version wrote them, so that
``torch.load(weights_only=True)`` reads the files and checkpoints of earlier versions still resume.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_tlq.core.codepack import pack_codes
from lightning_tlq.keys import ModuleKey
from lightning_tlq.module_stats import ModuleResult
from lightning_tlq.outputs import wrap_write_error, write_error

STATE_NAME = "state.json"
VISION_NAME = "vision.pt"
VERSION = 1
"""The version in ``state.json``; a checkpoint of another version is refused."""


def partial_dir(output_dir: str | os.PathLike) -> Path:
    """Where the checkpoint of a run writing ``output_dir`` lives: ``<output_dir>.partial`` beside it."""
    path = Path(output_dir)
    return path.with_name(path.name + ".partial")


def layer_file(index: int) -> str:
    """Decoder layer ``index``'s quantized state, results and record (rank 0)."""
    return f"layer_{index:04d}.pt"


def importance_file(rank: int) -> str:
    """Rank ``rank``'s token importance, raw vision scores and the method's per-run values."""
    return f"importance.rank{rank}.pt"


def activations_file(stream: str, index: int, rank: int) -> str:
    """Rank ``rank``'s outputs of decoder layer ``index`` on the ``"hidden"`` (quantized) or ``"fp_hidden"`` path."""
    return f"{stream}_{index:04d}.rank{rank}.pt"


def atomic_save(obj: Any, path: Path, *, what: str) -> None:
    """Write ``obj`` (a string as text, anything else with ``torch.save``) to ``path`` atomically.

    Raises:
        OutputWriteError: If the filesystem refused the write (full, read-only, no permission): one line naming the
            checkpoint file and how to continue.
    """
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


def load(path: Path) -> Any:
    """One checkpoint file (tensors on the CPU; ``weights_only``).

    Raises:
        FileNotFoundError: If the file is missing (the checkpoint is incomplete).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"The checkpoint in {path.parent} is incomplete ({path.name} is missing); pass --resume false "
            "--overwrite true to start over."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def results_to_disk(results: Mapping[Any, ModuleResult]) -> dict[str, dict[str, Any]]:
    """Results as saved: codes, scales, zero points and record, keyed by the string form of their key."""
    return {
        str(key): {"codes": r.codes, "scale": r.scale, "zero": r.zero, "record": r.record} for key, r in results.items()
    }


def results_from_disk(
    saved: Mapping[str, Any], stage: int | None = None, packing: tuple[int, int] | None = None
) -> dict[ModuleKey, ModuleResult]:
    """Saved results under their keys: parsed from ``"<stage>.<module>"``, or module names of decoder layer
    ``stage``. With ``packing = (bits, qmin)`` codes of <= 4 bits are kept packed (:func:`pack_codes`)."""

    def codes(c: Any) -> Any:
        return c if packing is None else pack_codes(c, *packing)

    return {
        ModuleKey(stage, name) if stage is not None else ModuleKey.parse(name): ModuleResult(
            None, codes(r["codes"]), r["scale"], r["zero"], r["record"]
        )
        for name, r in saved.items()
    }


def keys_to_disk(values: Mapping[ModuleKey, Any] | None) -> dict[str, Any]:
    """A mapping keyed by :class:`ModuleKey` as saved: keyed ``"<stage>.<module>"``."""
    return {str(key): value for key, value in (values or {}).items()}


def keys_from_disk(saved: Mapping[str, Any]) -> dict[ModuleKey, Any]:
    """A saved mapping keyed ``"<stage>.<module>"`` back under its :class:`ModuleKey` s."""
    return {ModuleKey.parse(key): value for key, value in saved.items()}
