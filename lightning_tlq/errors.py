"""Errors as the command line shows them, and checks of weight files before they are loaded.

:func:`report_error` prints one message (what went wrong and what to do), writes the traceback to a log file
and names it (``--verbose`` or ``TLQ_DEBUG=1`` print the traceback instead), and returns the exit code.
:func:`check_weight_files` runs before a model loads: a truncated or damaged safetensors shard is named with what
is wrong with it (the library only says "file not fully covered"), and pickle weight files (``pytorch_model.bin``,
``*.pt``) are refused unless ``--model.allow_pickle true``: unpickling can run code, and safetensors holds the
same weights without that risk.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import struct
import sys
import tempfile
import traceback
from pathlib import Path

from lightning_tlq import environment

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_USER_ERRORS = (
    ValueError,
    TypeError,
    OSError,  # FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, disk full
    ImportError,
)
_USER_ERROR_NAMES = ("MisconfigurationException", "SafetensorError", "ExportError", "UnpicklingError")


class WeightFileError(ValueError):
    """A weight file that cannot (or must not) be loaded; the message names the file and what to do."""


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (header and size), or None when it is whole."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return f"it has {size} bytes, fewer than the 8-byte header length"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"its header claims {length} bytes but the file has {size} (truncated)"
        try:
            header = json.loads(file.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON (damaged)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (damaged)"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"it has {size} bytes but its tensors need {expected} (truncated: {expected - size} bytes missing)"
    if size > expected:
        return f"it has {size - expected} bytes more than its tensors describe (damaged)"
    return None


def check_weight_files(model: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Check a local model directory's weight files before loading (no-op for built-in model names).

    Raises:
        WeightFileError: For a truncated or damaged safetensors file (named), or pickle weight files without
            ``allow_pickle``.
    """
    directory = Path(model)
    if not directory.is_dir():
        return
    shards = sorted(directory.glob("*.safetensors"))
    for shard in shards:
        problem = _safetensors_problem(shard)
        if problem is not None:
            raise WeightFileError(
                f"Weight file {shard} cannot be loaded: {problem}. Copy or download the model again (compare the "
                "file sizes with the source)."
            )
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and "training_args" not in p.name)
    if pickles and not shards and not allow_pickle:
        names = ", ".join(p.name for p in pickles)
        raise WeightFileError(
            f"{directory} holds pickle weight files ({names}) and no safetensors; loading a pickle can run code. "
            "Convert the model to safetensors (save_pretrained(..., safe_serialization=True)) or, if you trust the "
            "file, pass --model.allow_pickle true."
        )


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, _USER_ERRORS) or type(err).__name__ in _USER_ERROR_NAMES


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _flag_names() -> list[str]:
    """``quant.bits``, ``data.num_samples``, ...: the settings that messages name, as the CLI spells them."""
    from dataclasses import fields

    from lightning_tlq.config import DataArgs, ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs

    groups = {"quant": QuantArgs, "importance": ImportanceArgs, "token_set": TokenSetArgs, "memory": MemoryArgs}
    names = [f"{group}.{f.name}" for group, cls in {**groups, "data": DataArgs}.items() for f in fields(cls)]
    return sorted(names, key=len, reverse=True)


def name_flags(text: str) -> str:
    """Spell settings as flags: ``quant.bits=9 is ...`` -> ``--quant.bits 9 is ...``."""
    pattern = "|".join(re.escape(name) for name in _flag_names())
    return re.sub(rf"(?<![\w.-])({pattern})\b(=)?", lambda m: f"--{m.group(1)}" + (" " if m.group(2) else ""), text)


def error_message(err: BaseException) -> str:
    """The message shown for ``err``: ours with settings spelled as flags; library text rewritten where it gives
    unusable advice."""
    text = name_flags(str(err).strip()) or type(err).__name__
    if type(err).__name__ == "OutputWriteError":  # one line naming the file; its cause is the writer's raw text
        return text
    for link in _chain(err):
        name = type(link).__name__
        if name == "UnpicklingError" or "weights_only" in str(link):
            return (
                "a pickle weight file holds objects the safe loader refuses (it may run code when unpickled). "
                "Convert the checkpoint to safetensors with the tool that wrote it, then load that."
            )
        if name == "SafetensorError":
            return (
                f"a safetensors weight file is damaged ({str(link).strip()}); copy or download the model again "
                "(compare file sizes with the source)."
            )
    return text


def log_dir() -> Path:
    """Where tracebacks go: ``TLQ_LOG_DIR``, else ``~/.cache/lightning-tlq/logs`` (the temp dir if unwritable)."""
    configured = environment.get("TLQ_LOG_DIR")
    base = Path(environment.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning-tlq" / "logs"
    for candidate in ([Path(configured)] if configured else []) + [base, Path(tempfile.gettempdir()) / "lightning-tlq"]:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    return Path(tempfile.gettempdir())


def write_log(err: BaseException, subcommand: str) -> Path | None:
    """Write the command line and ``err``'s traceback to a new log file; None if nothing could be written."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = log_dir() / f"{subcommand}-{stamp}-{os.getpid()}.log"
    try:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        path.write_text(f"command: {' '.join(sys.argv)}\n\n{text}")
    except OSError:
        return None
    return path


def report_error(err: BaseException, subcommand: str, verbose: bool = False) -> int:
    """Print ``err`` as one message (plus where its traceback is) and return the exit code (1)."""
    prefix = f"lightning-tlq {subcommand}" if subcommand != "lightning-tlq" else subcommand
    if verbose:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if _is_user_error(err):
        lines = [f"{prefix}: error: {error_message(err)}"]
    else:
        lines = [
            f"{prefix}: internal error ({type(err).__name__}): {error_message(err)}",
            "This is a bug in lightning-tlq; please report it with the log file below.",
        ]
    if not verbose:
        path = write_log(err, subcommand.split()[-1])
        if path is not None:
            lines.append(f"traceback: {path} (--verbose or TLQ_DEBUG=1 prints it)")
    print("\n".join(lines), file=sys.stderr)
    return 1
