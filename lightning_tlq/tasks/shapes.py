"""The synthetic shapes set: 32x32 images of coloured squares, circles and triangles with five question kinds
(colour, shape, count, position, exists); the built-in calibration data of the random tiny models."""

from __future__ import annotations

import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from lightning_tlq.samples import Sample

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
PLURALS: dict[str, str] = {"square": "squares", "circle": "circles", "triangle": "triangles"}
COUNTS: tuple[str, ...] = ("one", "two", "three", "four")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
YES_NO: tuple[str, ...] = ("yes", "no")
QUESTION_WORDS: tuple[str, ...] = (
    "what", "color", "is", "the", "shape", "in", "image", "how", "many", "are", "there", "where", "a", "?",
)  # fmt: skip
KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "exists")

SYNTHETIC_WORDS: tuple[str, ...] = tuple(
    sorted({*COLORS, *SHAPES, *PLURALS.values(), *COUNTS, *POSITIONS, *YES_NO, *QUESTION_WORDS})
)
"""Every word (split on whitespace and punctuation, lower-case) used by :func:`synthetic_samples`."""

SYNTHETIC_IMAGE_SIZE = 32
_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_BACKGROUND = (120, 120, 120)
_QUADRANT_CENTERS = ((8, 8), (24, 8), (8, 24), (24, 24))
_POSITION_CENTERS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24)}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, center: tuple[int, int], radius: int) -> None:
    x, y = center
    box = (x - radius, y - radius, x + radius, y + radius)
    fill = _RGB[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill)


def _canvas(shapes: Sequence[tuple[str, str, tuple[int, int], int]]) -> Image.Image:
    image = Image.new("RGB", (SYNTHETIC_IMAGE_SIZE, SYNTHETIC_IMAGE_SIZE), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, color, center, radius in shapes:
        _draw_shape(draw, shape, color, center, radius)
    return image


def _jitter(rng: random.Random, center: tuple[int, int], amount: int = 1) -> tuple[int, int]:
    return center[0] + rng.randint(-amount, amount), center[1] + rng.randint(-amount, amount)


def _color_or_shape_sample(rng: random.Random, kind: str) -> Sample:
    shape, color, radius = rng.choice(SHAPES), rng.choice(COLORS), rng.randint(5, 8)
    center = (rng.randint(radius, 31 - radius), rng.randint(radius, 31 - radius))
    image = _canvas([(shape, color, center, radius)])
    if kind == "color":
        return Sample(image, f"what color is the {shape} ?", color, kind)
    return Sample(image, "what shape is in the image ?", shape, kind)


def _count_sample(rng: random.Random) -> Sample:
    shape, color, count = rng.choice(SHAPES), rng.choice(COLORS), rng.randint(1, len(COUNTS))
    quadrants = sorted(rng.sample(range(4), count))
    image = _canvas([(shape, color, _jitter(rng, _QUADRANT_CENTERS[q]), 5) for q in quadrants])
    return Sample(image, f"how many {PLURALS[shape]} are there ?", COUNTS[count - 1], "count")


def _position_sample(rng: random.Random) -> Sample:
    shape, color, position = rng.choice(SHAPES), rng.choice(COLORS), rng.choice(POSITIONS)
    image = _canvas([(shape, color, _jitter(rng, _POSITION_CENTERS[position]), 5)])
    return Sample(image, f"where is the {color} {shape} ?", position, "position")


def _exists_sample(rng: random.Random) -> Sample:
    shape, color, radius = rng.choice(SHAPES), rng.choice(COLORS), rng.randint(5, 8)
    image = _canvas([(shape, color, (16, 16), radius)])
    if rng.random() < 0.5:
        return Sample(image, f"is there a {color} {shape} ?", "yes", "exists")
    if rng.random() < 0.5:
        asked_color, asked_shape = rng.choice([c for c in COLORS if c != color]), shape
    else:
        asked_color, asked_shape = color, rng.choice([s for s in SHAPES if s != shape])
    return Sample(image, f"is there a {asked_color} {asked_shape} ?", "no", "exists")


def synthetic_samples(n: int, seed: int = 0) -> list[Sample]:
    """Generate procedural 32x32 images of coloured shapes with questions and one-word answers.

    Kinds cycle through ``color, shape, count, position, exists``; every word comes from
    :data:`SYNTHETIC_WORDS`. The result is deterministic given ``seed``, and ``synthetic_samples(k, s)`` is a
    prefix of ``synthetic_samples(n, s)`` for ``k <= n``.

    Args:
        n: Number of samples.
        seed: Random seed.

    Returns:
        ``n`` samples.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind in ("color", "shape"):
            samples.append(_color_or_shape_sample(rng, kind))
        elif kind == "count":
            samples.append(_count_sample(rng))
        elif kind == "position":
            samples.append(_position_sample(rng))
        else:
            samples.append(_exists_sample(rng))
    return samples
