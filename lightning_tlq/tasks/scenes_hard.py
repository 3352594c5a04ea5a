"""The hard scenes task: 96x96 images whose questions need fine visual detail and multi-token answers.

A benchmark on which quantization methods separate (the easy :mod:`lightning_tlq.tasks.scenes` tolerates 3-bit
weights). Five skills (``KINDS``), each answered with several tokens, so one wrong token fails the whole answer:

- ``read``: a 6-10 character string in the 5x7 bitmap font -> the characters, e.g. ``"k 3 7 a 0 e"``;
- ``colors``: 3-6 objects in distinct columns -> their colours from left to right (``"red cyan red blue"``);
- ``count``: 1-12 objects of one colour and shape among distractors sharing one of the two -> digits (``"1 1"``);
- ``add``: two 2-digit numbers drawn on two lines -> the digits of their sum (``"1 4 2"``);
- ``relation``: where one object is relative to another -> ``above|below left|right``;
- ``shades`` (not in the default stream): 3-5 objects in distinct columns, each in one of three shades of its
  colour (100%, 85% or 70% of its RGB) -> colour and shade from left to right (``"red 2 cyan 1 blue 3"``);
- ``fine_shades`` (not in the default stream): the same with four shades 6% apart (100, 94, 88, 82%).

Named variants (:data:`VARIANTS`) fix which kinds a model is trained and tested on: ``scenes_hard`` (the five kinds
above but the shades), ``scenes_fine`` (``shades``, ``colors``, ``count``, ``relation``: every kind there is
learnable in a few GPU minutes, and ``shades`` needs a colour judgement on every object of the answer) and
``scenes_finer`` (``fine_shades`` in place of ``shades``: the judgement is finer).

Objects are small (radius 2-4 px in 16 px cells of a 6x6 grid) and glyphs are 5x7 px, so a LLaVA patch of 8 px
holds about one character. Drawing is numpy only (identical on every machine); splits are disjoint by hashing each
sample's content, exactly as in the easy task (10% ``test``, 10% ``validation``, 80% ``train``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lightning_tlq.tasks import common
from lightning_tlq.tasks.common import CELL, JITTER, SPLITS, Example, Thing, split_of  # noqa: F401 (re-exported)
from lightning_tlq.tasks.font import CHARACTERS
from lightning_tlq.tasks.scenes import BACKGROUND, INK, SHAPES
from lightning_tlq.tasks.scenes import COLORS as _EASY_COLORS

KINDS: tuple[str, ...] = ("read", "colors", "count", "add", "relation")
FINE_KINDS: tuple[str, ...] = ("shades", "colors", "count", "relation")
FINER_KINDS: tuple[str, ...] = ("fine_shades", "colors", "count", "relation")
VARIANTS: dict[str, tuple[str, ...]] = {"scenes_hard": KINDS, "scenes_fine": FINE_KINDS, "scenes_finer": FINER_KINDS}
"""Task names a model's config can carry (``config.tlq_task``) and the kinds each draws."""
SHADES: dict[str, float] = {"1": 1.0, "2": 0.85, "3": 0.7}
"""Shade name (a digit, already a word of the task) -> the factor on the colour's RGB (``shades``)."""
FINE_SHADES: dict[str, float] = {"1": 1.0, "2": 0.94, "3": 0.88, "4": 0.82}
"""The same for ``fine_shades`` (whose objects carry their factor: ``"red@0.94"``)."""
IMAGE_SIZE = 96
_GRID = IMAGE_SIZE // CELL  # 6x6 cells
COLORS: dict[str, tuple[int, int, int]] = {**_EASY_COLORS, "orange": (240, 140, 30), "cyan": (40, 200, 210)}
PLURAL: dict[str, str] = {s: s + "s" for s in SHAPES}
_QUESTION_WORDS = ("what", "does", "the", "text", "say", "?", "are", "colors", "from", "left", "to", "right",
                   "how", "many", "there", "is", "sum", "of", "two", "numbers", "where", "relative", "above",
                   "below")  # fmt: skip
