"""The environment variables the package reads, declared in one place; no other module reads ``os.environ``.

Settings come from arguments (flags, configs, dataclasses); the environment only says how this process was
started and where the user keeps things. :func:`get` refuses a name that is not declared here.
"""

from __future__ import annotations

import os

VARIABLES: dict[str, str] = {
    "LT_CLI_USED": "set by `fabric run`: the processes exist already, launch() must not start them",
    "LT_ACCELERATOR": "`fabric run --accelerator`",
    "LT_DEVICES": "`fabric run --devices`",
    "LT_NUM_NODES": "`fabric run --num-nodes`",
    "LT_STRATEGY": "`fabric run --strategy`",
    "LOCAL_WORLD_SIZE": "processes on this node, set by torchrun / Lightning launchers (CPU thread count)",
    "OMP_NUM_THREADS": "the user's intra-op thread count (then left as torch applied it)",
    "PL_GLOBAL_SEED": "the seed LightningCLI's --seed_everything set",
    "TLQ_DEBUG": "print tracebacks instead of writing them to a log file",
    "TLQ_LOG_DIR": "where the command line writes tracebacks",
    "XDG_CACHE_HOME": "the user's cache directory (tracebacks, Hugging Face cache)",
    "HF_HOME": "the Hugging Face home (hub cache under HF_HOME/hub)",
    "HF_HUB_CACHE": "the Hugging Face hub cache",
    "HUGGINGFACE_HUB_CACHE": "the hub cache, older name",
    "HF_HUB_OFFLINE": "no downloads: hub ids must be in the cache",
    "TRANSFORMERS_OFFLINE": "no downloads, transformers' name",
    "RANK": "global rank, set by torchrun / Lightning launchers (only rank 0 locks the output)",
    "LOCAL_RANK": "rank on this node, set by launchers (only rank 0 locks the output)",
    "NODE_RANK": "node index, set by launchers (only rank 0 locks the output)",
    "GROUP_RANK": "node index, torchrun's name (only rank 0 locks the output)",
    "SLURM_PROCID": "global rank under SLURM (only rank 0 locks the output)",
    "LIGHTNING_TLQ_OUTPUT_LOCK": "`<pid>:<lock path>` of the output lock the process that started this one holds",
}


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value now (``default`` when unset)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a declared environment variable of lightning_tlq; declare it in VARIABLES.")
    return os.environ.get(name, default)


def put(name: str, value: str | None) -> None:
    """Set the variable for this process and the processes it starts (None: unset it)."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a declared environment variable of lightning_tlq; declare it in VARIABLES.")
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def flag(name: str) -> bool:
    """Whether the variable is set to something other than empty, ``0``, ``false``, ``no`` or ``off``."""
    return (get(name) or "").strip().lower() not in ("", "0", "false", "no", "off")
