"""The calibration loss: next-token cross-entropy summed over answer tokens (the model's own SFT loss).

The next tokens it scores are the data's answers (``labels="data"``) or, with ``labels="model"``, tokens drawn from
the full-precision model's own next-token distribution at the answer positions. The expected outer product of the
second kind of gradient is the Fisher information of the model's output distribution, i.e. the curvature of the
KL divergence to the full-precision outputs: importance then measures how far a token's error moves the model away
from what it predicts, not how much it would help the data's answer (which is large exactly where the model is
wrong anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LabelSource = Literal["data", "model"]
LABEL_SOURCES = ("data", "model")
_DRAW_SALT = 0x7A11_0000
"""Added to a sample's global id to seed its draws (one generator per sample: no dependence on batches or ranks)."""


def check_has_answer(labels: Tensor) -> None:
    """Raise if no position carries a label (the SFT loss, hence the importance, would be empty)."""
    if not (labels[:, 1:] != -100).any():
        raise ValueError("The batch has no answer tokens (all labels are -100): importance needs an answer.")


def model_draws(logits: Tensor, counts: Sequence[int], sample_ids: Sequence[int]) -> Tensor:
    """One next token per row of ``logits``, drawn from its softmax (inverse CDF in float64).

    Rows come sample by sample: ``counts[i]`` rows of the sample whose global id is ``sample_ids[i]``; each sample's
    uniforms come from a generator seeded by its id, so a draw does not depend on batching or the number of ranks.
    """
    if len(counts) != len(sample_ids) or sum(counts) != logits.shape[0]:
        raise ValueError(f"model_draws: {logits.shape[0]} rows, counts {list(counts)}, {len(sample_ids)} sample ids.")
    u = [
        torch.rand(n, generator=torch.Generator().manual_seed(_DRAW_SALT + int(i)), dtype=torch.float64)
        for n, i in zip(counts, sample_ids)
    ]
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    point = torch.cat(u).to(cdf.device) * cdf[:, -1]
    return torch.searchsorted(cdf, point.unsqueeze(-1)).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def _next_tokens(rows: Tensor, target: Tensor, keep: Tensor, draw_ids: Tensor | None) -> Tensor:
    """The scored next token of each kept position: the data's, or a draw from the model (``draw_ids``)."""
    if draw_ids is None:
        return target[keep]
    return model_draws(rows, keep.sum(1).tolist(), draw_ids.tolist())


def answer_loss(logits: Tensor, labels: Tensor, draw_ids: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy summed over the positions whose label is not -100 (fp32).

    With ``draw_ids`` (the batch's global sample ids) the scored tokens are drawn from the model
    (:func:`model_draws`) instead of read from ``labels``.
    """
    if draw_ids is None:
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
    target = labels[:, 1:]
    keep = target != -100
    rows = logits[:, :-1][keep]
    return F.cross_entropy(rows.float(), _next_tokens(rows, target, keep, draw_ids), reduction="sum")


def answer_loss_from_hidden(head: Any, hidden: Tensor, labels: Tensor, draw_ids: Tensor | None = None) -> Tensor:
    """:func:`answer_loss` of ``head(hidden)``, with the head applied only where a next-token label exists.

    The loss (and its gradient, zero elsewhere) is the same; the logits are ``[answer tokens, vocab]`` instead of
    ``[B, S, vocab]``: for a 152k vocabulary and batches of 8 x 514 tokens that is 2.5 GB of float32 logits less.
    ``head`` must act on each position independently (final norm + LM head). ``draw_ids`` as in :func:`answer_loss`.
    """
    target = labels[:, 1:]
    keep = target != -100
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), _next_tokens(logits, target, keep, draw_ids), reduction="sum")
