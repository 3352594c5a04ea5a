"""What ``memory.profile`` changes: where activations, the head and the next layer are while a layer is calibrated.

``fast`` (the default) keeps calibration activations, the LM head and the next decoder layer (prefetched) on the
accelerator. ``low`` gives the same codes with the least accelerator memory:

- **activations** (every layer input the layer-wise importance pass stores, the captured decoder inputs, each
  layer's inputs and outputs) live in page-locked host memory; each batch is copied to the device when a layer
  runs on it and its output copied back without a wait (:meth:`~lightning_tlq.activations.LayerReplay.store`);
- **the LM head** is parked on the host once the importance pass is done (only that pass uses it);
- **the next layer** is prefetched after the current layer's solves instead of before, so it never coincides
  with the largest solve;
- **GPTQ** factorises without full-size temporaries (:mod:`lightning_tlq.core.gptq_lean`).

The Hessian accumulators are already those of one true-sequential group at a time, and ``down_proj``'s input is
never held for all samples (each batch's rows are added as the layer runs), in both profiles. A model of the
peak for a shape and profile: ``examples/memory_model.py``; measurements: ``docs/performance.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_tlq.config import MemoryArgs


@dataclass(frozen=True)
class MemoryPlan:
    """The placement decisions of one run, from its :class:`~lightning_tlq.config.MemoryArgs`."""

    offload_activations: bool
    """Activations in page-locked host memory (``memory.offload_activations`` or the low profile)."""
    offload_captured: bool
    """The captured decoder inputs too (they stay referenced for the whole run)."""
    park_head_for_layers: bool
    """Park the LM head on the host after the importance pass."""
    prefetch_before_solve: bool
    """Prefetch the next layer when a layer starts (fast) rather than after its solves (low)."""
    lean_solve: bool
    """GPTQ without full-size temporaries."""

    @classmethod
    def from_args(cls, memory: MemoryArgs) -> MemoryPlan:
        low = memory.profile == "low"
        return cls(
            offload_activations=memory.offload_activations or low,
            offload_captured=low,
            park_head_for_layers=low,
            prefetch_before_solve=not low,
            lean_solve=low,
        )

    def release_captured(self, captured: Any, store: Any) -> None:
        """Move each batch's captured decoder input where activations are kept (``store``), if this plan says so."""
        if self.offload_captured:
            for c in captured:
                c.hidden = store(c.hidden)

    def before_layers(self, placement: Any) -> None:
        """Between the importance pass and the decoder layers: park the head, give cached blocks back."""
        if self.park_head_for_layers and placement.moves:
            placement.park((), modified=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
