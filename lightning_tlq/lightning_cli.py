"""The Lightning side of the ``lightning-tlq`` command line: :class:`TLQTrainer` (the subcommands are its methods)
and :class:`TLQCLI` (a ``LightningCLI``). Imported by :func:`lightning_tlq.cli.main` only once a subcommand runs,
so ``lightning-tlq --help`` does not pay for Lightning, torch and transformers.

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
same processes. The Trainer group therefore holds only :data:`TRAINER_OPTIONS`; training options (epochs,
gradient clipping, ...) would have no effect and are not offered.
"""

from __future__ import annotations

import inspect
from typing import Any

import jsonargparse
import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_tlq import environment
from lightning_tlq.cli_help import HELP_EPILOG, CompactHelpFormatter, order_help_groups
from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.console import configure_logging
from lightning_tlq.datamodule import CalibrationDataModule
from lightning_tlq.errors import check_weight_files
from lightning_tlq.module import TLQModule

TRAINER_OPTIONS = ("accelerator", "strategy", "devices", "num_nodes", "logger")
"""The ``--trainer.*`` options the subcommands read (where the processes run and which loggers get metrics)."""

# Attribute docstrings of the argument dataclasses (QuantArgs.bits: """Weight bit width, 2..8.""") become help text.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)


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
        output_dir: str | None = None,
        overwrite: bool = False,
        resume: bool = False,
        checkpoint: bool = True,
        metrics: bool = True,
        weighted_metrics: bool = False,
        quiet: bool = False,
        export: bool = False,
    ) -> dict[str, Any]:
        """Quantize a VLM layer by layer (tlq, or the baselines rtn, gptq, awq, smoothquant, mbq) and save it.

        Args:
            model: The model to quantize (its ``model_name_or_path``: a built-in name, a local directory or a hub id,
                ``revision``, ``trust_remote_code`` and ``dtype``).
            datamodule: Calibration data (default: 64 built-in synthetic samples).
            quant: Quantization settings, incl. ``method``.
            importance: Token importance settings.
            token_set: Token-level calibration set settings.
            memory: Where weights and activations live (layer-wise offload, activation offload, GPU memory cap).
            output_dir: Where the quantized model and ``tlq_report.json`` go (default:
                ``tlq_out/<model>-<method>-w<bits>a<act bits>-g<group>``).
            overwrite: Replace ``output_dir`` if it holds an earlier run's output (never another directory).
            resume: Continue an interrupted run from ``<output_dir>.partial/`` (same settings required).
            checkpoint: Save the loop state after every layer to ``<output_dir>.partial/`` (enables ``resume``).
            metrics: Report every module's relative output error.
            weighted_metrics: Also report importance-weighted errors for rtn, gptq, awq, smoothquant (costs their
                importance backward; tlq and mbq report them anyway).
            quiet: No progress bars, log lines or summary.
            export: Also write the compressed-tensors checkpoint to ``output_dir/packed`` (see ``export``).

        Returns:
            The report (also written to ``output_dir/tlq_report.json``).
        """
        from lightning_tlq.run_calibration import calibrate
        from lightning_tlq.savedtype import resolve_dtypes

        source = _model_source(model)
        dtype, save_dtype = resolve_dtypes(model.hparams.dtype, source)
        return calibrate(
            model=source,
            data=(datamodule or CalibrationDataModule()).args,
            quant=quant,
            importance=importance,
            token_set=token_set,
            memory=memory,
            output_dir=output_dir,
            overwrite=overwrite,
            resume=resume,
            checkpoint=checkpoint,
            dtype=dtype,
            save_dtype=save_dtype,
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
        output_dir: str | None = None,
        overwrite: bool = False,
        max_new_tokens: int = 8,
        reference_model: str | None = None,
        reference_revision: str | None = None,
        exact_match: str = "greedy",
        quiet: bool = False,
    ) -> dict[str, Any]:
        """Score a (quantized) VLM: exact match per question type, answer-token NLL, KL to a full-precision model.

        Args:
            model: The model to evaluate, e.g. ``--model.model_name_or_path tlq_out/scenes-llava-tlq-w4a16-g128``.
            datamodule: Evaluation data (use held-out samples: another JSONL or another ``--data.seed``); JSONL
                records may carry a ``kind`` (question type) for per-type metrics.
            output_dir: Where ``metrics.json`` goes (default: beside the model, ``<model dir>-eval-<data>``).
            overwrite: Replace ``output_dir`` if it holds an earlier evaluation (never another directory).
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

        if reference_model is not None:
            check_weight_files(reference_model, model.hparams.get("allow_pickle", False))
        return evaluate(
            model=_model_source(model),
            data=(datamodule or CalibrationDataModule()).args,
            output_dir=output_dir,
            overwrite=overwrite,
            max_new_tokens=max_new_tokens,
            dtype="float32" if model.hparams.dtype == "auto" else model.hparams.dtype,
            reference_model=reference_model,
            exact_match=exact_match,
            seed=_global_seed(),
            quiet=quiet,
            revision=model.hparams.revision,
            trust_remote_code=model.hparams.trust_remote_code,
            reference_revision=reference_revision,
            loggers=self.loggers,
            **fabric_settings(self),
        )

    def export(
        self,
        model: TLQModule | None = None,
        datamodule: CalibrationDataModule | None = None,
        checkpoint: str | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
        act_bits: int | None = None,
        max_shard_size: str = "5GB",
        quiet: bool = False,
        revision: str | None = None,
    ) -> dict[str, Any]:
        """Write a calibrated directory as a compressed-tensors checkpoint (transformers / vLLM loadable).

        Args:
            model: Unused (the checkpoint says what the model is).
            datamodule: Unused.
            checkpoint: A directory written by ``lightning-tlq calibrate``, or the hub id of one (required).
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

        if checkpoint is None:
            raise ValueError("export needs --checkpoint DIR: a directory written by lightning-tlq calibrate.")
        check_weight_files(checkpoint)
        return export(checkpoint, output_dir, overwrite, act_bits, max_shard_size, quiet, revision=revision)


