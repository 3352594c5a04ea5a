"""``lightning-tlq calibrate``: TLQ calibration of a Hugging Face VLM with Fabric, written to disk.

Also a Fabric entry script: ``fabric run ... <package dir>/calibrate.py --config FILE`` or
``torchrun ... -m lightning_tlq.calibrate --config FILE`` (see ``examples/multinode/``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_tlq.actquant import CONFIG_KEY, quantization_config
from lightning_tlq.adapters.vision import vision_adapter
from lightning_tlq.config import DataArgs, ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs, importance_for
from lightning_tlq.data import collate
from lightning_tlq.datamodule import encode_samples, load_samples
from lightning_tlq.distributed import Collective, shard_batches
from lightning_tlq.export import PACKED_DIRNAME, export_format, save_qparams, write_packed
from lightning_tlq.importance import TokenImportance
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.scenes import model_task
from lightning_tlq.models.tiny import DEFAULT_MODEL
from lightning_tlq.module import TLQModule
from lightning_tlq.preflight import (
    check_batches,
    check_finite_weights,
    check_quantizable,
    load_processor_for,
    model_max_length,
    model_on_meta,
    resolve_max_length,
)
from lightning_tlq.progress import CalibrationProgress
from lightning_tlq.report import (
    atomic_output_dir,
    check_output_dir,
    default_output_dir,
    format_summary,
    summarize,
    write_report,
)
from lightning_tlq.resume import LayerCheckpoint, partial_dir, prepare_partial_dir
from lightning_tlq.savedtype import cast_for_save


def calibrate(
    model: str = DEFAULT_MODEL,
    data: DataArgs = DataArgs(),
    quant: QuantArgs = QuantArgs(),
    importance: ImportanceArgs = ImportanceArgs(),
    token_set: TokenSetArgs = TokenSetArgs(),
    memory: MemoryArgs = MemoryArgs(),
    output_dir: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint: bool = True,
    dtype: str = "float32",
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    loggers: Sequence[Any] | None = None,
    metrics: bool = True,
    seed: int = 0,
    quiet: bool = False,
    export: bool = False,
    save_dtype: str | None = None,
) -> dict[str, Any]:
    """Calibrate a VLM's language model (with ``quant.vision`` also its vision tower) with TLQ and save it.

    ``method`` ``rtn``, ``gptq``, ``awq``, ``smoothquant`` and ``mbq`` are the baselines (``mbq`` always collects
    ``grad_abs`` importance, see :func:`~lightning_tlq.config.importance_for`). The saved ``config.json`` records
    the scheme under ``tlq_quantization``; with ``quant.act_bits`` set, evaluate the saved model with
    :func:`lightning_tlq.actquant.apply_saved_activation_quant` applied.

    Args:
        model: a local Hugging Face model directory, the embedded trained ``scenes-llava`` (default), or a built-in
            random tiny model: ``tiny-llava``, ``tiny-qwen2_vl``.
        data: calibration data (default: the calibration split of the task the model was trained on; the scenes
            task for ``scenes-llava``, the synthetic shapes set for the tiny models).
        quant: quantization settings, incl. ``method``.
        importance: token importance settings.
        token_set: token-level calibration set settings.
        memory: where weights and activations live (layer-wise offload, activation offload, GPU memory cap).
        output_dir: where the quantized model (``from_pretrained``-loadable) and ``tlq_report.json`` go; default
            ``tlq_out/<model>-<method>-w<bits>a<act bits>-g<group>`` (:func:`~lightning_tlq.report.run_name`).
        overwrite: replace ``output_dir`` (and discard the checkpoint of an interrupted run) if it exists and is a
            lightning-tlq output; any other directory is left alone.
        resume: continue an interrupted run from its checkpoint ``<output_dir>.partial/`` (same settings).
        checkpoint: after every layer, save the loop state to ``<output_dir>.partial/`` so that ``resume`` can
            continue after a crash; removed once the output is written.
        dtype: dtype the model runs in: ``float32``, ``bfloat16`` or ``float16``.
        accelerator: Fabric accelerator (``auto``, ``cpu``, ``cuda``).
        devices: processes per node (or device indices); calibration samples are sharded over all processes.
        num_nodes: nodes (launch the same command on each, e.g. with ``torchrun`` or ``fabric run``).
        strategy: Fabric strategy (``auto`` = ``ddp`` on several processes; ``ddp_spawn`` for notebooks/tests).
        loggers: Lightning loggers (e.g. ``CSVLogger``) that receive per-layer metrics.
        metrics: report every module's weighted and plain relative output error (costs extra statistics).
        seed: global seed.
        quiet: no progress bars and no summary.
        export: also write the compressed-tensors checkpoint (what ``lightning-tlq export`` writes) to
            ``output_dir/packed``, in the same atomic step.
        save_dtype: save the model in this dtype (codes kept, scales rounded to it, weights re-derived from the
            codes: :func:`lightning_tlq.savedtype.cast_for_save`); None = in ``dtype``.

    Returns:
        The report (also written to ``output_dir/tlq_report.json``).
    """
    output_dir = output_dir or default_output_dir(model, quant)
    check_output_dir(output_dir, overwrite)
    importance = importance_for(quant, importance)
    if export:  # fail before calibrating if the format cannot hold these settings
        export_format(quant.spec, quant.act_bits)
    callbacks: list[Any] = [TokenImportance(importance.score, importance.groups), CalibrationProgress(not quiet)]
    if checkpoint:
        prepare_partial_dir(output_dir, resume=resume, overwrite=overwrite)
        settings = _settings(model, data, quant, importance, token_set, dtype, metrics, seed)
        callbacks.append(LayerCheckpoint(partial_dir(output_dir), settings, resume=resume))
    fabric = build_fabric(accelerator, devices, num_nodes, strategy, loggers, callbacks)
    args = (model, data, quant, importance, token_set, memory, output_dir, overwrite, dtype, metrics, seed, quiet)
    if os.environ.get("LT_CLI_USED"):  # under `fabric run` the processes already exist
        return _main(fabric, *args, export=export, save_dtype=save_dtype)
    return fabric.launch(_main, *args, export=export, save_dtype=save_dtype)


def build_fabric(
    accelerator: str, devices: Any, num_nodes: int, strategy: str, loggers: Any = None, callbacks: Any = None
) -> Any:
    """A Fabric for our entry points; under ``fabric run`` (``LT_CLI_USED``) the launcher's flags rule."""
    from lightning.fabric import Fabric

    common = {"loggers": list(loggers or []), "callbacks": list(callbacks or [])}
    if os.environ.get("LT_CLI_USED"):
        # `fabric run` already chose accelerator, devices and nodes (LT_* variables) and started the processes;
        # passing our own values as well would conflict with its flags.
        return Fabric(**common)
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, **common)


