"""Which tokens enter which statistic, and with what weight: :class:`TokenWeights` per batch and layer, and the one
token-set selector the language model's layers and the vision tower's stages share (:func:`select_token_set`).

The token set keeps every token of the smallest set covering ``token_set.keep_mass`` of the stage's importance mass
(threshold computed over every rank's tokens) and a ``token_set.p_rest`` random share of the rest, whose weights
are divided by ``p_rest``. A token's draw depends on ``(seed, stage, sample id, position)`` only, so the set does
not depend on how samples are sharded over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.core.importance import scatter_back
from lightning_tlq.core.tokenset import mass_threshold, select_tokens, token_uniforms
from lightning_tlq.keys import ModuleKey


@dataclass
class TokenWeights:
    """Which tokens of one batch enter which statistic, for one layer."""

    valid: Tensor | None
    """``[B, S]`` bool: real (non-pad) tokens; None means every input row of every module is a real token (e.g. a
    vision tower, whose rows are patches, with other shapes than the batch's text)."""
    importance: dict[str, Tensor] | None = None
    """Module name (relative to the layer) -> ``[B, S, G]`` importance weights, mean 1 over real tokens."""
    multiplier: Tensor | None = None
    """``[B, S]`` token-set multipliers (0 = not in the calibration set); None keeps every real token."""
    vision: Tensor | None = None
    """``[B, S]`` bool: image tokens (mbq's modality-weighted loss); None where unknown."""
    answer: Tensor | None = None
    """``[B, S]`` bool: supervised answer tokens, ``labels != -100`` (mbq); None where unknown."""


def stage_scores(importance: Mapping[str, Tensor]) -> Tensor:
    """A stage's score per token: the mean over its modules (and importance groups) of their token weights."""
    return torch.stack([w.mean(-1) for w in importance.values()]).mean(0)


def input_weights(importance: Mapping[str, Tensor], input_groups: Sequence[Sequence[str]]) -> dict[str, Tensor]:
    """``importance.granularity=input``: every module of an input group (modules reading one input) gets the mean of
    the group's module weights, as one shared tensor (so the group's Hessians coincide); others keep theirs."""
    out = dict(importance)
    for group in input_groups:
        members = [n for n in group if n in importance]
        if len(members) > 1:
            shared = torch.stack([importance[n] for n in members]).mean(0)
            out.update((n, shared) for n in members)
    return out


def select_token_set(
    scores: Tensor,
    uniforms: Tensor,
    token_set: Any,
    collective: Any,
    *,
    image: Tensor | None = None,
    answer: Tensor | None = None,
    fingerprint: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """This rank's token-set multipliers for the flat ``scores`` of its tokens, and the stage's record.

    Args:
        scores: ``[N]`` this rank's tokens' stage scores.
        uniforms: ``[N]`` their random draws (:func:`~lightning_tlq.core.tokenset.token_uniforms`).
        token_set: :class:`~lightning_tlq.config.TokenSetArgs`.
        collective: gathers and reductions over ranks.
        image, answer: ``[N]`` bool masks; when given, the record has the kept tokens' shares (``kept_share``).
        fingerprint: callable ``multiplier -> int`` digest of the set (summed over ranks); recorded when given.

    Returns:
        ``[N]`` multipliers (0 outside the set) and the record (every count over all ranks).
    """
    every = collective.gather_cat(scores)
    threshold = mass_threshold(every, token_set.keep_mass)
    sel = select_tokens(scores, uniforms, token_set.keep_mass, token_set.p_rest, threshold=threshold)
    kept = sel.kept
    counts = [float(kept.sum()), float(sel.by_mass.sum()), float(scores[sel.by_mass].double().sum())]
    if image is not None and answer is not None:
        counts += [float((kept & image).sum()), float((kept & answer).sum())]
    if fingerprint is not None:
        counts.append(float(fingerprint(sel.multiplier)))
    totals = collective.all_reduce(torch.tensor(counts, dtype=torch.float64)).tolist()
    n_kept, by_mass, mass = totals[:3]
    total_mass = float(every.double().sum())
    record: dict[str, Any] = {}
    if fingerprint is not None:
        record["token_set_fingerprint"] = int(totals[-1])
    record.update(
        tokens_kept=int(n_kept),
        tokens_by_mass=int(by_mass),
        mass_covered=mass / total_mass if total_mass > 0 else 1.0,
    )
    if image is not None and answer is not None:
        vision, answers = totals[3:5]
        record["kept_share"] = {
            "vision": vision / max(n_kept, 1),
            "text": (n_kept - vision) / max(n_kept, 1),
            "answer": answers / max(n_kept, 1),
        }
    return sel.multiplier, record


def fingerprint(multiplier: Tensor, valid: Sequence[Tensor], sample_ids: Sequence[Tensor]) -> int:
    """Order-independent digest of a token set: sums of per-token hashes of (sample id, position, multiplier).

    Summed over ranks it is the same for any sharding, so 1-vs-N-rank runs can be compared exactly.
    """
    total, start = 0, 0
    for v, ids in zip(valid, sample_ids):
        n = int(v.sum())
        rows, cols = v.nonzero(as_tuple=True)
        mult = multiplier[start : start + n]
        start += n
        keep = mult > 0
        key = ids[rows[keep]].long() * 1_000_003 + cols[keep].long() * 7919 + (mult[keep] * 1000).round().long()
        total += int((key * 2_654_435_761 % 2_147_483_647).sum())
    return total % (2**50)


def decoder_token_weights(
    index: int,
    names: Sequence[str],
    importance: Mapping[ModuleKey, Sequence[Tensor]],
    masks: Sequence[Any],
    sample_ids: Sequence[Tensor],
    *,
    select: bool,
    token_set: Any,
    collective: Any,
    input_groups: Sequence[Sequence[str]] | None = None,
) -> tuple[list[TokenWeights], dict[str, Any]]:
    """Decoder layer ``index``'s token weights per batch (host tensors) and its token-set record.

    Args:
        names: the layer's target modules (relative names); ``importance`` is keyed ``ModuleKey(index, name)``
            (empty: uniform weights).
        masks: per batch, :class:`~lightning_tlq.data.TokenMasks` on the host.
        select: build the token-level calibration set (methods whose handler ``selects_tokens``).
        input_groups: ``importance.granularity=input``: the modules reading one input, which then share the mean of
            their weights (:func:`input_weights`); the token set is chosen from the modules' own weights either way.
    """
    valid = [~m.pad for m in masks]
    n_batches = len(masks)
    keys = {n: ModuleKey(index, n) for n in names}
    layer_imp = [{n: importance[k][b] for n, k in keys.items()} if importance else None for b in range(n_batches)]
    total = collective.all_reduce(torch.tensor([sum(int(v.sum()) for v in valid)], dtype=torch.float64))
    record: dict[str, Any] = {"tokens_total": int(total.item())}
    multipliers: list[Tensor | None] = [None] * n_batches
    if select:
        scores = [stage_scores(imp) if imp else v.float() for imp, v in zip(layer_imp, valid)]
        flat = torch.cat([s[v] for s, v in zip(scores, valid)])
        uniforms = torch.cat(
            [token_uniforms(token_set.seed, index, ids, v.shape[1])[v] for ids, v in zip(sample_ids, valid)]
        )
        multiplier, set_record = select_token_set(
            flat,
            uniforms,
            token_set,
            collective,
            image=torch.cat([m.image[v] for m, v in zip(masks, valid)]),
            answer=torch.cat([m.answer[v] for m, v in zip(masks, valid)]),
            fingerprint=lambda mult: fingerprint(mult, valid, sample_ids),
        )
        record.update(set_record)
        multipliers = scatter_back(multiplier, [v.float() for v in valid], valid)
    if input_groups is not None:
        layer_imp = [input_weights(imp, input_groups) if imp else imp for imp in layer_imp]
    weights = [
        TokenWeights(valid[b], layer_imp[b], multipliers[b], vision=masks[b].image, answer=masks[b].answer & valid[b])
        for b in range(n_batches)
    ]
    return weights, record


LayerWeights = tuple[list[TokenWeights], dict[str, Any]]


class LayerWeightsAhead:
    """Each decoder layer's :func:`decoder_token_weights`; in one process, layer ``i + 1``'s chosen on a helper thread
    while layer ``i`` calibrates.

    They depend on the importance and the masks only, never on an earlier layer's result, so they can be chosen
    early, with the same result. Only where no collective runs (one process): a helper thread's gathers could
    interleave with the layer stage's. Use as a context manager; :meth:`get` returns layer ``index``'s (waiting for
    them, or choosing them here), :meth:`start` begins a later layer's.

    Args:
        groups_of: ``index -> `` the layer's module groups (modules reading one input), as the adapter gives them.
        share_inputs: ``importance.granularity=input`` (the groups' modules share their weights).
        importance, masks, sample_ids, select, token_set, collective: as :func:`decoder_token_weights` takes them.
    """

    def __init__(
        self,
        groups_of: Callable[[int], Sequence[Sequence[str]]],
        importance: Mapping[ModuleKey, Sequence[Tensor]],
        masks: Sequence[Any],
        sample_ids: Sequence[Tensor],
        *,
        select: bool,
        token_set: Any,
        collective: Any,
        share_inputs: bool,
    ) -> None:
        self._groups_of, self._share = groups_of, share_inputs
        self._args = (importance, masks, sample_ids)
        self._kw = {"select": select, "token_set": token_set, "collective": collective}
        ahead = getattr(collective, "world_size", 1) == 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tlq-token-weights") if ahead else None
        self._pending: dict[int, Future[LayerWeights]] = {}

    def _compute(self, index: int) -> LayerWeights:
        groups = self._groups_of(index)
        names = [n for g in groups for n in g]
        return decoder_token_weights(
            index, names, *self._args, **self._kw, input_groups=groups if self._share else None
        )

    def start(self, index: int) -> None:
        if self._pool is not None and index not in self._pending:
            self._pending[index] = self._pool.submit(self._compute, index)

    def get(self, index: int) -> LayerWeights:
        pending = self._pending.pop(index, None)
        return pending.result() if pending is not None else self._compute(index)

    def __enter__(self) -> LayerWeightsAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()
