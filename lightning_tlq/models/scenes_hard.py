"""Benchmark models of the hard scenes task: a LLaVA (CLIP + Llama) and a Qwen2-VL, both built from configs.

Realistic decoder shapes (hidden 512, MLP 1536, 8 layers, 8 heads of 64) and 144 image tokens per 96x96 image
(LLaVA: 8 px patches, 12x12; Qwen2-VL: 4 px patches merged 2x2, 24x24 -> 12x12), many more image than text
tokens as in real VLMs. Trained by ``examples/train_hard_vlm.py``; ``config.tlq_task`` (``"scenes_hard"`` or the
``"scenes_fine"`` variant, :data:`lightning_tlq.tasks.scenes_hard.VARIANTS`) makes calibration draw that task's
train-side split by default. :class:`HardEncoder` encodes examples in batches
without the HF processor (tested equal to :func:`lightning_tlq.data.encode_sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import transformers
from transformers import LlavaConfig, PretrainedConfig, ProcessorMixin, Qwen2VLConfig

from lightning_tlq.data import Sample, encode_sample
from lightning_tlq.models.encoding import WordEncoder, normalize
from lightning_tlq.models.scenes import TASK_KEY
from lightning_tlq.models.tiny import CLIP_MEAN, CLIP_STD, build_processor
from lightning_tlq.tasks import scenes_hard

FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl")
IMAGE_TOKENS = 144
_QWEN_PATCH, _QWEN_MERGE, _QWEN_TEMPORAL = 4, 2, 2


@dataclass
class HardModelShape:
    """Sizes of a benchmark model; the defaults are the benchmark's (head dim 64 is required)."""

    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    vision_hidden_size: int = 192
    vision_layers: int = 4
    vision_heads: int = 6

    def __post_init__(self) -> None:
        if self.hidden_size != 64 * self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be 64 x num_attention_heads (head dim 64).")


SMOKE_SHAPE = HardModelShape(128, 256, 2, 2, 32, 1, 2)
"""A tiny shape for CPU smoke tests (still head dim 64 and hidden 128, so g128 / g64 groups fit)."""


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown benchmark family {family!r}; choose one of {', '.join(FAMILIES)}.")


def build_hard_processor(family: str) -> ProcessorMixin:
    """The family's processor over :data:`scenes_hard.WORDS`: 96x96 images -> 144 image tokens."""
    _check_family(family)
    size = scenes_hard.IMAGE_SIZE
    processor = build_processor(family, words=scenes_hard.WORDS, image_size=size)
    if family == "qwen2_vl":  # min == max pixels: every image stays 96x96 -> 24x24 patches -> 12x12 tokens
        processor.image_processor = type(processor.image_processor)(
            size={"shortest_edge": size * size, "longest_edge": size * size}, patch_size=_QWEN_PATCH,
            merge_size=_QWEN_MERGE, temporal_patch_size=_QWEN_TEMPORAL, image_mean=CLIP_MEAN, image_std=CLIP_STD,
            do_convert_rgb=True,
        )  # fmt: skip
    return processor


def build_hard_config(
    family: str, processor: ProcessorMixin, shape: HardModelShape | None = None, task: str = "scenes_hard"
) -> PretrainedConfig:
    """The model config of ``family`` for ``processor`` (from :func:`build_hard_processor`), trained on ``task``."""
    _check_family(family)
    scenes_hard.variant_kinds(task)  # a known variant
    s, tok = shape or HardModelShape(), processor.tokenizer
    ids = tok.convert_tokens_to_ids
    text = {
        "vocab_size": len(tok), "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_attention_heads, "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }  # fmt: skip
    if family == "llava":
        vision = {
            "model_type": "clip_vision_model", "hidden_size": s.vision_hidden_size,
            "intermediate_size": 4 * s.vision_hidden_size, "num_hidden_layers": s.vision_layers,
            "num_attention_heads": s.vision_heads, "image_size": scenes_hard.IMAGE_SIZE, "patch_size": 8,
            "projection_dim": s.vision_hidden_size,
        }  # fmt: skip
        config = LlavaConfig(
            vision_config=vision, text_config={**text, "model_type": "llama"}, image_token_index=ids("<image>"),
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
        )  # fmt: skip
    else:
        vision = {
            "depth": s.vision_layers, "embed_dim": s.vision_hidden_size, "hidden_size": s.hidden_size,
            "num_heads": s.vision_heads, "mlp_ratio": 4, "patch_size": _QWEN_PATCH, "spatial_merge_size": _QWEN_MERGE,
            "temporal_patch_size": _QWEN_TEMPORAL, "in_channels": 3,
        }  # fmt: skip
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}  # sum = head_dim / 2
        config = Qwen2VLConfig(
            vision_config=vision, text_config={**text, "rope_parameters": rope}, image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False,
        )  # fmt: skip
    setattr(config, TASK_KEY, task)
    config.tlq_model_shape = asdict(s)
    return config


