"""Up-front checks, so that bad input fails in seconds and before any model weights are loaded or calibrated.

Order used by ``lightning-tlq calibrate``: settings (dataclass ``__post_init__``) -> output directory ->
model structure on the ``meta`` device (architecture supported, every target module's ``in_features`` divisible
by the group size) -> data (images readable, answers present, lengths within the model's limit) -> weights
(finite) -> calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.adapters import UnsupportedModelError, VLMAdapter, get_adapter, supported_model_types
from lightning_tlq.config import QuantArgs
from lightning_tlq.data import IGNORE_INDEX

__all__ = [
    "check_batches",
    "check_finite_weights",
    "check_quantizable",
    "load_processor_for",
    "model_max_length",
    "model_on_meta",
    "resolve_max_length",
]


def _config_for(name_or_path: str) -> Any:
    from transformers import AutoConfig

    from lightning_tlq.models.embedded import embedded_path
    from lightning_tlq.models.tiny import TINY_MODELS, _check_model_dir, build_config, build_tokenizer

    name_or_path = embedded_path(name_or_path)
    if name_or_path in TINY_MODELS:
        family = TINY_MODELS[name_or_path]
        return build_config(family, build_tokenizer(family))
    path = Path(name_or_path).expanduser()
    _check_model_dir(path, name_or_path)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError) as err:
        raise UnsupportedModelError(
            f"{path}/config.json describes a model transformers cannot build ({err}). Supported model types: "
            f"{', '.join(supported_model_types())}."
        ) from err


def model_on_meta(name_or_path: str) -> nn.Module:
    """The model's structure without its weights (``meta`` device), to validate it in milliseconds.

    Raises:
        FileNotFoundError: If the name is no tiny model and no such directory exists.
        UnsupportedModelError: If no adapter handles the model type.
    """
    from transformers import AutoModelForImageTextToText

    config = _config_for(name_or_path)
    model_type = getattr(config, "model_type", None)
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"Model {name_or_path!r} has model_type {model_type!r}, which lightning_tlq cannot quantize. Supported "
            f"model types: {', '.join(supported_model_types())}. Add an adapter (lightning_tlq/adapters/) for it."
        )
    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(config)
        except ValueError as err:
            raise UnsupportedModelError(
                f"Model {name_or_path!r} ({model_type}) is not an image-text-to-text model: {err}"
            ) from err


def check_quantizable(model: nn.Module, quant: QuantArgs) -> VLMAdapter:
    """Every target linear module (with ``quant.vision`` also the tower's and projector's) exists and its
    ``in_features`` is a multiple of the group size.

    Raises:
        UnsupportedModelError: If the adapter cannot find the decoder layers or a target module, the family
            has no vision support while ``quant.vision`` is set, or (awq / smoothquant / mbq) no op to fold input
            scales into.
        ValueError: If ``quant.group_size`` does not divide a module's ``in_features`` (the message lists sizes
            that do).
    """
    adapter = get_adapter(model)
    layers = adapter.decoder_layers()
    for index in range(len(layers)):
        for group in adapter.module_groups(index):
            for name in group:
                module = layers[index].get_submodule(name)
                _check_shape(quant, module, f"decoder layer {index} {name}")
    if quant.handler.smoothing is not None:  # scale-search methods: every group's scales must have an op to fold into
        for index in range(len(layers)):
            adapter.smoothing_plan(index)
    if quant.vision:
        from lightning_tlq.adapters.vision import vision_adapter

        for key, module in vision_adapter(adapter).vision_targets().items():
            _check_shape(quant, module, key, hint=" For the vision tower, alternatively use quant.vision=false.")
    return adapter


def _check_shape(quant: QuantArgs, module: nn.Module, name: str, hint: str = "") -> None:
    try:
        quant.spec.check_shape(module.in_features, name=name)
    except ValueError as err:
        raise ValueError(f"quant.group_size={quant.group_size} does not fit this model. {err}{hint}") from err


def model_max_length(model_or_config: Any) -> int | None:
    """The text model's position limit (``max_position_embeddings``), or None if the config has none."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value is not None else None


def resolve_max_length(requested: int | None, model_limit: int | None) -> int | None:
    """``data.max_length`` if set (it may not exceed the model's limit), else the model's limit."""
    if requested is None:
        return model_limit
    if requested < 1:
        raise ValueError(f"data.max_length={requested} must be a positive number of tokens.")
    if model_limit is not None and requested > model_limit:
        raise ValueError(
            f"data.max_length={requested} exceeds the model's limit of {model_limit} positions; "
            f"use at most {model_limit}."
        )
    return requested


def load_processor_for(name_or_path: str) -> Any:
    """The processor alone (cheap), so the data can be validated before the weights are loaded."""
    from lightning_tlq.models.embedded import embedded_path
    from lightning_tlq.models.tiny import TINY_MODELS, build_processor, load_processor

    if name_or_path in TINY_MODELS:
        return build_processor(TINY_MODELS[name_or_path])
    return load_processor(Path(embedded_path(name_or_path)).expanduser())


def check_finite_weights(model: nn.Module) -> None:
    """Raise if any parameter or floating buffer holds NaN or Inf (naming the first few)."""
    bad = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise FloatingPointError(
            f"The model's weights contain NaN/Inf in {len(bad)} tensor(s), e.g. {bad[:5]}. The checkpoint is "
            "corrupt or overflowed (e.g. saved in float16); repair or re-export it before quantizing."
        )


def check_batches(batches: Sequence[dict[str, Tensor]]) -> None:
    """Every batch has ``input_ids``/``labels`` and every sample at least one supervised answer token.

    Raises:
        ValueError: If there are no batches, a batch lacks keys, or a sample has no answer token.
    """
    if not batches:
        raise ValueError("The calibration data is empty: the dataloader yielded no batches.")
    for i, batch in enumerate(batches):
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
        if missing:
            raise ValueError(
                f"Calibration batch {i} lacks {missing}; batches must be collated by lightning_tlq.data.collate "
                "(input_ids, attention_mask, labels = -100 outside the answer, plus the processor's image inputs)."
            )
        labels = batch["labels"]
        empty = (~(labels[:, 1:] != IGNORE_INDEX).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"Calibration batch {i}, sample(s) {empty}: no answer tokens (every label is -100). TLQ's importance "
                "comes from the loss on the answer; give every sample a non-empty answer."
            )
