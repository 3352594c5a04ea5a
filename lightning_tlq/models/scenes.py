"""The embedded default model: a small LLaVA (CLIP + Llama, transformers classes) trained on the scenes task.

``scenes-llava`` names the checkpoint shipped in ``lightning_tlq/checkpoints/scenes-llava`` (bf16 safetensors,
trained by ``examples/train_scenes_vlm.py``; :mod:`lightning_tlq.models.embedded` resolves the name). This module
builds its config and processor from scratch (for training) and encodes scenes examples without the HF processor
(for fast training batches); a test checks that the fast path gives exactly what
:func:`lightning_tlq.data.encode_sample` gives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import LlavaConfig, PreTrainedTokenizerFast, ProcessorMixin

from lightning_tlq.models.encoding import WordEncoder, normalize
from lightning_tlq.models.tiny import build_processor
from lightning_tlq.tasks import scenes

PATCH_SIZE = 8
IMAGE_TOKENS = (scenes.IMAGE_SIZE // PATCH_SIZE) ** 2  # 64
TASK_KEY = "tlq_task"
"""``config.json`` key naming the task a model was trained on (``"scenes"``): its default calibration data."""


@dataclass
class ScenesModelShape:
    """Sizes of the scenes LLaVA; the defaults are the shipped model's."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 512
    vision_layers: int = 4
    vision_heads: int = 4


def build_scenes_processor() -> ProcessorMixin:
    """The LLaVA processor: word-level tokenizer over :data:`scenes.WORDS`, 64x64 CLIP images, 64 image tokens."""
    return build_processor("llava", words=scenes.WORDS, image_size=scenes.IMAGE_SIZE)


def build_scenes_config(tokenizer: PreTrainedTokenizerFast, shape: ScenesModelShape | None = None) -> LlavaConfig:
    """The model config for ``tokenizer`` (from :func:`build_scenes_processor`)."""
    s = shape or ScenesModelShape()
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_attention_heads,
        "max_position_embeddings": 128,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": s.vision_hidden_size,
        "intermediate_size": s.vision_intermediate_size,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "image_size": scenes.IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "projection_dim": s.vision_hidden_size,
    }
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    setattr(config, TASK_KEY, "scenes")
    config.tlq_model_shape = asdict(s)
    return config


class FastEncoder(WordEncoder):
    """Token ids, labels and pixel values of scenes examples without running the HF processor.

    Gives exactly what ``encode_sample(build_scenes_processor(), sample)`` gives (tested), for whole batches.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.vocab = tokenizer.get_vocab()
        ids = tokenizer.convert_tokens_to_ids
        self.pad, self.eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.prefix = [ids("user"), ids(":"), *[ids("<image>")] * IMAGE_TOKENS]
        self.suffix = [ids("assistant"), ids(":")]


def pixel_values(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, 64, 64, 3]`` uint8 -> the CLIP processor's normalised ``[B, 3, 64, 64]`` pixel values."""
    return normalize(images).to(dtype)


def model_task(config: Any) -> str | None:
    """The task a checkpoint was trained on (``"scenes"``), or None."""
    return getattr(config, TASK_KEY, None)
