"""The sample types: an image-question-answer example, and the token masks of a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass
class Sample:
    """One image-question-answer example.

    Attributes:
        image: RGB image.
        question: Question about the image.
        answer: Short reference answer (the supervised target).
        kind: Optional question type, e.g. ``"color"`` or ``"count"``.
    """

    image: Image.Image
    question: str
    answer: str
    kind: str = ""


@dataclass
class TokenMasks:
    """Boolean ``[B, S]`` masks over the positions of a batch.

    Attributes:
        image: Image (placeholder) tokens.
        text: Every real token that is not an image token (includes the answer).
        answer: Supervised answer tokens (``labels != -100``).
        pad: Padding positions.
    """

    image: torch.Tensor
    text: torch.Tensor
    answer: torch.Tensor
    pad: torch.Tensor
