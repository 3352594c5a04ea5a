"""Progress bars, per-layer log lines and per-layer metrics for the Lightning loggers, as a Fabric-style callback.

:class:`CalibrationProgress` listens to the events of :class:`~lightning_tlq.loop.CalibrationLoop`:

- a bar over this rank's calibration samples during the importance pass (a layer-wise backward advances it by
  a share of each batch per layer), and a bar over the decoder layers (rank 0, on stderr, only when ``enabled``
  and stderr is a terminal: in a log file bars would mix with the log lines);
- one ``INFO`` line per layer on the ``lightning_tlq.progress`` logger: errors, damping, seconds, memory; layers
  are numbered from 0 as in the summary table and the report (``layer 3 (4/8)``);
- ``fabric.log_dict`` of the same numbers (prefix ``tlq/``, step = layer index), so every logger given to
  ``Fabric(loggers=...)`` (or the Trainer's loggers, through :class:`~lightning_tlq.callbacks.TLQCallback`)
  receives them. Loggers are flushed (``save()``) when calibration ends.

tqdm is a dependency of ``lightning`` itself, so no extra package is needed.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lightning_tlq.observers import CalibrationObserver

log = logging.getLogger(__name__)


def memory_gib(device: torch.device | None) -> tuple[float, str]:
    """Peak CUDA memory allocated since the last reset on ``device``, else the process's resident memory."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "peak GPU"
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30, "RSS"
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**30 if sys.platform == "darwin" else 2**20), "peak RSS"


def layer_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Scalar per-layer metrics from a layer record of the loop (means over its modules)."""
    modules = list(record["modules"].values())

    def mean(key: str) -> float:
        values = [m[key] for m in modules if m.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    damps = [m["damp"] for m in modules if m.get("damp") is not None]
    metrics = {
        "weighted_rel_error": mean("weighted_rel_error"),
        "rel_error": mean("rel_error"),
        "max_damp": max(damps) if damps else float("nan"),
        "damp_retries": float(sum(m.get("retries", 0) for m in modules)),
        "seconds": float(record["seconds"]),
        "tokens_total": float(record["tokens_total"]),
    }
    if "tokens_kept" in record:
        metrics["tokens_kept"] = float(record["tokens_kept"])
    return metrics


class CalibrationProgress(CalibrationObserver):
    """Progress bars, log lines and logger metrics for a calibration run.

    Args:
        enabled: Show progress bars (rank 0). Log lines and logger metrics do not depend on it.
        prefix: Prefix of the metric names sent to the loggers.
    """

    def __init__(self, enabled: bool = True, prefix: str = "tlq/") -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.num_layers = 0
        self._batch_sizes: list[int] = []
        self._passes = 1
        self._layers: Any = None
        self._samples: Any = None
        self._layer_start = 0.0

    def _bar(self, fabric: Any, **kwargs: Any) -> Any:
        show = self.enabled and fabric.is_global_zero and sys.stderr.isatty()
        return tqdm(disable=not show, file=sys.stderr, dynamic_ncols=True, **kwargs)

    def on_calibration_start(
        self,
        fabric: Any,
        num_layers: int,
        batch_sizes: Sequence[int] = (),
        importance_passes: int = 1,
        start_layer: int = 0,
        **_: Any,
    ) -> None:
        """Open the layer bar (resumed runs start at ``start_layer``)."""
        self.num_layers, self._batch_sizes, self._passes = num_layers, list(batch_sizes), importance_passes
        self._layers = self._bar(fabric, total=num_layers, initial=start_layer, desc="TLQ layers", unit="layer")

    def on_importance_start(self, fabric: Any, **_: Any) -> None:
        """Open the bar of the importance pass over this rank's samples."""
        total = sum(self._batch_sizes) or None
        bar_format = "{l_bar}{bar}| {n:.0f}/{total_fmt} samples [{elapsed}<{remaining}]"
        self._samples = self._bar(fabric, total=total, desc="importance", leave=False, bar_format=bar_format)

    def on_importance_batch_end(self, fabric: Any, batch_idx: int = 0, **_: Any) -> None:
        """Advance the importance bar by the batch's samples (a share of them per layer when layer-wise)."""
        if self._samples is not None:
            size = self._batch_sizes[batch_idx] if batch_idx < len(self._batch_sizes) else 1
            self._samples.update(size / max(self._passes, 1))

    def on_importance_end(self, fabric: Any = None, **_: Any) -> None:
        """Close the sample bar."""
        if self._samples is not None:
            self._samples.close()
            self._samples = None

    def on_layer_start(self, fabric: Any, index: int, **_: Any) -> None:
        """Start the layer's clock and memory peak."""
        self._layer_start = time.perf_counter()
        device = getattr(fabric, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_layer_end(self, fabric: Any, index: int, record: Mapping[str, Any], **_: Any) -> None:
        """Log the layer's line and metrics; advance the layer bar."""
        metrics = layer_metrics(record)
        metrics["memory_gib"], kind = memory_gib(getattr(fabric, "device", None))
        if fabric.is_global_zero:
            kept = f"{int(metrics['tokens_kept'])}/" if "tokens_kept" in metrics else ""
            log.info(
                "layer %d (%d/%d): %d modules, tokens %s%d, weighted err %.3e, plain err %.3e, max damp %.2g "
                "(%d retries), %.2f s, %s %.2f GiB",
                index, index + 1, self.num_layers, len(record["modules"]), kept, int(metrics["tokens_total"]),
                metrics["weighted_rel_error"], metrics["rel_error"], metrics["max_damp"],
                int(metrics["damp_retries"]), metrics["seconds"], kind, metrics["memory_gib"],
            )  # fmt: skip
        fabric.log_dict({f"{self.prefix}layer/{k}": v for k, v in metrics.items()}, step=index)
        if self._layers is not None:
            self._layers.update(1)

    def on_calibration_end(self, fabric: Any, records: Sequence[Mapping[str, Any]] = (), **_: Any) -> None:
        """Close the bars and flush the loggers."""
        for bar in (self._samples, self._layers):
            if bar is not None:
                bar.close()
        self._samples = self._layers = None
        for logger in getattr(fabric, "loggers", []):
            logger.save()
