"""What ``lightning-tlq calibrate`` runs: :func:`calibrate` loads a Hugging Face VLM and its data by name, shards
the batches over the Fabric ranks and hands them to :class:`~lightning_tlq.pipeline.Calibration`, which does the
work and writes the result. Import it as ``lightning_tlq.calibrate.calibrate`` (``calibrate.py`` is also the
Fabric entry script)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from lightning_tlq.config import DataArgs, ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.data import collate
from lightning_tlq.datamodule import encode_samples, load_samples
from lightning_tlq.distributed import shard_batches
from lightning_tlq.export import export_format
from lightning_tlq.launch import build_fabric, run_on_ranks
from lightning_tlq.models.scenes import model_task
from lightning_tlq.models.tiny import DEFAULT_MODEL
from lightning_tlq.module import TLQModule
from lightning_tlq.output_lock import locks_output_dir
from lightning_tlq.pipeline import Calibration
from lightning_tlq.preflight import (
    check_finite_weights,
    check_output_space,
    check_quantizable,
    load_processor_for,
    model_max_length,
    model_on_meta,
    resolve_max_length,
)
from lightning_tlq.progress import CalibrationProgress
from lightning_tlq.report import check_output_dir, default_output_dir
from lightning_tlq.resume import LayerCheckpoint, partial_dir, prepare_partial_dir
from lightning_tlq.settings import CalibrationSettings


@locks_output_dir(lambda args: args["output_dir"] or default_output_dir(args["model"], args["quant"]))
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
    weighted_metrics: bool = False,
    seed: int = 0,
    quiet: bool = False,
    export: bool = False,
    callbacks: Sequence[Any] = (),
    revision: str | None = None,
    trust_remote_code: bool = False,
    save_dtype: str | None = None,
) -> dict[str, Any]:
    """Calibrate a VLM's language model (with ``quant.vision`` also its vision tower) and save it.

    The saved ``config.json`` records the scheme under ``tlq_quantization``; with ``quant.act_bits`` set, evaluate
    the saved model with :func:`lightning_tlq.actquant.apply_saved_activation_quant` applied.

    Args:
        model: the embedded trained ``scenes-llava`` (default), a built-in random tiny model (``tiny-llava``,
            ``tiny-qwen2_vl``), a local Hugging Face model directory or a hub id (through the Hugging Face cache).
        data: calibration data (default: the calibration split of the task the model was trained on; the scenes
            task for ``scenes-llava``, the synthetic shapes set for the tiny models).
        quant, importance, token_set, memory, metrics, weighted_metrics: the
            :class:`~lightning_tlq.settings.CalibrationSettings` of the run.
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
        seed: global seed.
        quiet: no progress bars and no summary.
        export: also write the compressed-tensors checkpoint (what ``lightning-tlq export`` writes) to
            ``output_dir/packed``, in the same atomic step.
        callbacks: more Fabric callbacks observing the run
            (:class:`~lightning_tlq.observers.CalibrationObserver` hooks).
        revision: branch, tag or commit of a hub id (default ``main``).
        trust_remote_code: run the model repository's own code (``from_pretrained``'s flag).
        save_dtype: save the model in this dtype (codes kept, scales rounded to it, weights re-derived from the
            codes: :func:`lightning_tlq.savedtype.cast_for_save`); None = in ``dtype``.

    Returns:
        The report (also written to ``output_dir/tlq_report.json``).
    """
    output_dir = output_dir or default_output_dir(model, quant)
    check_output_dir(output_dir, overwrite)
    settings = CalibrationSettings(quant, importance, token_set, memory, metrics, weighted_metrics)
    if export:  # fail before calibrating if the format cannot hold these settings
        export_format(quant.spec, quant.act_bits)
    layer_checkpoint = None
    if checkpoint:
        prepare_partial_dir(output_dir, resume=resume, overwrite=overwrite)
        fingerprint = {"model": str(model), "data": asdict(data), "dtype": dtype, "seed": seed}
        fingerprint.update(revision=revision, trust_remote_code=trust_remote_code)
        layer_checkpoint = LayerCheckpoint(
            partial_dir(output_dir), {**fingerprint, **settings.result_settings()}, resume
        )
    observers = [CalibrationProgress(not quiet), *([layer_checkpoint] if layer_checkpoint else []), *callbacks]
    fabric = build_fabric(accelerator, devices, num_nodes, strategy, loggers, observers)
    pipeline = Calibration(
        settings,
        output_dir=output_dir,
        overwrite=overwrite,
        export=export,
        checkpoint=layer_checkpoint,
        quiet=quiet,
        save_dtype=save_dtype,
    )
    source = (model, revision, trust_remote_code)
    return run_on_ranks(fabric, _main, pipeline, source, data, dtype, seed)


def rank_batches(
    encoded: Sequence[dict[str, torch.Tensor]], batch_size: int, pad_token_id: int, world_size: int = 1, rank: int = 0
) -> list[dict[str, torch.Tensor]]:
    """This rank's collated calibration batches, each with its samples' global ``sample_id`` (which keys the token
    set's random draws): global batches, whole batches per rank, so the batches are identical for any number of
    ranks."""
    batches = []
    for ids in shard_batches(len(encoded), batch_size, world_size, rank):
        batch = collate([encoded[i] for i in ids], pad_token_id)
        batches.append({**batch, "sample_id": torch.tensor(list(ids))})
    return batches


def _main(
    fabric: Any, pipeline: Calibration, source: tuple[str, str | None, bool], data: DataArgs, dtype: str, seed: int
) -> dict[str, Any]:
    model, revision, trust_remote_code = source  # a hub id: config and processor files now, weights at load
    fabric.seed_everything(seed, verbose=False)
    _cap_gpu_memory(fabric.device, pipeline.settings.memory.max_gpu_memory_gib)
    # Fail fast: structure (meta device, no weights), then data, before the weights are loaded.
    structure = model_on_meta(*source)
    check_quantizable(structure, pipeline.settings.quant)
    limit = resolve_max_length(data.max_length, model_max_length(structure))
    samples = load_samples(data, model_task(structure.config))
    # Every rank validates every sample: a bad one then fails all ranks alike instead of leaving the others waiting.
    encoded = encode_samples(load_processor_for(*source), samples, limit)
    quant, out = pipeline.settings.quant, pipeline.output_dir  # room for output and checkpoint, before the weights
    check_output_space(
        out, structure, quant, dtype, encoded, data.batch_size, pipeline.export, checkpoint=pipeline.checkpoint
    )
    module = TLQModule(model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    module.configure_model()
    check_finite_weights(module.model)
    batches = rank_batches(encoded, data.batch_size, module.adapter.pad_token_id, fabric.world_size, fabric.global_rank)
    extra = {"data": asdict(data), "dtype": dtype, "revision": revision, "trust_remote_code": trust_remote_code}
    extra["save_dtype"] = pipeline.save_dtype or dtype
    report = pipeline.run(fabric, module, batches, model_name=model, extra_settings=extra)
    for logger in fabric.loggers:
        logger.finalize("success")
    return report


def _cap_gpu_memory(device: torch.device, gib: float | None) -> None:
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)
