"""Speed paths that must not change results: early-stopped statistics passes, in-place offload of layers."""

from __future__ import annotations

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_tlq import stage
from lightning_tlq.config import QuantArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings


def _run_every_pass_to_the_end(monkeypatch) -> None:
    """Defeat the statistics passes' early stop: a Linear whose forward hook stops the layer returns its output
    anyway, so the layer's forward runs to its end (the test's reference for the early-stopped passes)."""
    call = nn.Linear.__call__

    def call_through(self, *args, **kwargs):
        outputs = []
        handle = self.register_forward_hook(lambda m, a, o: outputs.append(o), prepend=True)
        try:
            return call(self, *args, **kwargs)
        except stage._StopLayer:
            if not outputs:  # stopped before its forward ran (a pre-hook): nothing to continue with
                raise
            return outputs[-1]
        finally:
            handle.remove()

    monkeypatch.setattr(nn.Linear, "__call__", call_through)


def _calibrate(monkeypatch, early_stop: bool, method: str, act_bits: int | None = None):
    if not early_stop:
        _run_every_pass_to_the_end(monkeypatch)
    torch.manual_seed(0)
    model, processor = build_tiny_vlm("qwen2_vl", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(6, seed=2)]
    batches = make_batches(encoded, 3, module.adapter.pad_token_id)
    down = module.adapter.decoder_layers()[0].mlp.down_proj
    calls = []
    handle = down.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    fabric = Fabric(accelerator="cpu", devices=1)
    quant = QuantArgs(method=method, bits=3, group_size=32, act_bits=act_bits)
    loop = CalibrationLoop(fabric, module, CalibrationSettings(quant, metrics=True))
    records = loop.run(batches)
    handle.remove()
    monkeypatch.undo()
    return loop, records, calls


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: {f: x for f, x in v.items() if f != "seconds"} for k, v in r["modules"].items()} for r in records]


def test_early_stopped_passes_give_identical_results_with_fewer_layer_runs(monkeypatch) -> None:
    for method, act_bits in (("tlq", None), ("gptq", 8)):
        full, full_records, full_calls = _calibrate(monkeypatch, False, method, act_bits)
        early, early_records, early_calls = _calibrate(monkeypatch, True, method, act_bits)
        assert full.results.keys() == early.results.keys()
        for name, result in full.results.items():
            assert torch.equal(result.codes, early.results[name].codes), name
            assert torch.equal(result.scale, early.results[name].scale), name
        assert _untimed(full_records) == _untimed(early_records)  # tokens, damping, errors
        # layer 0's down_proj per batch: the true-sequential groups q/k/v and gate/up stop before it, so of the four
        # statistics passes only the last one reaches it (then the propagation pass); the o_proj pass starts at
        # self_attn (kept inputs, test_stage_replay.py) and reaches it in neither mode
        batches = 2
        no_grad_full, no_grad_early = full_calls.count(False), early_calls.count(False)
        assert no_grad_full - no_grad_early == 2 * batches


def test_blocked_triangular_inverse_matches_the_direct_solve() -> None:
    from lightning_tlq.core.factor import lower_triangular_inverse

    g = torch.Generator().manual_seed(0)
    for n in (7, 50, 129):
        x = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
        L = torch.linalg.cholesky(x @ x.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))
        direct = torch.linalg.solve_triangular(L, torch.eye(n, dtype=torch.float64), upper=False)
        for leaf in (1, 4, 16, n):
            inv = lower_triangular_inverse(L, leaf=leaf)
            assert torch.equal(inv, inv.tril())  # exactly lower triangular
            out = torch.full((n, n), float("nan"), dtype=torch.float64).mT  # column-major, as the lean solve's
            assert lower_triangular_inverse(L, leaf=leaf, out=out) is out
            assert torch.equal(out, inv)  # written in place, the same values
            torch.testing.assert_close(inv, direct, rtol=1e-10, atol=1e-10)
        assert torch.equal(lower_triangular_inverse(L, leaf=n), direct)  # up to leaf: exactly the direct path
