"""Up-front checks, so that bad input fails in seconds and before any model weights are loaded or calibrated.

Order used by ``lightning-tlq calibrate``: settings (dataclass ``__post_init__``) -> output directory (its lock
``<output_dir>.lock`` taken, which also proves the location writable; see :mod:`lightning_tlq.output_lock`) ->
model structure on the ``meta`` device (architecture supported, every target module's ``in_features`` divisible
by the group size) -> data (images readable, answers present, lengths within the model's limit) -> free space for
the output and checkpoint (:func:`check_output_space`) -> weights (finite) -> calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.adapters import UnsupportedModelError, VLMAdapter, get_adapter, supported_model_types
from lightning_tlq.config import QuantArgs
from lightning_tlq.data import IGNORE_INDEX

__all__ = [
    "check_batches",
    "check_finite_weights",
    "check_output_space",
    "check_quantizable",
    "load_processor_for",
    "model_max_length",
    "model_on_meta",
    "resolve_max_length",
]


def _config_for(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    from lightning_tlq.hub import model_dir
    from lightning_tlq.models.tiny import TINY_MODELS, build_config, build_tokenizer

    if name_or_path in TINY_MODELS and revision is None:
        family = TINY_MODELS[name_or_path]
        return build_config(family, build_tokenizer(family))
    path = model_dir(name_or_path, revision, weights=False)  # a hub id: config and processor files only
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        hint = " Pass --model.trust_remote_code true to run it." if "trust_remote_code" in str(err) else ""
        raise UnsupportedModelError(
            f"{path}/config.json describes a model transformers cannot build ({err}).{hint} Supported model types: "
            f"{', '.join(supported_model_types())}."
        ) from err


def model_on_meta(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model's structure without its weights (``meta`` device), to validate it in milliseconds. For a hub id,
    only the config and processor files are fetched (the weights come with :func:`~lightning_tlq.models.resolve_model`).

    Raises:
        ModelNotFoundError: (a ``FileNotFoundError``) if the name is no built-in model, no directory and no cached or
            downloadable hub id.
        UnsupportedModelError: If no adapter handles the model type.
    """
    from transformers import AutoModelForImageTextToText

    config = _config_for(name_or_path, revision, trust_remote_code)
    model_type = getattr(config, "model_type", None)
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"Model {name_or_path!r} has model_type {model_type!r}, which lightning_tlq cannot quantize. Supported "
            f"model types: {', '.join(supported_model_types())}. Add an adapter (lightning_tlq/adapters/) for it."
        )
    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
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
            _check_shape(quant, module, str(key), hint=" For the vision tower, alternatively use quant.vision=false.")
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


def load_processor_for(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The processor alone (cheap), so the data can be validated before the weights are loaded."""
    from lightning_tlq.hub import model_dir
    from lightning_tlq.models.tiny import TINY_MODELS, build_processor, load_processor

    if name_or_path in TINY_MODELS and revision is None:
        return build_processor(TINY_MODELS[name_or_path])
    return load_processor(model_dir(name_or_path, revision, weights=False), trust_remote_code=trust_remote_code)


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


def check_batches(batches: Sequence[dict[str, Tensor]], vision: bool = False) -> None:
    """Every batch has ``input_ids``/``labels`` and every sample at least one supervised answer token; with
    ``vision`` (``quant.vision``) every batch has images (text-only chat samples must share a batch with image ones).

    Raises:
        ValueError: If there are no batches, a batch lacks keys, a sample has no answer token, or (``vision``) a batch
            has no image.
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
        if vision and batch.get("pixel_values") is None:
            raise ValueError(
                f"Calibration batch {i} holds only text-only samples, but quant.vision=true calibrates the vision "
                "tower on every batch's images; mix text-only samples with image samples or use quant.vision=false."
            )
        labels = batch["labels"]
        empty = (~(labels[:, 1:] != IGNORE_INDEX).any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"Calibration batch {i}, sample(s) {empty}: no answer tokens (every label is -100). TLQ's importance "
                "comes from the loss on the answer; give every sample a non-empty answer."
            )


def check_output_space(
    output_dir: str, structure: nn.Module, quant: QuantArgs, dtype: str, encoded: Sequence[dict],
    batch_size: int, export: bool = False, checkpoint: Any = None,
) -> int:  # fmt: skip
    """Fail (:class:`~lightning_tlq.outputs.OutputWriteError`, ENOSPC) before the weights load if the output's
    filesystem clearly lacks room for the output, the checkpoint and the export.

    Args:
        checkpoint: the run's :class:`~lightning_tlq.resume.LayerCheckpoint`, or None when it keeps none.

    Returns the estimated bytes still needed.
    """
    from lightning_tlq.outputs import check_free_space, estimate_bytes

    lengths = [int(item["input_ids"].shape[-1]) for item in encoded]
    needs = estimate_bytes(
        structure, quant, dtype, lengths, batch_size, checkpoint=checkpoint is not None, export=export
    )
    return check_free_space(output_dir, needs, resume=checkpoint is not None and checkpoint.resume)
