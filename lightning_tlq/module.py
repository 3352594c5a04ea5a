"""The LightningModule that wraps a Hugging Face VLM for calibration."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_tlq.adapters import VLMAdapter, get_adapter
from lightning_tlq.adapters.vision import vision_adapter
from lightning_tlq.importance import enable_activation_grads
from lightning_tlq.losses import answer_loss, check_has_answer
from lightning_tlq.models.tiny import DEFAULT_MODEL, resolve_model


class TLQModule(pl.LightningModule):
    """A frozen HF vision-language model whose loss is the SFT loss on answer tokens.

    Args:
        model_name_or_path: ``scenes-llava`` (the embedded model), ``tiny-llava``, ``tiny-qwen2_vl``, a local
            model directory or a hub id (through the Hugging Face cache, as ``from_pretrained``).
        dtype: ``float32``, ``bfloat16``, ``float16``; ``auto`` computes in float32, saves in the checkpoint's dtype.
        revision: branch, tag or commit of a hub id (default ``main``).
        trust_remote_code: run the model repository's own code (``from_pretrained``'s flag).
        allow_pickle: load pickle weight files (``pytorch_model.bin``; unpickling can run code).

    The model is built in :meth:`configure_model` (once), all weights have ``requires_grad=False``, and
    :meth:`sft_loss` makes activation gradients available for importance collection.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        dtype: str = "float32",
        revision: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
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
        hp = self.hparams
        model, processor = resolve_model(hp.model_name_or_path, hp.dtype, hp.revision, hp.trust_remote_code)
        self.attach(model, processor)

    def attach(self, model: Any, processor: Any) -> TLQModule:
        """Use an already-built HF model and processor (e.g. from an existing Lightning project)."""
        model.eval().requires_grad_(False)
        self.model, self.processor = model, processor
        self.adapter = get_adapter(model)
        return self

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The SFT loss per answer token, logged as ``val_loss`` (lets ``TLQCallback(trigger="validate")`` run on a
        ``TLQModule`` with ``trainer.validate``)."""
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = self.sft_loss(batch).detach() / max(tokens, 1)
        self.log("val_loss", loss, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits of the wrapped model for a collated batch."""
        return self.model(**self.adapter.forward_inputs(batch)).logits

    def sft_loss(self, batch: dict[str, Tensor], vision_grads: bool = False, draw_ids: Tensor | None = None) -> Tensor:
        """Next-token cross-entropy summed over answer tokens (``labels != -100``).

        A sum (not a mean) keeps each token's gradient independent of how many answer tokens share its batch.
        With ``vision_grads`` the vision tower's patch embeddings also start a differentiable path, so the
        backward pass continues into the vision layers (for vision-tower importance). With ``draw_ids`` (the
        batch's global sample ids) the scored next tokens are drawn from the model's own distribution
        (``importance.labels="model"``, :func:`lightning_tlq.losses.model_draws`).
        """
        check_has_answer(batch["labels"])
        extra = [vision_adapter(self.adapter).vision_embedding()] if vision_grads else []
        handle = enable_activation_grads(self.model, extra)
        try:
            logits = self(batch)
        finally:
            handle.remove()
        return answer_loss(logits, batch["labels"], draw_ids)
