"""Where the model's pieces live: the decoder layers on the CPU, one at a time on the accelerator.

The next layer's weights are copied on a side CUDA stream while the current one computes (prefetch). The copy is
issued from a helper thread, so it never blocks the calling thread, even from pageable memory (such a copy holds
the thread that issues it until it is done). While :meth:`LayerPlacement.rest_on_device` runs, the layers' host
tensors are page-locked in place (``cudaHostRegister`` on a helper thread, layer after layer, overlapping the
work before the first layer; :class:`lightning_tlq.hostmem.Registration`), so copies both ways run as DMA; no
page-locked copy of the model is allocated. ``pin_layers=False`` (``memory.pin_layers``) leaves them pageable.
Placement never changes a result. Measured costs and rates: ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from lightning_tlq.hostmem import Registration

_range = torch.profiler.record_function  # named ranges in profiler traces
log = logging.getLogger(__name__)

LOCK_FRACTION = 0.5
"""At most this share of the host's physical memory is page-locked for decoder layers (``memory.pin_layers``):
the first layers that fit are locked, the rest stay pageable (slower copies). A 7B model's layers take 12 GiB, a
32B model's 61 GiB: all of them on a 128 GiB host."""


def lock_budget() -> int:
    """Bytes of decoder layers :class:`LayerPlacement` may page-lock (:data:`LOCK_FRACTION` of physical memory)."""
    try:
        return int(LOCK_FRACTION * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def within_budget(groups: list[list[torch.Tensor]], budget: int) -> list[list[torch.Tensor]]:
    """The leading groups whose host tensors add up to at most ``budget`` bytes."""
    total = 0
    for i, group in enumerate(groups):
        total += sum(t.numel() * t.element_size() for t in group if t.device.type == "cpu")
        if total > budget:
            log.info(
                "memory.pin_layers: page-locking the first %d of %d decoder layers (%.1f GiB of host memory may "
                "be locked); the others are copied from pageable memory.", i, len(groups), budget / 2**30,
            )  # fmt: skip
            return groups[:i]
    return groups


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(module, "_parameters" | "_buffers", name, tensor) for every tensor of ``model``, each tensor once."""
    seen: set[int] = set()
    for module in model.modules():
        for slot in ("_parameters", "_buffers"):
            for name, t in getattr(module, slot).items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield module, slot, name, t


class LayerPlacement:
    """Moves decoder layers between host and device.

    Args:
        layers: the decoder layers.
        device: the compute device.
        layerwise: if False, everything stays on ``device`` and the methods only hand layers out. On a CPU
            device nothing ever moves, but :attr:`layerwise` still tells the loop to work layer by layer.
        pin_layers: page-lock the layers' host memory in place while :meth:`rest_on_device` runs (CUDA only;
            ``memory.pin_layers``). False leaves it pageable: copies then run slower, still off the calling thread.
    """

    def __init__(
        self, layers: nn.ModuleList, device: torch.device, layerwise: bool = True, pin_layers: bool = True
    ) -> None:
        self.layers = layers
        self.pin_layers = pin_layers
        self.device = torch.device(device)
        self.layerwise = layerwise
        self._moves = layerwise and self.device.type != "cpu"
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if (self._cuda and self._moves) else None
        self._pending: dict[int, Any] = {}
        self._host: dict[int, list[torch.Tensor]] = {}
        self._rest: list[tuple[nn.Module, str, str, torch.Tensor]] = []
        self._parked: list[tuple[nn.Module, str, str]] = []
        self.seconds: dict[str, float] = {"prefetch": 0.0, "wait": 0.0, "offload": 0.0}
        """Host time spent issuing copies to the device (``prefetch``), waiting for a prefetch thread's copy
        (``wait``, for the copy), copying modified layers back (``offload``), starting the page-locking of the
        layers' host memory (``register``; ``prefetch`` includes waiting for a layer's) and releasing it
        (``unregister``)."""
        self.registered_bytes = 0
        """Bytes of layer host memory page-locked in place by the last :meth:`rest_on_device`."""
        self._registration: Registration | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def moves(self) -> bool:
        """Whether layers really move between host and device (layer-wise, on an accelerator)."""
        return self._moves

    @contextlib.contextmanager
    def rest_on_device(self, model: nn.Module) -> Iterator[None]:
        """Move everything but the decoder layers to the device (layers stay where they are) for the block."""
        if not self._moves:
            model.to(self.device)
            yield
            return
        stash = list(self.layers)
        for i in range(len(self.layers)):
            self.layers[i] = nn.Identity()
        try:
            self._rest = [(m, slot, name, t.data) for m, slot, name, t in _slots(model)]  # host tensors, for park
            model.to(self.device)
        finally:
            for i, layer in enumerate(stash):
                self.layers[i] = layer
        # page-lock the layers' host copies in place, layer after layer in the background (overlapping the capture):
        # both copy directions then run as DMA and none blocks a thread
        start = time.perf_counter()
        groups = within_budget([list(_tensors(layer)) for layer in self.layers], lock_budget())
        self._registration = Registration(groups, enabled=self.pin_layers)
        self.seconds["register"] = time.perf_counter() - start
        try:
            yield
        finally:
            self.unpark()
            self._rest = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            start = time.perf_counter()
            self._registration.close()  # after every copy was issued; waits for them before unregistering
            self.registered_bytes = self._registration.bytes
            self._registration = None
            self.seconds["unregister"] = time.perf_counter() - start

    def park(self, keep: Sequence[nn.Module], modified: bool) -> None:
        """Give back the device memory of everything :meth:`rest_on_device` moved except ``keep`` (and weights
        shared with it), e.g. embeddings and vision tower once the decoder inputs are captured, until
        :meth:`unpark` (or the end of ``rest_on_device``) brings them back.

        The weights go back to their original host tensors: copied into them if they were ``modified`` on the
        device (a calibrated vision tower), else simply pointed at again. No-op unless layers move. A later call
        parks more (what is parked already stays parked).
        """
        if not self._moves:
            return
        kept = {id(t) for module in keep for t in _tensors(module)}
        for module, slot, name, host in self._rest:
            t = getattr(module, slot)[name]
            if t is None or id(t) in kept or t.device == host.device:
                continue
            data = host.copy_(t.data) if modified else host
            if slot == "_parameters":
                t.data = data
            else:
                getattr(module, slot)[name] = data
            self._parked.append((module, slot, name))

    def unpark(self) -> None:
        """Move what :meth:`park` gave back to the device again."""
        for module, slot, name in self._parked:
            t = getattr(module, slot)[name]
            if slot == "_parameters":
                t.data = t.data.to(self.device)
            else:
                getattr(module, slot)[name] = t.to(self.device)
        self._parked = []

    def prefetch(self, index: int) -> None:
        """Start copying layer ``index`` to the device (no-op if out of range or not layer-wise)."""
        if not self._moves or not 0 <= index < len(self.layers) or index in self._pending:
            return
        start = time.perf_counter()
        if self._registration is not None:  # its pages locked first: the copy is then a true background DMA
            self._registration.wait(index)
        layer = self.layers[index]
        host = self._host[index] = [t.data for t in _tensors(layer)]
        if self._stream is None:
            layer.to(self.device)
            self._pending[index] = None
        else:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            if self._pool is None:  # a copy from pageable memory holds its thread until done: not the compute one
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="tlq-prefetch")
            self._pending[index] = self._pool.submit(self._copy, host)
        self.seconds["prefetch"] += time.perf_counter() - start

    def _copy(self, host: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Copy tensors to the device on the side stream; returns them and the event that marks the end."""
        assert self._stream is not None
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream), _range("tlq.prefetch_copy"):
            data = [h.to(self.device, non_blocking=True) for h in host]
            return data, self._stream.record_event()

    def onload(self, index: int) -> nn.Module:
        """Layer ``index`` on the device, ready to use on the current stream."""
        layer = self.layers[index]
        if not self._moves:
            return layer
        self.prefetch(index)
        pending = self._pending.pop(index)
        if pending is not None:
            start = time.perf_counter()
            data, event = pending.result()
            self.seconds["wait"] += time.perf_counter() - start
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t, d in zip(_tensors(layer), data):
                d.record_stream(current)
                t.data = d
        return layer

    def offload(self, index: int, modified: bool = False) -> None:
        """Give layer ``index``'s device memory back: point it at its host copy again, or, if its weights were
        ``modified`` on the device (quantized), copy them back to the host."""
        if not self._moves:
            return
        start = time.perf_counter()
        host = self._host.pop(index, None)
        with _range("tlq.offload"):
            self._offload(index, host, modified)
        self.seconds["offload"] += time.perf_counter() - start

    def _offload(self, index: int, host: list[torch.Tensor] | None, modified: bool) -> None:
        for i, t in enumerate(_tensors(self.layers[index])):
            if host is None:
                t.data = t.data.to("cpu")
            elif modified:  # into the existing host tensor: no fresh host allocation (page faults) per layer
                t.data = host[i].copy_(t.data)
            else:
                t.data = host[i]
