"""``rtn``: round every weight to the nearest grid point; no calibration statistics."""

from lightning_tlq.methods import register_method
from lightning_tlq.methods.base import Method


@register_method
class RoundToNearest(Method):
    name = "rtn"
