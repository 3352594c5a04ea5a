"""Loading models for evaluation: a module by name with its saved scheme, and the checks that a reference model
fits the evaluated one."""

from __future__ import annotations

from typing import Any

import torch

from lightning_tlq.module import TLQModule


def load_module(
    name_or_path: str,
    dtype: str = "float32",
    device: torch.device | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> TLQModule:
    """Build a model for evaluation: weights checked for NaN/Inf, a saved W4A8 activation scheme applied.

    Args:
        name_or_path: A local Hugging Face directory (e.g. ``calibrate``'s output), a built-in model or a hub id.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: Where to put it (default: stays on the CPU).
        revision: Branch, tag or commit of a hub id.
        trust_remote_code: Run the model repository's own code.
    """
    from lightning_tlq.preflight import check_finite_weights

    module = TLQModule(name_or_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    module.configure_model()
    check_finite_weights(module.model)
    if _has_saved_scheme(module.model):
        from lightning_tlq.actquant import apply_saved_activation_quant

        apply_saved_activation_quant(module.model)  # forward pre-hooks, kept for the module's lifetime
    if device is not None:
        module.model.to(device)
    return module


def _has_saved_scheme(model: Any) -> bool:
    from lightning_tlq.actquant import CONFIG_KEY

    return getattr(model.config, CONFIG_KEY, None) is not None


def activation_bits(model: Any) -> int | None:
    """Activation bits recorded in a lightning-tlq checkpoint's config (None: weight-only or not ours)."""
    if not _has_saved_scheme(model):
        return None
    from lightning_tlq.actquant import saved_quantization_config

    activations = saved_quantization_config(model).get("input_activations")
    return int(activations["num_bits"]) if activations else None


def _device(module: TLQModule) -> torch.device:
    return next(module.model.parameters()).device


def _pad_id(module: TLQModule) -> int:
    """The model's pad id, else the tokenizer's, else its eos (padding is masked out either way)."""
    tokenizer = module.processor.tokenizer
    for value in (module.adapter.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError("The model and its tokenizer define neither a pad nor an eos token id; set `pad_token_id`.")


def output_vocab_size(model: Any) -> int:
    """Logits per position: the output embedding's rows (works on the ``meta`` device)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def check_reference(
    model: Any, processor: Any, reference: Any, reference_processor: Any, *, names: tuple[str, str] = ("", "")
) -> None:
    """Raise unless the reference scores the same token sequences over the same vocabulary as the model.

    Works on full models and on their ``meta``-device structure (no weights needed).

    Raises:
        ValueError: If the logit counts or the tokenizers' vocabularies differ.
    """
    what = f"reference_model {names[1]!r}" if names[1] else "the reference"
    mine = f"model {names[0]!r}" if names[0] else "the model"
    ours, theirs = output_vocab_size(model), output_vocab_size(reference)
    if ours != theirs:
        raise ValueError(
            f"{what} has {theirs} logits per position, {mine} {ours}: the KL needs one vocabulary. Use the "
            "full-precision version of the evaluated model as the reference."
        )
    vocab, ref_vocab = processor.tokenizer.get_vocab(), reference_processor.tokenizer.get_vocab()
    if vocab != ref_vocab:
        differ = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=str)[:3]
        raise ValueError(
            f"{what} has a different tokenizer than {mine} ({len(ref_vocab)} vs {len(vocab)} tokens; e.g. "
            f"{differ} differ): both models must read the same token ids."
        )
