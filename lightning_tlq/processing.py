"""Low-level helpers shared by the sample encoders (question-answer samples in :mod:`lightning_tlq.data`, chat
samples in :mod:`lightning_tlq.chat`): running a multimodal processor on one text, and the length limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100
"""The label of positions that carry no loss (prompt, image and pad tokens)."""


def tokenizer_of(processor: Any) -> Any:
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{type(processor).__name__} has no tokenizer; pass a multimodal processor.")
    return tokenizer


def run_processor(processor: Any, images: Sequence[Image.Image], text: str) -> dict[str, torch.Tensor]:
    features = processor(images=list(images) or None, text=[text], return_tensors="pt")
    encoded = {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}
    if "image_grid_thw" in encoded and "mm_token_type_ids" not in encoded:
        # Qwen-VL models need mm_token_type_ids (1 = image, 2 = video); older processors do not return them.
        ids = encoded["input_ids"]
        types = torch.zeros_like(ids)
        types[ids == processor.image_token_id] = 1
        if getattr(processor, "video_token_id", None) is not None:
            types[ids == processor.video_token_id] = 2
        encoded["mm_token_type_ids"] = types
    return encoded


def length_limit(processor: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        return max_length
    limit = getattr(tokenizer_of(processor), "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None
