"""The ``lightning-tlq`` command line: subcommands ``calibrate``, ``evaluate`` and ``export``.

This module stays light: ``lightning-tlq --help`` answers without importing torch, transformers or Lightning,
and a subcommand imports them only once it runs (the ``LightningCLI`` itself is
:mod:`lightning_tlq.lightning_cli`). :func:`main` also chooses the CPU thread count (:mod:`lightning_tlq.threads`)
and turns errors into one readable message (:mod:`lightning_tlq.errors`).

Examples::

    lightning-tlq calibrate --overwrite true      # scenes-llava W4A16 g128 -> tlq_out/scenes-llava-tlq-w4a16-g128
    lightning-tlq calibrate --config configs/tiny_llava_w3a16_g64.yaml --quant.bits 2
    lightning-tlq calibrate --model.model_name_or_path /ckpt/llava --data.path calib.jsonl --trainer.devices 2
    lightning-tlq calibrate --model.model_name_or_path Qwen/Qwen2-VL-2B-Instruct --data.path calib.jsonl  # hub id
    lightning-tlq evaluate --model.model_name_or_path tlq_out/scenes-llava-tlq-w4a16-g128
    lightning-tlq export --checkpoint tlq_out/scenes-llava-tlq-w4a16-g128   # compressed-tensors checkpoint
    TLQ_CALIBRATE__QUANT__BITS=3 lightning-tlq calibrate --print_config

Every option can also come from an environment variable ``TLQ_<SUBCOMMAND>__<KEY>__<SUBKEY>``. Precedence:
defaults < environment variables < ``--config`` files and flags, in command-line order.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

from lightning_tlq import environment

ENV_PREFIX = "TLQ"

SUBCOMMANDS = {
    "calibrate": "Quantize a VLM layer by layer (tlq, or the baselines rtn, gptq, awq, smoothquant, mbq) and save it.",
    "evaluate": "Score a (quantized) VLM: exact match per question type, answer-token NLL, KL to a full-precision "
    "model.",
    "export": "Write a calibrated directory as a compressed-tensors checkpoint (transformers / vLLM loadable).",
}
"""The subcommands and their one-line descriptions (the first docstring lines of the ``TLQTrainer`` methods; a
test keeps them equal)."""

TOP_LEVEL_HELP = """\
usage: lightning-tlq [-h] [--verbose] {{calibrate,evaluate,export}} ...

Post-training quantization of vision-language models with TLQ: token importance from gradients, a token-level
calibration set, layer-wise calibration on the quantized path.

subcommands (`lightning-tlq <subcommand> --help` lists its options):
{subcommands}

options:
  -h, --help    Show this message and exit.
  --verbose     On an error, print the traceback (also TLQ_DEBUG=1); otherwise it goes to a log file whose path
                the error message gives.

Examples:
  lightning-tlq calibrate --overwrite true          # scenes-llava, W4A16 g128 -> tlq_out/scenes-llava-tlq-w4a16-g128
  lightning-tlq calibrate --config configs/tiny_llava_w3a16_g64.yaml --quant.method gptq
  lightning-tlq evaluate --model.model_name_or_path tlq_out/scenes-llava-tlq-w4a16-g128
  lightning-tlq export --checkpoint tlq_out/scenes-llava-tlq-w4a16-g128

CPU threads: one process uses min(torch's default, cores this process may run on / local processes); set
OMP_NUM_THREADS or --threads N (before the subcommand) to choose.
"""


def top_level_help() -> str:
    """The help of ``lightning-tlq`` without a subcommand (no heavy import needed)."""
    lines = "\n".join(f"  {name:<12}{text}" for name, text in SUBCOMMANDS.items())
    return TOP_LEVEL_HELP.format(subcommands=lines)


def _pop_flag(args: list[str], flag: str) -> bool:
    found = flag in args
    while flag in args:
        args.remove(flag)
    return found


def _pop_threads(args: list[str]) -> int | None:
    """``--threads N`` before the subcommand (a process setting, not a calibration setting)."""
    for i, arg in enumerate(args):
        if arg.startswith("--threads="):
            del args[i]
            return int(arg.split("=", 1)[1])
        if arg == "--threads" and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return int(value)
    return None


def main(argv: Sequence[str] | None = None, *, report_errors: bool | None = None) -> None:
    """Entry point of the ``lightning-tlq`` console script.

    Args:
        argv: The arguments after ``lightning-tlq`` (default: ``sys.argv[1:]``).
        report_errors: Turn an error into one message plus a traceback log file and exit 1 (see
            :func:`lightning_tlq.errors.report_error`); default: only for the console script (``argv`` None), so
            that Python callers and tests get the exception itself.
    """
    if report_errors is None:
        report_errors = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(top_level_help(), end="")
        if not args:
            raise SystemExit(2)
        return
    verbose = _pop_flag(args, "--verbose") or environment.flag("TLQ_DEBUG")
    subcommand = next((a for a in args if a in SUBCOMMANDS), None)
    try:
        threads = _pop_threads(args)
    except ValueError:
        _exit_with("--threads takes a positive integer, e.g. --threads 2.", 2)
    from lightning_tlq.errors import report_error

    try:
        _run(args, threads)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:
        if not report_errors:
            raise
        raise SystemExit(report_error(err, subcommand or "lightning-tlq", verbose)) from None


def _exit_with(message: str, code: int) -> None:
    print(f"lightning-tlq: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _run(args: list[str], threads: int | None) -> None:
    from lightning_tlq.threads import configure_threads

    configure_threads(threads, args)
    from transformers.utils import logging as hf_logging

    from lightning_tlq.console import quiet_lightning
    from lightning_tlq.datamodule import CalibrationDataModule
    from lightning_tlq.lightning_cli import TLQCLI, TLQTrainer
    from lightning_tlq.module import TLQModule

    hf_logging.disable_progress_bar()  # keep the summary readable
    quiet_lightning()
    with warnings.catch_warnings():
        # main(argv) from Python (tests, notebooks) is meant to ignore sys.argv; LightningCLI warns about that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        warnings.filterwarnings("ignore", message="The `TLQTrainer` class does not expose the `callbacks`")
        TLQCLI(
            TLQModule,
            CalibrationDataModule,
            trainer_class=TLQTrainer,
            seed_everything_default=0,
            save_config_callback=None,  # calibrate writes its settings into tlq_report.json
            auto_configure_optimizers=False,
            trainer_defaults={"logger": False},
            parser_kwargs={"default_env": True, "env_prefix": ENV_PREFIX},
            args=args,
            # `lightning-tlq evaluate ...`: only that subcommand's parser is built (~0.7 s less CPU for evaluate)
            only_subcommand=args[0] if args and args[0] in SUBCOMMANDS else None,
        )


def __getattr__(name: str) -> Any:
    """``TLQTrainer``, ``TLQCLI`` and ``fabric_settings`` live in :mod:`lightning_tlq.lightning_cli` (heavy)."""
    if name in ("TLQTrainer", "TLQCLI", "fabric_settings"):
        from lightning_tlq import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
