"""``smoothquant``: SmoothQuant's ``s = max|x|^a / max|W|^(1-a)`` at ``quant.smoothquant_alpha`` migrates
activation outliers into the weights (W-A settings only), folded into the producing op, then round to nearest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_tlq.methods.base import Method, SmoothingRecipe
from lightning_tlq.methods.registry import register_method

if TYPE_CHECKING:
    from lightning_tlq.config import QuantArgs


@register_method
class SmoothQuant(Method):
    name = "smoothquant"
    supports_vision = False
    smoothing = SmoothingRecipe(
        weight_only="smoothquant", with_act_bits="smoothquant", grid=False, objective="mse", clip=False
    )

    def validate(self, quant: QuantArgs) -> None:
        super().validate(quant)
        if quant.act_bits is None:
            raise ValueError(
                "quant.method=smoothquant migrates activation outliers into the weights for weight-activation "
                "quantization and needs quant.act_bits (e.g. 8 for W4A8); for weight-only settings use "
                "quant.method=awq or mbq."
            )
