"""Greedy answers that the teacher-forced forward already decides: ``evaluate`` generates only the others.

Greedy decoding picks, at every step, the argmax of the next-token logits given the prompt and the tokens picked
so far. The teacher-forced forward of the evaluation (:func:`lightning_tlq.eval_forward._answer_logits`) has the
logits at every answer position given the prompt and the *reference* answer before it. So as long as greedy
decoding follows the reference answer, its next token is the teacher-forced argmax; at the first position whose
argmax differs from the reference token it picks that argmax and leaves the reference. The tokens up to there
are known, and if decoding stops within them (at an eos, or after ``max_new_tokens`` tokens) the whole greedy
answer is known without calling ``generate``: always when the model answers correctly (the reference ends with
eos), and when it stops early with a wrong answer. Every other sample of the batch is generated as before
(:func:`~lightning_tlq.eval_forward.greedy_answers`, one call for all of them).

An answer is decided only if

- ``generate`` would pick the plain argmax: the model's class keeps transformers' ``generate`` and its generation
  config sets nothing outside :data:`GREEDY_NEUTRAL` (no repetition penalty, suppressed or forced tokens, minimum
  length, stop strings, ...);
- the model's activations are not quantized (W4A8 rounds each activation to a few levels, so the two computations
  below could differ by far more than their float rounding);
- each argmax it relies on leads the runner-up logit by more than ``MARGIN_ULPS`` units in the last place of the
  model's dtype (relative to the top logit, at least 1): the teacher-forced forward (right-padded, whole sequence)
  and ``generate`` (left-padded prompt, then the KV cache) round differently. On the embedded scenes model their
  logits differ by at most 7e-6 in float32 (the margin needed is then 1024 x 1.2e-7 x |top logit| ~ 2e-3) and
  by 0.0625 in bfloat16 (needed: ~8 x |top logit|, so bfloat16 runs mostly generate).

On the embedded scenes model (64 test samples, all answered correctly) no sample is left to generate, and the
evaluation loop's CPU time drops from 5.2 s to 1.9 s (``docs/cli_benchmark.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tlq.actquant import has_activation_quant
from lightning_tlq.data import IGNORE_INDEX
from lightning_tlq.eval_forward import eos_ids, greedy_answers
from lightning_tlq.module import TLQModule

MARGIN_ULPS = 1024
"""How far (in units in the last place of the model's dtype, times max(1, |top logit|)) an argmax must lead."""

GREEDY_NEUTRAL = frozenset(
    {
        # ids and bookkeeping
        "bos_token_id",
        "eos_token_id",  # the answer ends at the first of them either way (eos_ids)
        "pad_token_id",
        "decoder_start_token_id",
        "transformers_version",
        "_from_model_config",
        # what is returned or cached, not which token is picked
        "use_cache",
        "cache_implementation",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        # overridden by the evaluation's own generate call (do_sample=False, num_beams=1, max_new_tokens)
        "do_sample",
        "num_beams",
        "max_length",
        "max_new_tokens",
        # applied only when sampling
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "top_h",
        "epsilon_cutoff",
        "eta_cutoff",
    }
)
"""Generation-config keys that do not change greedy decoding's tokens under the evaluation's ``generate`` call."""


def argmax_is_greedy(model: torch.nn.Module) -> bool:
    """Whether ``generate(do_sample=False, num_beams=1)`` picks the plain argmax of the logits at every step and
    stops only at eos or ``max_new_tokens``."""
    from transformers import GenerationMixin

    config = getattr(model, "generation_config", None)
    if config is None or getattr(type(model), "generate", None) is not GenerationMixin.generate:
        return False
    return set(config.to_diff_dict()) <= GREEDY_NEUTRAL


def decided_tokens(
    argmax: Sequence[int], sure: Sequence[bool], reference: Sequence[int], eos: set[int], max_new_tokens: int
) -> list[int] | None:
    """The tokens greedy decoding generates, if the teacher-forced argmaxes decide them, else None.

    Args:
        argmax: The teacher-forced argmax at the prompt's last position and at each reference answer token after
            it (consecutive positions).
        sure: Per position, whether the argmax leads by more than the rounding margin.
        reference: The reference token at each of these positions (what teacher forcing feeds next).
        eos: Tokens that end an answer.
        max_new_tokens: The generation length limit.
    """
    tokens: list[int] = []
    for token, ok, expected in zip(argmax, sure, reference):
        if not ok:
            return None
        tokens.append(token)
        if token in eos or len(tokens) == max_new_tokens:
            return tokens
        if token != expected:
            return None  # greedy decoding leaves the reference here: its next tokens are unknown
    return None  # the reference ran out before decoding stopped


def decided_answers(
    module: TLQModule,
    encoded: Sequence[dict[str, Tensor]],
    logits: Tensor,
    targets: Tensor,
    rows: Tensor,
    max_new_tokens: int,
) -> list[str | None]:
    """Per sample of a batch, its greedy answer where the teacher-forced logits decide it (else None).

    Args:
        module: The model.
        encoded: The batch's samples (:func:`lightning_tlq.data.encode_sample`).
        logits, targets, rows: :func:`~lightning_tlq.eval_forward._answer_logits` of the batch (right-padded, in
            this order).
        max_new_tokens: The generation length limit.
    """
    if not argmax_is_greedy(module.model) or has_activation_quant(module.model) or logits.shape[-1] < 2:
        return [None] * len(encoded)
    top = logits.topk(2, dim=-1).values
    dtype = getattr(module.model, "dtype", torch.float32)
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    sure = (top[:, 0] - top[:, 1] > MARGIN_ULPS * eps * top[:, 0].abs().clamp_min(1.0)).tolist()
    argmax, reference, rows_list = logits.argmax(-1).tolist(), targets.tolist(), rows.tolist()
    eos, tokenizer = eos_ids(module), module.processor.tokenizer
    answers: list[str | None] = []
    start = 0
    for row, item in enumerate(encoded):
        count = rows_list.count(row)
        positions = (item["labels"][0, 1:] != IGNORE_INDEX).nonzero().flatten().tolist()
        run = next((k for k, p in enumerate(positions) if p != positions[0] + k), len(positions))  # consecutive
        span = slice(start, start + run)
        tokens = decided_tokens(argmax[span], sure[span], reference[span], eos, max_new_tokens)
        answers.append(None if tokens is None else tokenizer.decode(tokens, skip_special_tokens=True).strip())
        start += count
    return answers


def greedy_predictions(
    module: TLQModule, encoded: Sequence[dict[str, Tensor]], decided: Sequence[str | None], max_new_tokens: int
) -> list[str]:
    """The greedy answers of a batch: those ``decided`` (:func:`decided_answers`) as they are, the others (None)
    generated in one ``generate`` call."""
    answers = list(decided)
    rest = [i for i, answer in enumerate(answers) if answer is None]
    if rest:
        for i, answer in zip(rest, greedy_answers(module, [encoded[i] for i in rest], max_new_tokens)):
            answers[i] = answer
    return [str(answer) for answer in answers]
