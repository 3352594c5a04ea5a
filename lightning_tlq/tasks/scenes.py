"""The scenes task: procedural 64x64 images with questions that need the image *and* the language model.

Six skills (``KINDS``), each with balanced answers that the question alone does not give away:

- ``read``: a 3- or 4-character string drawn in a 5x7 bitmap font -> the characters, e.g. ``"k 3 7 a"``;
- ``sum``: two digits drawn side by side -> their sum, digit by digit (``"1 1"``): read, then add;
- ``count``: 1-6 objects of one colour and shape among distractors that share the colour or the shape;
- ``compare``: are there more objects of one colour than of another (yes / no);
- ``position``: the quadrant (``top left`` ... ``bottom right``) of the only object of a colour and shape;
- ``color``: the colour of the only object of a given shape.

Scenes are drawn with numpy only (no fonts, no anti-aliasing), so an image is the same on every machine. Splits
are disjoint by construction: every sample's content (scene, question, answer) is hashed, and the hash decides its
split (10% ``test``, 10% ``validation``, the rest ``train``, which calibration draws from). A generator for one
split rejects candidates that hash into another, so no test sample can ever appear in a calibration set.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
from PIL import Image

from lightning_tlq.tasks.font import CHARACTERS, DIGITS, GLYPH_HEIGHT, text_mask

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = get_args(Split)
KINDS: tuple[str, ...] = ("read", "sum", "count", "compare", "position", "color")

IMAGE_SIZE = 64
_CELL = 16  # the image is a 4x4 grid of cells; each object sits in its own cell
_GRID = IMAGE_SIZE // _CELL
_JITTER = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
PLURAL: dict[str, str] = {s: s + "s" for s in SHAPES}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
BACKGROUND = (110, 110, 110)
INK = (20, 20, 20)

_QUESTION_WORDS = ("what", "does", "the", "text", "say", "?", "is", "sum", "of", "digits", "how", "many", "are",
                   "there", "more", "shapes", "than", "color", "where", "top", "bottom", "left", "right")  # fmt: skip
WORDS: tuple[str, ...] = tuple(
    sorted({*_QUESTION_WORDS, *COLORS, *SHAPES, *PLURAL.values(), *NUMBERS, "yes", "no", *CHARACTERS})
)
"""Every word (whitespace-separated, lower case) that a question or an answer of this task uses."""

_SPLIT_BUCKETS: dict[str, range] = {"test": range(0, 10), "validation": range(10, 20), "train": range(20, 100)}
_SPLIT_SALT = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class Thing:
    """One drawn object: shape, colour name, centre (x, y) in pixels and radius."""

    shape: str
    color: str
    x: int
    y: int
    r: int


@dataclass
class Scene:
    """What an image shows: objects, and optionally a string of characters with its top-left corner."""

    things: list[Thing] = field(default_factory=list)
    text: str = ""
    text_xy: tuple[int, int] = (0, 0)

    def key(self) -> tuple:
        return (tuple((t.shape, t.color, t.x, t.y, t.r) for t in self.things), self.text, self.text_xy)


@dataclass
class Example:
    """A rendered question: ``image`` is ``[64, 64, 3]`` uint8."""

    kind: str
    question: str
    answer: str
    image: np.ndarray

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image, mode="RGB")


# --------------------------------------------------------------------------------------------------- drawing

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]


def _thing_mask(t: Thing) -> np.ndarray:
    dx, dy = _XX - t.x, _YY - t.y
    if t.shape == "square":
        return (np.abs(dx) <= t.r) & (np.abs(dy) <= t.r)
    if t.shape == "circle":
        return dx * dx + dy * dy <= t.r * t.r + t.r
    # triangle, apex up: half-width grows linearly from the apex (dy = -r) to the base (dy = +r)
    return (dy >= -t.r) & (dy <= t.r) & (2 * np.abs(dx) <= dy + t.r)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene as a ``[64, 64, 3]`` uint8 array."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for t in scene.things:
        image[_thing_mask(t)] = COLORS[t.color]
    if scene.text:
        mask = text_mask(scene.text)
        x, y = scene.text_xy
        region = image[y : y + mask.shape[0], x : x + mask.shape[1]]
        if region.shape[:2] != mask.shape:
            raise ValueError(f"Text {scene.text!r} at {scene.text_xy} does not fit in the image.")
        region[mask] = INK
    return image


# --------------------------------------------------------------------------------------------------- layout


class _Layout:
    """Free cells of the 4x4 grid; objects and text each take cells, so nothing overlaps."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.free = [(row, col) for row in range(_GRID) for col in range(_GRID)]
        rng.shuffle(self.free)

    def take(self, cell: tuple[int, int] | None = None) -> tuple[int, int]:
        cell = cell if cell is not None else self.free[-1]
        self.free.remove(cell)
        return cell

    def thing(self, shape: str, color: str, cell: tuple[int, int] | None = None) -> Thing:
        row, col = self.take(cell)
        r = self.rng.randint(3, 5)
        j = lambda: self.rng.randint(-_JITTER, _JITTER)  # noqa: E731
        return Thing(shape, color, col * _CELL + _CELL // 2 + j(), row * _CELL + _CELL // 2 + j(), r)

    def text(self, text: str) -> tuple[int, int]:
        """Place ``text`` inside one grid row, taking the cells it overlaps."""
        width = len(text) * 6 - 1
        rows = sorted({c[0] for c in self.free if all((c[0], k) in self.free for k in range(_GRID))})
        row = self.rng.choice(rows)
        x = self.rng.randint(1, IMAGE_SIZE - width - 1)
        y = row * _CELL + self.rng.randint(1, _CELL - GLYPH_HEIGHT - 1)
        for col in range(x // _CELL, (x + width - 1) // _CELL + 1):
            self.take((row, col))
        return x, y

    def distractors(self, n: int, avoid: Sequence[tuple[str, str]] = ()) -> list[Thing]:
        out = []
        for _ in range(min(n, len(self.free))):
            while True:
                shape, color = self.rng.choice(SHAPES), self.rng.choice(list(COLORS))
                if (shape, color) not in avoid:
                    break
            out.append(self.thing(shape, color))
        return out


# --------------------------------------------------------------------------------------------------- skills


def _read(rng: random.Random) -> tuple[Scene, str, str]:
    text = "".join(rng.choice(CHARACTERS) for _ in range(rng.choice((3, 4))))
    layout = _Layout(rng)
    xy = layout.text(text)
    return Scene(layout.distractors(rng.randint(0, 3)), text, xy), "what does the text say ?", " ".join(text)


def _sum(rng: random.Random) -> tuple[Scene, str, str]:
    total = rng.randint(0, 18)
    first = rng.randint(max(0, total - 9), min(9, total))
    text = DIGITS[first] + DIGITS[total - first]
    layout = _Layout(rng)
    xy = layout.text(text)
    scene = Scene(layout.distractors(rng.randint(0, 3)), text, xy)
    return scene, "what is the sum of the digits ?", " ".join(str(total))


def _count(rng: random.Random) -> tuple[Scene, str, str]:
    shape, color, count = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 6)
    layout = _Layout(rng)
    things = [layout.thing(shape, color) for _ in range(count)]
    for _ in range(rng.randint(0, 3)):  # distractors share the colour or the shape, never both
        if rng.random() < 0.5:
            things.append(layout.thing(rng.choice([s for s in SHAPES if s != shape]), color))
        else:
            things.append(layout.thing(shape, rng.choice([c for c in COLORS if c != color])))
    return Scene(things), f"how many {color} {PLURAL[shape]} are there ?", NUMBERS[count]


def _compare(rng: random.Random) -> tuple[Scene, str, str]:
    first, second = rng.sample(list(COLORS), 2)
    a, b = rng.sample(range(1, 5), 2)  # never equal
    layout = _Layout(rng)
    things = [layout.thing(rng.choice(SHAPES), first) for _ in range(a)]
    things += [layout.thing(rng.choice(SHAPES), second) for _ in range(b)]
    others = [c for c in COLORS if c not in (first, second)]
    things += [layout.thing(rng.choice(SHAPES), rng.choice(others)) for _ in range(rng.randint(0, 2))]
    return Scene(things), f"are there more {first} shapes than {second} shapes ?", "yes" if a > b else "no"


def _position(rng: random.Random) -> tuple[Scene, str, str]:
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    vertical, horizontal = rng.randrange(2), rng.randrange(2)
    layout = _Layout(rng)
    cell = rng.choice([c for c in layout.free if (c[0] // 2, c[1] // 2) == (vertical, horizontal)])
    things = [layout.thing(shape, color, cell)] + layout.distractors(rng.randint(1, 3), avoid=[(shape, color)])
    answer = f"{('top', 'bottom')[vertical]} {('left', 'right')[horizontal]}"
    return Scene(things), f"where is the {color} {shape} ?", answer


def _color(rng: random.Random) -> tuple[Scene, str, str]:
    shapes = rng.sample(SHAPES, rng.randint(2, 3))
    color = rng.choice(list(COLORS))
    layout = _Layout(rng)
    things = [layout.thing(shapes[0], color)] + [layout.thing(s, rng.choice(list(COLORS))) for s in shapes[1:]]
    return Scene(things), f"what color is the {shapes[0]} ?", color


_SKILLS = {
    "read": _read,
    "sum": _sum,
    "count": _count,
    "compare": _compare,
    "position": _position,
    "color": _color,
}


# --------------------------------------------------------------------------------------------------- splits


def split_of(kind: str, scene: Scene, question: str, answer: str) -> str:
    """The split a sample belongs to, decided by a hash of its whole content."""
    digest = hashlib.blake2b(repr((kind, scene.key(), question, answer)).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 100
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _check(split: str, kinds: Sequence[str]) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split of the scenes task; choose one of {', '.join(SPLITS)}.")
    unknown = [k for k in kinds if k not in _SKILLS]
    if unknown or not kinds:
        raise ValueError(f"Unknown scenes kinds {unknown or kinds}; choose from {', '.join(KINDS)}.")


def examples(split: str, seed: int = 0, kinds: Sequence[str] = KINDS) -> Iterator[Example]:
    """An endless, deterministic stream of ``split``'s examples, cycling through ``kinds``.

    Streams of different splits never share a sample; the same ``(split, seed)`` always gives the same stream.
    """
    _check(split, kinds)
    rng = random.Random(f"scenes/{_SPLIT_SALT[split]}/{seed}")
    i = 0
    while True:
        kind = kinds[i % len(kinds)]
        scene, question, answer = _SKILLS[kind](rng)
        if split_of(kind, scene, question, answer) == split:
            yield Example(kind, question, answer, render(scene))
            i += 1


def take(split: str, n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[Example]:
    """The first ``n`` examples of :func:`examples`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    stream = examples(split, seed, kinds)
    return [next(stream) for _ in range(n)]
