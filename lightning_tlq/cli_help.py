"""``--help`` of the subcommands: short, in the order a user needs it, with one line per option.

jsonargparse's default help repeats every option as ``ARG:``/``ENV:`` lines, lists every option again in the usage
line and shows each dataclass group's ``--quant CONFIG`` loader; :class:`CompactHelpFormatter` prints the option,
its description (the dataclass attribute docstrings) and its default. :func:`order_help_groups` puts the
subcommand's own options first, then model, data and quantization, then where it runs, then the expert groups.
"""

from __future__ import annotations

import argparse
import re
import shutil
from typing import Any

from jsonargparse import DefaultHelpFormatter
from jsonargparse._actions import _ActionConfigLoad

HELP_EPILOG = (
    "Every option is also read from the environment: TLQ_{subcommand}__<GROUP>__<KEY> (e.g. "
    "TLQ_{subcommand}__QUANT__BITS=3); precedence: defaults < environment < --config files and flags. "
    "--print_config prints every option with its value."
)

# Group order in --help: the subcommand's own options, then these nested keys; unknown groups keep their place
# before the expert ones.
_FIRST = ("model", "data", "quant")
_LATE = ("trainer",)
_EXPERT = ("importance", "token_set", "memory")
_UNUSED_BY_EXPORT = ("model", "data", "trainer")
_TITLES = {
    "model": "model (--model.*)",
    "data": "data (--data.*)",
    "quant": "quantization (--quant.*)",
    "trainer": "where it runs (--trainer.*: a Lightning Trainer's devices, nodes, strategy and loggers)",
    "importance": "expert: token importance (--importance.*)",
    "token_set": "expert: token-level calibration set (--token_set.*)",
    "memory": "expert: memory (--memory.*)",
}
_SHORT = {
    "trainer.accelerator": "cpu, gpu, cuda or auto.",
    "trainer.strategy": "auto (ddp on several processes), ddp, ddp_spawn, ddp_fork.",
    "trainer.devices": "Processes (devices) per node: a number, a list of indices, -1 (all) or auto.",
    "trainer.num_nodes": "Number of nodes (launch the same command on each).",
    "trainer.logger": "Lightning logger(s) receiving per-layer metrics, e.g. CSVLogger; false: none.",
    "seed_everything": "Global seed (true: a random one).",
}
"""Short descriptions for options whose own docstrings (Lightning's) run to several lines."""
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr):`~?([^`]+)`")


class CompactHelpFormatter(DefaultHelpFormatter):
    """One entry per option: ``--group.key VALUE``, the description and the default; no ``ENV:`` lines (the
    epilog gives the rule), no per-group config loaders, and a one-line usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 34)
        kwargs.setdefault("width", max(100, min(shutil.get_terminal_size((120, 24)).columns, 140)) - 2)
        super().__init__(*args, **kwargs)

    def add_usage(self, usage: str | None, actions: Any, groups: Any, prefix: str | None = None) -> None:
        super().add_usage("%(prog)s [options]" if usage is None else usage, actions, groups, prefix)

    def add_argument(self, action: argparse.Action) -> None:
        if isinstance(action, _ActionConfigLoad):  # `--quant CONFIG`: the same as --config for one group
            return
        if action.dest.endswith(".help"):  # `--trainer.logger.help CLASS`: help on Lightning's classes
            return
        super().add_argument(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._SubParsersAction):
            return super()._format_action_invocation(action)
        return argparse.HelpFormatter._format_action_invocation(self, action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = _SHORT.get(action.dest, action.help or "").strip()
        if text in ("", argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            return super()._get_help_string(action) if text else text
        text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], " ".join(text.split())).replace("``", "")
        if action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if "%(default)" not in text and "default:" not in text.lower():
            text += " (default: %(default)s)"
        return text


def order_help_groups(parser: Any, subcommand: str) -> None:
    """Reorder (and, for ``export``, drop from the help) the argument groups of a subcommand parser."""
    groups = list(parser._action_groups)

    def key_of(group: Any) -> str | None:
        for action in group._group_actions:
            dest = getattr(action, "dest", "")
            if "." in dest:
                return dest.split(".", 1)[0]
        return None

    def rank(item: tuple[int, Any]) -> tuple[int, int]:
        index, group = item
        key = key_of(group)
        if key in _EXPERT:
            return (4, _EXPERT.index(key))
        if key in _LATE:
            return (3, index)
        if key in _FIRST:
            return (1, _FIRST.index(key))
        if key is None and any(a.option_strings for a in group._group_actions):
            # the subcommand's own options (--output_dir, ...) first; positional/generic groups keep their place
            return (0, index) if group.title not in ("positional arguments", "options") else (-1, index)
        return (2, index)

    for group in groups:
        group.title = _TITLES.get(key_of(group) or "", group.title)
        if key_of(group) is None and group.title not in ("positional arguments", "options"):
            group.title = f"{subcommand} options"
    kept = [g for g in groups if not (subcommand == "export" and key_of(g) in _UNUSED_BY_EXPORT)]
    hidden = [g for g in groups if g not in kept]
    parser._action_groups[:] = [g for _, g in sorted(enumerate(kept), key=rank)]
    for group in hidden:  # still parsed (LightningCLI builds the Trainer), only not shown
        group.description = None
        for action in group._group_actions:
            action.help = argparse.SUPPRESS
        parser._action_groups.append(group)