def build_hard_model(
    family: str, shape: HardModelShape | None = None, seed: int = 0, task: str = "scenes_hard"
) -> tuple[Any, ProcessorMixin]:
    """A randomly initialised fp32 benchmark model of ``task`` and its processor (generation ids set)."""
    processor = build_hard_processor(family)
    config = build_hard_config(family, processor, shape, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tok = processor.tokenizer
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model, processor


class HardEncoder(WordEncoder):
    """Token ids, labels and model inputs of hard-scenes examples in batches, without the HF processor.

    The prompt's fixed parts (before and after the question) are read once from a real processor encoding, so the
    ids equal ``encode_sample(processor, sample)``'s for either family (tested); images are normalised (and for
    Qwen2-VL cut into patches) with torch, on whatever device they are.
    """

    def __init__(self, processor: ProcessorMixin, family: str) -> None:
        _check_family(family)
        self.family, tok = family, processor.tokenizer
        self.vocab, self.pad, self.eos = tok.get_vocab(), tok.pad_token_id, tok.eos_token_id
        self.image_token = tok.convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
        question, image = "what does the text say ?", np.zeros((96, 96, 3), dtype=np.uint8)
        from PIL import Image

        probe = encode_sample(processor, Sample(Image.fromarray(image), question, "red"))
        ids, labels = probe["input_ids"][0].tolist(), probe["labels"][0].tolist()
        q = self._words(question)
        at = next(i for i in range(len(ids)) if ids[i : i + len(q)] == q)
        answer_at = next(i for i, v in enumerate(labels) if v != -100)
        self.prefix, self.suffix = ids[:at], ids[at + len(q) : answer_at]
        self.token_types = "mm_token_type_ids" in probe  # Qwen2-VL's processor gives them in transformers 5.x
        if self.prefix.count(self.image_token) != IMAGE_TOKENS:
            raise ValueError(f"The processor gives {self.prefix.count(self.image_token)} image tokens, not 144.")

    def model_inputs(self, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The model's keyword arguments for a :meth:`batch` (moved to a device or not): what the processor gives."""
        ids = batch["input_ids"]
        out = {"input_ids": ids, "attention_mask": batch["attention_mask"].long()}
        pixels = normalize(batch["images"])
        if self.family == "llava":
            return {**out, "pixel_values": pixels.to(dtype)}
        if self.token_types:
            out["mm_token_type_ids"] = (ids == self.image_token).long()
        out["pixel_values"] = qwen_patches(pixels).to(dtype)
        grid = [1, scenes_hard.IMAGE_SIZE // _QWEN_PATCH, scenes_hard.IMAGE_SIZE // _QWEN_PATCH]
        out["image_grid_thw"] = torch.tensor([grid] * ids.shape[0], device=ids.device)
        return out

    def items(self, examples: Sequence[scenes_hard.Example]) -> list[dict[str, torch.Tensor]]:
        """One dict per example, equal to ``encode_sample(processor, sample)`` (for the evaluation harness)."""
        batch = self.batch(examples)
        inputs = {**self.model_inputs(batch), "labels": batch["labels"]}
        per_image = inputs["pixel_values"].shape[0] // len(examples)
        out = []
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            item = {k: v[i : i + 1, :n] for k, v in inputs.items() if v.dim() == 2 and k != "pixel_values"}
            item["pixel_values"] = inputs["pixel_values"][i * per_image : (i + 1) * per_image]
            if "image_grid_thw" in inputs:
                item["image_grid_thw"] = inputs["image_grid_thw"][i : i + 1]
            out.append(item)
        return out


def qwen_patches(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> Qwen2-VL's packed ``[B * H/4 * W/4, 3 * 2 * 4 * 4]`` patches (a still image, 2 frames)."""
    b, c, h, w = pixels.shape
    p, m, t = _QWEN_PATCH, _QWEN_MERGE, _QWEN_TEMPORAL
    x = pixels[:, None].expand(b, t, c, h, w)
    x = x.reshape(b, t, c, h // p // m, m, p, w // p // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(b * (h // p) * (w // p), c * t * p * p)