def _model_source(model: TLQModule) -> str:
    """The model's path or name, its weight files checked (:func:`~lightning_tlq.errors.check_weight_files`)."""
    if not isinstance(model, TLQModule):
        raise MisconfigurationException(f"Expected a TLQModule, got {type(model).__name__}.")
    if model.model is not None:
        raise MisconfigurationException(
            "TLQTrainer builds the model from `model_name_or_path` in every process; this TLQModule already holds "
            "a model. To quantize an in-memory model, use lightning_tlq.TLQCallback or CalibrationLoop."
        )
    check_weight_files(model.hparams.model_name_or_path, model.hparams.get("allow_pickle", False))
    return str(model.hparams.model_name_or_path)


def _global_seed() -> int:
    """The seed LightningCLI passed to ``seed_everything`` (``--seed_everything``), else 0."""
    return int(environment.get("PL_GLOBAL_SEED", "0"))


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

    def __init__(self, *args: Any, only_subcommand: str | None = None, **kwargs: Any) -> None:
        """``only_subcommand``: build the parser of this subcommand alone (the command line names it first; the
        calibrate parser alone takes ~0.7 s of CPU to build, ``evaluate``'s ~0.3 s)."""
        self._only_subcommand = only_subcommand
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands and the method arguments the CLI injects (not parsed)."""
        return {
            "calibrate": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "export": {"model", "datamodule"},
        }

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """All subcommand parsers, or only ``only_subcommand``'s."""
        only = self._only_subcommand
        if only is None:
            return super()._add_subcommands(parser, **kwargs)
        every = self.subcommands()
        self.subcommands = lambda: {only: every[only]}  # type: ignore[method-assign]  # read by the base method
        try:
            super()._add_subcommands(parser, **kwargs)
        finally:
            del self.subcommands

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Under ``fabric run`` the Trainer takes accelerator, devices, nodes and strategy from its flags."""
        if environment.get("LT_CLI_USED"):
            kwargs.update(_fabric_run_settings())
        kwargs.setdefault("enable_checkpointing", False)  # no fit: no ModelCheckpoint
        kwargs.setdefault("enable_model_summary", False)
        return super().instantiate_trainer(**kwargs)

    def before_calibrate(self) -> None:
        """Route log lines above the progress bars (or silence them with ``--quiet true``)."""
        configure_logging(quiet=bool(self._get(self.config, "quiet")))

    def before_evaluate(self) -> None:
        """Same for ``evaluate``."""
        configure_logging(quiet=bool(self._get(self.config, "quiet")))

    def before_export(self) -> None:
        """Same for ``export``."""
        configure_logging(quiet=bool(self._get(self.config, "quiet")))

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The Trainer group offers only what these subcommands use: where they run and the loggers."""
        skip = {name for name in inspect.signature(pl.Trainer.__init__).parameters if name not in TRAINER_OPTIONS}
        parser.add_class_arguments(
            self.trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=skip
        )
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k in TRAINER_OPTIONS})
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_lightning_class_args(self._datamodule_class, "data")
        # auto: compute in float32, save in the checkpoint's dtype (lightning_tlq.savedtype)
        parser.set_defaults({"model.dtype": "auto"})

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Our help formatter (subcommand parsers inherit it) and the program's name."""
        kwargs.setdefault("formatter_class", CompactHelpFormatter)
        kwargs.setdefault("prog", "lightning-tlq")
        return super().init_parser(**kwargs)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """The subcommand's own options come first in ``--help``, the Trainer's last (then the expert groups)."""
        kwargs.setdefault("usage", f"lightning-tlq {subcommand} [options]")
        kwargs.setdefault("epilog", HELP_EPILOG.format(subcommand=subcommand.upper()))
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        order_help_groups(parser, subcommand)
        return parser


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
        value = environment.get(var)
        if value is not None:
            out[key] = int(value) if value.isdigit() else value
    return out