def _main(
    fabric: Any,
    model: str,
    data: DataArgs,
    quant: QuantArgs,
    importance: ImportanceArgs,
    token_set: TokenSetArgs,
    memory: MemoryArgs,
    output_dir: str,
    overwrite: bool,
    dtype: str,
    metrics: bool,
    seed: int,
    quiet: bool,
    export: bool = False,
    save_dtype: str | None = None,
) -> dict[str, Any]:
    start = time.perf_counter()
    fabric.seed_everything(seed, verbose=False)
    _cap_gpu_memory(fabric.device, memory.max_gpu_memory_gib)
    # Fail fast: structure (meta device, no weights), then data, before the weights are loaded.
    structure = model_on_meta(model)
    check_quantizable(structure, quant)
    limit = resolve_max_length(data.max_length, model_max_length(structure))
    samples = load_samples(data, model_task(structure.config))
    shard = shard_batches(len(samples), data.batch_size, fabric.world_size, fabric.global_rank)
    # Every rank validates every sample: a bad one then fails all ranks alike instead of leaving the others waiting.
    encoded = encode_samples(load_processor_for(model), samples, limit)
    module = TLQModule(model, dtype=dtype)
    module.configure_model()
    check_finite_weights(module.model)
    batches = []  # global batches, whole batches per rank: identical batches for any number of ranks
    for ids in shard:
        encoded_batch = collate([encoded[i] for i in ids], module.adapter.pad_token_id)
        batches.append({**encoded_batch, "sample_id": torch.tensor(list(ids))})
    check_batches(batches)

    loop = CalibrationLoop(fabric, module, quant, importance, token_set, memory=memory, metrics=metrics)
    checkpoint = next((c for c in fabric._callbacks if isinstance(c, LayerCheckpoint)), None)
    try:
        records = loop.run(batches)
    except BaseException as err:
        if checkpoint is not None:
            checkpoint.on_failure(fabric, err)
        raise
    module.model.to("cpu")
    if save_dtype is not None:  # computed in `dtype` (float32), saved in the checkpoint's dtype
        cast_for_save(module.model, module.adapter, loop.results, quant.spec, save_dtype)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    targets = module.adapter.target_module_names()
    if quant.vision:
        targets = vision_adapter(module.adapter).vision_target_module_names() + targets
    record = quantization_config(quant, targets)
    setattr(module.model.config, CONFIG_KEY, record)  # saved in config.json; see actquant.apply_saved_...
    report = {
        "model": model,
        "output_dir": str(Path(output_dir).resolve()),
        "settings": {
            "quant": asdict(quant),
            "importance": asdict(importance),
            "token_set": asdict(token_set),
            "data": asdict(data),
            "memory": asdict(memory),
            "dtype": dtype,
            "save_dtype": save_dtype or dtype,
            "world_size": fabric.world_size,
            "device": str(fabric.device),
        },
        "data": {"samples": len(samples), "tokens": int(loop.collective.all_reduce(torch.tensor([tokens])).item())},
        "quantization": record,
        "summary": summarize(records),
        "vision": {"layers": loop.vision_records, "summary": summarize(loop.vision_records)} if quant.vision else None,
        "seconds": {**loop.phase_seconds},
        "peak_gpu_memory_gib_per_rank": _peak_memory(fabric.device, loop.collective),
        "resumed_from_layer": loop.start_layer,
        "layers": records,
    }
    if fabric.is_global_zero:
        try:
            with atomic_output_dir(output_dir, overwrite) as tmp:
                module.model.save_pretrained(tmp)
                module.processor.save_pretrained(tmp)
                save_qparams(tmp, module.model, module.adapter, loop.results, quant)
                report["seconds"]["total"] = time.perf_counter() - start
                write_report(report, tmp)
                if export:
                    (tmp / PACKED_DIRNAME).mkdir()
                    packed = write_packed(tmp, tmp / PACKED_DIRNAME)
                    report["export"] = {"dir": f"{report['output_dir']}/{PACKED_DIRNAME}", **packed}
                    write_report(report, tmp)
        except BaseException as err:
            if checkpoint is not None:
                checkpoint.on_failure(fabric, err)
            raise
        if not quiet:
            print(format_summary(report))
            if export:
                size = packed["bytes"] / 2**20
                print(f"packed {packed['format']} checkpoint ({size:.1f} MiB): {report['export']['dir']}")
    fabric.barrier()
    if checkpoint is not None:
        checkpoint.remove(fabric)
    for logger in fabric.loggers:
        logger.finalize("success")
    return report


def _cap_gpu_memory(device: torch.device, gib: float | None) -> None:
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)


def _peak_memory(device: torch.device, collective: Collective) -> list[float] | None:
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], dtype=torch.float64)
    return [round(v, 3) for v in collective.gather_cat(peak).tolist()]


def _settings(
    model: str,
    data: DataArgs,
    quant: QuantArgs,
    importance: ImportanceArgs,
    token_set: TokenSetArgs,
    dtype: str,
    metrics: bool,
    seed: int,
) -> dict[str, Any]:
    """Everything that determines the result; a resumed run must match it."""
    return {
        "model": str(model),
        "data": asdict(data),
        "quant": asdict(quant),
        "importance": asdict(importance),
        "token_set": asdict(token_set),
        "dtype": dtype,
        "metrics": metrics,
        "seed": seed,
    }


if __name__ == "__main__":
    from lightning_tlq.cli import main

    main(["calibrate", *__import__("sys").argv[1:]])
