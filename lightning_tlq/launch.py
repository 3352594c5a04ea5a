"""Building and launching the Fabric our entry points run on (directly, under ``fabric run`` or ``torchrun``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from lightning_tlq import environment


def launched_externally() -> bool:
    """Whether ``fabric run`` already started the processes (it exports ``LT_CLI_USED``); then ``launch()`` must
    not be called and the launcher's flags decide accelerator, devices and nodes."""
    return bool(environment.get("LT_CLI_USED"))


def build_fabric(
    accelerator: str, devices: Any, num_nodes: int, strategy: str, loggers: Any = None, callbacks: Any = None
) -> Any:
    """A Fabric for our entry points; under ``fabric run`` the launcher's flags rule."""
    from lightning.fabric import Fabric

    common = {"loggers": list(loggers or []), "callbacks": list(callbacks or [])}
    owns = not _process_group_exists()  # under fabric run, Fabric() itself joins the process group
    if launched_externally():  # passing our own values as well would conflict with its flags
        fabric = Fabric(**common)
    else:
        fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, **common)
    fabric.tlq_owns_process_group = owns
    return fabric


def run_on_ranks(fabric: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(fabric, *args, **kwargs)`` on every rank: launched here, or directly when a launcher made the ranks;
    then the process group is released (:func:`release_process_group`)."""
    run = partial(_run_then_release, fn)
    if launched_externally():
        return run(fabric, *args, **kwargs)
    return fabric.launch(run, *args, **kwargs)


def _run_then_release(fn: Callable[..., Any], fabric: Any, *args: Any, **kwargs: Any) -> Any:
    out = fn(fabric, *args, **kwargs)
    release_process_group(fabric)
    return out


def _process_group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def release_process_group(fabric: Any) -> None:
    """After a rank's work: wait for every rank, then destroy the process group, where :func:`build_fabric` made it.

    A rank that exits while its gloo threads and store connections are still up can be aborted in the C++ teardown
    ("terminate called without an active exception", SIGABRT): rank 1 of two 2-process tests in one CI run on a
    loaded 2-core box (none in two other CI runs); an explicit barrier and destroy is the clean shutdown. A process
    group the caller had before (the package used inside a distributed job of its own) is left alone.
    """
    import torch.distributed as dist

    if getattr(fabric, "tlq_owns_process_group", False) and _process_group_exists():
        fabric.barrier()  # no rank leaves while another still needs the store
        dist.destroy_process_group()
