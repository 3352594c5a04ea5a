"""The evaluation harness behind ``lightning-tlq evaluate``, usable in process (no Fabric launch).

For every batch of samples (collated in order, ``batch_size`` at a time) it runs

- a teacher-forced forward of the model on prompt + reference answer (right-padded batch): the float32
  log-softmax at every position that predicts an answer token (``labels != -100``), computed only there
  (``logits_to_keep``);
- the same forward of the reference model on the same batch, or a lookup of its precomputed logits
  (:func:`reference_logits`), for KL(P_ref || P_model) over the vocabulary at each of those positions;
- one batched greedy ``generate`` call on the left-padded prompts (``do_sample=False``, ``num_beams=1``; the
  checkpoint's other generation settings apply), whose answers are compared to the references after
  :func:`normalize_answer`; samples whose greedy answer the teacher-forced logits already decide (a correct
  answer, an early eos) are not generated again (:mod:`lightning_tlq.eval_greedy`).

Everything is accumulated in torchmetrics metrics with float64 states (float32 on MPS), one group over all samples
and one per question type (``Sample.kind``; samples without one form the type ``""``): ``SumMetric`` (samples,
correct answers, answer tokens), ``MeanMetric`` (per-token NLL, and per-token KL from
``torchmetrics.functional.kl_divergence``) and ``torchmetrics.text.Perplexity``. Their ``compute`` sums the states
over processes, so results do not depend on how the samples are sharded, provided every process passes the same
``kinds``.

Example (a benchmark runner: many quantized variants against one full-precision reference on the same data)::

    from lightning_tlq.data import synthetic_samples
    from lightning_tlq.harness import evaluate_model, load_module, reference_logits

    samples = synthetic_samples(64, seed=1)  # or lightning_tlq.data.load_jsonl("eval.jsonl")
    reference = reference_logits(load_module("ckpt/fp"), samples, batch_size=8)  # FP forward once
    for path in ("out/w4", "out/w3", "out/w2"):
        metrics = evaluate_model(load_module(path), samples, reference=reference, batch_size=8)
        print(path, metrics["exact_match"], metrics["kl_to_reference"], metrics["per_type"])

``reference_logits`` keeps the model's float32 logits at the answer positions on the CPU (``answer tokens x
vocabulary`` x 4 bytes, e.g. 64 samples x 3 tokens x 152k = 117 MB; logits rather than log-probabilities, since a
float32 log-softmax would add rounding errors of ~1e-7 x |log p| that enter the KL linearly: both distributions
are normalised in float64 when used). Pass the reference module itself instead to run it beside the model on every
batch (nothing stored, both models in memory).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tlq.answer_metrics import AnswerMetrics
from lightning_tlq.data import Sample, collate
from lightning_tlq.eval_forward import ReferenceLogits as ReferenceLogits  # re-exported
from lightning_tlq.eval_forward import _answer_counts, _answer_logits, _check_lengths, _check_module, _encode
from lightning_tlq.eval_forward import greedy_answers as greedy_answers  # re-exported
from lightning_tlq.eval_forward import reference_logits as reference_logits  # re-exported
from lightning_tlq.eval_greedy import decided_answers, greedy_predictions
from lightning_tlq.eval_models import _device, _pad_id
from lightning_tlq.eval_models import activation_bits as activation_bits  # re-exported
from lightning_tlq.eval_models import check_reference as check_reference  # re-exported
from lightning_tlq.eval_models import load_module as load_module  # re-exported
from lightning_tlq.eval_models import output_vocab_size as output_vocab_size  # re-exported
from lightning_tlq.module import TLQModule

__all__ = [
    "AnswerMetrics",
    "ReferenceLogits",
    "ShardResult",
    "activation_bits",
    "check_reference",
    "evaluate_model",
    "evaluate_shard",
    "greedy_answers",
    "load_module",
    "normalize_answer",
    "output_vocab_size",
    "reference_logits",
]

NUM_EXAMPLES = 8


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (what exact match compares)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class ShardResult:
    """What :func:`evaluate_shard` returns: the metric states and one record per sample.

    Attributes:
        metrics: The torchmetrics state (``compute()`` reduces it over processes).
        records: Per sample ``index, kind, question, answer, prediction, correct, nll`` (+ ``kl_to_reference``).
        seconds: Time in the teacher-forced forwards (``forward``, reference included) and in ``generate``.
    """

    metrics: AnswerMetrics
    records: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)


def _check_inputs(
    module: TLQModule,
    samples: Sequence[Sample],
    encoded: Sequence[dict[str, Tensor]],
    reference: TLQModule | ReferenceLogits | None,
    kinds: Sequence[str],
) -> None:
    _check_module(module)
    missing = sorted({s.kind for s in samples} - set(kinds))
    if missing:
        raise ValueError(f"Question types {missing} are not in kinds={list(kinds)}.")
    if isinstance(reference, TLQModule):
        check_reference(module.model, module.processor, reference.model, reference.processor)
    elif isinstance(reference, ReferenceLogits):
        if len(reference.logits) != len(samples):
            raise ValueError(
                f"The reference logits cover {len(reference.logits)} samples, not {len(samples)}: compute "
                "them with reference_logits on the same samples."
            )
        if reference.vocab_size != output_vocab_size(module.model):
            raise ValueError(
                f"The reference logits have {reference.vocab_size} entries per position, the model "
                f"{output_vocab_size(module.model)} logits: the reference must share the model's vocabulary."
            )
        counts = [int(t.shape[0]) for t in reference.logits]
        bad = [i for i, (a, b) in enumerate(zip(counts, _answer_counts(encoded))) if a != b]
        if bad:
            raise ValueError(
                f"The reference logits of sample(s) {bad[:5]} do not match their answer tokens: compute them "
                "with reference_logits on the same samples and encodings."
            )
    elif reference is not None:
        raise TypeError(f"reference must be a TLQModule or ReferenceLogits, not {type(reference).__name__}.")


@torch.no_grad()
def evaluate_shard(
    module: TLQModule,
    samples: Sequence[Sample],
    encoded: Sequence[dict[str, Tensor]],
    *,
    reference: TLQModule | ReferenceLogits | None = None,
    kinds: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    progress: bool = False,
    exact_match: str = "greedy",
) -> ShardResult:
    """Run the evaluation over these samples (this process's shard) without reducing across processes.

    Args:
        module: The model under evaluation.
        samples, encoded: The samples and their encodings (:func:`lightning_tlq.data.encode_sample`).
        reference: The reference model, its precomputed logits, or None (no KL).
        kinds: Question types tracked (default: those of ``samples``; give every process the same list).
        indices: The samples' positions in the whole dataset, for the records (default ``0..n-1``).
        batch_size: Samples per forward and per ``generate`` call.
        max_new_tokens: Greedy generation length.
        progress: Show a progress bar over the samples (stderr).
        exact_match: ``greedy`` (generate, compare the normalised answers) or ``teacher_forced``: correct when the
            argmax at every answer position, eos included, is the reference token (no generation). Greedy
            decoding reproduces a reference token sequence exactly when, and only when, every teacher-forced argmax
            matches, so the two agree whenever each answer has one tokenization (word-level tokenizers such as
            the scenes model's); otherwise ``teacher_forced`` is a lower bound.
    """
    from torchmetrics.functional import kl_divergence
    from tqdm.auto import tqdm

    _check_lengths(samples, encoded, batch_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if exact_match not in ("greedy", "teacher_forced"):
        raise ValueError(f"exact_match={exact_match!r} is not supported; choose one of greedy, teacher_forced.")
    kinds = sorted({s.kind for s in samples}) if kinds is None else list(kinds)
    _check_inputs(module, samples, encoded, reference, kinds)
    indices = list(range(len(samples)) if indices is None else indices)
    device, pad = _device(module), _pad_id(module)
    result = ShardResult(AnswerMetrics(kinds, reference is not None, device), [], {"forward": 0.0, "generate": 0.0})
    bar = tqdm(
        total=len(samples),
        desc="evaluate",
        unit="sample",
        disable=not progress or not sys.stderr.isatty(),
        file=sys.stderr,
    )
    for start in range(0, len(samples), batch_size):
        stop = min(start + batch_size, len(samples))
        items, batch_samples = encoded[start:stop], samples[start:stop]
        tick = time.perf_counter()
        logits, targets, rows = _answer_logits(module, collate(items, pad))
        ref = None
        if isinstance(reference, TLQModule):
            ref = _answer_logits(reference, collate(items, _pad_id(reference)))[0].to(device)
        elif reference is not None:
            ref = torch.cat(reference.logits[start:stop]).to(device)
        dtype = result.metrics.dtype  # float64: log-softmax rounding would otherwise enter the KL linearly
        log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
        token_nll = F.nll_loss(log_probs, targets, reduction="none")
        token_kl = None
        if ref is not None:
            ref_log_probs = torch.log_softmax(ref.to(dtype), dim=-1)
            token_kl = kl_divergence(ref_log_probs, log_probs, log_prob=True, reduction="none")
        result.seconds["forward"] += time.perf_counter() - tick
        tick = time.perf_counter()
        if exact_match == "greedy":
            decided = decided_answers(module, items, logits, targets, rows, max_new_tokens)
            predictions = greedy_predictions(module, items, decided, max_new_tokens)  # generates the rest
            correct = [normalize_answer(p) == normalize_answer(s.answer) for p, s in zip(predictions, batch_samples)]
        else:
            predictions, correct = _teacher_forced(module, logits, targets, rows, len(items))
        result.seconds["generate"] += time.perf_counter() - tick
        kinds_here = [s.kind for s in batch_samples]
        result.metrics.update(kinds_here, correct, log_probs, targets, rows, token_nll, token_kl)
        result.records += _records(indices[start:stop], batch_samples, predictions, correct, rows, token_nll, token_kl)
        bar.update(len(items))
    bar.close()
    return result


def _teacher_forced(
    module: TLQModule, logits: Tensor, targets: Tensor, rows: Tensor, n: int
) -> tuple[list[str], list[bool]]:
    """Per sample: the argmax tokens at its answer positions (decoded) and whether all equal the reference."""
    argmax = logits.argmax(-1)
    wrong = torch.zeros(n, dtype=torch.long, device=argmax.device).index_add_(0, rows, (argmax != targets).long())
    tokenizer = module.processor.tokenizer
    predictions = [tokenizer.decode(argmax[rows == i], skip_special_tokens=True).strip() for i in range(n)]
    return predictions, (wrong == 0).tolist()


def _records(
    indices: Sequence[int],
    samples: Sequence[Sample],
    predictions: Sequence[str],
    correct: Sequence[bool],
    rows: Tensor,
    token_nll: Tensor,
    token_kl: Tensor | None,
) -> list[dict[str, Any]]:
    count = torch.bincount(rows, minlength=len(samples)).to(token_nll.dtype)

    def per_sample(values: Tensor) -> list[float]:
        return (torch.zeros_like(count).index_add_(0, rows, values) / count).tolist()

    nll = per_sample(token_nll)
    kl = per_sample(token_kl) if token_kl is not None else None
    out = []
    for i, (index, sample, prediction, ok) in enumerate(zip(indices, samples, predictions, correct)):
        record = {"index": index, "kind": sample.kind, "question": sample.question, "answer": sample.answer}
        record.update(prediction=prediction, correct=ok, nll=nll[i])
        if kl is not None:
            record["kl_to_reference"] = kl[i]
        out.append(record)
    return out


def evaluate_model(
    module: TLQModule,
    samples: Sequence[Sample],
    *,
    encoded: Sequence[dict[str, Tensor]] | None = None,
    reference: TLQModule | ReferenceLogits | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    kinds: Sequence[str] | None = None,
    num_examples: int | None = NUM_EXAMPLES,
    progress: bool = False,
    exact_match: str = "greedy",
) -> dict[str, Any]:
    """Evaluate an already-built model on samples, in this process: the metrics dict of ``metrics.json``.

    Args:
        module: The model (``TLQModule().attach(model, processor)`` or :func:`load_module`), on its device.
        samples: Image-question-answer samples (``kind`` = question type).
        encoded: Their encodings, to reuse across models (default: encoded with ``module.processor``).
        reference: The full-precision model, run on the same batches, or its :func:`reference_logits`
            (computed once, reused for every variant); None skips the KL.
        batch_size: Samples per forward and per ``generate`` call.
        max_new_tokens: Greedy generation length.
        kinds: Question types to report (default: those of ``samples``).
        num_examples: Per-sample records to return under ``examples`` (None: all).
        progress: Show a progress bar.
        exact_match: ``greedy`` or ``teacher_forced`` (see :func:`evaluate_shard`).

    Returns:
        ``samples``, ``answer_tokens``, ``exact_match``, ``nll`` (mean over answer tokens), ``perplexity``,
        ``kl_to_reference`` (with a reference), ``overall`` (the same plus ``correct``), ``per_type`` (the same per
        question type), ``examples`` and ``seconds`` (``forward``, ``generate``, ``total``).

    Raises:
        ValueError: On empty or mismatched inputs, or a reference with another vocabulary or tokenizer.
    """
    start = time.perf_counter()
    _check_module(module)
    encoded = list(encoded) if encoded is not None else _encode(module, samples)
    shard = evaluate_shard(
        module, samples, encoded, reference=reference, kinds=kinds, batch_size=batch_size,
        max_new_tokens=max_new_tokens, progress=progress, exact_match=exact_match,
    )  # fmt: skip
    metrics = shard.metrics.compute()
    metrics["examples"] = shard.records[:num_examples] if num_examples is not None else shard.records
    metrics["seconds"] = {**shard.seconds, "total": time.perf_counter() - start}
    return metrics
