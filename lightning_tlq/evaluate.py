"""``lightning-tlq evaluate``: exact match of greedy answers (overall and per question type), answer-token NLL and
perplexity, and the KL divergence of the answer distributions to a full-precision reference model.

Works on any model ``calibrate`` accepts, including its output directory (fake-quantized weights; a recorded W4A8
activation scheme is applied, as at inference), on a JSONL of ``{"image", "question", "answer", "kind"?}`` records
or the synthetic set; writes ``metrics.json`` atomically. With ``reference_model`` (e.g. the model that was
quantized) both models run on the same batches, and KL(P_ref || P_model) over the vocabulary is averaged over every
answer token (teacher-forced on the reference answer). Samples are sharded over processes without padding or
repetition; the metrics are torchmetrics states summed over processes, so the numbers do not depend on the
number of processes. The harness itself (batched greedy generation, the metrics) is :mod:`lightning_tlq.harness`.

``metrics.json``: ``model``, ``reference_model``, ``samples``, ``answer_tokens``, ``exact_match``, ``nll``,
``perplexity``, ``kl_to_reference`` (with a reference), ``overall`` (the same plus ``correct``), ``per_type``
(the same per question type; samples without a ``kind`` under ``""``), ``activation_bits``, ``settings``,
``examples`` (the first 8 samples: question, answer, prediction, correct, nll, kl) and ``seconds``.

In process, without a Fabric launch (a benchmark runner evaluating many quantized variants against one
full-precision reference on the same data; the reference's forward runs once)::

    from lightning_tlq.data import load_jsonl
    from lightning_tlq.harness import evaluate_model, load_module, reference_logits

    samples = load_jsonl("eval.jsonl")
    reference = reference_logits(load_module("ckpt/fp"), samples, batch_size=8)
    for path in ("out/w4", "out/w3"):
        metrics = evaluate_model(load_module(path), samples, reference=reference, batch_size=8)

``evaluate_model`` takes any ``TLQModule`` (``TLQModule().attach(model, processor)`` for a model already in
memory) and returns the same dict as ``metrics.json`` minus the run's settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_tlq.config import DataArgs
from lightning_tlq.data import Sample, encode_sample
from lightning_tlq.datamodule import encode_samples, load_samples
from lightning_tlq.harness import (
    NUM_EXAMPLES,
    activation_bits,
    check_reference,
    evaluate_shard,
    load_module,
    normalize_answer,
)
from lightning_tlq.models.scenes import model_task
from lightning_tlq.models.tiny import DEFAULT_MODEL
from lightning_tlq.preflight import load_processor_for, model_max_length, model_on_meta, resolve_max_length
from lightning_tlq.report import METRICS_NAME, atomic_output_dir, check_output_dir, eval_output_dir

__all__ = ["METRICS_NAME", "evaluate", "normalize_answer"]


def evaluate(
    model: str = DEFAULT_MODEL,
    data: DataArgs = DataArgs(),
    output_dir: str | None = None,
    overwrite: bool = False,
    max_new_tokens: int = 8,
    dtype: str = "float32",
    reference_model: str | None = None,
    accelerator: str = "auto",
    devices: int | list[int] = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    loggers: Sequence[Any] | None = None,
    seed: int = 0,
    quiet: bool = False,
    exact_match: str = "greedy",
    revision: str | None = None,
    trust_remote_code: bool = False,
    reference_revision: str | None = None,
) -> dict[str, Any]:
    """Evaluate a (quantized) VLM: exact match per question type, answer-token NLL/perplexity, KL to a reference.

    Args:
        model: a local Hugging Face model directory (e.g. the output of ``calibrate``), the embedded
            ``scenes-llava`` (default), a built-in tiny model or a hub id (through the Hugging Face cache).
        data: evaluation data: a JSONL, or (``data.path`` None) the ``test`` split of the task the model was
            trained on unless ``data.split`` says otherwise (tiny models: the shapes set, held out by another
            ``data.seed``); ``data.batch_size`` samples per forward and per ``generate`` call.
        output_dir: where ``metrics.json`` goes; default beside the model
            (:func:`~lightning_tlq.report.eval_output_dir`: ``<model dir>-eval-<data>[-vs-<reference>]``).
        overwrite: replace ``output_dir`` if it exists and is a lightning-tlq output.
        max_new_tokens: greedy generation length per answer.
        dtype: dtype both models run in.
        reference_model: the full-precision model (same tokenizer and vocabulary) for ``kl_to_reference``.
        accelerator, devices, num_nodes, strategy: Fabric settings.
        loggers: Lightning loggers that receive the metrics (``eval/...``).
        seed: global seed.
        quiet: no progress bar and no summary.
        exact_match: ``greedy`` (generate, compare normalised answers) or ``teacher_forced`` (correct when the
            argmax at every answer position is the reference token; no generation; equal verdicts whenever each
            answer has one tokenization, a lower bound otherwise).
        revision: branch, tag or commit of a hub id ``model``.
        trust_remote_code: run the repositories' own code (``from_pretrained``'s flag), for both models.
        reference_revision: branch, tag or commit of a hub id ``reference_model``.

    Returns:
        The metrics (also written to ``output_dir/metrics.json``).
    """
    from lightning_tlq.launch import build_fabric, run_on_ranks

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if exact_match not in ("greedy", "teacher_forced"):
        raise ValueError(f"exact_match={exact_match!r} is not supported; choose one of greedy, teacher_forced.")
    output_dir = output_dir or eval_output_dir(model, data, reference_model, exact_match)
    check_output_dir(output_dir, overwrite)
    model_source = (model, revision, trust_remote_code)
    reference = (reference_model, reference_revision, trust_remote_code) if reference_model is not None else None
    if reference is not None:
        _reference_structure(*reference)  # a missing or unsupported reference fails before any process starts
    fabric = build_fabric(accelerator, devices, num_nodes, strategy, loggers)
    args = (model_source, reference, data, output_dir, overwrite, max_new_tokens, dtype, seed, quiet, exact_match)
    return run_on_ranks(fabric, _main, *args)


def _reference_structure(reference_model: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    try:
        return model_on_meta(reference_model, revision, trust_remote_code)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"reference_model={reference_model!r}: {err}") from err


def _check_reference(
    model: str, reference: tuple, structure: Any, processor: Any, sample: Sample, item: dict, limit: int | None
) -> None:
    """Same vocabulary, same tokenizer and the same encoding of the first sample, before any weights load."""
    reference_model = reference[0]
    reference_processor = load_processor_for(*reference)
    names = (model, reference_model)
    check_reference(structure, processor, _reference_structure(*reference), reference_processor, names=names)
    theirs = encode_sample(reference_processor, sample, limit)
    if theirs.keys() != item.keys() or any(not torch.equal(theirs[key], item[key]) for key in item):
        raise ValueError(
            f"reference_model {reference_model!r} encodes sample 0 differently from model {model!r} (another chat "
            "template or image processing): both models must read the same inputs."
        )


def _main(
    fabric: Any,
    model_source: tuple[str, str | None, bool],
    reference_source: tuple[str, str | None, bool] | None,
    data: DataArgs,
    output_dir: str,
    overwrite: bool,
    max_new_tokens: int,
    dtype: str,
    seed: int,
    quiet: bool,
    exact_match: str = "greedy",
) -> dict[str, Any]:
    start = time.perf_counter()
    fabric.seed_everything(seed, verbose=False)
    model, revision, trust_remote_code = model_source
    reference_model = reference_source[0] if reference_source is not None else None
    structure = model_on_meta(*model_source)  # a hub id: config and processor files now, weights at load
    limit = resolve_max_length(data.max_length, model_max_length(structure))
    samples = load_samples(data, model_task(structure.config), default_split="test")  # held out, never calibrated
    processor = load_processor_for(*model_source)
    encoded = encode_samples(processor, samples, limit)
    if reference_source is not None:
        _check_reference(model, reference_source, structure, processor, samples[0], encoded[0], limit)
    module = load_module(model, dtype, fabric.device, revision, trust_remote_code)
    reference = None
    if reference_source is not None:
        reference = load_module(reference_model, dtype, fabric.device, *reference_source[1:])
    rank, world = fabric.global_rank, fabric.world_size
    shard = evaluate_shard(
        module, samples[rank::world], encoded[rank::world], reference=reference,
        kinds=sorted({s.kind for s in samples}), indices=range(rank, len(samples), world),
        batch_size=data.batch_size, max_new_tokens=max_new_tokens, progress=not quiet and fabric.is_global_zero,
        exact_match=exact_match,
    )  # fmt: skip
    result = shard.metrics.compute()  # reduced over processes
    metrics = {
        "model": model,
        "reference_model": reference_model,
        **result,
        "activation_bits": activation_bits(module.model),
        "settings": {
            "data": asdict(data),
            "max_new_tokens": max_new_tokens,
            "dtype": dtype,
            "world_size": world,
            "exact_match": exact_match,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "reference_revision": reference_source[1] if reference_source else None,
        },  # fmt: skip
        "examples": _first_records(fabric, shard.records, NUM_EXAMPLES),
    }
    fabric.log_dict(_logged(result))
    if fabric.is_global_zero:
        metrics["seconds"] = {**shard.seconds, "total": time.perf_counter() - start}  # this process
        with atomic_output_dir(output_dir, overwrite) as tmp:
            (Path(tmp) / METRICS_NAME).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        if not quiet:
            print(_summary_line(metrics, Path(output_dir).resolve() / METRICS_NAME))
    fabric.barrier()
    for logger in fabric.loggers:
        logger.finalize("success")
    return metrics


def _first_records(fabric: Any, records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The records of the dataset's first ``count`` samples, gathered from every process."""
    mine = [record for record in records if record["index"] < count]
    if fabric.world_size > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(gathered, mine)
        mine = [record for part in gathered for record in part]
    return sorted(mine, key=lambda record: record["index"])


def _logged(result: dict[str, Any]) -> dict[str, float]:
    keys = ("exact_match", "nll", "perplexity", "kl_to_reference")
    logged = {f"eval/{key}": result[key] for key in keys if key in result}
    for kind, values in result["per_type"].items():
        if kind and values["exact_match"] is not None:
            logged[f"eval/{kind}/exact_match"] = values["exact_match"]
    return logged


def _summary_line(metrics: dict[str, Any], path: Path) -> str:
    types = ", ".join(
        f"{kind or '(no type)'} {v['exact_match']:.3f}" for kind, v in metrics["per_type"].items() if v["samples"]
    )
    kl = f", KL to reference {metrics['kl_to_reference']:.4g}" if "kl_to_reference" in metrics else ""
    return (
        f"lightning-tlq evaluate: {metrics['model']} on {metrics['samples']} samples: exact match "
        f"{metrics['exact_match']:.3f} ({types}), answer-token NLL {metrics['nll']:.4f} (perplexity "
        f"{metrics['perplexity']:.3f}){kl}; saved to {path}"
    )
