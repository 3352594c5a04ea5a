"""Adapter for LLaVA (``model_type="llava"``): CLIP/SigLIP vision tower, MLP projector, Llama-like decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_tlq.adapters.base import UnsupportedModelError, VLMAdapter, register_adapter
from lightning_tlq.adapters.vision import VisionAdapter

_SELECT_STRATEGIES = ("default", "full")


@register_adapter
class LlavaAdapter(VisionAdapter):
    """LLaVA 1.5-style models.

    The text decoder is Llama-like, so the default module groups apply. Decoder layers receive
    ``position_embeddings`` of shape ``(1, S, head_dim)``, ``position_ids`` and an ``attention_mask`` that is
    ``None`` for unpadded batches and a 4-D ``(B, 1, S, S)`` mask otherwise.

    Vision: the CLIP encoder layers (``(B, 1 + patches, C)``, CLS first) up to the deepest
    ``vision_feature_layer``; the features are that layer's hidden states (CLS dropped under the ``default``
    select strategy; several layers are concatenated), fed to the two-linear projector. ``post_layernorm`` and
    the layers after the feature layer (the last one under the usual ``vision_feature_layer=-2``) never reach
    the language model and stay untouched.
    """

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    forward_keys: ClassVar[tuple[str, ...]] = (*VLMAdapter.forward_keys, "image_sizes")
    vision_prefixes: ClassVar[tuple[str, ...]] = ("model.vision_tower", "model.multi_modal_projector")
    vision_layers_name: ClassVar[str] = "model.vision_tower.encoder.layers"
    vision_embedding_name: ClassVar[str] = "model.vision_tower.embeddings"
    projector_name: ClassVar[str] = "model.multi_modal_projector"
    vision_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("mlp.fc1",),
        ("mlp.fc2",),
    )
    projector_linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = (("linear_1",), ("linear_2",))

    def _feature_layers(self) -> list[int]:
        layer = self.model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    def _select_strategy(self) -> str:
        strategy = self.model.config.vision_feature_select_strategy
        if strategy not in _SELECT_STRATEGIES:
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} is not supported; expected one of {_SELECT_STRATEGIES}."
            )
        return strategy

    def vision_feature_indices(self) -> tuple[int, ...]:
        """Hidden-state indices of ``config.vision_feature_layer``, normalised to ``0..num_layers``."""
        n = len(self.all_vision_layers()) + 1
        out = []
        for layer in self._feature_layers():
            if not -n <= layer < n:
                raise UnsupportedModelError(f"vision_feature_layer={layer} is out of range for {n - 1} vision layers.")
            out.append(layer % n)
        return tuple(out)

    def projector_input(self, hidden_states: Mapping[int, Tensor]) -> Tensor:
        """The selected hidden states, CLS dropped under the ``default`` strategy, concatenated over layers."""
        feats = [hidden_states[i] for i in self.vision_feature_indices()]
        if self._select_strategy() == "default":
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def image_features(self, batch: Mapping[str, Any]) -> Tensor:
        """``model.get_image_features`` with the config's feature layer and strategy, images concatenated."""
        kwargs = {"image_sizes": batch["image_sizes"]} if batch.get("image_sizes") is not None else {}
        out = self.model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy=self._select_strategy(),
            **kwargs,
        )
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output])

    def image_patch_counts(self, batch: Mapping[str, Any]) -> list[int]:
        """Every image has the same number of patches (fixed resolution)."""
        return [1] * int(batch["pixel_values"].shape[0])
