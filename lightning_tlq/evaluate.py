"""``lightning-tlq evaluate``: answer-token SFT loss / perplexity and exact-match accuracy of greedy answers.

Works on any model ``calibrate`` accepts, including its output directory (fake-quantized weights; a recorded W4A8
activation scheme is applied, as at inference), on a JSONL of image-question-answer records or the synthetic set;
writes ``metrics.json``. Samples are sharded over processes
without padding or repetition and the sums are reduced with torchmetrics, so the numbers do not depend on the
number of processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.config import DataArgs
from lightning_tlq.data import IGNORE_INDEX, Sample, collate, prompt_inputs
from lightning_tlq.datamodule import encode_samples, load_samples
from lightning_tlq.module import TLQModule
from lightning_tlq.module import answer_loss as summed_answer_loss
from lightning_tlq.preflight import (
    check_finite_weights,
    load_processor_for,
    model_max_length,
    model_on_meta,
    resolve_max_length,
)
from lightning_tlq.report import atomic_output_dir, check_output_dir

METRICS_NAME = "metrics.json"
_NUM_EXAMPLES = 8


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (what exact match compares)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy over answer tokens (the calibration's SFT loss) and their count."""
    return summed_answer_loss(logits, labels), (labels[:, 1:] != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate_samples(
    module: TLQModule,
    samples: Sequence[Sample],
    encoded: Sequence[dict[str, Tensor]],
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> dict[str, Any]:
    """Loss sums (batched) and greedy answers (one sample at a time) on this process's samples.

    Returns:
        ``torchmetrics`` sum metrics (``loss``, ``tokens``, ``correct``, ``samples``) and this shard's examples.
    """
    from torchmetrics import SumMetric

    sums = {name: SumMetric().to(device) for name in ("loss", "tokens", "correct", "samples")}
    model, processor, adapter = module.model, module.processor, module.adapter
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], adapter.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, tokens = answer_loss(module(batch), batch["labels"])
        sums["loss"].update(loss)
        sums["tokens"].update(tokens.float())
    examples = []
    for sample, item in zip(samples, encoded):
        inputs = {k: v.to(device) for k, v in prompt_inputs(item).items()}
        prompt_len = inputs["input_ids"].shape[1]
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=adapter.pad_token_id
        )
        prediction = processor.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
        correct = normalize_answer(prediction) == normalize_answer(sample.answer)
        sums["correct"].update(torch.tensor(float(correct), device=device))
        sums["samples"].update(torch.tensor(1.0, device=device))
        examples.append({"question": sample.question, "answer": sample.answer, "prediction": prediction})
        examples[-1]["correct"] = correct
    return {"sums": sums, "examples": examples}


def evaluate(
    model: str = "tiny-llava",
    data: DataArgs = DataArgs(),
    output_dir: str = "tlq_eval",
    overwrite: bool = False,
    max_new_tokens: int = 8,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    loggers: Sequence[Any] | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a (quantized) VLM: answer-token SFT loss and perplexity, exact match of greedy answers.

    Args:
        model: a local Hugging Face model directory (e.g. the output of ``calibrate``) or a built-in tiny model.
        data: evaluation data (use held-out samples: another JSONL, or another synthetic ``data.seed``).
        output_dir: where ``metrics.json`` goes.
        overwrite: replace ``output_dir`` if it exists.
        max_new_tokens: greedy generation length per answer.
        dtype: dtype the model runs in.
        accelerator, devices, num_nodes, strategy: Fabric settings.
        loggers: Lightning loggers that receive the metrics (``eval/...``).
        seed: global seed.
        quiet: do not print the summary.

    Returns:
        The metrics (also written to ``output_dir/metrics.json``).
    """
    from lightning_tlq.calibrate import build_fabric

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    check_output_dir(output_dir, overwrite)
    fabric = build_fabric(accelerator, devices, num_nodes, strategy, loggers)
    args = (model, data, output_dir, overwrite, max_new_tokens, dtype, seed, quiet)
    if os.environ.get("LT_CLI_USED"):
        return _main(fabric, *args)
    return fabric.launch(_main, *args)


def _apply_saved_activation_quant(model: Any) -> int | None:
    """Apply a lightning-tlq checkpoint's recorded activation quantization; its bit width (None: weight-only)."""
    from lightning_tlq.actquant import CONFIG_KEY, apply_saved_activation_quant, saved_quantization_config

    if getattr(model.config, CONFIG_KEY, None) is None:
        return None  # not a lightning-tlq output (e.g. the full-precision model)
    activations = saved_quantization_config(model).get("input_activations")
    apply_saved_activation_quant(model)  # forward pre-hooks, kept for the whole evaluation
    return int(activations["num_bits"]) if activations else None


def _main(
    fabric: Any,
    model: str,
    data: DataArgs,
    output_dir: str,
    overwrite: bool,
    max_new_tokens: int,
    dtype: str,
    seed: int,
    quiet: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    fabric.seed_everything(seed, verbose=False)
    limit = resolve_max_length(data.max_length, model_max_length(model_on_meta(model)))
    samples = load_samples(data)
    encoded = encode_samples(load_processor_for(model), samples, limit)
    module = TLQModule(model, dtype=dtype)
    module.configure_model()
    check_finite_weights(module.model)
    act_bits = _apply_saved_activation_quant(module.model)
    module.model.to(fabric.device)
    rank, world = fabric.global_rank, fabric.world_size
    shard = evaluate_samples(
        module,
        samples[rank::world],
        encoded[rank::world],
        batch_size=data.batch_size,
        max_new_tokens=max_new_tokens,
        device=fabric.device,
    )
    totals = {name: float(metric.compute()) for name, metric in shard["sums"].items()}  # reduced over processes
    loss = totals["loss"] / totals["tokens"]
    metrics = {
        "model": model,
        "samples": int(totals["samples"]),
        "answer_tokens": int(totals["tokens"]),
        "sft_loss": loss,
        "perplexity": math.exp(loss),
        "exact_match": totals["correct"] / totals["samples"],
        "activation_bits": act_bits,
        "settings": {"data": asdict(data), "max_new_tokens": max_new_tokens, "dtype": dtype, "world_size": world},
        "examples": shard["examples"][:_NUM_EXAMPLES],
    }
    fabric.log_dict({f"eval/{k}": metrics[k] for k in ("sft_loss", "perplexity", "exact_match")})
    if fabric.is_global_zero:
        metrics["seconds"] = time.perf_counter() - start
        with atomic_output_dir(output_dir, overwrite) as tmp:
            (Path(tmp) / METRICS_NAME).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        if not quiet:
            print(
                f"lightning-tlq evaluate: {model} on {metrics['samples']} samples: answer-token loss "
                f"{loss:.4f} (perplexity {metrics['perplexity']:.3f}), exact match {metrics['exact_match']:.3f}; "
                f"saved to {Path(output_dir).resolve() / METRICS_NAME}"
            )
    fabric.barrier()
    for logger in fabric.loggers:
        logger.finalize("success")
    return metrics
