"""Token-level calibration set (METHOD.md section 2).

For each layer: keep the smallest set of tokens covering ``keep_mass`` of the importance mass, and from the
rest a uniform random fraction ``p_rest`` whose weights are divided by ``p_rest`` so that the weighted Hessian
stays unbiased. The random draw of a token depends only on ``(seed, layer, sample id, position)``, so the set
is the same however the samples are split over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A splitmix64-style hash of a few integers (deterministic across processes, unlike ``hash``)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def token_uniforms(seed: int, layer: int, sample_ids: Tensor, seq_len: int) -> Tensor:
    """Uniform draws in [0, 1) for every (sample, position), reproducible per sample id.

    Args:
        seed: token-set seed.
        layer: decoder layer index.
        sample_ids: ``[B]`` global ids of the samples in a batch.
        seq_len: padded sequence length ``S``.

    Returns:
        fp32 ``[B, S]``.
    """
    rows = []
    for sid in sample_ids.tolist():
        gen = torch.Generator().manual_seed(_mix(seed, layer, int(sid)))
        rows.append(torch.rand(seq_len, generator=gen))
    return torch.stack(rows) if rows else torch.empty(0, seq_len)


@dataclass
class TokenSelection:
    """Result of :func:`select_tokens` over ``N`` candidate tokens."""

    multiplier: Tensor
    """``[N]`` fp32: 1 for tokens kept by mass, ``1 / p_rest`` for randomly kept ones, 0 for dropped ones."""
    by_mass: Tensor
    """``[N]`` bool: kept because they lie in the top ``keep_mass`` of the importance mass."""
    threshold: float
    """Score at or above which a token is kept by mass."""
    mass_covered: float
    """Share of the total mass held by the tokens kept by mass."""

    @property
    def kept(self) -> Tensor:
        """``[N]`` bool: kept at all."""
        return self.multiplier > 0


def mass_threshold(scores: Tensor, keep_mass: float) -> float:
    """Smallest score ``tau`` such that the tokens with score >= tau hold at least ``keep_mass`` of the mass.

    Depends only on the multiset of scores, so it is the same for any order or split of the tokens.
    """
    if scores.numel() == 0:
        raise ValueError("The token set has no candidate tokens.")
    if (scores < 0).any():
        raise ValueError("Token scores must be non-negative.")
    ordered = scores.double().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return 0.0
    cum = ordered.cumsum(0)
    index = int(torch.searchsorted(cum, keep_mass * total).clamp_max(ordered.numel() - 1))
    return float(ordered[index])


def select_tokens(
    scores: Tensor, uniforms: Tensor, keep_mass: float, p_rest: float, *, threshold: float | None = None
) -> TokenSelection:
    """Choose the calibration tokens of one layer.

    Args:
        scores: ``[N]`` non-negative importance of each real token.
        uniforms: ``[N]`` draws from :func:`token_uniforms` for the same tokens.
        keep_mass: share of the importance mass to keep deterministically.
        p_rest: probability of keeping each remaining token (its weight is then divided by ``p_rest``).
        threshold: the :func:`mass_threshold` of *all* calibration tokens, when ``scores`` are only one rank's
            share of them (default: computed from ``scores``).

    Returns:
        The selection, with per-token weight multipliers (``mass_covered`` is over ``scores`` only).
    """
    if scores.shape != uniforms.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and uniforms {tuple(uniforms.shape)} differ in shape.")
    if threshold is None:
        threshold = mass_threshold(scores, keep_mass)
    by_mass = scores >= threshold if keep_mass < 1.0 else torch.ones_like(scores, dtype=torch.bool)
    multiplier = by_mass.float()
    if p_rest > 0:
        lucky = ~by_mass & (uniforms < p_rest)
        multiplier = multiplier + lucky.float() / p_rest
    total = float(scores.double().sum())
    covered = float(scores[by_mass].double().sum()) / total if total > 0 else 1.0
    return TokenSelection(multiplier=multiplier, by_mass=by_mass, threshold=threshold, mass_covered=covered)
