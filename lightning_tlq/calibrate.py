"""``lightning-tlq calibrate``: TLQ calibration of a Hugging Face VLM with Fabric, written to disk.

Also a Fabric entry script: ``fabric run ... lightning_tlq/calibrate.py --config FILE`` or
``torchrun ... -m lightning_tlq.calibrate --config FILE``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_tlq.config import DataArgs, ImportanceArgs, QuantArgs, TokenSetArgs
from lightning_tlq.data import Sample, encode_sample, load_jsonl, make_batches, synthetic_samples
from lightning_tlq.importance import TokenImportance
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.module import TLQModule
from lightning_tlq.report import atomic_output_dir, check_output_dir, format_summary, summarize, write_report


def calibrate(
    model: str = "tiny-llava",
    data: DataArgs = DataArgs(),
    quant: QuantArgs = QuantArgs(),
    importance: ImportanceArgs = ImportanceArgs(),
    token_set: TokenSetArgs = TokenSetArgs(),
    output_dir: str = "tlq_out",
    overwrite: bool = False,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int = 1,
    metrics: bool = True,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Calibrate a VLM's language model with TLQ (or the rtn / gptq baselines) and save it.

    Args:
        model: a local Hugging Face model directory, or a built-in tiny model: ``tiny-llava``, ``tiny-qwen2_vl``.
        data: calibration data (default: the built-in synthetic image-question set).
        quant: quantization settings, incl. ``method``.
        importance: token importance settings.
        token_set: token-level calibration set settings.
        output_dir: where the quantized model (``from_pretrained``-loadable) and ``tlq_report.json`` go.
        overwrite: replace ``output_dir`` if it exists.
        dtype: dtype the model runs in: ``float32``, ``bfloat16`` or ``float16``.
        accelerator: Fabric accelerator (``auto``, ``cpu``, ``cuda``).
        devices: processes per node.
        metrics: report every module's weighted and plain relative output error (costs extra statistics).
        seed: global seed.
        quiet: do not print the summary.

    Returns:
        The report (also written to ``output_dir/tlq_report.json``).
    """
    from lightning.fabric import Fabric

    check_output_dir(output_dir, overwrite)
    fabric = Fabric(
        accelerator=accelerator, devices=devices, callbacks=[TokenImportance(importance.score, importance.groups)]
    )
    args = (model, data, quant, importance, token_set, output_dir, overwrite, dtype, metrics, seed, quiet)
    if os.environ.get("LT_CLI_USED"):  # under `fabric run` the processes already exist
        return _main(fabric, *args)
    return fabric.launch(_main, *args)


def _main(
    fabric: Any,
    model: str,
    data: DataArgs,
    quant: QuantArgs,
    importance: ImportanceArgs,
    token_set: TokenSetArgs,
    output_dir: str,
    overwrite: bool,
    dtype: str,
    metrics: bool,
    seed: int,
    quiet: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    fabric.seed_everything(seed, verbose=False)
    module = TLQModule(model, dtype=dtype)
    module.configure_model()
    samples = _load_samples(data)
    limit = data.max_length or _model_max_length(module.model)
    encoded = [encode_sample(module.processor, s, max_length=limit) for s in samples]
    batches = make_batches(encoded, data.batch_size, module.adapter.pad_token_id)

    loop = CalibrationLoop(fabric, module, quant, importance, token_set, metrics=metrics)
    records = loop.run(batches)
    module.model.to("cpu")
    report = {
        "model": model,
        "output_dir": str(Path(output_dir).resolve()),
        "settings": {
            "quant": asdict(quant),
            "importance": asdict(importance),
            "token_set": asdict(token_set),
            "data": asdict(data),
            "dtype": dtype,
            "world_size": fabric.world_size,
        },
        "data": {"samples": len(samples), "tokens": sum(int(b["attention_mask"].sum()) for b in batches)},
        "summary": summarize(records),
        "seconds": {**loop.phase_seconds},
        "layers": records,
    }
    if fabric.is_global_zero:
        with atomic_output_dir(output_dir, overwrite) as tmp:
            module.model.save_pretrained(tmp)
            module.processor.save_pretrained(tmp)
            report["seconds"]["total"] = time.perf_counter() - start
            write_report(report, tmp)
        if not quiet:
            print(format_summary(report))
    fabric.barrier()
    return report


def _load_samples(data: DataArgs) -> list[Sample]:
    if data.path is None:
        return synthetic_samples(data.num_samples, seed=data.seed)
    samples = load_jsonl(data.path, image_root=data.image_root)
    return samples[: data.num_samples]


def _model_max_length(model: Any) -> int | None:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    from lightning_tlq.cli import main

    main(["calibrate", *__import__("sys").argv[1:]])
