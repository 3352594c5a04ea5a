"""Calibration activations: capturing the decoder's inputs, replaying one layer on them, and where they are kept."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.actquant import apply_activation_quant
from lightning_tlq.adapters.base import CapturedInputs
from lightning_tlq.hostmem import PinnedArena

ACTIVATION_SLAB_BYTES = 256 << 20
"""Page-locked slab size of offloaded activations (:meth:`LayerReplay.store`)."""

LayerForward = Callable[[int, Tensor], Tensor]
"""``forward(batch_index, hidden)``: one layer run on one batch's hidden states."""


class LayerReplay:
    """Runs decoder layers alone on captured inputs and keeps their outputs on the device or in pinned host memory.

    Args:
        adapter: the model's :class:`~lightning_tlq.adapters.VLMAdapter`.
        device: the compute device.
        offload: keep activations in page-locked host memory (CUDA only) instead of on the device.
    """

    def __init__(self, adapter: Any, device: torch.device, offload: bool = False) -> None:
        self.adapter, self.device, self.offload = adapter, device, offload
        self._finite: dict[int, Tensor] = {}  # id of a stored host copy -> its "all finite" flag on the device
        self._arena: PinnedArena | None = None
        self.host_seconds = 0.0
        """Host time spent taking page-locked slabs for offloaded activations (their first use dominates)."""

    def store(self, t: Tensor) -> Tensor:
        """``t`` where calibration activations are kept: as is, or copied to pinned host memory.

        The copy does not wait for the device: whatever reads the host copy goes through the device stream
        (``.to(device)``) or :meth:`check_finite` first, which waits for it. Its finiteness is computed on the
        device before the copy (a host scan of every layer's activations would cost seconds per run). Copies are
        carved from 256 MiB page-locked slabs: torch's page-locked allocator rounds each request up to a power of
        two (a 32B-shaped batch, 42 MB, would take 64 MB: 65 GiB for the 32B run's 41 GiB of activations).
        """
        if not self.offload or t.device.type != "cuda":
            return t
        if self._arena is None:
            self._arena = PinnedArena(ACTIVATION_SLAB_BYTES, pin=True)
        start = time.perf_counter()
        host = self._arena.empty(t.shape, t.dtype)
        self.host_seconds += time.perf_counter() - start
        flag = torch.isfinite(t).all()
        host.copy_(t, non_blocking=True)
        key = id(host)
        self._finite[key] = flag
        weakref.finalize(host, self._finite.pop, key, None)
        return host

    def check_finite(self, index: int, hidden: Sequence[Tensor], path: str = "quantized") -> None:
        """:func:`check_finite` that reads the device flags of copies made by :meth:`store` (one wait for the
        device, which also completes those copies) and scans only what it has no flag for (or a failing layer)."""
        flags = [self._finite.get(id(h)) for h in hidden]
        known = [f for f in flags if f is not None]
        good = bool(torch.stack(known).all()) if known else False  # waits for the stream: the copies have landed
        for b, (h, flag) in enumerate(zip(hidden, flags)):
            if not (good and flag is not None) and not torch.isfinite(h).all():
                _non_finite(index, b, path)

    def capture(
        self,
        batches: Sequence[dict[str, Tensor]],
        *,
        act_bits: int | None = None,
        quantized_vision: Iterable[torch.nn.Module] = (),
        skip_layers: bool = True,
    ) -> list[CapturedInputs]:
        """Decoder inputs (and each layer's call kwargs) per batch; a calibrated vision tower (``quantized_vision``)
        runs with its activation quantization, as at inference."""
        with torch.no_grad(), apply_activation_quant(None, act_bits, quantized_vision):
            return [self.adapter.capture(self.adapter.forward_inputs(b), skip_layers=skip_layers) for b in batches]

    def layer_forward(self, index: int, captured: Sequence[CapturedInputs]) -> LayerForward:
        """Decoder layer ``index`` on one batch, with that batch's captured kwargs (and e.g. Qwen3-VL's deepstack
        features added after it); outputs kept per :meth:`store`."""

        def forward(b: int, h: Tensor) -> Tensor:
            out = self.adapter.run_layer(index, h.to(self.device, non_blocking=True), captured[b].layer_kwargs[index])
            return self.store(captured[b].add_residual_delta(index, out))

        return forward

    def propagate(self, index: int, captured: Sequence[CapturedInputs], hidden: Sequence[Tensor]) -> list[Tensor]:
        """Layer ``index``'s outputs for every batch (no gradients)."""
        forward = self.layer_forward(index, captured)
        with torch.no_grad():
            return [forward(b, h) for b, h in enumerate(hidden)]


def check_finite(index: int, hidden: Sequence[Tensor], path: str = "quantized") -> None:
    """Raise ``FloatingPointError`` naming the layer if any batch's activations hold NaN/Inf."""
    for b, h in enumerate(hidden):
        if not torch.isfinite(h).all():
            _non_finite(index, b, path)


def _non_finite(index: int, b: int, path: str) -> None:
    where = f"Decoder layer {index}" if index >= 0 else "The embeddings (input of decoder layer 0)"
    raise FloatingPointError(
        f"{where} produced NaN/Inf activations on calibration batch {b} on the {path} path. Check "
        "the model's weights and inputs; in float16/bfloat16, try dtype float32; with very low bit "
        "widths, try more bits or a smaller group size."
    )


def check_loss(loss: Tensor, batch_idx: int) -> None:
    """Raise ``FloatingPointError`` if the full-precision SFT loss of a batch is not finite."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"The SFT loss of calibration batch {batch_idx} is {loss.item()}: the full-precision model produces "
            "NaN/Inf activations on this data. Check the weights and inputs; in float16/bfloat16, try dtype "
            "float32."
        )
