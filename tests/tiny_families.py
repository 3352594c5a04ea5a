"""Tiny random VLMs of every supported family, built from configs, and hand-collated batches for them.

Text models are big enough for quantization groups of 32-128 (hidden 128, intermediate 256) and have 2 decoder
layers; Gemma3's two layers are one sliding-window and one full-attention layer. Vision towers are minimal.
Every batch holds two samples with one image each: text, the image tokens (with the family's markers), text.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from typing import Any

import torch
import transformers
from torch import nn

VOCAB, IMAGE_ID, PAD_ID = 128, 100, 0
HIDDEN = 128
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": PAD_ID,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
# Qwen: 2x2-merged 4x4 patch grid -> 4 image tokens; M-RoPE sections sum to head_dim / 2 = 16.
_QWEN_IDS = {
    "image_token_id": IMAGE_ID,
    "video_token_id": IMAGE_ID + 1,
    "vision_start_token_id": IMAGE_ID + 2,
    "vision_end_token_id": IMAGE_ID + 3,
}
_QWEN_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "out_hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_heads": 4,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
}
_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}

FAMILIES: tuple[str, ...] = (
    "qwen2_5_vl",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    "internvl",
    "gemma3",
    "qwen3_vl",
)
# Image tokens per image in the text sequence (must equal the number of image features).
IMAGE_TOKENS: dict[str, int] = {
    "qwen2_5_vl": 4,
    "llava_onevision": 10,  # 2x2 base + 2x2 anyres crop + 2 row newlines
    "idefics3": 4,
    "smolvlm": 4,
    "internvl": 4,
    "gemma3": 4,
    "qwen3_vl": 4,
    "llava": 16,  # the two base families too (make_batch only): 4x4 CLIP patches, CLS dropped
    "qwen2_vl": 4,
}


def config(family: str) -> transformers.PretrainedConfig:
    """Return the tiny config of ``family`` (one of :data:`FAMILIES`, or ``llava`` / ``qwen2_vl``)."""
    if family == "llava":
        return transformers.LlavaConfig(
            vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=32),
            text_config=dict(TEXT, model_type="llama"),
            image_token_index=IMAGE_ID,
            vision_feature_layer=-1,
        )
    if family == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 4, "mlp_ratio": 2}
        vision.update({k: _QWEN_VISION[k] for k in ("patch_size", "spatial_merge_size", "temporal_patch_size")})
        return transformers.Qwen2VLConfig(
            vision_config=dict(vision, in_channels=3), text_config=dict(TEXT, rope_parameters=_ROPE), **_QWEN_IDS
        )
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(
            vision_config=dict(_QWEN_VISION, window_size=16, fullatt_block_indexes=[1]),
            text_config=dict(TEXT, rope_parameters=_ROPE),
            **_QWEN_IDS,
        )
    if family == "qwen3_vl":
        return transformers.Qwen3VLConfig(
            vision_config=dict(_QWEN_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0]),
            text_config=dict(TEXT, head_dim=32, rope_parameters=dict(_ROPE, mrope_interleaved=True)),
            **_QWEN_IDS,
        )
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=dict(VISION, model_type="siglip_vision_model", image_size=16),
            text_config=dict(TEXT, model_type="qwen2"),
            image_token_index=IMAGE_ID,
            video_token_index=IMAGE_ID + 1,
            image_grid_pinpoints=[[16, 16]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family in ("idefics3", "smolvlm"):
        cls = transformers.Idefics3Config if family == "idefics3" else transformers.SmolVLMConfig
        text = dict(TEXT, model_type="llama")
        return cls(vision_config=VISION, text_config=text, image_token_id=IMAGE_ID, scale_factor=2)
    if family == "internvl":
        return transformers.InternVLConfig(
            vision_config=VISION,
            text_config=dict(TEXT, model_type="qwen2", tie_word_embeddings=True),
            image_token_id=IMAGE_ID,
            downsample_ratio=0.5,
            image_seq_length=4,
        )
    if family == "gemma3":
        text = {k: v for k, v in TEXT.items() if "token" not in k}
        return transformers.Gemma3Config(
            vision_config=dict(VISION, model_type="siglip_vision_model"),
            text_config=dict(
                text,
                head_dim=32,
                query_pre_attn_scalar=32,
                sliding_window=8,  # shorter than the sequences, so the sliding mask differs from the full one
                layer_types=["sliding_attention", "full_attention"],
            ),
            mm_tokens_per_image=4,
            image_token_index=IMAGE_ID,
            boi_token_index=IMAGE_ID + 1,
            eoi_token_index=IMAGE_ID + 2,
        )
    raise ValueError(f"Unknown tiny family {family!r}; choose one of {('llava', 'qwen2_vl', *FAMILIES)}.")


def build_model(family: str, seed: int = 0) -> nn.Module:
    """Build the tiny fp32 model of ``family`` (eval mode, deterministic given ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForImageTextToText.from_config(config(family)).eval()


def _image_span(family: str) -> list[int]:
    """The tokens standing for one image, with the family's start/end markers."""
    tokens = [IMAGE_ID] * IMAGE_TOKENS[family]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return [IMAGE_ID + 2, *tokens, IMAGE_ID + 3]
    if family == "gemma3":
        return [IMAGE_ID + 1, *tokens, IMAGE_ID + 2]
    return tokens


def _pixels(family: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Pixel inputs (and their family extras) for ``n`` images, one per sample."""
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # packed patches: 16 per image of 3 * 2 * 4 * 4 values
        return {
            "pixel_values": torch.randn(16 * n, 96, generator=generator),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * n),
        }
    if family == "llava_onevision":  # base image + one anyres crop
        return {
            "pixel_values": torch.randn(n, 2, 3, 16, 16, generator=generator),
            "image_sizes": torch.tensor([[16, 16]] * n),
        }
    if family in ("idefics3", "smolvlm"):  # one crop per sample
        return {
            "pixel_values": torch.randn(n, 1, 3, 32, 32, generator=generator),
            "pixel_attention_mask": torch.ones(n, 1, 32, 32, dtype=torch.bool),
        }
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=generator)}


def make_batch(
    family: str, *, padded: bool = False, side: str = "right", seed: int = 0, answer_tokens: int = 2
) -> dict[str, torch.Tensor]:
    """Two collated samples with one image each, as a processor + collate would produce them.

    Args:
        family: Model family.
        padded: Make the second sample 3 tokens shorter and pad it on ``side``.
        side: ``"right"`` or ``"left"``.
        seed: Seed of the token ids and pixels.
        answer_tokens: Trailing real tokens of each sample that are supervised (``labels != -100``).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` and the family's pixel inputs.
    """
    generator = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(3, IMAGE_ID, (n,), generator=generator).tolist()

    rows = [[*words(3), *_image_span(family), *words(tail)] for tail in (6, 3 if padded else 6)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((2, length), PAD_ID)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), -100)
    for i, row in enumerate(rows):
        start = 0 if side == "right" else length - len(row)
        end = start + len(row)
        input_ids[i, start:end] = torch.tensor(row)
        attention_mask[i, start:end] = 1
        labels[i, end - answer_tokens : end] = input_ids[i, end - answer_tokens : end]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, **_pixels(family, 2, generator)}
