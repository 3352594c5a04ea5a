"""How an adapter runs its model: the forward inputs of a batch, the capture of every decoder layer's inputs, one
decoder layer, and the head (final norm and LM head)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_tlq.adapters.capture import (
    DROPPED_LAYER_KWARGS,
    CapturedInputs,
    _contains_tensor,
    _first_tensor,
    capture_decoder_inputs,
)
from lightning_tlq.adapters.registry import UnsupportedModelError


class LayerExecutionMixin:
    """Running the model, for :class:`~lightning_tlq.adapters.base.VLMAdapter` (reads its ``model``,
    ``forward_keys``, ``kept_layer_kwargs``, ``text_model`` and ``_layer``); families override what differs."""

    def forward_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Build model-forward kwargs from a collated batch.

        Keeps the keys in :attr:`forward_keys` (labels and other extras are dropped) and sets
        ``use_cache=False``. Families extend this to add inputs their forward requires.

        Args:
            batch: Collated batch with at least ``input_ids``.

        Returns:
            Keyword arguments for ``model(**kwargs)``.

        Raises:
            KeyError: If ``input_ids`` is missing.
        """
        if batch.get("input_ids") is None:
            raise KeyError(f"The batch needs `input_ids` to run the model; got keys {sorted(batch)}.")
        inputs = {key: batch[key] for key in self.forward_keys if batch.get(key) is not None}
        inputs["use_cache"] = False
        return inputs

    def capture(self, batch: Mapping[str, Any], skip_layers: bool = False) -> CapturedInputs:
        """Run the model once (no grad) and record the inputs of every text decoder layer.

        The forward stops right before the last decoder layer would run, so the work after it (final norm,
        LM head) is skipped; with :attr:`injects_residuals` it stops at the final norm instead, to record what is
        added after the last layer. All hooks are removed again, also when the forward raises.

        Args:
            batch: Collated batch, already on the model's device.
            skip_layers: replace every decoder layer's computation by the identity while capturing, so the
                decoder layers may stay on the CPU (only embeddings, vision tower and rotary embeddings run).
                Layer kwargs (masks, rotary embeddings) do not depend on the hidden states, so they are exact;
                so are residual deltas, which are additions that do not depend on them either.

        Returns:
            Layer-0 hidden states, the kwargs of each decoder layer and the per-layer residual deltas.

        Raises:
            RuntimeError: If some decoder layer was not reached during the forward.
            UnsupportedModelError: If the hidden states change between two decoder layers although
                :attr:`injects_residuals` is off.
        """
        return capture_decoder_inputs(self, batch, skip_layers)

    def run_layer(self, layer_index: int, hidden: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        """Run one decoder layer on ``hidden`` with its captured kwargs.

        Gradient mode is left to the caller.

        Args:
            layer_index: Index of the decoder layer.
            hidden: ``(B, S, D)`` input hidden states.
            kwargs: The layer's kwargs, e.g. ``CapturedInputs.layer_kwargs[layer_index]``.

        Returns:
            ``(B, S, D)`` output hidden states.
        """
        return _first_tensor(self._layer(layer_index)(hidden, **kwargs), layer_index)

    def head(self, hidden: Tensor) -> Tensor:
        """Apply the final norm and the LM head to the last decoder layer's output.

        Args:
            hidden: ``(B, S, D)`` output of the last decoder layer, passed through
                :meth:`CapturedInputs.add_residual_delta`.

        Returns:
            ``(B, S, V)`` logits, as the model's forward computes them.
        """
        norm, lm_head = self.head_modules()
        return lm_head(norm(hidden))

    def head_modules(self) -> list[nn.Module]:
        """The modules :meth:`head` runs (final norm, LM head); override together with :meth:`head`."""
        lm_head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(lm_head, nn.Module):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no output embeddings; override head() in {type(self).__name__}."
            )
        return [self._final_norm(), lm_head]

    # --------------------------------------------------------------------------------------------- helpers
    def _final_norm(self) -> nn.Module:
        norm = getattr(self.text_model(), "norm", None)
        if not isinstance(norm, nn.Module):
            raise UnsupportedModelError(
                f"The text model of {type(self.model).__name__} has no final `norm`; override head() and capture() "
                f"in {type(self).__name__}."
            )
        return norm

    def _clean_layer_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Drop caches, control flags and values holding no tensor (unless in :attr:`kept_layer_kwargs`)."""
        return {
            key: value
            for key, value in kwargs.items()
            if key in self.kept_layer_kwargs or (key not in DROPPED_LAYER_KWARGS and _contains_tensor(value))
        }
