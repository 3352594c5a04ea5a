"""The forward passes of the evaluation: answer-position logits (teacher forced), a reference model's logits kept
for many runs, and batched greedy answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.data import IGNORE_INDEX, Sample, collate, prompt_inputs
from lightning_tlq.eval_models import _device, _pad_id
from lightning_tlq.module import TLQModule


@dataclass
class ReferenceLogits:
    """A reference model's logits at every answer position of a list of samples (teacher-forced).

    Attributes:
        logits: Per sample, ``[answer_tokens, vocab]`` float32 logits at the positions that predict its answer
            tokens, in order (CPU).
        model: What the reference is, for reports (e.g. its path).
    """

    logits: list[Tensor]
    model: str | None = None

    @property
    def vocab_size(self) -> int:
        """Number of logits per position."""
        return int(self.logits[0].shape[-1])


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _answer_logits(module: TLQModule, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forced float32 logits at the answer positions of a right-padded batch.

    Returns:
        ``logits [N, V]`` (sample 0's answer tokens in order, then sample 1's, ...), their ``targets [N]`` and
        the batch row of each ``[N]``, on the module's device.
    """
    batch = _to(batch, _device(module))
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    logits = module.model(**module.adapter.forward_inputs(batch), logits_to_keep=keep).logits
    if logits.shape[1] == batch["input_ids"].shape[1]:  # a model that ignores logits_to_keep
        logits = logits[:, keep]
    targets = targets[:, keep]
    mask = targets != IGNORE_INDEX
    return logits[mask].float(), targets[mask], mask.nonzero()[:, 0]


def _answer_counts(encoded: Sequence[dict[str, Tensor]]) -> list[int]:
    return [int((item["labels"][:, 1:] != IGNORE_INDEX).sum()) for item in encoded]


def _encode(module: TLQModule, samples: Sequence[Sample]) -> list[dict[str, Tensor]]:
    from lightning_tlq.datamodule import encode_samples
    from lightning_tlq.preflight import model_max_length

    return encode_samples(module.processor, samples, model_max_length(module.model))


@torch.no_grad()
def reference_logits(
    reference: TLQModule,
    samples: Sequence[Sample],
    *,
    encoded: Sequence[dict[str, Tensor]] | None = None,
    batch_size: int = 8,
    name: str | None = None,
) -> ReferenceLogits:
    """Run the reference model once over the samples and keep its logits at the answer positions.

    Args:
        reference: The full-precision model (e.g. :func:`load_module`).
        samples: The evaluation samples.
        encoded: Their encodings (default: encoded with ``reference.processor``).
        batch_size: Samples per forward.
        name: What the reference is, for reports.

    Returns:
        Per-sample ``[answer_tokens, vocab]`` float32 logits on the CPU, for :func:`evaluate_model`.
    """
    _check_module(reference)
    encoded = list(encoded) if encoded is not None else _encode(reference, samples)
    _check_lengths(samples, encoded, batch_size)
    pad, out = _pad_id(reference), []
    for start in range(0, len(encoded), batch_size):
        items = encoded[start : start + batch_size]
        logits, _, _ = _answer_logits(reference, collate(items, pad))
        out += list(logits.cpu().split(_answer_counts(items)))
    return ReferenceLogits(out, name or str(reference.hparams.model_name_or_path))


@torch.no_grad()
def greedy_answers(module: TLQModule, encoded: Sequence[dict[str, Tensor]], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of encoded samples in one ``generate`` call on their left-padded prompts.

    The same tokens as one ``generate`` call per sample (left padding keeps every prompt's positions: the
    attention mask gives the position ids, M-RoPE included); generation stops at the first eos.
    """
    tokenizer, pad = module.processor.tokenizer, _pad_id(module)
    batch = _to(collate([prompt_inputs(item) for item in encoded], pad, padding_side="left"), _device(module))
    out = module.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
    eos = eos_ids(module)
    answers = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def eos_ids(module: TLQModule) -> set[int]:
    """The tokens that end a greedy answer: the generation config's eos ids, else the tokenizer's."""
    eos = module.model.generation_config.eos_token_id
    return {module.processor.tokenizer.eos_token_id} if eos is None else set(eos if isinstance(eos, list) else [eos])


def _check_module(module: Any) -> None:
    if not isinstance(module, TLQModule) or module.model is None:
        raise TypeError("Pass a TLQModule holding a model: TLQModule().attach(model, processor) or load_module(path).")


def _check_lengths(samples: Sequence[Sample], encoded: Sequence[Any], batch_size: int) -> None:
    if not samples:
        raise ValueError("No samples: there is nothing to evaluate.")
    if len(encoded) != len(samples):
        raise ValueError(f"Got {len(samples)} samples but {len(encoded)} encodings; pass one encoding per sample.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
