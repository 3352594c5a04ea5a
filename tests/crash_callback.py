"""Test-only crash injection: a Fabric-style callback that SIGKILLs its process when a decoder layer starts, and a
runner that calibrates with it in a fresh process.

Run as ``python tests/crash_callback.py LAYER KWARGS_JSON``: calls :func:`lightning_tlq.calibrate.calibrate` with
the JSON's keyword arguments (``data`` and ``quant`` given as dicts of their fields) plus ``CrashAtLayer(LAYER)``,
so the process (with ``ddp_spawn`` every rank) dies at a deterministic point, as a real crash would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from lightning_tlq.observers import CalibrationObserver


class CrashAtLayer(CalibrationObserver):
    """SIGKILL this process at the start of decoder layer ``layer`` (``on_layer_start``, after the checkpoint of
    the layers before it was committed)."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def on_layer_start(self, fabric: Any, index: int) -> None:
        if index == self.layer:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    from lightning_tlq.calibrate import calibrate
    from lightning_tlq.config import DataArgs, QuantArgs

    layer, kwargs = int(argv[0]), json.loads(argv[1])
    kwargs["data"] = DataArgs(**kwargs.get("data", {}))
    kwargs["quant"] = QuantArgs(**kwargs.get("quant", {}))
    calibrate(**kwargs, callbacks=[CrashAtLayer(layer)])
    raise SystemExit(f"layer {layer} never started: no crash")


if __name__ == "__main__":
    main(sys.argv[1:])
