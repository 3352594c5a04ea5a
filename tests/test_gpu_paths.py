"""The layer-placement speed paths that only exist on an accelerator (skipped without CUDA; run them on the GPU
machine with ``pytest tests/test_gpu_paths.py``): threaded prefetch, parking, in-place offload, page-locked layers
and staging buffers, and results that must not depend on where the layers' host memory lives."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric

from lightning_tlq import hostmem
from lightning_tlq.config import MemoryArgs, QuantArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.hostmem import HostStaging, PinnedArena
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.placement import LayerPlacement
from lightning_tlq.settings import CalibrationSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (layer placement moves)")


@pytest.mark.parametrize("pin_layers", [True, False])
def test_prefetch_onload_offload_round_trip(monkeypatch, pin_layers: bool) -> None:
    monkeypatch.setattr(hostmem, "MIN_REGISTER_BYTES", 0)  # the tiny model's tensors are all small
    model, _ = build_tiny_vlm("qwen2_vl", seed=0)
    layers = model.model.language_model.layers
    before = [[t.detach().clone() for t in layer.parameters()] for layer in layers]
    host = [[p.data for p in layer.parameters()] for layer in layers]
    placement = LayerPlacement(layers, torch.device("cuda"), layerwise=True, pin_layers=pin_layers)
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
    assert (placement.registered_bytes > 0) == pin_layers


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


def test_layers_are_page_locked_in_place_only_while_on_the_device_side(monkeypatch) -> None:
    monkeypatch.setattr(hostmem, "MIN_REGISTER_BYTES", 0)  # the tiny model's tensors are all small
    model, _ = build_tiny_vlm("qwen2_vl", seed=0)
    layers = model.model.language_model.layers
    host = [p for layer in layers for p in layer.parameters()]
    placement = LayerPlacement(layers, torch.device("cuda"), layerwise=True)
    assert not any(p.is_pinned() for p in host)
    with placement.rest_on_device(model):
        for i in range(len(layers)):
            placement.prefetch(i)  # waits for the layer's registration
            assert all(p.is_pinned() for p in layers[i].parameters())
            layer = placement.onload(i)
            assert all(p.is_cuda for p in layer.parameters())
            placement.offload(i, modified=True)
    assert placement.registered_bytes == sum({p.data_ptr(): p.untyped_storage().nbytes() for p in host}.values())
    assert not any(p.is_pinned() for p in host)
    torch.cuda.synchronize()
    torch.zeros(1, device="cuda").add_(1).item()  # no CUDA error was left behind


def test_staging_and_arena_copies_equal_plain_copies() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    staging = HostStaging(min_bytes=1 << 10)
    previous = []
    for shape in ((3000, 1000), (17, 5), (4000, 1200), (2000, 10)):  # grows, then reuses the buffer
        t = torch.randint(-8, 8, shape, generator=g, device="cuda", dtype=torch.int8)
        host = staging.to_host(t)
        assert host.device.type == "cpu"
        assert not host.is_pinned()
        assert torch.equal(host, t.cpu())
        previous.append((host, t.cpu()))
    assert all(torch.equal(h, w) for h, w in previous)  # later copies did not overwrite earlier results
    arena = PinnedArena(slab_bytes=1 << 16, pin=True)
    sources = [torch.randn(40, 30, generator=g, device="cuda") for _ in range(50)]
    copies = [arena.empty(s.shape, s.dtype).copy_(s, non_blocking=True) for s in sources]
    torch.cuda.synchronize()
    assert all(c.is_pinned() and torch.equal(c, s.cpu()) for c, s in zip(copies, sources))
    assert arena.slabs == 4  # 50 x 4800 bytes (aligned: 4800) in 64 KiB slabs: 13 per slab


def _gptq_codes(method: str = "gptq", pin_layers: bool = True) -> dict[str, torch.Tensor]:
    model, processor = build_tiny_vlm("qwen2_vl", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(8, seed=2)]
    batches = make_batches(encoded, 4, module.adapter.pad_token_id)
    fabric = Fabric(accelerator="cuda", devices=1)
    memory = MemoryArgs(layerwise=True, pin_layers=pin_layers)
    settings = CalibrationSettings(QuantArgs(method=method, bits=3, group_size=32), memory=memory, metrics=False)
    loop = CalibrationLoop(fabric, module, settings)
    loop.run(batches)
    return {k: r.codes for k, r in loop.results.items()}


@pytest.mark.parametrize("method", ["gptq", "tlq"])
def test_codes_do_not_depend_on_page_locked_layers(monkeypatch, method: str) -> None:
    monkeypatch.setattr(hostmem, "MIN_REGISTER_BYTES", 0)  # every layer tensor page-locked, every result staged
    monkeypatch.setattr(hostmem, "MIN_STAGING_BYTES", 0)
    reference = _gptq_codes(method)
    other = _gptq_codes(method, pin_layers=False)
    assert reference.keys() == other.keys()
    assert all(torch.equal(reference[k], other[k]) for k in reference)
