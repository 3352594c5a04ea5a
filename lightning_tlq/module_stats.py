"""What one module's calibration gathers and produces: the row selection of each batch, the Hessian
accumulators its method and the report need, the result of its solve, and the record broadcast with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.config import QuantArgs
from lightning_tlq.core.codepack import PackedCodes
from lightning_tlq.core.hessian import HessianAccumulator
from lightning_tlq.methods import ModuleStats


class ModuleResult:
    """What the solve produced for one module (integer codes kept for export).

    ``weight`` is the fake-quantized weight (dropped once copied into the module). ``codes`` may be given packed
    (:class:`~lightning_tlq.core.codepack.PackedCodes`, how a stage keeps them on the host); :attr:`codes` always
    reads them unpacked.
    """

    __slots__ = ("weight", "_codes", "scale", "zero", "record")

    def __init__(
        self,
        weight: Tensor | None,
        codes: Tensor | PackedCodes,
        scale: Tensor,
        zero: Tensor,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.weight = weight
        self._codes, self.scale, self.zero = codes, scale, zero
        self.record: dict[str, Any] = {} if record is None else record

    @property
    def codes(self) -> Tensor:
        """The integer codes ``[out, in]`` (unpacked here if kept packed)."""
        return self._codes.unpack() if isinstance(self._codes, PackedCodes) else self._codes

    @property
    def stored_codes(self) -> Tensor | PackedCodes:
        """The codes as kept (packed or not)."""
        return self._codes


@dataclass
class RowSelection:
    """Which rows of one batch's module inputs enter the statistics (device index tensors)."""

    valid: Tensor | None
    """Flat positions of the real tokens in ``[B * S]``; None: every row."""
    keep: Tensor | None = None
    """Methods that select tokens: positions, among the real tokens, of the token set (multiplier > 0); None: all
    of them."""
    multiplier: Tensor | None = None
    """The token-set multipliers of ``keep``."""

    def take(self, t: Tensor) -> Tensor:
        """The real tokens' rows of ``t [..., F]`` as ``[N, F]``."""
        flat = t.reshape(-1, t.shape[-1])
        return flat if self.valid is None else flat.index_select(0, self.valid)


RECORD_KEYS = ("damp", "retries", "seconds", "tokens", "shared", "rel_error", "weighted_rel_error")
"""``shared``: how many modules were solved with this module's Hessian (1: its own; q/k/v sharing one: 3)."""


def pack_record(record: dict[str, Any]) -> Tensor:
    """The record as a host tensor (the collective moves it where its backend needs it)."""
    values = [record.get(k) for k in RECORD_KEYS]
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def unpack_record(packed: Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in zip(RECORD_KEYS, packed.tolist()):
        out[key] = None if value != value else value  # NaN marks "not measured"
    out["retries"], out["tokens"] = int(out["retries"]), int(out["tokens"])
    out["shared"] = int(out["shared"]) if out["shared"] is not None else 1
    return out


class ModuleStatistics:
    """The Hessians one module needs: ``solve`` for the method (its handler's ``solve_statistic``),
    ``plain``/``weighted`` for the report, and with ``target = fp`` the cross term ``cross`` (same token weights as
    ``solve``)."""

    def __init__(
        self, in_features: int, groups: int, quant: QuantArgs, metrics: bool, weighted: bool, device: Any
    ) -> None:
        statistic = quant.handler.solve_statistic
        self.metrics = metrics
        self.plain = HessianAccumulator(in_features, device=device) if (metrics or statistic == "plain") else None
        self.weighted = HessianAccumulator(in_features, groups, device=device) if (metrics and weighted) else None
        self.solve = {
            "none": None,
            "plain": self.plain,
            "weighted": HessianAccumulator(in_features, groups, device=device) if statistic == "weighted" else None,
        }[statistic]
        self.cross = None
        if quant.target == "fp" and self.solve is not None:
            self.cross = HessianAccumulator(in_features, self.solve.groups, device=device)

    def accumulators(self) -> list[HessianAccumulator]:
        unique = {id(a): a for a in (self.plain, self.weighted, self.solve, self.cross) if a is not None}
        return list(unique.values())

    def for_solve(self, lean: bool = False) -> ModuleStats:
        """What the method's solve reads (``lean``: solved with the least memory, same result; the solve may then
        overwrite its Hessian unless the report's errors read it afterwards)."""
        solve = self.solve
        if solve is None:
            return ModuleStats(None)
        cross = self.cross.H if self.cross is not None else None
        reported = self.metrics and (solve is self.plain or solve is self.weighted)
        return ModuleStats(solve.H, solve.tokens, solve.weight_sum, cross, lean=lean, reuse_h=lean and not reported)
