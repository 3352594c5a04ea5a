"""Importance collection as a Fabric-style callback.

:class:`TokenImportance` records, during a forward + backward of the full-precision model on the SFT loss, the
gradient at the output of every target linear module and reduces it on the fly to a few scalars per token
(``O(tokens x modules)`` memory). It only uses hooks and ``fabric.call`` events, so a Trainer ``Callback``
adapter can reuse it unchanged (``class TokenImportanceCallback(TokenImportance, pl.Callback)``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.core.importance import Score, raw_scores
from lightning_tlq.hostmem import PinnedArena


class TokenImportance:
    """Collects raw per-token importance scores for a set of modules.

    Args:
        score: ``fisher``, ``grad_abs`` or ``taylor`` (see :func:`lightning_tlq.core.importance.raw_scores`).
        groups: output-channel groups per module (one score per group).
        offload: keep the collected scores on the CPU (they are small: ``B x S x groups`` per module).

    Events (called with ``fabric.call``): ``on_importance_start(fabric, targets)``; around each backward pass
    ``on_importance_batch_start(fabric, batch_idx)`` and ``on_importance_batch_end(fabric, batch_idx)`` (a
    layer-by-layer backward calls them once per layer and batch); then ``on_importance_end(fabric)``, which checks
    that every target received a gradient for every batch.
    """

    def __init__(self, score: Score = "fisher", groups: int = 1, offload: bool = True) -> None:
        self.score = score
        self.groups = groups
        self.offload = offload
        self.scores: dict[Hashable, list[Tensor]] = {}
        """Per target key (the calibration's :class:`~lightning_tlq.keys.ModuleKey`), a ``[B, S, G]`` score per
        batch (after ``on_importance_end``)."""
        self._collected: dict[Hashable, dict[int, Tensor]] = {}
        self._pending: dict[Hashable, Tensor] = {}
        self._batches: set[int] = set()
        self._handles: list[Any] = []
        self._async = False
        self._arena: PinnedArena | None = None

    def on_importance_start(self, fabric: Any = None, targets: Mapping[Hashable, nn.Module] | None = None) -> None:
        """Hook the output of every target module."""
        self._remove_hooks()
        self.scores, self._pending, self._batches = {}, {}, set()
        self._arena = None  # slabs of the last run stay alive as long as its scores
        self._collected = {name: {} for name in targets or {}}
        for name, module in (targets or {}).items():
            self._handles.append(module.register_forward_hook(partial(self._on_forward, name)))

    def on_importance_batch_start(self, fabric: Any = None, batch_idx: int = 0) -> None:
        """Start collecting for ``batch_idx``."""
        self._pending = {}

    def on_importance_batch_end(self, fabric: Any = None, batch_idx: int = 0) -> None:
        """File the scores of this backward pass under ``batch_idx``."""
        self._batches.add(batch_idx)
        for name, value in self._pending.items():
            if batch_idx in self._collected[name]:
                raise RuntimeError(f"Module {name} received two gradients for calibration batch {batch_idx}.")
            self._collected[name][batch_idx] = value
        self._pending = {}

    def on_importance_end(self, fabric: Any = None) -> None:
        """Remove the hooks; expose :attr:`scores` (per module, a list ordered by batch index)."""
        self._remove_hooks()
        if self._async:  # the pinned copies of the scores must have landed before anyone reads them
            torch.cuda.synchronize()
            self._async = False
        batches = sorted(self._batches)
        missing = [name for name, got in self._collected.items() if sorted(got) != batches]
        if missing:
            raise RuntimeError(
                f"No output gradient reached {len(missing)} module(s), e.g. {missing[:3]}: the loss must depend on "
                "them and gradients must be enabled (not under torch.inference_mode / no_grad)."
            )
        self.scores = {name: [got[b] for b in batches] for name, got in self._collected.items()}
        self._collected = {}

    def _on_forward(self, name: Hashable, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            keep = output.detach() if self.score == "taylor" else None
            output.register_hook(partial(self._on_grad, name, keep))

    def _on_grad(self, name: Hashable, output: Tensor | None, grad: Tensor) -> None:
        if name in self._pending:
            raise RuntimeError(f"Module {name} ran twice in one forward pass; importance expects one call per batch.")
        with torch.profiler.record_function("tlq.importance.score"):
            value = raw_scores(grad, output, self.score, self.groups)
        if self.offload and value.is_cuda:  # no host sync per module: pinned copy, waited for at the end
            if self._arena is None:  # one page-locked slab for many scores, not one cudaHostAlloc each
                self._arena = PinnedArena(pin=True)
            value = self._arena.empty(value.shape, value.dtype).copy_(value, non_blocking=True)
            self._async = True
        elif self.offload:
            value = value.cpu()
        self._pending[name] = value

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """Collected scores and settings (picklable)."""
        return {"score": self.score, "groups": self.groups, "scores": self.scores}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore collected scores."""
        self.score = state.get("score", self.score)
        self.groups = state.get("groups", self.groups)
        self.scores = {k: list(v) for k, v in state.get("scores", {}).items()}


def enable_activation_grads(model: nn.Module, extra: Iterable[nn.Module] = ()) -> Any:
    """Make the input embeddings' output require grad, so activation gradients exist with frozen weights.

    Args:
        model: the HF model.
        extra: more modules whose output should start a differentiable path, e.g. a vision tower's patch
            embedding, so that gradients also reach the vision layers (the pixels themselves never need one).

    Returns a handle; call ``.remove()`` when done.
    """

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if torch.is_grad_enabled() and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return None

    modules = [model.get_input_embeddings(), *extra]
    return _Handles([module.register_forward_hook(hook) for module in modules])


class _Handles:
    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
