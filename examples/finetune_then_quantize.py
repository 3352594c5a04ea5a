"""Fine-tune the embedded tiny VLM for a few steps on synthetic data, then quantize it with ``TLQCallback``.

Runs on a laptop CPU in seconds::

    python examples/finetune_then_quantize.py              # 1 process
    python examples/finetune_then_quantize.py --devices 2  # 2 CPU processes (ddp_spawn, gloo)

(The tiny LLaVA has parameters the loss does not use, hence DDP's ``find_unused_parameters``.)

The LightningModule is an ordinary fine-tuning module; to be quantized by ``TLQCallback`` it only exposes the Hugging
Face model as ``self.model`` and its processor as ``self.processor``. The datamodule provides
``calibration_dataloader()`` (``CalibrationDataModule`` does). After ``trainer.fit`` the callback calibrates the
fine-tuned weights in place (``on_fit_end``), logs per-layer metrics to the Trainer's logger and writes a
``from_pretrained``-loadable copy with ``tlq_report.json`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_tlq import CalibrationDataModule, QuantArgs, TLQCallback
from lightning_tlq.adapters import get_adapter
from lightning_tlq.models import build_tiny_vlm
from lightning_tlq.report import REPORT_NAME, format_summary


class FineTuneVLM(pl.LightningModule):
    """Supervised fine-tuning of a tiny VLM on image-question-answer batches (loss on the answer tokens only)."""

    def __init__(self, family: str = "llava", lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model, self.processor = build_tiny_vlm(family)  # TLQCallback's contract: `model` and `processor`
        self.model.train()
        self.adapter = get_adapter(self.model)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**self.adapter.forward_inputs(batch), labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune, quantize, and return ``{"report", "log_dir", "module"}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava", choices=["llava", "qwen2_vl"])
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group_size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="ddp_spawn_find_unused_parameters_true", help="used if devices > 1")
    parser.add_argument("--output_dir", default="tlq_finetuned")
    parser.add_argument("--log_dir", default="logs")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    pl.seed_everything(0, verbose=False)
    module = FineTuneVLM(args.family, args.lr)
    data = CalibrationDataModule(num_samples=args.num_samples, batch_size=args.batch_size)
    tlq = TLQCallback(
        quant=QuantArgs(bits=args.bits, group_size=args.group_size), output_dir=args.output_dir, overwrite=True
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        logger=CSVLogger(args.log_dir, name="finetune_then_quantize"),
        callbacks=[tlq],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    # with ddp_spawn the callback ran in the workers: read what rank 0 wrote
    with open(os.path.join(args.output_dir, REPORT_NAME)) as file:
        report = json.load(file)
    if trainer.is_global_zero:
        print(format_summary(report))
    return {"report": report, "log_dir": trainer.logger.log_dir, "module": module}


if __name__ == "__main__":
    main()
