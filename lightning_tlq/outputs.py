"""Safe outputs: write errors told apart from bugs, and a space check (locks and temporary folders:
:mod:`lightning_tlq.output_lock`).

- :func:`write_error` recognises an out-of-space, quota, read-only or permission failure of any writer --
  ``OSError`` (json, ``open``), safetensors' ``SafetensorError`` ("No space left on device (os error 28)") and
  torch's ``RuntimeError`` ("file write failed", "unexpected pos"; no errno at all when saving to a path) -- by the
  errno anywhere in the exception chain, by the message, and for torch's errno-less errors by probing the
  filesystem (read-only flag, free space) while the half-written file still occupies it. The caller re-raises it as
  :class:`OutputWriteError`, an ``OSError`` with ``errno`` set and a one-line message.
- :func:`estimate_bytes` / :func:`check_free_space`: the checkpoint + output size from the parameter count,
  dtype and activation size, checked against the free space before the weights are loaded.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OutputWriteError",
    "check_free_space",
    "du",
    "estimate_bytes",
    "format_size",
    "free_bytes",
    "wrap_write_error",
    "write_error",
]

WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_MESSAGES = (
    (re.compile(r"no space left on device|os error 28\b", re.I), errno.ENOSPC),
    (re.compile(r"disk quota exceeded|os error 122\b", re.I), errno.EDQUOT),
    (re.compile(r"read-only file system|os error 30\b", re.I), errno.EROFS),
    (re.compile(r"permission denied|os error 13\b", re.I), errno.EACCES),
)
# torch.save's writer reports a failed write without an errno: "file write failed", "unexpected pos N vs M",
# "basic_ios::clear: iostream error" (PytorchStreamWriter, inline_container.cc).
_TORCH_WRITE = re.compile(r"file write failed|unexpected pos|iostream error|inline_container|PytorchStreamWriter")
_WHAT = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "I/O error",
}
_LOW_SPACE = 1 << 20  # a failed write with less than this left on the filesystem is taken for a full disk
_needed: dict[Path, int] = {}  # output_dir -> estimated bytes of the run (set by check_free_space)


class OutputWriteError(OSError):
    """A write failed for a reason of the filesystem (full, quota, read-only, permissions, I/O), not of the run.

    ``errno`` is set (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``/``EPERM`` or ``EIO``) and ``filename`` is the
    path; ``str()`` is the one-line message. Rerunning after fixing the filesystem may succeed, so a checkpoint is
    never deleted because of it.
    """

    def __init__(self, code: int, message: str, filename: str | os.PathLike | None = None) -> None:
        super().__init__(code, message)
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:
        return str(self.strerror)


# --- sizes and free space ---------------------------------------------------------------------------------------
def format_size(num: float) -> str:
    """``3.2 GB``, ``412.0 MB``, ``96.0 KB`` (decimal units, as ``df -H`` prints them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(num) >= scale or unit == "KB":
            return f"{num / scale:.1f} {unit}"
    raise AssertionError  # pragma: no cover


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its nearest ancestor)."""
    st = os.statvfs(_existing(Path(path)))
    return st.f_bavail * st.f_frsize


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(_existing(path)).f_flag & os.ST_RDONLY)


def du(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# --- recognising write errors -----------------------------------------------------------------------------------
def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [err]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack += [cur.__cause__, cur.__context__]  # type: ignore[list-item]


def write_error(err: BaseException, path: str | os.PathLike | None = None) -> int | None:
    """The errno of a filesystem failure behind ``err`` (ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EIO), or None.

    Call it while a half-written file still occupies the disk: for torch's errno-less write errors, the
    filesystem holding ``path`` is probed (read-only, almost no space left, not writable).
    """
    torch_write = False
    for cur in _chain(err):
        if isinstance(cur, OutputWriteError) or (isinstance(cur, OSError) and cur.errno in WRITE_ERRNOS):
            return cur.errno
        text = str(cur)
        for pattern, code in _MESSAGES:
            if pattern.search(text):
                return code
        torch_write |= bool(_TORCH_WRITE.search(text)) or (isinstance(cur, OSError) and cur.errno == errno.EIO)
    if not torch_write:
        return None
    if path is not None:
        where = _existing(Path(path))
        if _read_only(where):
            return errno.EROFS
        if free_bytes(where) < _LOW_SPACE:
            return errno.ENOSPC
        if not os.access(where if where.is_dir() else where.parent, os.W_OK):
            return errno.EACCES
    return errno.EIO


def wrap_write_error(
    err: BaseException, path: str | os.PathLike, what: str, hint: str = "", code: int | None = None
) -> OutputWriteError | None:
    """``err`` as an :class:`OutputWriteError` with a one-line message if it is a filesystem failure, else None.

    ``code`` is :func:`write_error`'s answer if the caller already probed (before removing its partial file).
    """
    code = code if code is not None else write_error(err, path)
    if code is None:
        return None
    if isinstance(err, OutputWriteError):
        return err
    path = Path(os.path.abspath(path))
    message = f"{_WHAT.get(code, os.strerror(code).lower())} while writing {what} {path}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        needed = next((n for out, n in _needed.items() if path == out or out in path.parents or _beside(path, out)), 0)
        need = f", needed ~{format_size(needed)} in all" if needed else ""
        message += f": free {format_size(free_bytes(path))}{need}"
    elif code == errno.EIO:
        message += f" ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"
    return OutputWriteError(code, message + (f"; {hint}" if hint else ""), path)


def _beside(path: Path, out: Path) -> bool:
    """``path`` is ``<out>.partial/...`` or a ``.<out>.*`` temporary beside ``out``."""
    for p in (path, *path.parents):
        if p.parent == out.parent and (p.name.startswith(out.name + ".") or p.name.startswith(f".{out.name}.")):
            return True
    return False


# --- estimate ---------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate_bytes(
    structure: Any,
    quant: Any,
    dtype: str,
    lengths: Sequence[int],
    batch_size: int,
    *,
    checkpoint: bool,
    export: bool,
) -> dict[str, int]:
    """Bytes the run writes: ``output`` (model + codes + report), ``checkpoint`` at its largest, ``export``.

    Args:
        structure: the model on the ``meta`` device (:func:`~lightning_tlq.preflight.model_on_meta`).
        quant: :class:`~lightning_tlq.config.QuantArgs`.
        dtype: the run's dtype name.
        lengths: every calibration sample's token count (the saved activations are padded per batch).
        batch_size: samples per batch.
        checkpoint: the run keeps ``<output_dir>.partial``.
        export: the run also writes the packed checkpoint.
    """
    from lightning_tlq.adapters import get_adapter

    size = _DTYPE_BYTES.get(dtype, 4)
    total = sum(p.numel() for p in structure.parameters())
    layers = get_adapter(structure).decoder_layers()
    decoder = sum(p.numel() for p in layers.parameters())
    linear = sum(m.weight.numel() for m in layers.modules() if type(m).__name__ == "Linear")
    bits, group = quant.bits, max(1, quant.group_size if quant.group_size > 0 else 1 << 30)
    qparams = linear * bits // 8 + 2 * (linear // group) * size  # packed codes + scales and zero points
    out = {"output": total * size + qparams, "checkpoint": 0, "export": 0}
    if checkpoint:
        text = structure.config.get_text_config() if hasattr(structure.config, "get_text_config") else structure.config
        chunks = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
        tokens = sum(len(chunk) * max(chunk) for chunk in chunks)
        streams = 2 if getattr(quant, "target", "quantized") == "fp" else 1
        # layer files: weights + int8 codes + scales; activations: two generations while a layer commits
        layer_files = decoder * size + linear + 2 * (linear // group) * size
        out["checkpoint"] = layer_files + 2 * streams * tokens * int(text.hidden_size) * size
    if export:
        out["export"] = (total - linear) * size + linear * bits // 8 + 2 * (linear // group) * size
    return out


def check_free_space(output_dir: str | os.PathLike, needs: dict[str, int], *, resume: bool = False) -> int:
    """Raise :class:`OutputWriteError` (ENOSPC) if the filesystem of ``output_dir`` clearly lacks room for the run.

    A checkpoint already on disk (``resume``) counts toward its estimate. Returns the bytes still needed.
    """
    out = Path(os.path.abspath(output_dir))
    have = du(out.with_name(out.name + ".partial")) if resume else 0
    need = needs.get("output", 0) + needs.get("export", 0) + max(0, needs.get("checkpoint", 0) - have)
    _needed[out] = need
    free = free_bytes(out.parent)
    if free < need:
        parts = ", ".join(f"{k} ~{format_size(v)}" for k, v in needs.items() if v)
        raise OutputWriteError(
            errno.ENOSPC,
            f"disk full while writing {out}: free {format_size(free)}, needed ~{format_size(need)} ({parts}); free "
            "space on that filesystem or choose another --output_dir"
            + (" (or pass --checkpoint false)" if needs.get("checkpoint") else ""),
            out,
        )
    return need
