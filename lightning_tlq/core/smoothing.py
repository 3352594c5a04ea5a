"""Per-input-channel smoothing scales (AWQ, SmoothQuant, MBQ): formulas, grid search, clip search and folding.

Pure torch. A *group* is a set of linear modules reading one input ``x`` (q,k,v; o; gate,up; down). A scale vector
``s`` (one positive value per input channel) is migrated out of the input and into the weights:
``W x = (W diag(s)) (diag(s)^-1 x)``; the ``1/s`` is folded into the op that produces ``x`` (a norm's weight, or
the rows of the previous linear), so that only ``W diag(s)`` gets quantized. Candidate scales:

* AWQ: ``s = mean_t|x_t|^alpha``, clamped at 1e-4 and normalised by ``sqrt(max(s) * min(s))``; ``alpha = 0``
  gives ``s = 1`` exactly (plain round to nearest).
* SmoothQuant: ``s_j = max_t|x_tj|^alpha / max_i|W_ij|^(1 - alpha)`` (the max over every weight of the group),
  clamped at 1e-5.

:class:`ScaleSearch` accumulates, per candidate, the group's output error ``D = W x - Q(W diag(s)) A(x / s)`` (``A``
the per-token activation fake-quant of W-A settings, identity otherwise) over calibration tokens, as sums that can
be reduced over ranks, and turns them into either AWQ's objective (``sum_t ||D_t||^2``) or MBQ's
(``J = (sum_answer |D| + rho * sum_vision |D|) / (K_answer + K_vision)``, ``|D|`` the L1 norm of a token's error).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_tlq.core.actquant import fake_quantize_per_token
from lightning_tlq.core.quantizer import QuantSpec, rtn

__all__ = [
    "AWQ_SCALE_EPS",
    "CLIP_GRID",
    "CLIP_MAX_SHRINK",
    "SMOOTHQUANT_EPS",
    "ScaleSearch",
    "alpha_grid",
    "awq_scales",
    "block_gram",
    "clip_ratios",
    "clip_weight",
    "column_absmax",
    "floor_at_median",
    "fold_into_norm_",
    "fold_into_rows_",
    "scale_columns_",
    "search_clip",
    "smoothquant_scales",
]

Objective = Literal["mse", "mbq"]

AWQ_SCALE_EPS = 1e-4
"""AWQ clamps ``mean|x|^alpha`` at this value before normalising."""
SMOOTHQUANT_EPS = 1e-5
"""SmoothQuant clamps the weight maxima and the scales at this value."""
CLIP_GRID = 20
"""AWQ clip search: candidate clipping ratios ``1 - i / CLIP_GRID``..."""
CLIP_MAX_SHRINK = 0.5
"""...for ``i < CLIP_MAX_SHRINK * CLIP_GRID`` (ratios 1.0, 0.95, ..., 0.55)."""


# ---------------------------------------------------------------------------------------------------- formulas
def alpha_grid(n: int) -> list[float]:
    """AWQ's grid ``{0, 1/n, ..., (n-1)/n}``; ``n = 1`` is ``[0.0]`` (plain round to nearest)."""
    if n < 1:
        raise ValueError(f"The alpha grid needs at least one point, got n={n}.")
    return [i / n for i in range(n)]


def awq_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """AWQ scales ``s = mean|x|^alpha`` (clamped at 1e-4), normalised by ``sqrt(max(s) * min(s))``; float32.

    Args:
        mean_abs: ``[in]`` mean absolute input per channel over the calibration tokens.
        alpha: migration strength in ``[0, 1)``; 0 gives all ones exactly.
    """
    s = mean_abs.float().pow(alpha).clamp_min(AWQ_SCALE_EPS)
    return s / (s.max() * s.min()).sqrt()


