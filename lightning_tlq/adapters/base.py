"""Model-family adapters: everything the quantizer needs to know about a vision-language model.

The calibration loop is family-agnostic. It asks an adapter for the text decoder layers, the linear modules to
quantize (grouped in inference order), the inputs each decoder layer receives and how to run a single layer
(:mod:`~lightning_tlq.adapters.execution`); awq, smoothquant and mbq also where to fold input scales
(:mod:`~lightning_tlq.adapters.folding`). Each family is one small module that subclasses :class:`VLMAdapter`,
overrides what differs, and is decorated with :func:`register_adapter`; :func:`get_adapter` then picks it by
``model.config.model_type``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lightning_tlq.adapters.capture import CapturedInputs, move_to
from lightning_tlq.adapters.execution import LayerExecutionMixin
from lightning_tlq.adapters.folding import ScaleFold, SmoothingPlanMixin
from lightning_tlq.adapters.registry import (
    UnsupportedModelError,
    _model_type,
    get_adapter,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "CapturedInputs",
    "ScaleFold",
    "UnsupportedModelError",
    "VLMAdapter",
    "get_adapter",
    "move_to",
    "register_adapter",
    "supported_model_types",
]

# Llama-style decoder layer: q/k/v read the normed input, o reads attention, gate/up read the normed residual.
_LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


# Per module group of a Llama-style layer: the op producing the group's input (awq / smoothquant / mbq fold 1/s
# into it), and the module whose output gradient weighs the group's tokens under mbq (attention / MLP block).
_LLAMA_SMOOTHING_PRODUCERS: tuple[str | None, ...] = (
    "input_layernorm",
    "self_attn.v_proj",
    "post_attention_layernorm",
    "mlp.up_proj",
)
_LLAMA_BLOCK_OUTPUTS: tuple[str, ...] = ("self_attn.o_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.down_proj")


def require_linear(adapter: object, parent: nn.Module, name: str, where: str, fix: str) -> nn.Linear:
    """``parent.get_submodule(name)``, which must be an ``nn.Linear``; otherwise a clear error naming ``fix``."""
    try:
        module = parent.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        found = "nothing" if module is None else type(module).__name__
        raise UnsupportedModelError(
            f"{type(adapter).__name__} expects an nn.Linear at '{name}' in {where} ({type(parent).__name__}) but "
            f"found {found}; {fix} for this family."
        )
    return module


class VLMAdapter(LayerExecutionMixin, SmoothingPlanMixin):
    """Family knowledge of a Hugging Face vision-language model, with Llama-like defaults.

    Subclasses set :attr:`model_types` and override only what differs for their family (extra forward
    inputs, module groups, vision prefixes, ...), then register with :func:`register_adapter`.

    Attributes:
        model_types: ``config.model_type`` values handled by the adapter.
        forward_keys: Batch keys passed to the model forward (others, such as labels, are dropped).
        linear_groups: Linear module names relative to a decoder layer, grouped in inference order.
        vision_prefixes: Qualified names (relative to the model) of the vision tower and projector.
        kept_layer_kwargs: Layer kwargs kept by :meth:`capture` even though they hold no tensor.
        injects_residuals: Whether the model adds something to the hidden states between decoder layers (Qwen3-VL
            deepstack). Capture then records it per layer (:attr:`CapturedInputs.residual_delta`) and also runs
            the last layer; otherwise finding such an addition is an error.
        smoothing_producers: Per entry of :attr:`linear_groups`, the op whose output is exactly that group's input
            and nothing else's, so that awq / smoothquant / mbq can fold ``1 / s`` into it: a norm, or a linear
            whose output channels reach the group channel-wise-linearly (v_proj through attention, up_proj
            through ``act(gate) * up``). None for a group without one; None as a whole refuses those methods.
        block_outputs: Per group, the module whose output gradient gives mbq's vision weight (attention: o_proj,
            MLP: down_proj).
        norm_weight_offset: 0 if the norms compute ``weight * n(x)`` (Llama, Qwen), 1 for ``(1 + weight) * n(x)``
            (Gemma). :meth:`smoothing_plan` checks it numerically on each norm.
        clip_excluded: Modules that AWQ's clip search leaves alone (q and k: their outputs meet in ``q k^T``).
        model: The wrapped model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    forward_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values")
    linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = _LLAMA_GROUPS
    vision_prefixes: ClassVar[tuple[str, ...]] = ()
    kept_layer_kwargs: ClassVar[frozenset[str]] = frozenset()
    injects_residuals: ClassVar[bool] = False
    smoothing_producers: ClassVar[tuple[str | None, ...] | None] = _LLAMA_SMOOTHING_PRODUCERS
    block_outputs: ClassVar[tuple[str, ...]] = _LLAMA_BLOCK_OUTPUTS
    norm_weight_offset: ClassVar[float] = 0.0
    clip_excluded: ClassVar[tuple[str, ...]] = ("self_attn.q_proj", "self_attn.k_proj")

    def __init__(self, model: nn.Module) -> None:
        """Wrap ``model``.

        Args:
            model: A Hugging Face image-text-to-text model (``...ForConditionalGeneration``).

        Raises:
            UnsupportedModelError: If the model's ``config.model_type`` is not in :attr:`model_types`.
        """
        model_type = _model_type(model)
        if self.model_types and model_type not in self.model_types:
            raise UnsupportedModelError(
                f"{type(self).__name__} handles model types {list(self.model_types)}, got {model_type!r}; "
                "use get_adapter(model) to pick the right adapter."
            )
        self.model = model

    # ----------------------------------------------------------------------------------------------- config
    @property
    def image_token_id(self) -> int:
        """Id of the image placeholder token in ``input_ids``."""
        config = self.model.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise UnsupportedModelError(
            f"{type(config).__name__} has neither `image_token_id` nor `image_token_index`; "
            f"override image_token_id in {type(self).__name__}."
        )

    @property
    def pad_token_id(self) -> int | None:
        """Padding token id from the text config (or the top-level config), ``None`` if unset."""
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for cfg in (text_config, config):
            value = getattr(cfg, "pad_token_id", None)
            if value is not None:
                return int(value)
        return None

    @property
    def num_layers(self) -> int:
        """Number of text decoder layers."""
        return len(self.decoder_layers())

    # ------------------------------------------------------------------------------------------- structure
    def text_model(self) -> nn.Module:
        """Return the text decoder stack (the module owning ``layers`` and the final ``norm``).

        Raises:
            UnsupportedModelError: If no candidate module has an ``nn.ModuleList`` named ``layers``.
        """
        candidates: list[Any] = []
        if hasattr(self.model, "get_decoder"):
            decoder = self.model.get_decoder()
            candidates += [decoder, getattr(decoder, "language_model", None)]
        candidates.append(getattr(getattr(self.model, "model", None), "language_model", None))
        for module in candidates:
            if isinstance(getattr(module, "layers", None), nn.ModuleList):
                return module
        raise UnsupportedModelError(
            f"Cannot find the text decoder layers of {type(self.model).__name__} (tried model.get_decoder().layers "
            f"and model.model.language_model.layers); override text_model() in {type(self).__name__}."
        )

    def decoder_layers(self) -> nn.ModuleList:
        """Return the text decoder layers, in execution order."""
        return self.text_model().layers

    def layer_name(self, layer_index: int) -> str:
        """Return the qualified name of decoder layer ``layer_index`` within the model."""
        return self._qualified_name(self._layer(layer_index))

    def module_groups(self, layer_index: int) -> list[list[str]]:
        """Return the linear modules of a decoder layer to quantize, grouped in inference order.

        Modules in one group read the same input and are calibrated together; groups are solved one after
        the other (true-sequential calibration).

        Args:
            layer_index: Index of the decoder layer.

        Returns:
            Module names relative to the decoder layer, e.g. ``[["self_attn.q_proj", ...], ["self_attn.o_proj"]]``.

        Raises:
            UnsupportedModelError: If a listed module is missing or is not an ``nn.Linear``.
        """
        layer = self._layer(layer_index)
        groups = [list(group) for group in self.linear_groups]
        for name in (n for group in groups for n in group):
            self._check_linear(layer, layer_index, name)
        return groups

    def target_module_names(self) -> list[str]:
        """Return the qualified names of all linear modules to quantize, over all decoder layers."""
        return [
            f"{self.layer_name(i)}.{name}"
            for i in range(self.num_layers)
            for group in self.module_groups(i)
            for name in group
        ]

    @property
    def ignore_prefixes(self) -> tuple[str, ...]:
        """Qualified-name prefixes of modules kept in full precision: vision tower, projector and LM head."""
        for prefix in self.vision_prefixes:
            self._check_submodule(prefix)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_names = (self._qualified_name(head),) if isinstance(head, nn.Module) else ()
        return (*self.vision_prefixes, *head_names)

    def is_ignored(self, name: str) -> bool:
        """Return whether the qualified module name ``name`` lies under one of :attr:`ignore_prefixes`."""
        return any(name == p or name.startswith(p + ".") for p in self.ignore_prefixes)

    # --------------------------------------------------------------------------------------------- helpers
    def _layer(self, layer_index: int) -> nn.Module:
        layers = self.decoder_layers()
        if not 0 <= layer_index < len(layers):
            raise IndexError(f"Decoder layer index {layer_index} is out of range; the model has {len(layers)} layers.")
        return layers[layer_index]

    def _check_linear(self, layer: nn.Module, layer_index: int, name: str) -> None:
        module = require_linear(
            self, layer, name, f"decoder layer {layer_index}", "override linear_groups or module_groups()"
        )
        embeddings = [getattr(self.model, f"get_{kind}_embeddings", lambda: None)() for kind in ("input", "output")]
        if any(getattr(e, "weight", None) is module.weight for e in embeddings):
            raise UnsupportedModelError(
                f"'{name}' in decoder layer {layer_index} shares its weight with the model's (tied) embeddings; "
                "quantizing it would overwrite them. Remove it from linear_groups."
            )

    def _check_submodule(self, name: str) -> None:
        try:
            self.model.get_submodule(name)
        except AttributeError as err:
            raise UnsupportedModelError(
                f"{type(self).__name__}.vision_prefixes names '{name}', which {type(self.model).__name__} does not "
                "have; fix vision_prefixes for this family."
            ) from err

    def _qualified_name(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise UnsupportedModelError(f"{type(module).__name__} is not a submodule of {type(self.model).__name__}.")
