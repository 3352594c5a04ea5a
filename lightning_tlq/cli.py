"""The ``lightning-tlq`` command line: a ``LightningCLI`` with the subcommands ``calibrate``, ``evaluate``, ``export``.

Why LightningCLI although calibration is a Fabric loop: the subcommands are methods of :class:`TLQTrainer`, a
``Trainer`` subclass, so users get the usual Lightning surface (``--trainer.accelerator/devices/num_nodes/strategy``,
``--trainer.logger CSVLogger``, ``--model.*`` for the :class:`~lightning_tlq.module.TLQModule`, ``--data.*`` for the
:class:`~lightning_tlq.datamodule.CalibrationDataModule``, ``--config``, ``--print_config``, environment variables).
Each method reads the Trainer's device settings and loggers and runs the Fabric entry point
(:func:`lightning_tlq.calibrate.calibrate`, :func:`lightning_tlq.evaluate.evaluate`), so the command line and
``fabric run`` / ``torchrun`` share one code path; ``export`` is a file conversion
(:func:`lightning_tlq.export.export`) and ignores the Trainer, model and data groups. A Trainer *stage* would not
fit: calibration is neither a training nor an evaluation epoch, and a validate-based route would need a dummy
``validation_step`` and ``inference_mode=False``; the Trainer's launcher is not needed because Fabric launches the
same processes.

Examples::

    lightning-tlq calibrate --overwrite true                          # scenes-llava, its calibration split, W4A16 g128
    lightning-tlq calibrate --config configs/tiny_llava_w3a16_g64.yaml --quant.bits 2
    lightning-tlq calibrate --model.model_name_or_path /ckpt/llava --data.path calib.jsonl --trainer.devices 2
    lightning-tlq calibrate --model.model_name_or_path Qwen/Qwen2-VL-2B-Instruct --data.path calib.jsonl  # hub id
    lightning-tlq evaluate --model.model_name_or_path tlq_out --data.seed 1 --output_dir tlq_eval
    lightning-tlq export --checkpoint tlq_out --output_dir tlq_packed          # compressed-tensors checkpoint
    TLQ_CALIBRATE__QUANT__BITS=3 lightning-tlq calibrate --print_config

Every option can also come from an environment variable ``TLQ_<SUBCOMMAND>__<KEY>__<SUBKEY>`` (``--help`` shows
each name). Precedence: defaults < environment variables < ``--config`` files and flags, in command-line order.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.datamodule import CalibrationDataModule
from lightning_tlq.module import TLQModule

ENV_PREFIX = "TLQ"
_LOGGER_NAMES = ("lightning_tlq",)


class TLQTrainer(pl.Trainer):
    """A ``Trainer`` with the extra stages ``calibrate``, ``evaluate`` (on its devices and loggers) and ``export``."""

    def calibrate(
        self,
        model: TLQModule,
        datamodule: CalibrationDataModule | None = None,
        quant: QuantArgs = QuantArgs(),
        importance: ImportanceArgs = ImportanceArgs(),
        token_set: TokenSetArgs = TokenSetArgs(),
        memory: MemoryArgs = MemoryArgs(),
        output_dir: str = "tlq_out",
        overwrite: bool = False,
        resume: bool = False,
        checkpoint: bool = True,
        metrics: bool = True,
        weighted_metrics: bool = False,
        quiet: bool = False,
        export: bool = False,
    ) -> dict[str, Any]:
        """Quantize a VLM with TLQ (or the rtn / gptq baselines) layer by layer and save it.

        Args:
            model: The model to quantize (its ``model_name_or_path``: a built-in name, a local directory or a hub id,
                ``revision``, ``trust_remote_code`` and ``dtype``).
            datamodule: Calibration data (default: 64 built-in synthetic samples).
            quant: Quantization settings, incl. ``method``.
            importance: Token importance settings.
            token_set: Token-level calibration set settings.
            memory: Where weights and activations live (layer-wise offload, activation offload, GPU memory cap).
            output_dir: Where the quantized model (``from_pretrained``-loadable) and ``tlq_report.json`` go.
            overwrite: Replace ``output_dir`` (and discard an interrupted run's checkpoint) if it exists.
            resume: Continue an interrupted run from ``<output_dir>.partial/`` (same settings required).
            checkpoint: Save the loop state after every layer to ``<output_dir>.partial/`` (enables ``resume``).
            metrics: Report every module's relative output error.
            weighted_metrics: Also report importance-weighted errors for methods that need no importance (rtn,
                gptq, awq, smoothquant; runs the importance backward for them). tlq and mbq always report them.
            quiet: No progress bars, log lines or summary.
            export: Also write the compressed-tensors checkpoint to ``output_dir/packed`` (see ``export``).

        Returns:
            The report (also written to ``output_dir/tlq_report.json``).
        """
        from lightning_tlq.run_calibration import calibrate

        return calibrate(
            model=_model_source(model),
            data=(datamodule or CalibrationDataModule()).args,
            quant=quant,
            importance=importance,
            token_set=token_set,
            memory=memory,
            output_dir=output_dir,
            overwrite=overwrite,
            resume=resume,
            checkpoint=checkpoint,
            dtype=model.hparams.dtype,
            metrics=metrics,
            weighted_metrics=weighted_metrics,
            seed=_global_seed(),
            quiet=quiet,
            export=export,
            revision=model.hparams.revision,
            trust_remote_code=model.hparams.trust_remote_code,
            loggers=self.loggers,
            **fabric_settings(self),
        )

    def evaluate(
        self,
        model: TLQModule,
        datamodule: CalibrationDataModule | None = None,
        output_dir: str = "tlq_eval",
        overwrite: bool = False,
        max_new_tokens: int = 8,
        reference_model: str | None = None,
        reference_revision: str | None = None,
        exact_match: str = "greedy",
        quiet: bool = False,
    ) -> dict[str, Any]:
        """Evaluate a (quantized) VLM: exact match per question type, answer-token NLL and perplexity, KL divergence
        to a full-precision reference.

        Args:
            model: The model to evaluate, e.g. ``--model.model_name_or_path tlq_out``.
            datamodule: Evaluation data (use held-out samples: another JSONL or another ``--data.seed``); JSONL
                records may carry a ``kind`` (question type) for per-type metrics.
            output_dir: Where ``metrics.json`` goes.
            overwrite: Replace ``output_dir`` if it exists.
            max_new_tokens: Greedy generation length per answer.
            reference_model: The full-precision model (built-in name, local directory or hub id; same tokenizer and
                vocabulary): report KL(P_ref || P_model) at every answer token, both models on the same batches.
            reference_revision: Branch, tag or commit of a hub id ``reference_model`` (default ``main``).
            exact_match: ``greedy`` (generate and compare) or ``teacher_forced`` (the argmax at every answer position
                is the reference token; no generation, the same verdicts for answers with one tokenization).
            quiet: No progress bar and no summary line.

        Returns:
            The metrics (also written to ``output_dir/metrics.json``).
        """
        from lightning_tlq.evaluate import evaluate

        return evaluate(
            model=_model_source(model),
            data=(datamodule or CalibrationDataModule()).args,
            output_dir=output_dir,
            overwrite=overwrite,
            max_new_tokens=max_new_tokens,
            dtype=model.hparams.dtype,
            reference_model=reference_model,
            exact_match=exact_match,
            revision=model.hparams.revision,
            trust_remote_code=model.hparams.trust_remote_code,
            reference_revision=reference_revision,
            seed=_global_seed(),
            quiet=quiet,
            loggers=self.loggers,
            **fabric_settings(self),
        )

    def export(
        self,
        model: TLQModule | None = None,
        datamodule: CalibrationDataModule | None = None,
        checkpoint: str = "tlq_out",
        output_dir: str | None = None,
        overwrite: bool = False,
        act_bits: int | None = None,
        max_shard_size: str = "5GB",
        quiet: bool = False,
        revision: str | None = None,
    ) -> dict[str, Any]:
        """Write a calibrated directory as a compressed-tensors checkpoint (``from_pretrained``/vLLM loadable).

        Args:
            model: Unused (the checkpoint says what the model is).
            datamodule: Unused.
            checkpoint: A directory written by ``lightning-tlq calibrate``, or the hub id of one.
            output_dir: Where to write; default ``<checkpoint>/packed`` (required for a hub id).
            overwrite: Replace ``output_dir`` if it exists.
            act_bits: None = as calibrated, 16 = weight-only (``pack-quantized``), 8 = int8 per-token activations.
            max_shard_size: Largest weight file, e.g. ``5GB``; bigger checkpoints are sharded with an index.
            quiet: No summary line.
            revision: Branch, tag or commit of a hub id ``checkpoint``.

        Returns:
            A summary: output directory, format, bytes written, quantized and ignored module counts.
        """
        from lightning_tlq.export import export

        return export(checkpoint, output_dir, overwrite, act_bits, max_shard_size, quiet, revision=revision)


def _model_source(model: TLQModule) -> str:
    if not isinstance(model, TLQModule):
        raise MisconfigurationException(f"Expected a TLQModule, got {type(model).__name__}.")
    if model.model is not None:
        raise MisconfigurationException(
            "TLQTrainer builds the model from `model_name_or_path` in every process; this TLQModule already holds "
            "a model. To quantize an in-memory model, use lightning_tlq.TLQCallback or CalibrationLoop."
        )
    return str(model.hparams.model_name_or_path)


def _global_seed() -> int:
    """The seed LightningCLI passed to ``seed_everything`` (``--seed_everything``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def fabric_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """``Fabric(...)`` arguments that run on the Trainer's accelerator, devices, nodes and (DDP) strategy.

    Raises:
        MisconfigurationException: For accelerators or strategies calibration does not support.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    accelerator = {"CPUAccelerator": "cpu", "CUDAAccelerator": "cuda", "MPSAccelerator": "mps"}.get(
        type(trainer.accelerator).__name__
    )
    if accelerator is None:
        raise MisconfigurationException(f"lightning-tlq supports cpu, cuda and mps, not {type(trainer.accelerator)}.")
    strategy = trainer.strategy
    if isinstance(strategy, SingleDeviceStrategy):
        name = "auto"
    elif type(strategy) is DDPStrategy:
        name = {"popen": "ddp", "spawn": "ddp_spawn", "fork": "ddp_fork"}[strategy._start_method]
    else:
        raise MisconfigurationException(
            f"lightning-tlq runs on a single device or with DDP (ddp, ddp_spawn, ddp_fork), not "
            f"{type(strategy).__name__}."
        )
    devices: Any = trainer.num_devices
    if accelerator == "cuda":
        devices = [d.index for d in getattr(strategy, "parallel_devices", None) or [strategy.root_device]]
    return {"accelerator": accelerator, "devices": devices, "num_nodes": trainer.num_nodes, "strategy": name}


class TLQCLI(LightningCLI):
    """``LightningCLI`` with the subcommands ``calibrate``, ``evaluate`` and ``export`` (methods of
    :class:`TLQTrainer`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands and the method arguments the CLI injects (not parsed)."""
        return {
            "calibrate": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "export": {"model", "datamodule"},
        }

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Under ``fabric run`` the Trainer takes accelerator, devices, nodes and strategy from its flags."""
        if os.environ.get("LT_CLI_USED"):
            kwargs.update(_fabric_run_settings())
        return super().instantiate_trainer(**kwargs)

    def before_calibrate(self) -> None:
        """Route log lines above the progress bars (or silence them with ``--quiet true``)."""
        _configure_logging(quiet=bool(self._get(self.config, "quiet")))

    def before_evaluate(self) -> None:
        """Same for ``evaluate``."""
        _configure_logging(quiet=bool(self._get(self.config, "quiet")))


def _fabric_run_settings() -> dict[str, Any]:
    """``fabric run`` exports its flags as ``LT_*`` variables and starts the processes; the config's values are then
    ignored (as by Fabric itself), otherwise the Trainer would refuse the world size."""
    names = {
        "accelerator": "LT_ACCELERATOR",
        "devices": "LT_DEVICES",
        "num_nodes": "LT_NUM_NODES",
        "strategy": "LT_STRATEGY",
    }
    out: dict[str, Any] = {}
    for key, var in names.items():
        value = os.environ.get(var)
        if value is not None:
            out[key] = int(value) if value.isdigit() else value
    return out


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines with ``tqdm.write`` so they appear above active progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise
            self.handleError(record)


def _configure_logging(quiet: bool) -> None:
    for name in _LOGGER_NAMES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
            handler = _TqdmHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-tlq`` console script (hub ids: ``HF_HUB_OFFLINE`` / ``HF_HOME`` as the user set
    them, see :mod:`lightning_tlq.hub`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the summary readable
    with warnings.catch_warnings():
        # main(argv) from Python (tests, notebooks) is meant to ignore sys.argv; LightningCLI warns about that.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        TLQCLI(
            TLQModule,
            CalibrationDataModule,
            trainer_class=TLQTrainer,
            seed_everything_default=0,
            save_config_callback=None,  # calibrate writes its settings into tlq_report.json
            auto_configure_optimizers=False,
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False},
            parser_kwargs={"default_env": True, "env_prefix": ENV_PREFIX},
            args=list(argv) if argv is not None else None,
        )


if __name__ == "__main__":
    main()