def smoothquant_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant scales ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` (weights clamped, result clamped at 1e-5).

    Args:
        act_absmax: ``[in]`` maximum absolute input per channel over the calibration tokens.
        weight_absmax: ``[in]`` maximum absolute weight per input column over every module of the group
            (:func:`column_absmax`).
        alpha: migration strength in ``[0, 1]``.
    """
    w = weight_absmax.float().clamp_min(SMOOTHQUANT_EPS)
    return (act_absmax.float().pow(alpha) / w.pow(1.0 - alpha)).clamp_min(SMOOTHQUANT_EPS)


def column_absmax(weights: Sequence[Tensor]) -> Tensor:
    """``[in]`` maximum ``|W_ij|`` over the rows of every weight ``[out_m, in]`` of a group (float32)."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def floor_at_median(ratios: Sequence[float]) -> list[float]:
    """MBQ's per-layer modality weights floored at their median over layers: ``max(r_l, median_l(r))``."""
    if not ratios:
        return []
    median = statistics.median(ratios)
    return [max(float(r), median) for r in ratios]


# ------------------------------------------------------------------------------------------------------ folding
def scale_columns_(weight: Tensor, s: Tensor) -> Tensor:
    """``W <- W diag(s)`` in place (computed in float32, stored in ``weight``'s dtype); returns ``weight``."""
    weight.copy_((weight.float() * s.to(weight.device).float()).to(weight.dtype))
    return weight


def fold_into_rows_(weight: Tensor, bias: Tensor | None, s: Tensor) -> None:
    """Divide the outputs of a linear op by ``s`` in place: rows of ``weight`` ``[out, in]`` and ``bias`` ``[out]``."""
    s = s.to(weight.device).float()
    weight.copy_((weight.float() / s[:, None]).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


def fold_into_norm_(weight: Tensor, bias: Tensor | None, s: Tensor, offset: float = 0.0) -> None:
    """Divide the output of an elementwise-affine norm by ``s`` in place.

    For ``y = (offset + weight) * n(x) + bias``: ``weight <- (offset + weight) / s - offset``, ``bias <- bias / s``.
    ``offset = 0`` is the ``weight * n(x)`` of Llama/Qwen RMSNorm and LayerNorm, ``offset = 1`` Gemma's
    ``(1 + weight) * n(x)``.
    """
    s = s.to(weight.device).float()
    weight.copy_(((weight.float() + offset) / s - offset).to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))


# ------------------------------------------------------------------------------------------------- scale search
class ScaleSearch:
    """Output error of one group of linear modules for several candidate input scales, as reducible sums.

    The quantized weight of a candidate is ``Q(W diag(s))`` (round to nearest on ``spec``, computed in ``W``'s dtype
    as the fold stores it) and its input ``A(x / s)``; the reference is the full-precision ``W x``. Biases cancel.

    Args:
        weights: the group's weights ``[out_m, in]`` (their rows are concatenated; quantization groups run along
            ``in`` so this equals quantizing each module).
        candidates: ``[K, in]`` positive scale vectors.
        spec: the weight grid.
        act_bits: per-token activation bits applied to ``x / s`` in the loss (None: weight-only).
        objective: ``mse`` (AWQ: squared error over every token) or ``mbq`` (L1 error over answer and vision
            tokens, see :meth:`losses`).
        cache_bytes: keep every candidate's quantized weight (float32) between :meth:`add` calls when they fit in
            this many bytes, instead of re-quantizing per call; the results are the same either way.

    Attributes:
        sums: ``[K, 3]`` float64: per candidate the squared error, the L1 error over answer tokens and over vision
            tokens.
        reference: ``[3]`` float64: the same sums with ``D`` replaced by ``W x`` (for relative losses).
        counts: ``[3]`` float64: tokens, answer tokens, vision tokens (0 without the masks).
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        candidates: Tensor,
        spec: QuantSpec,
        *,
        act_bits: int | None = None,
        objective: Objective = "mse",
        cache_bytes: int = 2**28,
    ) -> None:
        if objective not in ("mse", "mbq"):
            raise ValueError(f"Unknown scale-search objective {objective!r}; choose mse or mbq.")
        self.weight = torch.cat([w.detach() for w in weights])
        if candidates.dim() != 2 or candidates.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"ScaleSearch: candidates must be [K, {self.weight.shape[1]}], got {tuple(candidates.shape)}."
            )
        self.candidates = candidates.float().to(self.weight.device)
        self.spec, self.act_bits, self.objective = spec, act_bits, objective
        device = self.weight.device
        self.sums = torch.zeros(len(candidates), 3, dtype=torch.float64, device=device)
        self.reference = torch.zeros(3, dtype=torch.float64, device=device)
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)
        fits = len(candidates) * self.weight.numel() * 4 <= cache_bytes
        self._cache: list[Tensor | None] | None = [None] * len(candidates) if fits else None

    def add(self, x: Tensor, answer: Tensor | None = None, vision: Tensor | None = None) -> None:
        """Add input rows ``x`` ``[N, in]`` (real tokens only); ``answer``/``vision`` are ``[N]`` bool (``mbq``)."""
        if self.objective == "mbq" and (answer is None or vision is None):
            raise ValueError("ScaleSearch(objective='mbq') needs the answer and vision masks of the rows.")
        x = x.detach().to(self.weight.device).float()
        weight = self.weight.float()
        ref = x @ weight.T
        self.reference += self._sums(ref, answer, vision)
        n = x.shape[0]
        self.counts += torch.tensor([n, _count(answer), _count(vision)], dtype=torch.float64, device=self.counts.device)
        for k, s in enumerate(self.candidates):
            quantized = self._quantized(k, weight)
            xs = x / s
            if self.act_bits is not None:
                xs = fake_quantize_per_token(xs, self.act_bits)
            self.sums[k] += self._sums(xs @ quantized.T - ref, answer, vision)

    def _quantized(self, k: int, weight: Tensor) -> Tensor:
        """``Q(W diag(s_k))`` as float32, in the dtype the fold stores ``W diag(s)`` in."""
        if self._cache is not None and self._cache[k] is not None:
            return self._cache[k]
        quantized = rtn((weight * self.candidates[k]).to(self.weight.dtype), self.spec).weight.float()
        if self._cache is not None:
            self._cache[k] = quantized
        return quantized

    def _sums(self, d: Tensor, answer: Tensor | None, vision: Tensor | None) -> Tensor:
        out = torch.zeros(3, dtype=torch.float64, device=self.sums.device)
        if self.objective == "mse":
            out[0] = d.square().sum(dtype=torch.float64)
        else:
            l1 = d.abs().sum(-1, dtype=torch.float64)
            out[1], out[2] = l1[answer.to(l1.device)].sum(), l1[vision.to(l1.device)].sum()
        return out

    def state(self) -> Tensor:
        """Every sum as one float64 vector (to be summed over ranks, then :meth:`load_state`)."""
        return torch.cat([self.sums.flatten(), self.reference, self.counts])

    def load_state(self, state: Tensor) -> None:
        """Take sums from :meth:`state` (e.g. after an all-reduce)."""
        k = self.sums.numel()
        state = state.to(self.sums.device, torch.float64)
        self.sums = state[:k].reshape(self.sums.shape).clone()
        self.reference, self.counts = state[k : k + 3].clone(), state[k + 3 : k + 6].clone()

    def losses(self, rho: float | None = None) -> Tensor:
        """``[K]`` relative objective per candidate (float64), 0 where the reference is 0.

        ``mse``: ``sum_t ||D_t||^2 / sum_t ||W x_t||^2``. ``mbq``: ``J(D) / J(W x)`` with
        ``J(D) = (sum_answer |D_t| + rho * sum_vision |D_t|) / (K_answer + K_vision)``; the common denominator
        cancels, the argmin is MBQ's.
        """
        if self.objective == "mse":
            num, den = self.sums[:, 0], self.reference[0]
        else:
            if rho is None:
                raise ValueError("The mbq objective needs the vision weight rho.")
            num = self.sums[:, 1] + rho * self.sums[:, 2]
            den = self.reference[1] + rho * self.reference[2]
        return num / den if float(den) > 0 else torch.zeros_like(num)


def _count(mask: Tensor | None) -> float:
    return 0.0 if mask is None else float(mask.sum())


# --------------------------------------------------------------------------------------------------- clip search
def clip_ratios(n_grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK) -> list[float]:
    """AWQ's clipping ratios ``1 - i / n_grid`` for ``i < max_shrink * n_grid``."""
    return [1.0 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]


def block_gram(x: Tensor, spec: QuantSpec) -> Tensor:
    """``[G, g, g]`` float64 Gram matrices ``sum_t x_tG x_tG^T`` of each quantization group's input columns."""
    n, in_features = x.shape
    glen = spec.group_len(in_features)
    xg = x.float().reshape(n, in_features // glen, glen).transpose(0, 1)  # [G, N, g]
    return (xg.transpose(1, 2) @ xg).double()


def clip_weight(weight: Tensor, max_val: Tensor, spec: QuantSpec) -> Tensor:
    """``weight`` ``[out, in]`` clamped to ``[-max_val, max_val]`` per (row, quantization group) ``[out, G]``."""
    out_features, in_features = weight.shape
    glen = spec.group_len(in_features)
    w = weight.reshape(out_features, in_features // glen, glen)
    m = max_val.to(w.device, w.dtype).unsqueeze(-1)
    return torch.clamp(w, -m, m).reshape(out_features, in_features)


def search_clip(
    weight: Tensor, gram: Tensor, spec: QuantSpec, ratios: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """AWQ's clip search: per (row, group) the clipping of ``max|W|`` minimising ``sum_t (dW_g x_tg)^2``.

    ``dW = Q(clip(W)) - W`` (round to nearest on the clipped weight, error against the unclipped one); the error of
    each (row, group) is the quadratic form of its ``dW`` with the group's Gram matrix, so the data enter only
    through ``gram`` (:func:`block_gram`, summed over batches and ranks).

    Returns:
        ``(max_val, ratio)``, each ``[out, G]``: the chosen clipping bound and ratio (1.0 = no clipping).
    """
    ratios = list(ratios) if ratios is not None else clip_ratios()
    out_features, in_features = weight.shape
    glen = spec.group_len(in_features)
    w = weight.detach()
    org_max = w.float().reshape(out_features, -1, glen).abs().amax(-1)
    gram = gram.to(w.device, torch.float64)
    best = torch.full_like(org_max, float("inf"), dtype=torch.float64)
    best_ratio = torch.ones_like(org_max)
    for r in ratios:
        max_val = org_max * r
        d = (rtn(clip_weight(w, max_val.to(w.dtype), spec), spec).weight.float() - w.float()).double()
        d = d.reshape(out_features, -1, glen)  # [out, G, g]
        err = torch.einsum("ogc,gcd,ogd->og", d, gram, d)
        better = err < best
        best = torch.where(better, err, best)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return (org_max * best_ratio).to(w.dtype), best_ratio
