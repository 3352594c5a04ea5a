"""Vision-tower knowledge for adapters whose family supports vision quantization (``quant.vision=true``).

A family adapter subclasses :class:`VisionAdapter` (instead of :class:`VLMAdapter`) and names its vision encoder
layers, the module whose output starts the differentiable vision path, the projector and their linear groups;
it overrides how the model computes image features and how the projector input is formed from the encoder's
hidden states. The calibration then treats each *used* vision encoder layer as a stage, and the projector's
linears as a final stage.

Hidden-state indices follow Hugging Face's ``hidden_states`` tuple: index 0 is the input of encoder layer 0 and
index ``i + 1`` the output of layer ``i``. Layers after the last index the projector reads never influence the
model's output (e.g. the last CLIP layer under LLaVA's ``vision_feature_layer=-2``), so they are not used, not
calibrated and not quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_tlq.adapters.base import VLMAdapter, require_linear
from lightning_tlq.adapters.capture import (
    DROPPED_LAYER_KWARGS,
    CapturedInputs,
    _first_tensor,
    _split_layer_call,
    _StopForward,
)
from lightning_tlq.adapters.registry import UnsupportedModelError
from lightning_tlq.keys import PROJECTOR, ModuleKey, vision_stage

__all__ = ["VisionAdapter", "vision_adapter"]


class VisionAdapter(VLMAdapter):
    """An adapter that can also quantize the vision tower and projector.

    Attributes:
        vision_layers_name: Qualified name of the ``nn.ModuleList`` of vision encoder layers.
        vision_embedding_name: Module whose output feeds encoder layer 0 (patch embeddings); during the
            importance pass its output is made to require grad, so activation gradients reach the tower.
        projector_name: Qualified name of the projector (vision features -> language model embeddings).
        vision_linear_groups: Linear names relative to a vision layer, grouped in inference order.
        projector_linear_groups: Linear names relative to the projector, grouped in inference order.
    """

    vision_layers_name: ClassVar[str] = ""
    vision_embedding_name: ClassVar[str] = ""
    projector_name: ClassVar[str] = ""
    vision_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
    projector_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()

    # ------------------------------------------------------------------------------------------- structure
    def all_vision_layers(self) -> nn.ModuleList:
        """Every vision encoder layer, used or not."""
        layers = self._vision_submodule(self.vision_layers_name, "vision_layers_name")
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedModelError(
                f"{self.vision_layers_name} is a {type(layers).__name__}, not an nn.ModuleList."
            )
        return layers

    def vision_feature_indices(self) -> tuple[int, ...]:
        """Hidden-state indices the projector reads (default: the last encoder layer's output)."""
        return (len(self.all_vision_layers()),)

    def num_used_vision_layers(self) -> int:
        """Number of leading encoder layers whose output reaches the projector."""
        return max(self.vision_feature_indices())

    def vision_layers(self) -> list[nn.Module]:
        """The used vision encoder layers, in execution order."""
        return list(self.all_vision_layers())[: self.num_used_vision_layers()]

    def vision_module_groups(self, layer_index: int) -> list[list[str]]:
        """Linear modules of used vision layer ``layer_index``, grouped in inference order."""
        layers = self.vision_layers()
        if not 0 <= layer_index < len(layers):
            raise IndexError(f"Vision layer index {layer_index} is out of range; {len(layers)} vision layers are used.")
        return self._checked_groups(layers[layer_index], f"vision layer {layer_index}", self.vision_linear_groups)

    def projector(self) -> nn.Module:
        """The projector module."""
        return self._vision_submodule(self.projector_name, "projector_name")

    def projector_module_groups(self) -> list[list[str]]:
        """Linear modules of the projector, grouped in inference order."""
        return self._checked_groups(self.projector(), "the projector", self.projector_linear_groups)

    def vision_embedding(self) -> nn.Module:
        """The module whose output enters vision encoder layer 0 (made to require grad for importance)."""
        return self._vision_submodule(self.vision_embedding_name, "vision_embedding_name")

    def vision_targets(self) -> dict[ModuleKey, nn.Module]:
        """Every vision linear to quantize, keyed ``ModuleKey("vision.<i>", name)`` and ``ModuleKey("projector",
        name)``."""
        layers = self.vision_layers()
        targets = {
            ModuleKey(vision_stage(i), name): layers[i].get_submodule(name)
            for i in range(len(layers))
            for group in self.vision_module_groups(i)
            for name in group
        }
        projector = self.projector()
        for name in (n for g in self.projector_module_groups() for n in g):
            targets[ModuleKey(PROJECTOR, name)] = projector.get_submodule(name)
        return targets

    def vision_target_module_names(self) -> list[str]:
        """Qualified names of every vision linear to quantize (used layers and projector)."""
        return [self._qualified_name(module) for module in self.vision_targets().values()]

    # ------------------------------------------------------------------------------------------- execution
    def image_features(self, batch: Mapping[str, Any]) -> Tensor:
        """The model's own image features for a batch, ``[image_tokens, D]`` (all images concatenated)."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_features().")

    def image_feature_positions(self, batch: Mapping[str, Any]) -> Tensor:
        """``[B, S]`` bool: where the decoder's input holds :meth:`image_features` rows (in the same order).

        Default: the image placeholder tokens, which the model overwrites with the features unchanged.
        """
        return batch["input_ids"] == self.image_token_id

    def image_patch_counts(self, batch: Mapping[str, Any]) -> list[int]:
        """Relative number of vision rows per image (rows of every vision stage are split in this ratio)."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_patch_counts().")

    def projector_input(self, hidden_states: Mapping[int, Tensor]) -> Tensor:
        """The projector's input from the encoder hidden states at :meth:`vision_feature_indices`."""
        return hidden_states[self.num_used_vision_layers()]

    def run_projector(self, features: Tensor) -> Tensor:
        """Run the projector on :meth:`projector_input`'s output."""
        return self.projector()(features)

    def run_vision_layer(self, layer_index: int, hidden: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        """Run used vision layer ``layer_index`` on ``hidden`` with its captured kwargs."""
        return _first_tensor(self.vision_layers()[layer_index](hidden, **kwargs), layer_index)

    def vision_capture(self, batch: Mapping[str, Any]) -> CapturedInputs:
        """Record the input of vision layer 0 and every used layer's kwargs during one no-grad image forward.

        The forward stops before the last used layer runs. Unlike decoder kwargs, ``None`` values are kept
        (CLIP layers take ``attention_mask`` positionally and need it even when it is ``None``).

        Raises:
            RuntimeError: If a used vision layer was not called.
        """
        layers = self.all_vision_layers()
        count = max(self.num_used_vision_layers(), 1)  # layer 0's input is needed even if no layer is used
        records: list[dict[str, Any] | None] = [None] * count
        first: list[Tensor] = []
        handles = []
        try:
            for i in range(count):
                hook = self._vision_capture_hook(i, count, records, first)
                handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
            with torch.no_grad():
                self.image_features(batch)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i, kw in enumerate(records) if kw is None]
        if missing or not first:
            raise RuntimeError(f"Vision layers {missing} were not called while computing the image features.")
        return CapturedInputs(hidden=first[0], layer_kwargs=[kw for kw in records if kw is not None])

    def vision_rows_per_image(self, batch: Mapping[str, Any], n_rows: int) -> list[int]:
        """Split ``n_rows`` rows of a vision stage (image-major order) into rows per image.

        Raises:
            ValueError: If the rows do not split into whole rows per image.
        """
        counts = [int(c) for c in self.image_patch_counts(batch)]
        total = sum(counts)
        rows = [c * n_rows // total for c in counts]
        if total == 0 or sum(rows) != n_rows or any(r * total != c * n_rows for r, c in zip(rows, counts)):
            raise ValueError(f"{n_rows} vision rows do not split over images with patch counts {counts}.")
        return rows

    # --------------------------------------------------------------------------------------------- helpers
    def _vision_capture_hook(
        self, index: int, count: int, records: list[dict[str, Any] | None], first: list[Tensor]
    ) -> Callable[[nn.Module, tuple, dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden, layer_kwargs = _split_layer_call(module, args, kwargs)
            if index == 0:
                first.append(hidden)
            records[index] = {k: v for k, v in layer_kwargs.items() if k not in DROPPED_LAYER_KWARGS}
            if index == count - 1:
                raise _StopForward

        return hook

    def _checked_groups(self, parent: nn.Module, where: str, groups: Sequence[Sequence[str]]) -> list[list[str]]:
        if not groups:
            raise UnsupportedModelError(f"{type(self).__name__} lists no linear modules for {where}.")
        for name in (n for g in groups for n in g):
            require_linear(self, parent, name, where, "fix vision_linear_groups / projector_linear_groups")
        return [list(g) for g in groups]

    def _vision_submodule(self, name: str, attribute: str) -> nn.Module:
        if not name:
            raise UnsupportedModelError(f"{type(self).__name__}.{attribute} is not set.")
        try:
            return self.model.get_submodule(name)
        except AttributeError as err:
            raise UnsupportedModelError(
                f"{type(self).__name__}.{attribute} names '{name}', which {type(self.model).__name__} does not have."
            ) from err


def vision_adapter(adapter: VLMAdapter) -> VisionAdapter:
    """Return ``adapter`` if its family supports vision quantization, else raise a clear error."""
    if not isinstance(adapter, VisionAdapter):
        raise UnsupportedModelError(
            f"quant.vision=true is not supported for {type(adapter).__name__} "
            f"(model type {getattr(adapter.model.config, 'model_type', None)!r}): its adapter does not subclass "
            "VisionAdapter. Use quant.vision=false to keep the vision tower in full precision."
        )
    return adapter
