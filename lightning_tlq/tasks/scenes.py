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

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_tlq.tasks import common
from lightning_tlq.tasks.common import CELL, JITTER, SPLITS, Example, Split, Thing, split_of  # noqa: F401 (re-exported)
from lightning_tlq.tasks.font import CHARACTERS, DIGITS

KINDS: tuple[str, ...] = ("read", "sum", "count", "compare", "position", "color")

IMAGE_SIZE = 64

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


@dataclass
class Scene:
    """What an image shows: objects, and optionally a string of characters with its top-left corner."""

    things: list[Thing] = field(default_factory=list)
    text: str = ""
    text_xy: tuple[int, int] = (0, 0)

    def key(self) -> tuple:
        return (tuple((t.shape, t.color, t.x, t.y, t.r) for t in self.things), self.text, self.text_xy)


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
        common.draw_text(image, scene.text, *scene.text_xy, INK)
    return image


# --------------------------------------------------------------------------------------------------- layout


class _Layout(common.Layout):
    """Free cells of the 4x4 grid; objects and text each take cells, so nothing overlaps."""

    size, shapes, colors = IMAGE_SIZE, SHAPES, COLORS

    def thing(self, shape: str, color: str, cell: tuple[int, int] | None = None) -> Thing:
        row, col = self.take(cell)
        r = self.rng.randint(3, 5)
        j = lambda: self.rng.randint(-JITTER, JITTER)  # noqa: E731
        return Thing(shape, color, col * CELL + CELL // 2 + j(), row * CELL + CELL // 2 + j(), r)

    text = common.Layout.place_text


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
    things += layout.near_misses(shape, color, rng.randint(0, 3))  # distractors share the colour or the shape
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


def examples(split: str, seed: int = 0, kinds: Sequence[str] = KINDS) -> Iterator[Example]:
    """An endless, deterministic stream of ``split``'s examples, cycling through ``kinds``.

    Streams of different splits never share a sample; the same ``(split, seed)`` always gives the same stream.
    """
    yield from common.stream("scenes", _SKILLS, render, split, seed, kinds)


def take(split: str, n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[Example]:
    """The first ``n`` examples of :func:`examples`."""
    return common.first(examples(split, seed, kinds), n)