WORDS: tuple[str, ...] = tuple(sorted({*_QUESTION_WORDS, *COLORS, *SHAPES, *PLURAL.values(), *CHARACTERS}))
"""Every word (whitespace-separated, lower case) that a question or an answer of this task uses."""


@dataclass
class Scene:
    """What an image shows: objects and strings of characters (each with its top-left corner)."""

    things: list[Thing] = field(default_factory=list)
    texts: list[tuple[str, int, int]] = field(default_factory=list)

    def key(self) -> tuple:
        return tuple((t.shape, t.color, t.x, t.y, t.r) for t in self.things), tuple(self.texts)


# --------------------------------------------------------------------------------------------------- drawing


def rgb(color: str) -> tuple[int, int, int]:
    """The RGB of a colour name, of ``"<colour> <shade>"`` (:data:`SHADES`) or of ``"<colour>@<factor>"``: the
    colour's RGB times the shade's factor."""
    if "@" in color:
        name, factor = color.split("@")[0], float(color.split("@")[1])
    else:
        name, _, shade = color.partition(" ")
        if not shade:
            return COLORS[name]
        factor = SHADES[shade]
    return tuple(round(v * factor) for v in COLORS[name])  # type: ignore[return-value]


def _draw_thing(image: np.ndarray, t: Thing) -> None:
    """Fill the object's pixels, computed in its bounding box only (the same masks as the easy task's)."""
    y0, x0 = max(t.y - t.r, 0), max(t.x - t.r, 0)
    yy, xx = np.mgrid[y0 : min(t.y + t.r + 1, IMAGE_SIZE), x0 : min(t.x + t.r + 1, IMAGE_SIZE)]
    dx, dy = xx - t.x, yy - t.y
    if t.shape == "square":
        mask = np.ones(dx.shape, dtype=bool)
    elif t.shape == "circle":
        mask = dx * dx + dy * dy <= t.r * t.r + t.r
    else:  # triangle, apex up
        mask = 2 * np.abs(dx) <= dy + t.r
    image[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = rgb(t.color)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene as a ``[96, 96, 3]`` uint8 array."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for t in scene.things:
        _draw_thing(image, t)
    for text, x, y in scene.texts:
        common.draw_text(image, text, x, y, INK)
    return image


# --------------------------------------------------------------------------------------------------- layout


class _Layout(common.Layout):
    """Free cells of the 6x6 grid; objects and text each take cells, so nothing overlaps."""

    size, shapes, colors = IMAGE_SIZE, SHAPES, COLORS

    def thing(self, shape: str, color: str, cell: tuple[int, int] | None = None) -> Thing:
        row, col = self.take(cell)
        rng = self.rng
        x = col * CELL + CELL // 2 + rng.randint(-JITTER, JITTER)
        return Thing(shape, color, x, row * CELL + CELL // 2 + rng.randint(-JITTER, JITTER), rng.randint(2, 4))

    def text(self, text: str) -> tuple[str, int, int]:
        """Place ``text`` inside one free grid row, taking the cells it overlaps."""
        return (text, *self.place_text(text))


# --------------------------------------------------------------------------------------------------- skills


def _read(rng: random.Random) -> tuple[Scene, str, str]:
    text = "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(6, 10)))
    layout = _Layout(rng)
    texts = [layout.text(text)]
    return Scene(layout.distractors(rng.randint(0, 4)), texts), "what does the text say ?", " ".join(text)


def _colors(rng: random.Random) -> tuple[Scene, str, str]:
    cols = sorted(rng.sample(range(_GRID), rng.randint(3, 6)))
    colors = [rng.choice(list(COLORS)) for _ in cols]
    layout = _Layout(rng)
    things = [layout.thing(rng.choice(SHAPES), c, (rng.randrange(_GRID), col)) for c, col in zip(colors, cols)]
    return Scene(things), "what are the colors from left to right ?", " ".join(colors)


def _count(rng: random.Random) -> tuple[Scene, str, str]:
    shape, color, count = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randint(1, 12)
    layout = _Layout(rng)
    things = [layout.thing(shape, color) for _ in range(count)]
    things += layout.near_misses(shape, color, rng.randint(0, 6))  # distractors share the colour or the shape
    return Scene(things), f"how many {color} {PLURAL[shape]} are there ?", " ".join(str(count))


def _add(rng: random.Random) -> tuple[Scene, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    layout = _Layout(rng)
    texts = [layout.text(str(a)), layout.text(str(b))]
    scene = Scene(layout.distractors(rng.randint(0, 3)), texts)
    return scene, "what is the sum of the two numbers ?", " ".join(str(a + b))


def _relation(rng: random.Random) -> tuple[Scene, str, str]:
    (s1, c1), (s2, c2) = rng.sample([(s, c) for s in SHAPES for c in COLORS], 2)
    layout = _Layout(rng)
    first = layout.free[-1]
    second = rng.choice([c for c in layout.free if c[0] != first[0] and c[1] != first[1]])
    things = [layout.thing(s1, c1, first), layout.thing(s2, c2, second)]
    things += layout.distractors(rng.randint(0, 4), avoid=[(s1, c1), (s2, c2)])
    answer = f"{'above' if first[0] < second[0] else 'below'} {'left' if first[1] < second[1] else 'right'}"
    return Scene(things), f"where is the {c1} {s1} relative to the {c2} {s2} ?", answer


def _shade_scene(rng: random.Random, levels: dict[str, float], drawn_as: str) -> tuple[Scene, str, str]:
    """3-5 objects in distinct columns, each a colour in one of ``levels``; ``drawn_as`` formats the object's colour
    from ``c`` (name) and ``s`` (shade): ``shades`` objects carry ``"red 2"``, ``fine_shades`` their factor."""
    cols = sorted(rng.sample(range(_GRID), rng.randint(3, 5)))
    picks = [(rng.choice(list(COLORS)), rng.choice(list(levels))) for _ in cols]
    layout = _Layout(rng)
    things = [layout.thing(rng.choice(SHAPES), drawn_as.format(c=c, s=s, f=levels[s]), (rng.randrange(_GRID), col))
              for (c, s), col in zip(picks, cols)]  # fmt: skip
    return Scene(things), "what colors are there from left to right ?", " ".join(f"{c} {s}" for c, s in picks)


def _shades(rng: random.Random) -> tuple[Scene, str, str]:
    return _shade_scene(rng, SHADES, "{c} {s}")


def _fine_shades(rng: random.Random) -> tuple[Scene, str, str]:
    return _shade_scene(rng, FINE_SHADES, "{c}@{f}")


_SKILLS = {"read": _read, "colors": _colors, "count": _count, "add": _add, "relation": _relation, "shades": _shades,
           "fine_shades": _fine_shades}  # fmt: skip


# --------------------------------------------------------------------------------------------------- splits


def variant_kinds(task: str) -> tuple[str, ...]:
    """The kinds of a named variant (:data:`VARIANTS`)."""
    if task not in VARIANTS:
        raise ValueError(f"Unknown hard-scenes variant {task!r}; choose one of {', '.join(VARIANTS)}.")
    return VARIANTS[task]


def examples(split: str, seed: int = 0, kinds: Sequence[str] = KINDS) -> Iterator[Example]:
    """An endless, deterministic stream of ``split``'s examples (``[96, 96, 3]`` images), cycling through ``kinds``.

    Streams of different splits never share a sample; the same ``(split, seed)`` always gives the same stream.
    """
    yield from common.stream("scenes_hard", _SKILLS, render, split, seed, kinds)


def take(split: str, n: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[Example]:
    """The first ``n`` examples of :func:`examples`."""
    return common.first(examples(split, seed, kinds), n)
