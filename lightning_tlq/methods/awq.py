"""``awq``: activation-aware scales ``s = mean|x|^alpha`` searched on the layer's output MSE over an alpha grid,
folded into the producing op, then round to nearest (optionally AWQ's clip search, ``quant.awq_clip``)."""

from lightning_tlq.methods.base import Method, SmoothingRecipe
from lightning_tlq.methods.registry import register_method


@register_method
class AWQ(Method):
    name = "awq"
    supports_vision = False
    smoothing = SmoothingRecipe(weight_only="awq", with_act_bits="awq", grid=True, objective="mse", clip=True)
