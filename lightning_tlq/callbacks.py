"""A Trainer ``Callback`` that quantizes a Lightning project's Hugging Face VLM with TLQ.

The calibration itself is the one pipeline every entry point uses (:class:`~lightning_tlq.pipeline.Calibration`).
:class:`TLQCallback` is a thin adapter, as Lightning's ``SpikeDetection`` is over its Fabric version: it serves the
part of the Fabric API the pipeline uses from the running Trainer
(:class:`~lightning_tlq.trainer_fabric.TrainerFabric`: the strategy's device and collectives, the Trainer's
loggers), takes the model from the LightningModule and the data from the datamodule, and prints the same summary
as ``lightning-tlq calibrate``.

**When it runs** (``trigger``):

- ``"fit"`` (default): in ``on_fit_end``, i.e. after fine-tuning, once checkpoints are written. With
  ``ddp_spawn`` the quantized weights of rank 0 are what ``trainer.fit`` hands back to the main process.
- ``"validate"``: in ``on_validation_end`` of ``trainer.validate(...)``, to quantize an already trained model
  without training. Importance needs gradients, so this requires ``Trainer(inference_mode=False)``: it is checked
  in ``setup`` for every strategy. (Under gloo Lightning quietly uses ``no_grad`` instead of inference mode, so a
  runtime check would pass on 2 CPU processes and fail on one GPU; the calibration enables gradients itself.)

**Contract with the LightningModule**: the HF vision-language model is ``pl_module.<model_attr>`` (default
``model``; a :class:`~lightning_tlq.module.TLQModule` qualifies) and its processor ``pl_module.<processor_attr>``
(needed only to write ``output_dir``). The model's family needs an adapter (``llava``, ``qwen2_vl``, ...).

**Contract with the data**: the datamodule (or else the LightningModule) has a method named by ``dataloader``
(default ``calibration_dataloader``) returning, on every rank, the *whole* calibration set as an iterable of batches
collated by :func:`lightning_tlq.data.collate` (``input_ids``, ``attention_mask``, ``labels`` = -100 outside the
answer, and the processor's image inputs), e.g. :class:`~lightning_tlq.datamodule.CalibrationDataModule`. Every rank
validates all batches, then calibrates on its contiguous share of them (no padding or repetition; global
``sample_id`` s keep the token set independent of the number of ranks), exactly as ``lightning-tlq calibrate`` does.

Supported strategies: single device and DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``); sharded strategies (FSDP,
DeepSpeed) are refused in ``setup``. With ``ddp_spawn`` a model built in the main process is pickled into the
workers; :func:`~lightning_tlq.compat.restore_output_capturing` repairs what transformers 5.x loses there.
Weights are quantized in place (fake-quantized, still floating point) and the scheme is recorded in ``model.config``
(key ``tlq_quantization``); with ``output_dir`` rank 0 also writes a ``from_pretrained``-loadable copy with
``tlq_report.json`` and the codes (``lightning-tlq export`` turns it into a compressed-tensors checkpoint). With
``quant.act_bits`` (W4A8) run inference with
``lightning_tlq.actquant.apply_saved_activation_quant(model)`` applied, as for ``lightning-tlq calibrate`` outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_tlq.adapters import get_adapter
from lightning_tlq.compat import restore_output_capturing
from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.distributed import shard_range
from lightning_tlq.keys import ModuleKey
from lightning_tlq.module import TLQModule
from lightning_tlq.pipeline import Calibration
from lightning_tlq.preflight import check_batches, check_finite_weights, check_quantizable
from lightning_tlq.progress import CalibrationProgress
from lightning_tlq.report import check_output_dir
from lightning_tlq.settings import CalibrationSettings
from lightning_tlq.trainer_fabric import TrainerFabric

log = logging.getLogger(__name__)

Trigger = Literal["fit", "validate"]
_TRIGGERS = ("fit", "validate")


class TLQCallback(Callback):
    """Quantize the LightningModule's Hugging Face VLM with TLQ after ``fit`` (or during ``validate``).

    Args:
        quant: Quantization settings (method, bits, group size, ...).
        importance: Token-importance settings.
        token_set: Token-level calibration set settings.
        memory: Where weights and activations live during calibration (default: layer by layer).
        trigger: ``"fit"`` (``on_fit_end``) or ``"validate"`` (``on_validation_end`` of ``trainer.validate``;
            needs ``Trainer(inference_mode=False)``).
        output_dir: If set, rank 0 writes the quantized model, its processor and ``tlq_report.json`` there.
        overwrite: Replace ``output_dir`` if it exists (checked in ``setup``, before training).
        metrics: Report every module's relative output error; also sent to the Trainer's loggers.
        weighted_metrics: Also report importance-weighted errors for methods that need no importance (runs the
            importance backward for them).
        model_attr: Attribute of the LightningModule holding the HF model.
        processor_attr: Attribute of the LightningModule holding the HF processor.
        dataloader: Name of the datamodule (or LightningModule) method returning calibration batches.
        progress_bar: Show progress bars over samples and layers (rank 0).

    Attributes:
        records: Per-layer records of the last calibration (None before it ran).
        report: The full report of the last calibration.
        results: :class:`~lightning_tlq.keys.ModuleKey` ``(layer, module)`` -> integer codes, scales and zero points
            of every quantized module.
    """

    def __init__(
        self,
        quant: QuantArgs | None = None,
        importance: ImportanceArgs | None = None,
        token_set: TokenSetArgs | None = None,
        memory: MemoryArgs | None = None,
        trigger: Trigger = "fit",
        output_dir: str | None = None,
        overwrite: bool = False,
        metrics: bool = True,
        weighted_metrics: bool = False,
        model_attr: str = "model",
        processor_attr: str = "processor",
        dataloader: str = "calibration_dataloader",
        progress_bar: bool = True,
    ) -> None:
        if trigger not in _TRIGGERS:
            raise MisconfigurationException(
                f"TLQCallback(trigger={trigger!r}) is not supported; use one of {_TRIGGERS}."
            )
        self.settings = CalibrationSettings(
            quant or QuantArgs(),
            importance or ImportanceArgs(),
            token_set or TokenSetArgs(),
            memory or MemoryArgs(),
            metrics,
            weighted_metrics,
        )
        self.trigger = trigger
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.model_attr, self.processor_attr, self.dataloader = model_attr, processor_attr, dataloader
        self.progress_bar = progress_bar
        self.records: list[dict[str, Any]] | None = None
        self.report: dict[str, Any] | None = None
        self.results: dict[ModuleKey, Any] = {}

    # --- hooks -----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail before any training or validation if the run cannot calibrate."""
        if stage != self.trigger:
            return
        _check_strategy(trainer)
        if self.trigger == "validate" and trainer.validate_loop.inference_mode:
            raise MisconfigurationException(
                "TLQCallback(trigger='validate') needs gradients (token importance), which torch.inference_mode "
                "forbids: create the Trainer with `Trainer(inference_mode=False)`."
            )
        if self.output_dir is not None:
            check_output_dir(self.output_dir, self.overwrite)
        self._data_source(trainer, pl_module)
        model = getattr(pl_module, self.model_attr, None)
        if model is not None or not is_overridden("configure_model", pl_module):  # else it is built later
            restore_output_capturing(self._hf_model(pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate after training (``trigger="fit"``)."""
        if self.trigger == "fit":
            self.calibrate(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Calibrate at the end of ``trainer.validate`` (``trigger="validate"``; not during fit)."""
        if self.trigger == "validate" and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.calibrate(trainer, pl_module)

    # --- work ------------------------------------------------------------------------------------------------
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """Quantize ``pl_module``'s VLM in place (and write ``output_dir``); returns the per-layer records."""
        model = self._hf_model(pl_module)
        restore_output_capturing(model)
        batches = list(self._data_source(trainer, pl_module)())
        check_batches(batches)
        batches = _shard(batches, trainer.world_size, trainer.global_rank)
        check_quantizable(model, self.settings.quant)
        check_finite_weights(model)
        flags, was_training = {n: p.requires_grad for n, p in model.named_parameters()}, model.training
        module = TLQModule().attach(model, getattr(pl_module, self.processor_attr, None))  # eval, frozen weights
        fabric = TrainerFabric(trainer, [CalibrationProgress(self.progress_bar)], step_offset=trainer.global_step)
        pipeline = Calibration(
            self.settings, output_dir=self.output_dir, overwrite=self.overwrite, quiet=not self.progress_bar
        )
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        try:
            self.report = pipeline.run(
                fabric, module, batches, model_name=name, extra_settings={"trigger": self.trigger}
            )
        finally:
            for param_name, param in model.named_parameters():
                param.requires_grad_(flags[param_name])
            model.train(was_training)
        self.records, self.results = pipeline.records, pipeline.results
        return self.records

    # --- contracts -------------------------------------------------------------------------------------------
    def _hf_model(self, pl_module: pl.LightningModule) -> nn.Module:
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "model_type"):
            raise MisconfigurationException(
                f"TLQCallback quantizes the Hugging Face model at `pl_module.{self.model_attr}`, but "
                f"{type(pl_module).__name__}.{self.model_attr} is {type(model).__name__}. Store the model there (or "
                "pass TLQCallback(model_attr=...))."
            )
        get_adapter(model)  # raises UnsupportedModelError naming the supported families
        if self.output_dir is not None and getattr(pl_module, self.processor_attr, None) is None:
            raise MisconfigurationException(
                f"TLQCallback(output_dir=...) saves the processor too, but `pl_module.{self.processor_attr}` is not "
                "set. Store the HF processor there (or pass processor_attr=..., or drop output_dir)."
            )
        return model

    def _data_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        for owner in (trainer.datamodule, pl_module):
            method = getattr(owner, self.dataloader, None)
            if callable(method):
                return method
        raise MisconfigurationException(
            f"TLQCallback needs calibration data: give your LightningDataModule (or LightningModule) a "
            f"`{self.dataloader}()` method returning batches collated by lightning_tlq.data.collate, e.g. use "
            "lightning_tlq.CalibrationDataModule."
        )


def _shard(batches: Sequence[dict[str, Tensor]], world_size: int, rank: int) -> list[dict[str, Tensor]]:
    """This rank's contiguous share of the batches, each tagged with the global index of its samples."""
    start, tagged = 0, []
    for batch in batches:
        n = int(batch["input_ids"].shape[0])
        tagged.append(batch if "sample_id" in batch else {**batch, "sample_id": torch.arange(start, start + n)})
        start += n
    if len(tagged) < world_size:
        raise ValueError(
            f"The calibration dataloader yields {len(tagged)} batch(es) for {world_size} processes; batches are split "
            "over processes, so use a smaller batch size or more calibration samples."
        )
    return [tagged[i] for i in shard_range(len(tagged), world_size, rank)]


def _check_strategy(trainer: pl.Trainer) -> None:
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if not (isinstance(strategy, SingleDeviceStrategy) or type(strategy) is DDPStrategy):
        raise MisconfigurationException(
            f"TLQCallback supports single-device and DDP strategies (ddp, ddp_spawn, ddp_fork), got "
            f"{type(strategy).__name__}: sharded strategies split the weights that calibration solves whole."
        )
