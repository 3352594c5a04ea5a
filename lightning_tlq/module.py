"""The LightningModule that wraps a Hugging Face VLM for calibration."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor

from lightning_tlq.adapters import VLMAdapter, get_adapter
from lightning_tlq.adapters.vision import vision_adapter
from lightning_tlq.importance import enable_activation_grads
from lightning_tlq.models.tiny import DEFAULT_MODEL, resolve_model


class TLQModule(pl.LightningModule):
    """A frozen HF vision-language model whose loss is the SFT loss on answer tokens.

    Args:
        model_name_or_path: a local Hugging Face model directory, the embedded trained ``scenes-llava`` (default),
            or a built-in random tiny model (``tiny-llava``, ``tiny-qwen2_vl``).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (the command line's default ``auto`` computes in float32 and
            saves in the checkpoint's dtype, see :mod:`lightning_tlq.savedtype`).
        allow_pickle: Load pickle weight files (``pytorch_model.bin``) when a directory has no safetensors;
            refused by default because unpickling can run code (see :func:`lightning_tlq.errors.check_weight_files`).

    The model is built in :meth:`configure_model` (once), all weights have ``requires_grad=False``, and
    :meth:`sft_loss` makes activation gradients available for importance collection.
    """

    def __init__(
        self, model_name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", allow_pickle: bool = False
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: Any = None
        self.processor: Any = None
        self.adapter: VLMAdapter | None = None

    def configure_model(self) -> None:
        """Build (or load) the HF model and processor once; freeze the weights."""
        if self.model is not None:
            return
        model, processor = resolve_model(self.hparams.model_name_or_path, dtype=self.hparams.dtype)
        self.attach(model, processor)

    def attach(self, model: Any, processor: Any) -> TLQModule:
        """Use an already-built HF model and processor (e.g. from an existing Lightning project)."""
        model.eval().requires_grad_(False)
        self.model, self.processor = model, processor
        self.adapter = get_adapter(model)
        return self

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits of the wrapped model for a collated batch."""
        return self.model(**self.adapter.forward_inputs(batch)).logits

    def sft_loss(self, batch: dict[str, Tensor], vision_grads: bool = False) -> Tensor:
        """Next-token cross-entropy summed over answer tokens (``labels != -100``).

        A sum (not a mean) keeps each token's gradient independent of how many answer tokens share its batch.
        With ``vision_grads`` the vision tower's patch embeddings also start a differentiable path, so the
        backward pass continues into the vision layers (for vision-tower importance).
        """
        check_has_answer(batch["labels"])
        extra = [vision_adapter(self.adapter).vision_embedding()] if vision_grads else []
        handle = enable_activation_grads(self.model, extra)
        try:
            logits = self(batch)
        finally:
            handle.remove()
        return answer_loss(logits, batch["labels"])


def check_has_answer(labels: Tensor) -> None:
    """Raise if no position carries a label (the SFT loss, hence the importance, would be empty)."""
    if not (labels[:, 1:] != -100).any():
        raise ValueError("The batch has no answer tokens (all labels are -100): importance needs an answer.")


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy summed over the positions whose label is not -100 (fp32)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def answer_loss_from_hidden(head: Any, hidden: Tensor, labels: Tensor) -> Tensor:
    """:func:`answer_loss` of ``head(hidden)``, with the head applied only where a next-token label exists.

    The loss (and its gradient, zero elsewhere) is the same; the logits are ``[answer tokens, vocab]`` instead of
    ``[B, S, vocab]``: for a 152k vocabulary and batches of 8 x 514 tokens that is 2.5 GB of float32 logits less.
    ``head`` must act on each position independently (final norm + LM head).
    """
    target = labels[:, 1:]
    keep = target != -100
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep], reduction="sum")
