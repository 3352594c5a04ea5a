"""A Trainer ``Callback`` that quantizes a Lightning project's Hugging Face VLM with TLQ.

The calibration itself is the Fabric loop (:class:`~lightning_tlq.loop.CalibrationLoop` with the Fabric-style
callbacks :class:`~lightning_tlq.importance.TokenImportance` and :class:`~lightning_tlq.progress.CalibrationProgress`).
:class:`TLQCallback` is a thin adapter, as Lightning's ``SpikeDetection`` is over its Fabric version: it serves the
part of the Fabric API the loop uses from the running Trainer (:class:`TrainerFabric`: the strategy's device and
collectives, the Trainer's loggers), takes the model from the LightningModule and the data from the datamodule.

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
workers; :func:`restore_output_capturing` repairs what transformers 5.x loses there (see its docstring). Weights are
quantized in place (fake-quantized, still floating point) and the scheme is recorded in ``model.config`` (key
``tlq_quantization``); with ``output_dir`` rank 0 also writes a ``from_pretrained``-loadable copy with
``tlq_report.json`` and the codes (``lightning-tlq export`` turns it into a compressed-tensors checkpoint). With
``quant.act_bits`` (W4A8) run inference with
``lightning_tlq.actquant.apply_saved_activation_quant(model)`` applied, as for ``lightning-tlq calibrate`` outputs.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from lightning_tlq.actquant import CONFIG_KEY, quantization_record
from lightning_tlq.adapters import get_adapter
from lightning_tlq.adapters.vision import vision_adapter
from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs, importance_for
from lightning_tlq.distributed import shard_range
from lightning_tlq.export import save_qparams
from lightning_tlq.importance import TokenImportance
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.module import TLQModule
from lightning_tlq.preflight import check_batches, check_finite_weights, check_quantizable
from lightning_tlq.progress import CalibrationProgress
from lightning_tlq.report import atomic_output_dir, check_output_dir, format_summary, summarize, write_report

log = logging.getLogger(__name__)

Trigger = Literal["fit", "validate"]
_TRIGGERS = ("fit", "validate")


class TrainerFabric:
    """The part of the ``lightning.fabric.Fabric`` API that the calibration loop uses, served by a running Trainer.

    Args:
        trainer: The Trainer (its strategy gives device and collectives, its loggers receive metrics).
        callbacks: Fabric-style callbacks that :meth:`call` dispatches to.
        step_offset: Added to logged steps (keeps them increasing after training steps).
    """

    def __init__(self, trainer: pl.Trainer, callbacks: Sequence[Any], step_offset: int = 0) -> None:
        self.trainer = trainer
        self.strategy = trainer.strategy
        self._callbacks = list(callbacks)
        self.step_offset = step_offset

    @property
    def device(self) -> torch.device:
        return self.strategy.root_device

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank

    @property
    def local_rank(self) -> int:
        return self.trainer.local_rank

    @property
    def node_rank(self) -> int:
        return self.trainer.node_rank

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero

    @property
    def loggers(self) -> list[Any]:
        return list(self.trainer.loggers)

    def all_reduce(self, data: Any, group: Any = None, reduce_op: str = "mean") -> Any:
        return apply_to_collection(data, Tensor, self.strategy.reduce, group=group, reduce_op=reduce_op)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        return apply_to_collection(data, Tensor, self.strategy.all_gather, group=group, sync_grads=sync_grads)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self.strategy.broadcast(obj, src=src)

    def barrier(self, name: str | None = None) -> None:
        self.strategy.barrier(name)

    def to_device(self, obj: Any) -> Any:
        if isinstance(obj, nn.Module):
            return obj.to(self.device)
        return self.strategy.batch_to_device(obj, self.device)

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook_name`` on every callback that has it, passing only the keyword arguments it accepts."""
        for callback in self._callbacks:
            method = getattr(callback, hook_name, None)
            if not callable(method):
                continue
            params = inspect.signature(method).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                kwargs_ = {k: v for k, v in kwargs.items() if k in params}
            else:
                kwargs_ = kwargs
            method(*args, **kwargs_)

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        step = None if step is None else self.step_offset + step
        for logger in self.trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        self.log_dict({name: value}, step=step)


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
        metrics: Report every module's (weighted) relative output error; also sent to the Trainer's loggers.
        model_attr: Attribute of the LightningModule holding the HF model.
        processor_attr: Attribute of the LightningModule holding the HF processor.
        dataloader: Name of the datamodule (or LightningModule) method returning calibration batches.
        progress_bar: Show progress bars over samples and layers (rank 0).

    Attributes:
        records: Per-layer records of the last calibration (None before it ran).
        report: The full report of the last calibration.
        results: ``"{layer}.{module}"`` -> integer codes, scales and zero points of every quantized module.
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
        model_attr: str = "model",
        processor_attr: str = "processor",
        dataloader: str = "calibration_dataloader",
        progress_bar: bool = True,
    ) -> None:
        if trigger not in _TRIGGERS:
            raise MisconfigurationException(
                f"TLQCallback(trigger={trigger!r}) is not supported; use one of {_TRIGGERS}."
            )
        self.quant = quant or QuantArgs()
        self.importance = importance or ImportanceArgs()
        self.token_set = token_set or TokenSetArgs()
        self.memory = memory or MemoryArgs()
        self.trigger = trigger
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.metrics = metrics
        self.model_attr, self.processor_attr, self.dataloader = model_attr, processor_attr, dataloader
        self.progress_bar = progress_bar
        self.records: list[dict[str, Any]] | None = None
        self.report: dict[str, Any] | None = None
        self.results: dict[str, Any] = {}

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
        """Quantize ``pl_module``'s VLM in place; returns the per-layer records."""
        start = time.perf_counter()
        model = self._hf_model(pl_module)
        restore_output_capturing(model)
        processor = getattr(pl_module, self.processor_attr, None)
        batches = list(self._data_source(trainer, pl_module)())
        check_batches(batches)
        batches = _shard(batches, trainer.world_size, trainer.global_rank)
        check_quantizable(model, self.quant)
        check_finite_weights(model)
        device = next(model.parameters()).device
        flags, was_training = {n: p.requires_grad for n, p in model.named_parameters()}, model.training
        module = TLQModule().attach(model, processor)  # eval mode, frozen weights (gradients only w.r.t. inputs)
        self.importance = importance_for(self.quant, self.importance)  # mbq: grad_abs
        callbacks = [
            TokenImportance(self.importance.score, self.importance.groups),
            CalibrationProgress(self.progress_bar),
        ]
        fabric = TrainerFabric(trainer, callbacks, step_offset=trainer.global_step)
        loop = CalibrationLoop(
            fabric, module, self.quant, self.importance, self.token_set, memory=self.memory, metrics=self.metrics
        )
        try:
            records = loop.run(batches)
        finally:
            for name, param in model.named_parameters():
                param.requires_grad_(flags[name])
            model.train(was_training).to(device)
        self.records, self.results = records, loop.results
        targets = module.adapter.target_module_names()
        if self.quant.vision:
            targets = vision_adapter(module.adapter).vision_target_module_names() + targets
        setattr(model.config, CONFIG_KEY, quantization_record(self.quant, targets))  # saved with the model
        local = [
            sum(int(b["input_ids"].shape[0]) for b in batches),
            sum(int(b["attention_mask"].sum()) for b in batches),
        ]
        samples, tokens = loop.collective.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        self.report = self._report(model, int(samples), int(tokens), records, loop.phase_seconds, trainer.world_size)
        if self.output_dir is not None:
            self._save(trainer, module, start)
        return records

    def _report(
        self, model: nn.Module, samples: int, tokens: int, records: list, seconds: dict, world: int
    ) -> dict[str, Any]:
        return {
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "output_dir": str(Path(self.output_dir).resolve()) if self.output_dir else None,
            "settings": {
                "quant": asdict(self.quant),
                "importance": asdict(self.importance),
                "token_set": asdict(self.token_set),
                "memory": asdict(self.memory),
                "world_size": world,
                "trigger": self.trigger,
            },
            "data": {"samples": samples, "tokens": tokens},
            "summary": summarize(records),
            "seconds": dict(seconds),
            "layers": records,
        }

    def _save(self, trainer: pl.Trainer, module: TLQModule, start: float) -> None:
        assert self.report is not None
        assert self.output_dir is not None
        if trainer.is_global_zero:
            with atomic_output_dir(self.output_dir, self.overwrite) as tmp:
                module.model.save_pretrained(tmp)
                module.processor.save_pretrained(tmp)
                save_qparams(tmp, module.model, module.adapter, self.results, self.quant)  # for `lightning-tlq export`
                self.report["seconds"]["total"] = time.perf_counter() - start
                write_report(self.report, tmp)
            log.info("%s", format_summary(self.report))
        trainer.strategy.barrier("tlq_saved")

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


def restore_output_capturing(model: nn.Module) -> nn.Module:
    """Re-register transformers' output-capture specs for every submodel of ``model`` (idempotent).

    Work-around for a transformers 5.x bug: ``PreTrainedModel.post_init`` fills a registry keyed by class name
    (``output_capturing._CAN_RECORD_REGISTRY``) that unpickling does not. In a ``ddp_spawn`` worker a model built in
    the main process therefore installs no capture hooks, and e.g. LLaVA fails in every forward with
    ``'NoneType' object is not subscriptable`` (its vision features read ``hidden_states``). :class:`TLQCallback`
    calls this in ``setup``, before training touches the model.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # other transformers versions: nothing to repair
        return model
    for module in model.modules():
        specs = getattr(module, "_can_record_outputs", None)
        if isinstance(module, PreTrainedModel) and specs and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = specs
    return model


def _check_strategy(trainer: pl.Trainer) -> None:
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if not (isinstance(strategy, SingleDeviceStrategy) or type(strategy) is DDPStrategy):
        raise MisconfigurationException(
            f"TLQCallback supports single-device and DDP strategies (ddp, ddp_spawn, ddp_fork), got "
            f"{type(strategy).__name__}: sharded strategies split the weights that calibration solves whole."
        )
