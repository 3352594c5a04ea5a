"""``tlq``: GPTQ on the token-importance-weighted Hessian of a per-layer token-level calibration set.

Each layer's tokens are weighted by their post-processed importance (``importance.*``), a calibration set keeps
the tokens covering ``token_set.keep_mass`` of the importance mass plus a ``token_set.p_rest`` sample of the rest
(inverse-probability weighted), and ``H = sum_{t in set} w_t x_t x_t^T`` (per output-channel group with
``importance.groups > 1``) is what GPTQ solves on. With ``importance.mode=none`` every token weighs 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_tlq.methods.base import GPTQSolve
from lightning_tlq.methods.registry import register_method

if TYPE_CHECKING:
    from lightning_tlq.config import ImportanceArgs


@register_method
class TLQ(GPTQSolve):
    name = "tlq"
    selects_tokens = True
    solve_statistic = "weighted"

    def needs_importance(self, importance: ImportanceArgs) -> bool:
        return importance.mode != "none"
