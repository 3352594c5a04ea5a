"""A 5x7 bitmap font for the scenes task: rendered with numpy, identical on every machine and Pillow version."""

from __future__ import annotations

import numpy as np

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7

_ROWS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": (".###.", "#....", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "....#", ".###."),
    "a": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "c": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "e": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "f": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "h": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "k": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "l": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "p": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "u": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "x": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
}

CHARACTERS: tuple[str, ...] = tuple(_ROWS)
"""Every character the font draws (digits first, then letters)."""
DIGITS: tuple[str, ...] = tuple(c for c in CHARACTERS if c.isdigit())

GLYPHS: dict[str, np.ndarray] = {
    char: np.array([[cell == "#" for cell in row] for row in rows], dtype=bool) for char, rows in _ROWS.items()
}
"""Character -> ``[GLYPH_HEIGHT, GLYPH_WIDTH]`` bool mask."""


def text_mask(text: str, spacing: int = 1) -> np.ndarray:
    """The ``[7, len * (5 + spacing) - spacing]`` bool mask of ``text`` written left to right."""
    if not text:
        raise ValueError("text_mask() needs at least one character.")
    unknown = sorted(set(text) - set(GLYPHS))
    if unknown:
        raise ValueError(f"The font has no glyph for {unknown}; it draws {''.join(CHARACTERS)}.")
    width = len(text) * (GLYPH_WIDTH + spacing) - spacing
    out = np.zeros((GLYPH_HEIGHT, width), dtype=bool)
    for i, char in enumerate(text):
        x = i * (GLYPH_WIDTH + spacing)
        out[:, x : x + GLYPH_WIDTH] = GLYPHS[char]
    return out
