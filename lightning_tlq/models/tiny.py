"""Tiny random-init vision-language models with real, offline HF processors.

The models are built from configs (no downloads) and paired with a word-level tokenizer whose vocabulary covers
the synthetic data of :mod:`lightning_tlq.data` and the chat template, so the full pipeline (processor ->
model -> loss / generate) runs on a laptop CPU in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    LlavaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
)

from lightning_tlq.models.embedded import SCENES_MODEL, TINY_MODELS
from lightning_tlq.models.tiny_processors import (
    CLIP_MEAN,
    CLIP_STD,
    FAMILIES,
    IMAGE_SIZE,
    IMAGE_TOKENS,
    Family,
    Qwen2VLImageOnlyProcessor,
    _check_family,
    build_processor,
    build_tokenizer,
    load_processor,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MODEL",
    "DTYPES",
    "FAMILIES",
    "IMAGE_SIZE",
    "IMAGE_TOKENS",
    "TINY_MODELS",
    "Family",
    "Qwen2VLImageOnlyProcessor",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "build_tiny_vlm",
    "load_processor",
    "resolve_model",
    "save_tiny_vlm",
]

DEFAULT_MODEL = SCENES_MODEL  # the embedded trained model (lightning_tlq.models.scenes)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _text_config(tokenizer: PreTrainedTokenizerFast, num_layers: int) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }


def build_config(family: Family, tokenizer: PreTrainedTokenizerFast, num_layers: int = 2) -> PretrainedConfig:
    """Build the model config of a tiny VLM matching ``tokenizer``.

    Args:
        family: Model family.
        tokenizer: Tokenizer from :func:`build_tokenizer` for the same family.
        num_layers: Number of text decoder layers (the vision tower always has 2).

    Returns:
        A ``LlavaConfig`` or ``Qwen2VLConfig``.
    """
    _check_family(family)
    text = _text_config(tokenizer, num_layers)
    ids = tokenizer.convert_tokens_to_ids
    if family == "llava":
        vision = {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "projection_dim": 32,
        }
        return LlavaConfig(
            vision_config=vision,
            text_config={**text, "model_type": "llama"},
            image_token_index=ids("<image>"),
            vision_feature_layer=-1,  # -2 (the default) would leave the last CLIP layer unused
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text["hidden_size"],  # merger output feeds the text model
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    # M-RoPE splits head_dim / 2 = 16 rotary frequencies into (temporal, height, width) sections.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    return Qwen2VLConfig(
        vision_config=vision,
        text_config={**text, "rope_parameters": rope},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny_vlm(
    family: Family = "llava", seed: int = 0, num_layers: int = 2
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a random-init tiny VLM (fp32, eval mode) and its offline processor.

    Args:
        family: ``"llava"`` (CLIP + Llama) or ``"qwen2_vl"``.
        seed: Seed for the weight initialisation; the global RNG state is left untouched.
        num_layers: Number of text decoder layers.

    Returns:
        ``(model, processor)``; a 32x32 image becomes 16 image tokens for both families.
    """
    _check_family(family)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
    processor = build_processor(family)
    config = build_config(family, processor.tokenizer, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor


def save_tiny_vlm(path: str | os.PathLike[str], family: Family = "llava", seed: int = 0, num_layers: int = 2) -> Path:
    """Build a tiny VLM and save model (safetensors) and processor to ``path``.

    Args:
        path: Output directory (created if missing).
        family: Model family.
        seed: Initialisation seed.
        num_layers: Number of text decoder layers.

    Returns:
        The output directory, loadable with :func:`resolve_model` or ``AutoModelForImageTextToText``.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_vlm(family, seed=seed, num_layers=num_layers)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of {list(DTYPES)}.")
    return DTYPES[dtype]


def resolve_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a model and processor by built-in name, local directory or Hugging Face hub id (through the hub cache,
    as ``from_pretrained``; see :mod:`lightning_tlq.hub`).

    Args:
        name_or_path: ``"scenes-llava"`` (the embedded trained model), ``"tiny-llava"``, ``"tiny-qwen2_vl"``, a
            local directory holding a saved image-text-to-text model and its processor, or a hub id.
        dtype: Optional ``"float32"``, ``"bfloat16"`` or ``"float16"``; default keeps fp32 for tiny
            models and the checkpoint's dtype otherwise.
        revision: Branch, tag or commit of a hub id (default ``main``).
        trust_remote_code: Run the model repository's own code (``from_pretrained``'s flag).

    Returns:
        ``(model, processor)`` with the model in eval mode.

    Raises:
        ModelNotFoundError: (a ``FileNotFoundError``) if the name is no built-in model, no directory and no hub id
            that is cached or downloadable.
        ValueError: If the directory is not an HF model directory, or the dtype is unknown.
    """
    from lightning_tlq.hub import model_dir

    torch_dtype = _resolve_dtype(dtype)
    name = str(name_or_path)
    if name in TINY_MODELS and revision is None:
        model, processor = build_tiny_vlm(TINY_MODELS[name])
        return (model.to(torch_dtype) if torch_dtype else model), processor
    path = model_dir(name, revision)
    kwargs = {"dtype": torch_dtype} if torch_dtype else {"dtype": "auto"}
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
    )
    return model.eval(), load_processor(path, trust_remote_code=trust_remote_code)
