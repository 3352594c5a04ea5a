"""Every hook that :class:`~lightning_tlq.observers.CalibrationObserver` declares is emitted by the runs that use
every feature (vision tower; GPTAQ target; layer-wise importance), and the loop emits nothing undeclared."""

from __future__ import annotations

import pytest
from lightning.fabric import Fabric

from lightning_tlq import CalibrationObserver, CalibrationSettings, QuantArgs, TLQModule
from lightning_tlq.config import MemoryArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.observers import HOOKS, emit


class _Recorder(CalibrationObserver):
    """Records the name of every declared hook the loop calls."""

    def __init__(self) -> None:
        self.called: list[str] = []
        for hook in HOOKS:
            setattr(self, hook, lambda *args, _hook=hook, **kwargs: self.called.append(_hook))


def _run(family: str, **quant: object) -> tuple[list[str], int]:
    model, processor = build_tiny_vlm(family, seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(4, seed=1)]
    batches = make_batches(encoded, 2, module.adapter.pad_token_id)
    recorder = _Recorder()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[recorder])
    settings = CalibrationSettings(
        QuantArgs(method="tlq", bits=4, group_size=16, **quant), memory=MemoryArgs(layerwise=True)
    )
    records = CalibrationLoop(fabric, module, settings).run(batches)
    return recorder.called, len(records)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_runs_emit_every_declared_hook_in_order(family):
    seen: set[str] = set()
    for quant in ({"vision": True}, {"target": "fp"}):
        called, n_layers = _run(family, **quant)
        seen |= set(called)
        assert called[0] == "on_calibration_start"
        assert called[-1] == "on_calibration_end"
        assert called.count("on_layer_start") == called.count("on_layer_end") == n_layers
        assert called.count("on_importance_batch_start") == called.count("on_importance_batch_end") > 0
    assert seen == HOOKS, f"declared but never emitted: {sorted(HOOKS - seen)}"


def test_emit_refuses_an_undeclared_hook():
    with pytest.raises(ValueError, match="'on_layer_done' is not a declared calibration hook"):
        emit(Fabric(accelerator="cpu", devices=1), "on_layer_done", index=0)
