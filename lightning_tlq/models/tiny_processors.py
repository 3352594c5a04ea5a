"""Offline HF processors of the tiny VLMs: a word-level tokenizer, the family's real image processor and a chat
template, plus loading a saved processor (with a torchvision-free Qwen2-VL fallback)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    BatchFeature,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLProcessor,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available

from lightning_tlq.data import SYNTHETIC_WORDS

Family = Literal["llava", "qwen2_vl"]
FAMILIES: tuple[str, ...] = get_args(Family)

IMAGE_SIZE = 32
IMAGE_TOKENS = 16  # both families: 32x32 image -> 16 tokens in the text sequence
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
FAMILY_TOKENS: dict[str, tuple[str, ...]] = {
    "llava": ("<image>",),
    "qwen2_vl": ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
}
TEMPLATE_WORDS: tuple[str, ...] = ("user", "assistant", ":")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Image placeholder text emitted by the chat template, per family.
_IMAGE_PLACEHOLDER = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}" + EOS + "{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the video processor, so it works where torchvision is missing.

    In transformers 5.x ``Qwen2VLProcessor`` requires a video processor, and every video processor requires
    torchvision, which cannot be installed beside the CPU torch wheel. Images and text behave exactly as in
    ``Qwen2VLProcessor`` (same image-token expansion, same ``mm_token_type_ids``); passing ``videos`` is an error.

    Args:
        image_processor: A ``Qwen2VLImageProcessor`` (or its PIL variant).
        tokenizer: Tokenizer that knows ``<|image_pad|>`` and ``<|video_pad|>``.
        chat_template: Optional jinja chat template.
    """

    def __init__(
        self,
        image_processor: transformers.BaseImageProcessor | None = None,
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None or image_processor is None:
            raise ValueError("Qwen2VLImageOnlyProcessor needs both an image_processor and a tokenizer.")
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        self.video_processor = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any) -> BatchFeature:
        """Process images and text like ``Qwen2VLProcessor``; videos are not supported."""
        if videos is not None:
            raise ValueError("Qwen2VLImageOnlyProcessor has no video processor; install torchvision for videos.")
        return super().__call__(images=images, text=text, **kwargs)


class _Qwen2VLImageOnlyKey(PretrainedConfig):
    """Private registry key so ``AutoProcessor`` can find :class:`Qwen2VLImageOnlyProcessor` by name."""

    model_type = "lightning_tlq_qwen2_vl_image_only"


PROCESSOR_MAPPING.register(_Qwen2VLImageOnlyKey, Qwen2VLImageOnlyProcessor, exist_ok=True)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny VLM family {family!r}; choose one of {list(FAMILIES)}.")


def build_tokenizer(family: Family = "llava", words: Sequence[str] = SYNTHETIC_WORDS) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer of a tiny VLM.

    Args:
        family: Model family; decides which image tokens are added.
        words: The data's vocabulary (default: the built-in synthetic set's); the chat template's words are added.

    Returns:
        A fast tokenizer whose ids are: special tokens, the family's image tokens, then the sorted words.
    """
    _check_family(family)
    specials = [*SPECIAL_TOKENS, *FAMILY_TOKENS[family]]
    words = sorted(set(TEMPLATE_WORDS) | set(words))
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    extra = {"image_token": FAMILY_TOKENS[family][0]} if family == "llava" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=512,
        padding_side="right",
        extra_special_tokens=extra,
    )


def _image_processor(family: Family, image_size: int = IMAGE_SIZE) -> transformers.BaseImageProcessor:
    """Return the family's real image processor, preferring the PIL backend (no torchvision needed)."""
    common = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True}
    if family == "llava":
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            **common,
        )
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    pixels = IMAGE_SIZE * IMAGE_SIZE  # min == max pixels: every image becomes 32x32 -> 8x8 patches -> 16 tokens
    return cls(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=4, merge_size=2, **common)


def build_processor(
    family: Family = "llava", words: Sequence[str] = SYNTHETIC_WORDS, image_size: int = IMAGE_SIZE
) -> ProcessorMixin:
    """Build the HF processor (tokenizer + image processor + chat template) of a tiny VLM.

    Args:
        family: Model family.
        words: The data's vocabulary (see :func:`build_tokenizer`).
        image_size: Square image side the image processor resizes to (LLaVA only; Qwen2-VL keeps 32).

    Returns:
        A ``LlavaProcessor`` or :class:`Qwen2VLImageOnlyProcessor` (a ``Qwen2VLProcessor``); either expands
        each image placeholder to 16 image tokens.
    """
    tokenizer = build_tokenizer(family, words)
    template = _CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", _IMAGE_PLACEHOLDER[family])
    if family == "llava":
        return LlavaProcessor(
            image_processor=_image_processor(family, image_size),
            tokenizer=tokenizer,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLS token, dropped again by the "default" strategy
            chat_template=template,
        )
    return Qwen2VLImageOnlyProcessor(
        image_processor=_image_processor(family), tokenizer=tokenizer, chat_template=template
    )


def _saved_processor_class(path: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            cls = json.loads(file.read_text(encoding="utf-8")).get("processor_class")
            if cls:
                return cls
    return None


def load_processor(path: str | os.PathLike[str], trust_remote_code: bool = False) -> ProcessorMixin:
    """Load a saved multimodal processor from a local directory (:func:`lightning_tlq.hub.model_dir` gives one for a
    hub id).

    Falls back to :class:`Qwen2VLImageOnlyProcessor` for Qwen2-VL checkpoints when torchvision is missing.

    Args:
        path: Directory written by ``processor.save_pretrained``.
        trust_remote_code: Run the directory's own processor code (``from_pretrained``'s flag).

    Returns:
        The processor.

    Raises:
        ValueError: If the directory holds no loadable multimodal processor.
    """
    path = Path(path)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ImportError, ValueError, TypeError, AttributeError) as err:
        if _saved_processor_class(path) == "Qwen2VLProcessor" and not is_torchvision_available():
            return Qwen2VLImageOnlyProcessor.from_pretrained(path, local_files_only=True)
        raise ValueError(f"Could not load a processor from {path}: {err}") from err
    if not isinstance(processor, ProcessorMixin):
        raise ValueError(
            f"{path} has no multimodal processor (AutoProcessor gave a {type(processor).__name__}). "
            "Save one next to the model with `processor.save_pretrained(dir)`."
        )
    return processor
