"""Calibration methods as handlers, looked up by name (``quant.method``).

>>> get_method("tlq").selects_tokens
True
"""

from __future__ import annotations

from lightning_tlq.methods.base import GPTQSolve, Method, ModuleStats, SmoothingRecipe
from lightning_tlq.methods.registry import get_method, method_names, register_method

# The built-in methods register themselves on import, in the order shown to users.
from lightning_tlq.methods import rtn, gptq, tlq, awq, smoothquant, mbq  # noqa: F401  # isort: skip

__all__ = ["GPTQSolve", "Method", "ModuleStats", "SmoothingRecipe", "get_method", "method_names", "register_method"]
