"""Token importance: raw scores from output gradients and their post-processing (METHOD.md section 1).

Pure torch. Scores live per module as ``[B, S, G]`` tensors per batch (``G`` output-channel groups); masks say
which positions are real (non-pad) and which are vision tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Score = Literal["fisher", "grad_abs", "taylor"]
_SCORE_FNS = {
    "fisher": lambda g, y: g.square(),
    "grad_abs": lambda g, y: g.abs(),
    "taylor": lambda g, y: (g * y).abs(),
}


def raw_scores(grad: Tensor, output: Tensor | None, score: Score, groups: int = 1) -> Tensor:
    """Reduce a module's output gradient to a few scalars per token.

    Args:
        grad: ``dL/dy`` at the module output, ``[..., C]``.
        output: the module output ``y`` (needed by ``taylor`` only), same shape as ``grad``.
        score: ``fisher`` (mean g^2), ``grad_abs`` (mean |g|) or ``taylor`` (mean |g*y|).
        groups: split the ``C`` output channels into this many contiguous groups, one score each.

    Returns:
        fp32 tensor ``[..., groups]``.
    """
    if score not in _SCORE_FNS:
        raise ValueError(f"Unknown importance score {score!r}; choose one of {', '.join(_SCORE_FNS)}.")
    channels = grad.shape[-1]
    if channels % groups:
        raise ValueError(f"importance.groups={groups} does not divide the module's {channels} output channels.")
    g = grad.float()
    y = output.float() if output is not None else None
    per_channel = _SCORE_FNS[score](g, y)
    return per_channel.unflatten(-1, (groups, channels // groups)).mean(-1)


def _normalise(values: Tensor) -> Tensor:
    """Scale each column so that its mean is 1 (an all-zero column becomes all ones)."""
    mean = values.mean(0, keepdim=True)
    return torch.where(mean > 0, values / mean.clamp_min(torch.finfo(values.dtype).tiny), torch.ones_like(values))


def _modality_mean(values: Tensor, vision: Tensor) -> Tensor:
    """Per token, the mean of its modality's values (vision vs. everything else), per column."""
    out = torch.empty_like(values)
    for mask in (vision, ~vision):
        if mask.any():
            out[mask] = values[mask].mean(0)
    return out


def _clip_quantile(values: Tensor, quantile: float) -> Tensor:
    if quantile >= 1.0 or values.shape[0] < 2:
        return values
    k = max(1, min(values.shape[0], int(round(quantile * (values.shape[0] - 1))) + 1))
    threshold = values.kthvalue(k, dim=0).values
    return torch.minimum(values, threshold)


def postprocess(
    scores: Sequence[Tensor],
    valid: Sequence[Tensor],
    vision: Sequence[Tensor],
    *,
    floor: float = 0.1,
    clip_quantile: float = 0.999,
    mode: Literal["token", "modality", "none"] = "token",
) -> list[Tensor]:
    """Turn one module's raw scores into token weights with mean 1 over real tokens.

    Steps: normalise to mean 1; floor/mix ``(1 - floor) * s + floor * mean_modality(s)``; clip at the
    ``clip_quantile``; renormalise to mean 1. Pad tokens get weight 0. ``mode="modality"`` replaces every
    score by its modality mean (MBQ-style); ``mode="none"`` gives weight 1 to every real token.

    Args:
        scores: per batch, raw scores ``[B, S, G]``.
        valid: per batch, bool ``[B, S]``, True for real (non-pad) tokens.
        vision: per batch, bool ``[B, S]``, True for vision tokens.
        floor: mixing weight of the modality mean.
        clip_quantile: quantile above which weights are clipped (1.0 disables).
        mode: ``token``, ``modality`` or ``none``.

    Returns:
        per batch, weights ``[B, S, G]`` (fp32).
    """
    flat = torch.cat([s[m] for s, m in zip(scores, valid)]).float()  # [N, G]
    is_vision = torch.cat([v[m] for v, m in zip(vision, valid)])
    if flat.numel() == 0:
        raise ValueError("Importance post-processing got no real (non-pad) tokens.")
    if not torch.isfinite(flat).all():
        raise FloatingPointError("Importance scores contain NaN/Inf: the model's activations or loss overflowed.")
    if mode == "none":
        weights = torch.ones_like(flat)
    else:
        weights = _normalise(flat)
        if mode == "modality":
            weights = _modality_mean(weights, is_vision)
        else:
            weights = (1.0 - floor) * weights + floor * _modality_mean(weights, is_vision)
            weights = _normalise(_clip_quantile(weights, clip_quantile))
    return _scatter_back(weights, scores, valid)


def _scatter_back(flat: Tensor, like: Sequence[Tensor], valid: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for s, m in zip(like, valid):
        full = torch.zeros(s.shape, dtype=flat.dtype, device=flat.device)
        n = int(m.sum())
        full[m] = flat[start : start + n]
        out.append(full)
        start += n
    return out
