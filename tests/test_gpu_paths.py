"""The layer-placement speed paths that only exist on an accelerator (skipped without CUDA; run them on the GPU
machine with ``pytest tests/test_gpu_paths.py``): threaded prefetch, parking, in-place offload, and GPTQ results
that must not depend on any speed switch."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric

from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.importance import TokenImportance
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.placement import LayerPlacement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (layer placement moves)")


@pytest.mark.parametrize("threaded", ["1", "0"])
def test_prefetch_onload_offload_round_trip(monkeypatch, threaded: str) -> None:
    monkeypatch.setenv("LIGHTNING_TLQ_PREFETCH_THREAD", threaded)
    model, _ = build_tiny_vlm("qwen2_vl", seed=0)
    layers = model.model.language_model.layers
    before = [[t.detach().clone() for t in layer.parameters()] for layer in layers]
    host = [[p.data for p in layer.parameters()] for layer in layers]
    placement = LayerPlacement(layers, torch.device("cuda"), layerwise=True)
    with placement.rest_on_device(model):
        for i in range(len(layers)):
            layer = placement.onload(i)
            placement.prefetch(i + 1)
            assert all(p.is_cuda for p in layer.parameters())
            assert all(torch.equal(p.cpu(), b) for p, b in zip(layer.parameters(), before[i]))
            with torch.no_grad():
                for p in layer.parameters():
                    p.mul_(2)
            placement.offload(i, modified=True)
            # copied back into the original host tensors, not into fresh host memory
            assert all(p.data_ptr() == h.data_ptr() for p, h in zip(layer.parameters(), host[i]))
            assert all(torch.equal(p, 2 * b) for p, b in zip(layer.parameters(), before[i]))


def test_parking_frees_all_but_the_head_and_brings_it_back() -> None:
    model, processor = build_tiny_vlm("qwen2_vl", seed=0)
    module = TLQModule().attach(model, processor)
    layers = module.adapter.decoder_layers()
    placement = LayerPlacement(layers, torch.device("cuda"), layerwise=True)
    head = module.adapter.head_modules()
    head_ids = {id(p) for m in head for p in m.parameters()}
    with placement.rest_on_device(model):
        placement.park(head, modified=False)
        for p in model.parameters():
            if id(p) in head_ids:
                assert p.is_cuda
            else:
                assert not p.is_cuda  # layers (never moved) and the parked embeddings / vision tower
        placement.unpark()
        assert model.get_input_embeddings().weight.is_cuda
    assert model.get_input_embeddings().weight.is_cuda


def _gptq_codes(monkeypatch, **env: str) -> dict[str, torch.Tensor]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model, processor = build_tiny_vlm("qwen2_vl", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(8, seed=2)]
    batches = make_batches(encoded, 4, module.adapter.pad_token_id)
    fabric = Fabric(accelerator="cuda", devices=1, callbacks=[TokenImportance("fisher")])
    loop = CalibrationLoop(fabric, module, QuantArgs(method="gptq", bits=3, group_size=32), ImportanceArgs(),
                           TokenSetArgs(), memory=MemoryArgs(layerwise=True), metrics=False)  # fmt: skip
    loop.run(batches)
    return {k: r.codes for k, r in loop.results.items()}


def test_gptq_codes_do_not_depend_on_the_speed_switches(monkeypatch) -> None:
    reference = _gptq_codes(monkeypatch)
    for env in ({"LIGHTNING_TLQ_PREFETCH_THREAD": "0"}, {"LIGHTNING_TLQ_EARLY_STOP": "0"}):
        other = _gptq_codes(monkeypatch, **env)
        assert all(torch.equal(reference[k], other[k]) for k in reference), env
        for key in env:
            monkeypatch.delenv(key)
