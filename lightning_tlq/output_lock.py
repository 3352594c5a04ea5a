"""An exclusive lock per output directory, temporary folders named after their process, and their clean-up.

- :class:`OutputLock` holds ``fcntl.flock`` on ``<output_dir>.lock`` beside the output for the whole run; it
  covers the output and its ``.partial`` checkpoint. The kernel drops a flock when its holder dies, so a lock file
  left by a killed run is taken over at once (its pid is named in a warning), while a live holder makes a second
  run fail at once with its pid, host and start time.
- Temporary output folders are named ``.<out>.tmp-<pid>-<host>-<token>`` and follow the umask; under the lock,
  :func:`remove_orphans` deletes those of dead processes on this host (and restores a previous output that a
  killed fallback swap left aside).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lightning_tlq import environment
from lightning_tlq.outputs import wrap_write_error

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "OutputLock",
    "OutputLockedError",
    "discard_dir",
    "lock_if_main_process",
    "lock_path",
    "locks_output_dir",
    "make_temp_dir",
    "remove_dead_temp_files",
    "remove_orphans",
    "temp_name",
]


class OutputLockedError(OSError):
    """Another live run holds the lock of this output directory (an ``OSError``: the command line shows it as a
    user error, in one line)."""


# --- temporary folders and orphans ------------------------------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.]+)-[0-9a-f]{8}$")


def make_temp_dir(path: Path, kind: str = "tmp") -> Path:
    """Create ``.<name>.<kind>-<pid>-<host>-<token>`` beside ``path`` with the umask's mode (mkdtemp uses 0700)."""
    tmp = path.with_name(f".{path.name}.{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}")
    os.mkdir(tmp, 0o777)
    return tmp


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A fresh name like :func:`make_temp_dir`'s, not created."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders beside ``path`` (of the output and of its ``.partial``) left by dead processes of
    this host; returns what was removed.

    A ``.old-`` folder (the previous output set aside by a swap that was killed half-way) is renamed back to
    ``path`` if ``path`` is missing. Call it while holding the :class:`OutputLock` of ``path``.
    """
    path = Path(os.path.abspath(path))
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for entry in sorted(path.parent.iterdir()):
        match = _TEMP.match(entry.name)
        if not match or match["name"] not in (path.name, f"{path.name}.partial") or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if match["kind"] == "old" and match["name"] == path.name and not path.exists():
            entry.rename(path)
            log.warning("Restored the previous output %s, set aside by a run (pid %d) that was killed.", path, pid)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("Removed %s, left by a run (pid %d) that was killed while writing.", entry, pid)
        removed.append(entry)
    return removed


def discard_dir(path: str | os.PathLike) -> None:
    """Remove a directory all at once for an observer: renamed to a temporary name first, then deleted (a run
    killed meanwhile leaves a temporary folder that :func:`remove_orphans` deletes, never a half-deleted one)."""
    path = Path(os.path.abspath(path))
    doomed = temp_name(path)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_dead_temp_files(directory: str | os.PathLike) -> None:
    """Delete ``.<file>.tmp-<pid>`` files in a checkpoint directory whose writer (on this host) is dead."""
    for entry in Path(directory).glob(".*.tmp-*"):
        pid = entry.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            entry.unlink(missing_ok=True)


# --- lock -------------------------------------------------------------------------------------------------------
def lock_path(output_dir: str | os.PathLike) -> Path:
    """``<output_dir>.lock`` beside the output directory."""
    path = Path(os.path.abspath(output_dir))
    return path.with_name(path.name + ".lock")


_held: dict[Path, list[Any]] = {}  # lock path -> [fd, depth]: re-entrant within a process
_ENV = "LIGHTNING_TLQ_OUTPUT_LOCK"  # "<pid>:<lock path>" of the lock the process that started this one holds


class OutputLock:
    """Exclusive, re-entrant (per process) lock of an output directory and its checkpoint, held with ``flock``.

    Usage::

        with OutputLock(output_dir):
            ...  # nobody else writes output_dir or output_dir.partial

    Raises:
        OutputLockedError: If a live process holds it (the message names its pid, host and start time).
        OutputWriteError: If the lock file cannot be created (read-only file system, permissions).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(os.path.abspath(output_dir))
        self.path = lock_path(output_dir)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        held = _held.get(self.path)
        if held is None and _held_by_parent(self.path):  # a rank started by the run that holds it (ddp_spawn)
            held = _held[self.path] = [None, 0]
        if held is not None:
            held[1] += 1
            return
        try:
            self.output_dir.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
        except OSError as err:
            wrapped = wrap_write_error(err, self.output_dir, "the output", "fix that or choose another --output_dir")
            if wrapped is None:
                raise
            raise wrapped from err
        _held[self.path] = [fd, 1]
        environment.put(_ENV, f"{os.getpid()}:{self.path}")  # inherited by the processes this run starts
        remove_orphans(self.output_dir)

    def _open_locked(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 512).decode(errors="replace").split()
                os.close(fd)
                pid, host, since = (owner + ["?", "?", "?"])[:3]
                raise OutputLockedError(
                    f"{self.output_dir} is being written by another lightning-tlq run (pid {pid} on {host}, since "
                    f"{since}): wait for it to finish, stop it, or choose another --output_dir."
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:  # not unlinked by a releasing holder meanwhile
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        owner = os.read(fd, 512).decode(errors="replace").split()
        if owner and owner[0].isdigit() and int(owner[0]) != os.getpid():
            log.warning("Took over the lock %s of a run that is gone (pid %s on %s).", self.path, *owner[:2])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_HOST} {stamp}\n".encode(), 0)
        return fd

    def release(self) -> None:
        held = _held.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1]:
            return
        del _held[self.path]
        if held[0] is None:
            return
        if environment.get(_ENV) == f"{os.getpid()}:{self.path}":
            environment.put(_ENV, None)
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiting run re-checks the inode and retries
        os.close(held[0])


def _held_by_parent(path: Path) -> bool:
    pid, _, held = (environment.get(_ENV) or "").partition(":")
    return held == str(path) and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))


def lock_if_main_process(output_dir: str | os.PathLike) -> contextlib.AbstractContextManager[Any]:
    """:class:`OutputLock` in the process that will become global rank 0, a no-op in the others.

    ``calibrate`` takes the lock before Fabric launches: processes started by a launcher (ddp's re-run of the
    script, ``torchrun``, ``fabric run``, SLURM) carry a rank in the environment, and only rank 0 (which writes)
    locks, so the ranks never wait on each other's lock.
    """
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if environment.get(var, "0") != "0":
            return contextlib.nullcontext()
    return OutputLock(output_dir)


def locks_output_dir(
    resolve: Callable[[dict[str, Any]], str | os.PathLike] = lambda args: args["output_dir"],
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate an entry point so that it runs holding its output's lock (:func:`lock_if_main_process`), taken
    before anything else, so a second run fails at once. ``resolve`` gets the call's arguments by name (defaults
    applied) and returns the output directory."""

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with lock_if_main_process(resolve(bound.arguments)):
                return func(*args, **kwargs)

        return wrapper

    return decorate
