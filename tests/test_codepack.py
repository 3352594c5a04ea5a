"""Codes of <= 4 bits kept packed on the host: exact round trip, the size they take, and what a run keeps."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from lightning_tlq.config import QuantArgs
from lightning_tlq.core.codepack import PackedCodes, pack_codes
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.module_stats import ModuleResult
from lightning_tlq.settings import CalibrationSettings


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols", [1, 3, 7, 64, 129])
def test_round_trip_is_exact(bits, symmetric, cols):
    spec = QuantSpec(bits=bits, group_size=-1, symmetric=symmetric)
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (5, cols), generator=g).to(spec.code_dtype)
    codes[0, 0], codes[-1, -1] = spec.qmin, spec.qmax  # both ends of the grid
    packed = pack_codes(codes, bits, spec.qmin)
    if bits > 4:
        assert packed is codes
        return
    assert isinstance(packed, PackedCodes)
    assert packed.data.dtype == torch.uint8
    per = 4 if bits <= 2 else 2
    assert packed.data.shape == (5, -(-cols // per))
    assert packed.shape == codes.shape
    out = packed.unpack()
    assert out.dtype == codes.dtype
    assert torch.equal(out, codes)


def test_pack_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"codes \[out, in\]"):
        pack_codes(torch.zeros(2, 3, 4, dtype=torch.int8), 4, -8)


def test_module_result_reads_packed_codes_unpacked():
    codes = torch.tensor([[-8, 7, 0], [1, -1, 3]], dtype=torch.int8)
    res = ModuleResult(None, pack_codes(codes, 4, -8), torch.ones(2, 1), torch.zeros(2, 1))
    assert isinstance(res.stored_codes, PackedCodes)
    assert torch.equal(res.codes, codes)
    assert res.record == {}


@pytest.mark.parametrize(("bits", "packed"), [(4, True), (3, True), (8, False)])
def test_a_run_keeps_codes_packed_on_the_host(bits, packed):
    """Each decoder module's codes stay packed (1/2 byte per weight at <= 4 bits), and read back exactly as the
    fake-quantized weights in the model say (dequantizing them gives the module's weight)."""
    model, processor = build_tiny_vlm("llava", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(4, seed=1)]
    batches = make_batches(encoded, 2, module.adapter.pad_token_id)
    settings = CalibrationSettings(QuantArgs(method="gptq", bits=bits, group_size=32), metrics=False)
    loop = CalibrationLoop(Fabric(accelerator="cpu", devices=1), module, settings)
    loop.run(batches)
    spec = settings.quant.spec
    layers = module.adapter.decoder_layers()
    assert loop.results
    for key, res in loop.results.items():
        assert isinstance(res.stored_codes, PackedCodes) == packed, key
        weight = layers[key.stage].get_submodule(key.module).weight
        codes = res.codes
        assert codes.shape == weight.shape
        assert codes.dtype == spec.code_dtype
        assert int(codes.min()) >= spec.qmin
        assert int(codes.max()) <= spec.qmax
        groups = codes.float().view(codes.shape[0], -1, 32) - res.zero.unsqueeze(-1)
        dequant = (groups * res.scale.unsqueeze(-1)).view_as(weight)
        torch.testing.assert_close(dequant.to(weight.dtype), weight, rtol=0, atol=0)


def test_benchmark_digest_reads_packed_codes_as_unpacked():
    """examples/benchmark_speed.py's digest (how GPU runs are compared) is the same for packed and plain codes."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = importlib.util.spec_from_file_location("benchmark_speed", examples / "benchmark_speed.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(examples))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(examples))
    g = torch.Generator().manual_seed(0)
    codes = {n: torch.randint(-8, 8, (6, 10), generator=g).to(torch.int8) for n in ("a", "b")}
    scale = torch.rand(6, 1, generator=g)
    plain = {n: ModuleResult(None, c, scale, torch.zeros(6, 1)) for n, c in codes.items()}
    packed = {n: ModuleResult(None, pack_codes(c, 4, -8), scale, torch.zeros(6, 1)) for n, c in codes.items()}
    assert bench.codes_digest(packed, "cpu") == bench.codes_digest(plain, "cpu")


def test_restored_results_are_kept_packed(tmp_path):
    """A resumed run keeps the finished layers' codes packed as a running stage does (checkpoint files keep them
    unpacked, as before); the settings give bits and grid."""
    from lightning_tlq.checkpoint_files import results_from_disk, results_to_disk
    from lightning_tlq.resume import LayerCheckpoint

    codes = torch.tensor([[0, 15, 3], [7, 8, 1]], dtype=torch.int32)  # asymmetric 4-bit codes
    saved = results_to_disk({"mlp.up_proj": ModuleResult(None, codes, torch.ones(2, 1), torch.zeros(2, 1))})
    assert torch.equal(saved["mlp.up_proj"]["codes"], codes)
    checkpoint = LayerCheckpoint(tmp_path, {"quant": {"bits": 4, "symmetric": False}})
    assert checkpoint._packing() == (4, 0)
    assert LayerCheckpoint(tmp_path, {"quant": {"bits": 3, "symmetric": True}})._packing() == (3, -4)
    assert LayerCheckpoint(tmp_path, {"other": 1})._packing() is None
    (res,) = results_from_disk(saved, stage=2, packing=checkpoint._packing()).values()
    assert isinstance(res.stored_codes, PackedCodes)
    assert torch.equal(res.codes, codes)
