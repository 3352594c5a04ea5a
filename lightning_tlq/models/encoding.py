"""What the fast encoders of the scenes models share: word ids, right-padded training batches, CLIP normalisation.

:class:`WordEncoder` turns examples into token ids without the HF processor, given the fixed prompt parts around
the question (``prefix``, ``suffix``) that a subclass sets; :func:`normalize` is the CLIP processors' image
normalisation in torch, on whatever device the images are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_tlq.models.tiny import CLIP_MEAN, CLIP_STD


class WordEncoder:
    """Token ids and labels of examples from a word-level vocabulary; subclasses set the attributes below."""

    vocab: dict[str, int]
    pad: int
    eos: int
    prefix: list[int]
    suffix: list[int]

    def _words(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def ids(self, question: str, answer: str) -> tuple[list[int], int]:
        """``(input_ids, answer_start)`` of one example: prompt, answer words, eos."""
        prompt = self.prefix + self._words(question) + self.suffix
        return prompt + self._words(answer) + [self.eos], len(prompt)

    def batch(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (answer + eos) and uint8 ``images``."""
        rows = [self.ids(e.question, e.answer) for e in examples]
        length = max(len(r) for r, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, (row, start) in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, start : len(row)] = input_ids[i, start : len(row)]
        images = torch.from_numpy(np.stack([e.image for e in examples]))
        return {"input_ids": input_ids, "attention_mask": input_ids != self.pad, "labels": labels, "images": images}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> CLIP-normalised float32 ``[B, 3, H, W]`` (the LLaVA and Qwen2-VL processors')."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() * (1 / 255) - mean) / std
