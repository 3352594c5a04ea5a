"""Calibration data for vision-language models: samples, encoding, batching and token masks.

A :class:`~lightning_tlq.samples.Sample` is an image with a question and a short answer (the built-in synthetic
set: :mod:`lightning_tlq.tasks.shapes`). :func:`encode_sample` turns it into the
processor's tensors plus ``labels`` that supervise only the answer, :func:`collate` pads samples into a
batch, and :func:`token_masks` splits a batch's positions into image, text, answer and padding tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image, UnidentifiedImageError

from lightning_tlq.processing import IGNORE_INDEX, length_limit, run_processor, tokenizer_of
from lightning_tlq.samples import Sample, TokenMasks
from lightning_tlq.tasks.shapes import SYNTHETIC_WORDS as SYNTHETIC_WORDS  # re-exported
from lightning_tlq.tasks.shapes import synthetic_samples as synthetic_samples  # re-exported

if TYPE_CHECKING:
    from lightning_tlq.chat import ChatSample

# Sequence keys padded by `collate`; the value is a placeholder replaced by the pad token id.
_PAD_VALUES: dict[str, int | None] = {
    "input_ids": None,
    "attention_mask": 0,
    "labels": IGNORE_INDEX,
    "mm_token_type_ids": 0,
    "token_type_ids": 0,
}


# --------------------------------------------------------------------------------------------- JSONL loading


def _load_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file {path} does not exist.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{where}: cannot read image {path} ({err}); is the file a valid image?") from err


def shorten(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters for error messages (a 100 kB question stays one line)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"


def _parse_record(line: str, where: str, image_root: Path) -> Sample | ChatSample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        what = err.msg.removesuffix(" at").removesuffix(" starting")  # "Unterminated string starting at"
        raise ValueError(f"{where}: invalid JSON at column {err.colno}: {what}.") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record or "conversations" in record:
        return _parse_chat_record(record, where, image_root)
    for key in ("image", "question", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}; each line needs 'image', 'question' and 'answer'.")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {shorten(record[key])}.")
    image_path = Path(record["image"]).expanduser()
    if not image_path.is_absolute():
        image_path = image_root / image_path
    image = _load_image(image_path, where)
    return Sample(image, record["question"], record["answer"], str(record.get("kind", "")))


def _parse_chat_record(record: dict, where: str, image_root: Path) -> ChatSample:
    """A ``{"messages"}`` / ``{"conversations"}`` record (images: ``"images"`` list or ``"image"``, paths)."""
    from lightning_tlq.chat import parse_chat

    def load(source: Any) -> Image.Image:
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{where}: an image must be a path string, got {source!r}.")
        path = Path(source).expanduser()
        return _load_image(path if path.is_absolute() else image_root / path, where)

    sources = record.get("images", record.get("image"))
    sources = [] if sources is None else sources if isinstance(sources, list) else [sources]
    turns = record["messages"] if "messages" in record else record["conversations"]
    return parse_chat(turns, [load(s) for s in sources], where, load, str(record.get("kind", "")))


def load_jsonl(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> list[Sample | ChatSample]:
    """Load samples from a JSONL file of ``{"image", "question", "answer", "kind"?}`` objects or chat records
    (``{"messages"}`` / ``{"conversations"}``, see :mod:`lightning_tlq.chat`; they load as ``ChatSample``).

    Args:
        path: The JSONL file; blank lines are skipped.
        image_root: Folder that relative image paths are resolved against (default: the JSONL's folder).

    Returns:
        The samples, with images loaded as RGB.

    Raises:
        FileNotFoundError: If the JSONL file or an image is missing.
        ValueError: On bad JSON, a missing or empty key, an unreadable image, or an empty dataset; the message
            names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {path} does not exist.")
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    with path.open(encoding="utf-8") as file:
        for lineno, line in enumerate(file, start=1):
            if line.strip():
                samples.append(_parse_record(line, f"{path}:{lineno}", root))
    if not samples:
        raise ValueError(f"Dataset file {path} contains no samples.")
    return samples


# --------------------------------------------------------------------------------------------- encoding


def build_prompt(processor: Any, question: str) -> str:
    """Render the generation prompt for one image and a question.

    Uses the processor's chat template, or ``"USER: <image> question ASSISTANT:"`` when it has none.

    Args:
        processor: A multimodal HF processor.
        question: The question text.

    Returns:
        The prompt text, ending where the answer starts.
    """
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise ValueError(f"{type(processor).__name__} has neither a chat template nor an `image_token`.")
    return f"USER: {image_token} {question} ASSISTANT:"


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    mismatch = (a[:n] != b[:n]).nonzero()
    return int(mismatch[0]) if mismatch.numel() else n


def encode_sample(
    processor: Any, sample: Sample | ChatSample, max_length: int | None = None, *, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Encode a sample as prompt + answer + eos, supervising only the answer (a chat sample: rendered by the chat
    template, every assistant turn supervised, see :func:`lightning_tlq.chat.encode_chat`).

    Args:
        processor: A multimodal HF processor (expands image placeholders to the model's image tokens).
        sample: The sample.
        max_length: Maximum sequence length; defaults to the tokenizer's ``model_max_length``.
        name: How to call the sample in error messages (default: its question).

    Returns:
        The processor's tensors with batch dim 1 (``input_ids``, ``attention_mask``, ``pixel_values`` and family
        extras such as ``image_grid_thw`` / ``mm_token_type_ids``) plus ``labels``: ``input_ids`` with
        ``-100`` everywhere except the answer and eos tokens.

    Raises:
        ValueError: If the answer yields no tokens, or the sequence is longer than the limit (never truncated).
    """
    if not isinstance(sample, Sample):  # a chat-format sample (lightning_tlq.chat.ChatSample)
        from lightning_tlq.chat import encode_chat

        return encode_chat(processor, sample, max_length, name=name)
    label = name or f"sample {shorten(sample.question)}"
    if not sample.answer.strip():
        raise ValueError(f"{label}: the answer is empty; every sample needs a non-empty answer to supervise.")
    tokenizer = tokenizer_of(processor)
    prompt = build_prompt(processor, sample.question)
    full = run_processor(processor, [sample.image], prompt + sample.answer + (tokenizer.eos_token or ""))
    prompt_ids = run_processor(processor, [sample.image], prompt)["input_ids"][0]
    ids = full["input_ids"][0]
    start = _common_prefix(prompt_ids, ids)
    if start >= ids.numel():
        raise ValueError(f"{label}: answer {shorten(sample.answer)} produced no tokens after the prompt.")
    limit = length_limit(processor, max_length)
    if limit is not None and ids.numel() > limit:
        raise ValueError(
            f"{label}: {ids.numel()} tokens exceed the limit of {limit} by {ids.numel() - limit}; "
            "shorten the question/answer or raise max_length (samples are never truncated)."
        )
    labels = full["input_ids"].clone()
    labels[:, :start] = IGNORE_INDEX
    return {**full, "labels": labels}


# --------------------------------------------------------------------------------------------- batching


def _pad(tensors: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
    length = max(t.shape[-1] for t in tensors)
    widths = [(0, length - t.shape[-1]) if side == "right" else (length - t.shape[-1], 0) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, w, value=value) for t, w in zip(tensors, widths)], dim=0)


def prompt_inputs(encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The generation inputs of one encoded sample: everything before its first answer token, no labels."""
    answer = (encoded["labels"][0] != IGNORE_INDEX).nonzero()
    start = int(answer[0]) if answer.numel() else encoded["input_ids"].shape[1]
    return {k: (v[:, :start] if k in _PAD_VALUES else v) for k, v in encoded.items() if k != "labels"}


def collate(
    encoded: Sequence[dict[str, torch.Tensor]], pad_token_id: int, padding_side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad sequence tensors (on the right by default) and concatenate everything else along dim 0.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` / ``mm_token_type_ids`` with 0 and
    ``labels`` with -100. Other tensors (LLaVA ``pixel_values [1, 3, H, W]``, Qwen2-VL packed
    ``pixel_values [patches, C]`` and ``image_grid_thw [1, 3]``) are concatenated; per-sample crop stacks of
    different sizes (``[1, n_i, 3, H, W]``: LLaVA-OneVision, Idefics3, SmolVLM) are zero-padded to the largest.

    Args:
        encoded: Outputs of :func:`encode_sample` (or :func:`prompt_inputs`), all with the same keys.
        pad_token_id: Token id used to pad ``input_ids``.
        padding_side: ``"right"`` for loss computation, ``"left"`` for batched generation (every prompt then ends
            at the last position, where generation continues).

    Returns:
        The batch.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} is not supported; choose 'right' or 'left'.")
    if not encoded:
        raise ValueError("collate() got no samples.")
    keys = set(encoded[0])
    if any(set(item) != keys for item in encoded):
        return _collate_mixed(encoded, pad_token_id, padding_side)
    batch = {}
    for key in encoded[0]:
        tensors = [item[key] for item in encoded]
        if key in _PAD_VALUES:
            value = _PAD_VALUES[key]
            batch[key] = _pad(tensors, pad_token_id if value is None else value, padding_side)
        else:
            batch[key] = _concat(key, tensors)
    return batch


def _collate_mixed(
    encoded: Sequence[dict[str, torch.Tensor]], pad_token_id: int, padding_side: Literal["right", "left"]
) -> dict[str, torch.Tensor]:
    """A batch of samples with and without images (text-only chat samples): the image tensors of the samples that
    have them are concatenated (the models place image features at the image tokens in order), and a sequence key
    that only some samples have (``mm_token_type_ids``) is its pad value (no image) for the others."""
    keys = list(dict.fromkeys(key for item in encoded for key in item))  # in order of appearance
    for i, item in enumerate(encoded):
        missing = {"input_ids", "attention_mask"} - set(item)
        if missing or ("labels" in keys) != ("labels" in item):
            raise ValueError(f"Sample {i} has keys {sorted(item)}, but another sample has {sorted(keys)}.")
    batch = {}
    for key in keys:
        present = [item[key] for item in encoded if key in item]
        if key in _PAD_VALUES:
            value = _PAD_VALUES[key]
            fill = pad_token_id if value is None else value
            tensors = [item.get(key, torch.full_like(item["input_ids"], fill)) for item in encoded]
            batch[key] = _pad(tensors, fill, padding_side)
        else:
            batch[key] = _concat(key, present)
    return batch


def _concat(key: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample tensors along dim 0; per-sample crop stacks ``[1, n_i, ...]`` of different ``n_i``
    (LLaVA-OneVision anyres patches, Idefics3 / SmolVLM image splits) are zero-padded to the largest ``n_i``, as
    their processors do for a batch: the models drop the padding (OneVision by ``image_sizes``, Idefics3 by
    all-zero pixels; a padded ``pixel_attention_mask`` is False)."""
    if len({tuple(t.shape[1:]) for t in tensors}) == 1:
        return torch.cat(tensors, dim=0)
    crops = all(t.dim() >= 3 and t.shape[0] == 1 for t in tensors) and len({t.shape[2:] for t in tensors}) == 1
    if not crops:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(
            f"Cannot batch {key!r}: the samples' shapes {shapes} differ beyond the first dimension (and are not "
            "per-sample crop stacks [1, n, ...]). Resize the images to one size or use data.batch_size 1."
        )
    out = tensors[0].new_zeros((len(tensors), max(t.shape[1] for t in tensors), *tensors[0].shape[2:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[1]] = t[0]
    return out


def make_batches(
    encoded: Sequence[dict[str, torch.Tensor]], batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """Split encoded samples, in order, into collated batches (the last one may be smaller).

    Args:
        encoded: Outputs of :func:`encode_sample`.
        batch_size: Samples per batch.
        pad_token_id: Token id used to pad ``input_ids``.

    Returns:
        The batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return [collate(encoded[i : i + batch_size], pad_token_id) for i in range(0, len(encoded), batch_size)]


def token_masks(batch: dict[str, torch.Tensor], image_token_id: int) -> TokenMasks:
    """Classify every position of a batch as image, text, answer or padding.

    Args:
        batch: A batch from :func:`collate` (``input_ids``, ``attention_mask``; ``labels`` optional).
        image_token_id: The model's image token id (``model.config.image_token_id``).

    Returns:
        The masks; ``answer`` is all-False when the batch has no ``labels``.
    """
    input_ids = batch["input_ids"]
    attention = batch.get("attention_mask")
    pad = attention == 0 if attention is not None else torch.zeros_like(input_ids, dtype=torch.bool)
    image = (input_ids == image_token_id) & ~pad
    labels = batch.get("labels")
    answer = labels != IGNORE_INDEX if labels is not None else torch.zeros_like(pad)
    return TokenMasks(image=image, text=~pad & ~image, answer=answer, pad=pad)
