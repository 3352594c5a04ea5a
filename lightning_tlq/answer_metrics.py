"""The torchmetrics state of an evaluation: answer counts, exact match, NLL, perplexity and KL, overall and per type.

Every state is a sum (``SumMetric``; ``MeanMetric`` keeps a value sum and a weight sum; ``Perplexity`` a log-prob
sum and a count), in float64 except on MPS, so ``compute`` — which reduces the states over processes — gives the
same numbers for any sharding of the samples, provided every process tracks the same question types.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.data import IGNORE_INDEX

__all__ = ["AnswerMetrics"]

_COUNTS = ("samples", "correct", "answer_tokens")


def _metric_group(with_kl: bool) -> Any:
    from torchmetrics import MeanMetric, MetricCollection, SumMetric
    from torchmetrics.text import Perplexity

    metrics = {name: SumMetric() for name in _COUNTS}
    metrics["nll"] = MeanMetric(nan_strategy="disable")  # NaN must surface, not be dropped
    metrics["perplexity"] = Perplexity(ignore_index=IGNORE_INDEX)
    if with_kl:
        metrics["kl_to_reference"] = MeanMetric(nan_strategy="disable")
    return MetricCollection(metrics, compute_groups=False)


class AnswerMetrics:
    """torchmetrics state of an evaluation: one group over all samples, one per question type.

    Args:
        kinds: Every question type (the same list on every process).
        with_kl: Track the KL divergence to a reference.
        device: Where the states live (the collectives' device).
    """

    def __init__(self, kinds: Sequence[str], with_kl: bool, device: torch.device) -> None:
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.with_kl = with_kl
        self.overall = _metric_group(with_kl).to(device).set_dtype(self.dtype)
        self.per_type = {kind: _metric_group(with_kl).to(device).set_dtype(self.dtype) for kind in kinds}

    def update(
        self,
        kinds: Sequence[str],
        correct: Sequence[bool],
        log_probs: Tensor,
        targets: Tensor,
        rows: Tensor,
        token_nll: Tensor,
        token_kl: Tensor | None,
    ) -> None:
        """Add a batch: per sample its type and correctness, per answer token its log-probs, target and row."""
        groups = [(self.overall, torch.ones(len(kinds), dtype=torch.bool))]
        for kind in dict.fromkeys(kinds):
            groups.append((self.per_type[kind], torch.tensor([k == kind for k in kinds])))
        for group, in_group in groups:
            tokens = in_group.to(rows.device)[rows]
            group["samples"].update(float(in_group.sum()))
            group["correct"].update(float(sum(c for c, i in zip(correct, in_group.tolist()) if i)))
            group["answer_tokens"].update(float(tokens.sum()))
            group["nll"].update(token_nll[tokens])
            group["perplexity"].update(log_probs[tokens][None], targets[tokens][None])
            if token_kl is not None:
                group["kl_to_reference"].update(token_kl[tokens])

    def compute(self) -> dict[str, Any]:
        """The metrics over every process: overall values at the top level, plus ``overall`` and ``per_type``."""
        with warnings.catch_warnings():  # a type absent from this process's shard is still reduced correctly
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
            overall = _summary(self.overall.compute())
            per_type = {kind: _summary(group.compute()) for kind, group in self.per_type.items()}
        for key in ("nll", "perplexity", "kl_to_reference"):
            value = overall.get(key)
            if value is not None and not torch.isfinite(torch.tensor(value)):
                raise FloatingPointError(
                    f"The evaluation's {key} is {value}: the model produced NaN/Inf logits (e.g. float16 overflow). "
                    "Evaluate in float32 or bfloat16."
                )
        top = {key: overall[key] for key in ("samples", "answer_tokens", "exact_match", "nll", "perplexity")}
        if self.with_kl:
            top["kl_to_reference"] = overall["kl_to_reference"]
        return {**top, "overall": overall, "per_type": per_type}


def _summary(values: dict[str, Tensor]) -> dict[str, Any]:
    counts = {key: round(float(values[key])) for key in _COUNTS}
    if counts["samples"] == 0:  # a type no process saw
        return {**counts, "exact_match": None, "nll": None, "perplexity": None}
    out: dict[str, Any] = {**counts, "exact_match": counts["correct"] / counts["samples"]}
    out.update({key: float(values[key]) for key in ("nll", "perplexity", "kl_to_reference") if key in values})
    return out
