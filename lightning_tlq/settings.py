"""One settings object for a calibration run, shared by the CLI, the Trainer callback and the Python API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs, importance_for


@dataclass
class CalibrationSettings:
    """Everything that decides how a model is calibrated (what data and where results go are the caller's).

    ``importance`` is resolved on construction: a method that needs a particular score (mbq: ``grad_abs``) gets it.
    """

    quant: QuantArgs = field(default_factory=QuantArgs)
    """Quantization settings, incl. ``method``."""
    importance: ImportanceArgs = field(default_factory=ImportanceArgs)
    """Token importance settings."""
    token_set: TokenSetArgs = field(default_factory=TokenSetArgs)
    """Token-level calibration set settings."""
    memory: MemoryArgs = field(default_factory=MemoryArgs)
    """Where weights and activations live."""
    metrics: bool = True
    """Report every module's relative output error (costs an extra statistic per module)."""
    weighted_metrics: bool = False
    """Also report importance-weighted errors for methods that need no importance (rtn, gptq, awq, smoothquant),
    which runs the importance backward for them; tlq and mbq report them anyway."""

    def __post_init__(self) -> None:
        self.importance = importance_for(self.quant, self.importance)

    @property
    def needs_importance(self) -> bool:
        """Whether the run performs the importance backward: the method needs it, or weighted metrics are asked."""
        if self.quant.handler.needs_importance(self.importance):
            return True
        return self.metrics and self.weighted_metrics and self.importance.mode != "none"

    def result_settings(self) -> dict[str, Any]:
        """The settings that determine the calibrated weights (a resumed run must match them; memory placement
        does not count)."""
        return {k: v for k, v in self.as_dict().items() if k != "memory"}

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (reports, checkpoint compatibility)."""
        return {
            "quant": asdict(self.quant),
            "importance": asdict(self.importance),
            "token_set": asdict(self.token_set),
            "memory": asdict(self.memory),
            "metrics": self.metrics,
            "weighted_metrics": self.weighted_metrics,
        }
