"""``rtn``: round every weight to the nearest grid point; no calibration statistics."""

from lightning_tlq.methods.base import Method
from lightning_tlq.methods.registry import register_method


@register_method
class RoundToNearest(Method):
    name = "rtn"
