"""Building and launching the Fabric our entry points run on (directly, under ``fabric run`` or ``torchrun``)."""

from __future__ import annotations

from collections.abc import Callable
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
    if launched_externally():  # passing our own values as well would conflict with its flags
        return Fabric(**common)
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, **common)


def run_on_ranks(fabric: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(fabric, *args, **kwargs)`` on every rank: launched here, or directly when a launcher made the ranks."""
    if launched_externally():
        return fn(fabric, *args, **kwargs)
    return fabric.launch(fn, *args, **kwargs)
