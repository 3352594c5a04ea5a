"""How many intra-op threads torch uses on the CPU for one ``lightning-tlq`` process.

torch starts one thread per core it sees. On a machine that other work keeps busy (or with several processes per
node) that oversubscribes the cores and the threads mostly wait for each other (measurements on the 2-core dev box:
``docs/cli_benchmark.md``). So the default is ``min(torch's default, cores this process may run on / local
processes, idle cores)``, where the idle cores are the usable cores minus the 1-minute load average (at least 1).
``OMP_NUM_THREADS`` (read by torch itself) or ``lightning-tlq --threads N <subcommand>`` choose the count instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lightning_tlq import environment


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_processes(args: Sequence[str] = ()) -> int:
    """Processes sharing this node: ``LOCAL_WORLD_SIZE`` when a launcher set it, else ``--trainer.devices N``."""
    value = environment.get("LOCAL_WORLD_SIZE")
    if value is None:
        for flag, nxt in zip(args, [*args[1:], ""]):
            if flag == "--trainer.devices":
                value = nxt
            elif flag.startswith("--trainer.devices="):
                value = flag.split("=", 1)[1]
    return int(value) if value and value.isdigit() and int(value) > 0 else 1


def idle_cores(cores: int) -> int:
    """``cores`` minus the 1-minute load average, at least 1 (``cores`` where the load average is unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, int(cores - load + 0.5))


def choose_threads(default: int, cores: int, processes: int, idle: int) -> int:
    """``min(default, cores // processes, idle)``, at least 1."""
    return max(1, min(default, cores // max(processes, 1), idle))


def configure_threads(threads: int | None = None, args: Sequence[str] = ()) -> int:
    """Set torch's intra-op thread count for this process and return it (see the module docstring)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: use a positive number of threads.")
        torch.set_num_threads(threads)
        return threads
    if environment.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user's choice, already applied by torch
    cores = usable_cores()
    count = choose_threads(torch.get_num_threads(), cores, local_processes(args), idle_cores(cores))
    torch.set_num_threads(count)
    return count
