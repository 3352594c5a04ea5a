"""The part of the Fabric API the calibration uses, served by a running Trainer (for ``TLQCallback``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn


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
