"""What the scenes tasks (:mod:`~lightning_tlq.tasks.scenes`, :mod:`~lightning_tlq.tasks.scenes_hard`) share.

Splits by content hash (10% ``test``, 10% ``validation``, the rest ``train``), the endless deterministic example
stream that keeps only its split's samples, the grid layout that places objects and text without overlap, and
the text drawing.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from lightning_tlq.tasks.font import GLYPH_HEIGHT, GLYPH_WIDTH, text_mask

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
CELL = 16  # each object sits in its own 16x16 cell of the image's grid
JITTER = 2

_SPLIT_BUCKETS: dict[str, range] = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}
_SPLIT_SALT = {"train": 0, "validation": 1, "test": 2}

Skill = Callable[[random.Random], tuple[Any, str, str]]
"""Draws one sample: ``(scene, question, answer)``; a scene has ``key()``, the content that decides its split."""


@dataclass(frozen=True)
class Thing:
    """One drawn object: shape, colour name, centre (x, y) in pixels and radius."""

    shape: str
    color: str
    x: int
    y: int
    r: int


@dataclass
class Example:
    """A rendered question: ``image`` is ``[size, size, 3]`` uint8."""

    kind: str
    question: str
    answer: str
    image: np.ndarray

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, mode="RGB")


def draw_text(image: np.ndarray, text: str, x: int, y: int, ink: tuple[int, int, int]) -> None:
    """Draw ``text`` in the bitmap font with its top-left corner at ``(x, y)``; it must fit in the image."""
    mask = text_mask(text)
    region = image[y : y + mask.shape[0], x : x + mask.shape[1]]
    if region.shape[:2] != mask.shape:
        raise ValueError(f"Text {text!r} at {(x, y)} does not fit in the image.")
    region[mask] = ink


def split_of(kind: str, scene: Any, question: str, answer: str) -> str:
    """The split a sample belongs to, decided by a hash of its whole content."""
    digest = hashlib.blake2b(repr((kind, scene.key(), question, answer)).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def stream(
    task: str, skills: Mapping[str, Skill], render: Callable[[Any], np.ndarray], split: str, seed: int,
    kinds: Sequence[str],
) -> Iterator[Example]:  # fmt: skip
    """The examples of ``task``'s ``split``, cycling through ``kinds``; candidates of other splits are dropped."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split of the {task} task; choose one of {', '.join(SPLITS)}.")
    unknown = [k for k in kinds if k not in skills]
    if unknown or not kinds:
        raise ValueError(f"Unknown {task} kinds {unknown or kinds}; choose from {', '.join(skills)}.")
    rng = random.Random(f"{task}/{_SPLIT_SALT[split]}/{seed}")
    i = 0
    while True:
        kind = kinds[i % len(kinds)]
        scene, question, answer = skills[kind](rng)
        if split_of(kind, scene, question, answer) == split:
            yield Example(kind, question, answer, render(scene))
            i += 1


def first(examples: Iterator[Example], n: int) -> list[Example]:
    """The first ``n`` of a stream (``n >= 0``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    return [next(examples) for _ in range(n)]


class Layout:
    """Free cells of a ``grid`` x ``grid`` grid; objects and text each take cells, so nothing overlaps.

    Subclasses set ``size`` (pixels), ``shapes`` and ``colors`` and implement :meth:`thing`.
    """

    size: int
    shapes: Sequence[str]
    colors: Mapping[str, Any]

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.grid = self.size // CELL
        self.free = [(row, col) for row in range(self.grid) for col in range(self.grid)]
        rng.shuffle(self.free)

    def take(self, cell: tuple[int, int] | None = None) -> tuple[int, int]:
        cell = cell if cell is not None else self.free[-1]
        self.free.remove(cell)
        return cell

    def thing(self, shape: str, color: str, cell: tuple[int, int] | None = None) -> Thing:
        raise NotImplementedError

    def place_text(self, text: str) -> tuple[int, int]:
        """The top-left corner of ``text`` inside one free grid row, taking the cells it overlaps."""
        width = len(text) * (GLYPH_WIDTH + 1) - 1
        rows = sorted({c[0] for c in self.free if all((c[0], k) in self.free for k in range(self.grid))})
        row = self.rng.choice(rows)
        x = self.rng.randint(1, self.size - width - 1)
        y = row * CELL + self.rng.randint(1, CELL - GLYPH_HEIGHT - 1)
        for col in range(x // CELL, (x + width - 1) // CELL + 1):
            self.take((row, col))
        return x, y

    def distractors(self, n: int, avoid: Sequence[tuple[str, str]] = ()) -> list[Thing]:
        out = []
        for _ in range(min(n, len(self.free))):
            while True:
                shape, color = self.rng.choice(self.shapes), self.rng.choice(list(self.colors))
                if (shape, color) not in avoid:
                    break
            out.append(self.thing(shape, color))
        return out

    def near_misses(self, shape: str, color: str, n: int) -> list[Thing]:
        """``n`` objects that share the colour or the shape with ``(shape, color)``, never both."""
        out = []
        for _ in range(n):
            if self.rng.random() < 0.5:
                out.append(self.thing(self.rng.choice([s for s in self.shapes if s != shape]), color))
            else:
                out.append(self.thing(shape, self.rng.choice([c for c in self.colors if c != color])))
        return out
