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
    n = values.shape[0]
    k = max(1, min(n, int(round(quantile * (n - 1))) + 1))
    if n - k + 1 < k:  # the k-th smallest is the (n - k + 1)-th largest: a short top-k for quantiles near 1
        threshold = values.topk(n - k + 1, dim=0).values[-1]
    else:
        threshold = values.kthvalue(k, dim=0).values
    return torch.minimum(values, threshold)


def postprocess_flat(
    flat: Tensor,
    is_vision: Tensor,
    *,
    floor: float = 0.1,
    clip_quantile: float = 0.999,
    mode: Literal["token", "modality", "none"] = "token",
) -> Tensor:
    """Turn one module's raw scores over all real calibration tokens into weights with mean 1.

    Every column is processed on its own, so ``[N, M x G]`` post-processes ``M`` modules at once.

    Steps: normalise to mean 1; floor/mix ``(1 - floor) * s + floor * mean_modality(s)``; clip at the
    ``clip_quantile``; renormalise to mean 1. ``mode="modality"`` replaces every score by its modality mean
    (MBQ-style); ``mode="none"`` gives weight 1 to every token. The result depends only on the set of tokens, so
    ranks that gather all tokens compute identical weights.

    Args:
        flat: ``[N, G]`` raw scores of the ``N`` real (non-pad) tokens.
        is_vision: ``[N]`` bool, True for vision tokens.
        floor: mixing weight of the modality mean.
        clip_quantile: quantile above which weights are clipped (1.0 disables).
        mode: ``token``, ``modality`` or ``none``.

    Returns:
        ``[N, G]`` fp32 weights.
    """
    flat = flat.float()
    if flat.numel() == 0:
        raise ValueError("Importance post-processing got no real (non-pad) tokens.")
    if not torch.isfinite(flat).all():
        raise FloatingPointError("Importance scores contain NaN/Inf: the model's activations or loss overflowed.")
    if mode == "none":
        return torch.ones_like(flat)
    weights = _normalise(flat)
    if mode == "modality":
        return _modality_mean(weights, is_vision)
    weights = (1.0 - floor) * weights + floor * _modality_mean(weights, is_vision)
    return _normalise(_clip_quantile(weights, clip_quantile))


def postprocess(
    scores: Sequence[Tensor],
    valid: Sequence[Tensor],
    vision: Sequence[Tensor],
    **kwargs: object,
) -> list[Tensor]:
    """:func:`postprocess_flat` on per-batch tensors: ``[B, S, G]`` scores, ``[B, S]`` masks; pads get 0."""
    flat = torch.cat([s[m] for s, m in zip(scores, valid)])
    is_vision = torch.cat([v[m] for v, m in zip(vision, valid)])
    return scatter_back(postprocess_flat(flat, is_vision, **kwargs), scores, valid)


def scatter_back(flat: Tensor, like: Sequence[Tensor], valid: Sequence[Tensor]) -> list[Tensor]:
    """Inverse of ``torch.cat([x[m] for x, m in zip(like, valid)])``: zeros where ``valid`` is False."""
    out, start = [], 0
    for s, m in zip(like, valid):
        full = torch.zeros(s.shape, dtype=flat.dtype, device=flat.device)
        n = int(m.sum())
        full[m] = flat[start : start + n]
        out.append(full)
        start += n
    return out


def scatter_modules(flat: Tensor, valid: Sequence[Tensor]) -> list[Tensor]:
    """Per batch, ``[M, B, S, G]`` with zeros at padding, from ``flat [N, M, G]`` of the batches' real tokens in
    order (``valid``: ``[B, S]`` bool per batch); ``out[b][m]`` is module ``m``'s contiguous ``[B, S, G]``."""
    out, start = [], 0
    n_modules, groups = flat.shape[1:]
    for v in valid:
        full = torch.zeros(n_modules, *v.shape, groups, dtype=flat.dtype, device=flat.device)
        n = int(v.sum())
        full.permute(1, 2, 0, 3)[v] = flat[start : start + n]
        out.append(full)
        start += n
    return out


def modality_sums(scores: Sequence[Tensor], vision: Sequence[Tensor], answer: Sequence[Tensor]) -> Tensor:
    """MBQ's gradient statistics of one module: ``[sum over vision tokens, their count, sum over answer tokens, their
    count]`` (float64) of the per-token raw scores (``grad_abs``: mean ``|dL/dy|`` over channels), averaged over
    output-channel groups. ``vision``/``answer`` are ``[B, S]`` bool per batch; sums can be added over ranks."""
    out = torch.zeros(4, dtype=torch.float64)
    for s, v, a in zip(scores, vision, answer):
        per_token = s.double().mean(-1).cpu()
        v, a = v.cpu(), a.cpu()
        out += torch.stack([per_token[v].sum(), v.sum().double(), per_token[a].sum(), a.sum().double()])
    return out


def vision_weight(sums: Tensor, name: str = "") -> float:
    """``rho = mean score over vision tokens / mean score over answer tokens`` from :func:`modality_sums` totals
    (0.0 without vision tokens).

    Raises:
        ValueError: If there is no answer token or the answer tokens' mean score is 0.
    """
    vision_sum, vision_count, answer_sum, answer_count = (float(v) for v in sums)
    if answer_count == 0 or answer_sum <= 0:
        raise ValueError(
            f"{name or 'A module'}: the answer tokens received no gradient (mean |dL/dy| = 0), so MBQ cannot weigh "
            "vision tokens against them; check that the samples have answers (labels != -100)."
        )
    if vision_count == 0:
        return 0.0
    return (vision_sum / vision_count) / (answer_sum / answer_count)
