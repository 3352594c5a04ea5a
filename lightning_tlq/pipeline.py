"""One calibration pipeline, behind ``lightning-tlq calibrate``, :class:`~lightning_tlq.callbacks.TLQCallback` and
the Python API: run the loop on this rank's batches, record the scheme in the model's config, build the report,
and (rank 0) write the quantized model atomically. Callers only bring a launched Fabric (or the Trainer's stand-in),
the wrapped model and this rank's batches."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_tlq.actquant import CONFIG_KEY, quantization_record
from lightning_tlq.adapters.vision import vision_adapter
from lightning_tlq.distributed import Collective
from lightning_tlq.export import PACKED_DIRNAME, save_qparams, write_packed
from lightning_tlq.keys import ModuleKey
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.module import TLQModule
from lightning_tlq.preflight import check_batches
from lightning_tlq.report import atomic_output_dir, format_summary, summarize, write_report
from lightning_tlq.resume import LayerCheckpoint
from lightning_tlq.savedtype import cast_for_save
from lightning_tlq.settings import CalibrationSettings


class Calibration:
    """Calibrates a wrapped VLM in place and (optionally) writes it.

    Args:
        settings: how to calibrate.
        output_dir: rank 0 writes the quantized model (``from_pretrained``-loadable), its processor, the codes
            (``tlq_qparams.safetensors``) and ``tlq_report.json`` there, atomically; None writes nothing.
        overwrite: replace ``output_dir`` if it exists.
        export: also write the compressed-tensors checkpoint to ``output_dir/packed`` in the same atomic step.
        checkpoint: makes the run resumable; it must also be one of the Fabric's callbacks (it observes layers).
        quiet: print no summary table (rank 0 prints it otherwise).
        save_dtype: write the model in this dtype (codes kept, scales rounded to it, weights re-derived from the
            codes: :func:`~lightning_tlq.savedtype.cast_for_save`); None keeps the compute dtype.

    Attributes (after :meth:`run`): ``records`` (per decoder layer), ``results`` (:class:`~lightning_tlq.keys.ModuleKey`
    ``(layer, module)`` -> codes, scales and zero points), ``report`` and ``loop``.
    """

    def __init__(
        self,
        settings: CalibrationSettings,
        *,
        output_dir: str | None = None,
        overwrite: bool = False,
        export: bool = False,
        checkpoint: LayerCheckpoint | None = None,
        quiet: bool = False,
        save_dtype: str | None = None,
    ) -> None:
        self.settings, self.output_dir, self.overwrite, self.export = settings, output_dir, overwrite, export
        self.checkpoint, self.quiet, self.save_dtype = checkpoint, quiet, save_dtype
        self.records: list[dict[str, Any]] = []
        self.results: dict[ModuleKey, Any] = {}
        self.report: dict[str, Any] = {}
        self.loop: CalibrationLoop | None = None

    def run(
        self,
        fabric: Any,
        module: TLQModule,
        batches: Sequence[dict[str, Tensor]],
        *,
        model_name: str,
        extra_settings: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Calibrate on this rank's ``batches`` (global ``sample_id`` s), write the output; returns the report.

        ``extra_settings`` (e.g. the data and dtype) join the report's ``settings``.
        """
        start = time.perf_counter()
        check_batches(batches, vision=self.settings.quant.vision)
        loop = self.loop = CalibrationLoop(fabric, module, self.settings, checkpoint=self.checkpoint)
        model = module.model
        device = next(model.parameters()).device
        with self._keep_checkpoint_on(fabric):
            try:
                self.records = loop.run(batches)
            finally:
                model.to(device)  # where the caller had it (layer-wise placement moves pieces around)
        self.results = loop.results
        if self.save_dtype is not None:  # computed in float32, saved in the checkpoint's dtype
            cast_for_save(model, module.adapter, self.results, self.settings.quant.spec, self.save_dtype)
        quant = self.settings.quant
        targets = module.adapter.target_module_names()
        if quant.vision:
            targets = vision_adapter(module.adapter).vision_target_module_names() + targets
        record = quantization_record(quant, targets)
        setattr(model.config, CONFIG_KEY, record)  # saved in config.json; see actquant.apply_saved_activation_quant
        self.report = self._report(fabric, loop, batches, model_name, record, extra_settings or {})
        if self.output_dir is not None and fabric.is_global_zero:
            with self._keep_checkpoint_on(fabric):
                self._write(module, start)
        if not self.quiet and fabric.is_global_zero:
            print(format_summary(self.report))
            if self.export:
                packed = self.report["export"]
                print(f"packed {packed['format']} checkpoint ({packed['bytes'] / 2**20:.1f} MiB): {packed['dir']}")
        fabric.barrier()
        if self.checkpoint is not None:
            self.checkpoint.remove(fabric)
        return self.report

    @contextlib.contextmanager
    def _keep_checkpoint_on(self, fabric: Any) -> Iterator[None]:
        """Hand a failure to the checkpoint (it decides whether a rerun can resume), then re-raise."""
        try:
            yield
        except BaseException as err:
            if self.checkpoint is not None:
                self.checkpoint.on_failure(fabric, err)
            raise

    def _report(
        self,
        fabric: Any,
        loop: CalibrationLoop,
        batches: Sequence[dict[str, Tensor]],
        model_name: str,
        record: dict[str, Any],
        extra_settings: Mapping[str, Any],
    ) -> dict[str, Any]:
        local = [
            sum(int(b["input_ids"].shape[0]) for b in batches),
            sum(int(b["attention_mask"].sum()) for b in batches),
        ]
        samples, tokens = loop.collective.all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        settings = {**self.settings.as_dict(), **extra_settings}
        settings.update(world_size=fabric.world_size, device=str(fabric.device))
        return {
            "model": model_name,
            "output_dir": str(Path(self.output_dir).resolve()) if self.output_dir is not None else None,
            "settings": settings,
            "data": {"samples": int(samples), "tokens": int(tokens)},
            "quantization": record,
            "summary": summarize(self.records),
            "vision": (
                {"layers": loop.vision_records, "summary": summarize(loop.vision_records)}
                if self.settings.quant.vision
                else None
            ),
            "seconds": dict(loop.phase_seconds),
            "peak_gpu_memory_gib_per_rank": _peak_memory(fabric.device, loop.collective),
            "resumed_from_layer": loop.start_layer,
            "layers": self.records,
        }

    def _write(self, module: TLQModule, start: float) -> None:
        assert self.output_dir is not None
        report = self.report
        with atomic_output_dir(self.output_dir, self.overwrite) as tmp:
            module.model.save_pretrained(tmp)
            module.processor.save_pretrained(tmp)
            save_qparams(tmp, module.model, module.adapter, self.results, self.settings.quant)
            report["seconds"]["total"] = time.perf_counter() - start
            write_report(report, tmp)
            if self.export:
                (tmp / PACKED_DIRNAME).mkdir()
                packed = write_packed(tmp, tmp / PACKED_DIRNAME)
                report["export"] = {"dir": f"{report['output_dir']}/{PACKED_DIRNAME}", **packed}
                write_report(report, tmp)


def _peak_memory(device: torch.device, collective: Collective) -> list[float] | None:
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], dtype=torch.float64)
    return [round(v, 3) for v in collective.gather_cat(peak).tolist()]
