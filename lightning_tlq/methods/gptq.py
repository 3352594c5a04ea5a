"""``gptq``: GPTQ on ``H = sum_t x_t x_t^T`` over every real calibration token (uniform token weights)."""

from lightning_tlq.methods.base import GPTQSolve
from lightning_tlq.methods.registry import register_method


@register_method
class GPTQ(GPTQSolve):
    name = "gptq"
    solve_statistic = "plain"
