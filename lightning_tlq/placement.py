"""Where the model's pieces live: the decoder layers on the CPU, one at a time on the accelerator.

The next layer's weights are copied on a side CUDA stream while the current one computes (prefetch). Host
memory is not pinned: with pinning, a 7B-shaped run on one H200 spent ~16 s of its 66 s outside its timed
phases, more than faster copies can save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


class LayerPlacement:
    """Moves decoder layers between host and device.

    Args:
        layers: the decoder layers.
        device: the compute device.
        layerwise: if False, everything stays on ``device`` and the methods only hand layers out. On a CPU
            device nothing ever moves, but :attr:`layerwise` still tells the loop to work layer by layer.
    """

    def __init__(self, layers: nn.ModuleList, device: torch.device, layerwise: bool = True) -> None:
        self.layers = layers
        self.device = torch.device(device)
        self.layerwise = layerwise
        self._moves = layerwise and self.device.type != "cpu"
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if (self._cuda and self._moves) else None
        self._pending: dict[int, Any] = {}
        self._host: dict[int, list[torch.Tensor]] = {}

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
            model.to(self.device)
        finally:
            for i, layer in enumerate(stash):
                self.layers[i] = layer
        yield

    def prefetch(self, index: int) -> None:
        """Start copying layer ``index`` to the device (no-op if out of range or not layer-wise)."""
        if not self._moves or not 0 <= index < len(self.layers) or index in self._pending:
            return
        layer = self.layers[index]
        self._host[index] = [t.data for t in _tensors(layer)]
        if self._stream is None:
            layer.to(self.device)
            self._pending[index] = None
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for t in _tensors(layer):
                t.data = t.data.to(self.device, non_blocking=True)
        self._pending[index] = self._stream.record_event()

    def onload(self, index: int) -> nn.Module:
        """Layer ``index`` on the device, ready to use on the current stream."""
        layer = self.layers[index]
        if not self._moves:
            return layer
        self.prefetch(index)
        event = self._pending.pop(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in _tensors(layer):
                t.data.record_stream(current)
        return layer

    def offload(self, index: int, modified: bool = False) -> None:
        """Give layer ``index``'s device memory back: point it at its host copy again, or, if its weights were
        ``modified`` on the device (quantized), copy them back to the host."""
        if not self._moves:
            return
        host = self._host.pop(index, None)
        for i, t in enumerate(_tensors(self.layers[index])):
            t.data = t.data.to("cpu") if (modified or host is None) else host[i]
