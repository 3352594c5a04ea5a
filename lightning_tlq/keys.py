"""The key of one quantized module's per-run state: :class:`ModuleKey` ``(stage, module)``.

Calibration results, importance scores, token weights and a method's per-run values are keyed by the stage the
module belongs to -- a decoder layer index, or a vision-tower stage name (``"vision.<i>"``, ``"projector"``) --
and the module's name inside it. The string form ``"<stage>.<module>"`` (``"3.mlp.down_proj"``,
``"vision.0.self_attn.q_proj"``, ``"projector.linear_1"``) exists only where keys are written or shown: checkpoint
files, log lines and error messages (:meth:`ModuleKey.parse` reads it back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PROJECTOR", "ModuleKey", "vision_stage"]

PROJECTOR = "projector"
"""The stage name of the vision projector."""
_VISION = "vision"


def vision_stage(index: int) -> str:
    """The stage name of vision encoder layer ``index``: ``"vision.<index>"``."""
    return f"{_VISION}.{int(index)}"


def _is_index(text: str) -> bool:
    """``text`` is a non-negative integer in its one canonical spelling (``"3"``, not ``"03"`` or ``"+3"``)."""
    return text.isascii() and text.isdigit() and text == str(int(text))


def _is_vision_stage(stage: str) -> bool:
    head, _, tail = stage.partition(".")
    return stage == PROJECTOR or (head == _VISION and _is_index(tail))


@dataclass(frozen=True, slots=True)
class ModuleKey:
    """One quantized module of a calibration run.

    Args:
        stage: the decoder layer index (``int >= 0``), or a vision-tower stage (:func:`vision_stage`,
            :data:`PROJECTOR`).
        module: the module's name relative to the stage (``"mlp.down_proj"``).

    Raises:
        ValueError: If ``stage`` is neither, or ``module`` is empty.
    """

    stage: int | str
    module: str

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or not isinstance(self.stage, (int, str)):
            raise ValueError(f"ModuleKey stage must be a layer index or a vision stage name, not {self.stage!r}.")
        if isinstance(self.stage, int) and self.stage < 0:
            raise ValueError(f"ModuleKey stage must be a layer index >= 0, not {self.stage}.")
        if isinstance(self.stage, str) and not _is_vision_stage(self.stage):
            raise ValueError(
                f"ModuleKey stage {self.stage!r} is not a vision stage: expected 'vision.<i>' or '{PROJECTOR}'."
            )
        if not isinstance(self.module, str) or not self.module:
            raise ValueError(f"ModuleKey module must be a non-empty module name, not {self.module!r}.")

    @property
    def is_vision(self) -> bool:
        """Whether the module belongs to the vision tower or the projector."""
        return isinstance(self.stage, str)

    def __str__(self) -> str:
        return f"{self.stage}.{self.module}"

    def __lt__(self, other: Any) -> bool:
        if not isinstance(other, ModuleKey):
            return NotImplemented
        return self._order() < other._order()

    def _order(self) -> tuple[int, int, str]:
        """Decoder layers, then vision encoder layers (both by index), then the projector; modules by name."""
        if isinstance(self.stage, int):
            return (0, self.stage, self.module)
        if self.stage == PROJECTOR:
            return (2, 0, self.module)
        return (1, int(self.stage.partition(".")[2]), self.module)

    @classmethod
    def parse(cls, text: str) -> ModuleKey:
        """The key whose string form is ``text`` (``str(ModuleKey.parse(s)) == s``).

        Raises:
            ValueError: If ``text`` is not ``"<layer>.<module>"``, ``"vision.<i>.<module>"`` or
                ``"projector.<module>"``.
        """
        head, _, rest = str(text).partition(".")
        if _is_index(head):
            return cls(int(head), rest) if rest else cls._bad(text)
        if head == _VISION:
            index, _, module = rest.partition(".")
            return cls(vision_stage(int(index)), module) if _is_index(index) and module else cls._bad(text)
        if head == PROJECTOR and rest:
            return cls(PROJECTOR, rest)
        return cls._bad(text)

    @staticmethod
    def _bad(text: str) -> ModuleKey:
        raise ValueError(
            f"{text!r} is not a module key: expected '<layer>.<module>', 'vision.<i>.<module>' or "
            f"'{PROJECTOR}.<module>'."
        )
