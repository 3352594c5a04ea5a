"""One statistic per distinct input (lightning_tlq.shared_stats): modules reading one input share their Hessians and
their solve, with exactly the results of one statistic and one solve per module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_tlq.config import QuantArgs
from lightning_tlq.core.hessian import HessianAccumulator
from lightning_tlq.shared_stats import LayerStatistics
from lightning_tlq.stage import LayerStage
from lightning_tlq.tokenweights import TokenWeights, input_weights

GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
NAMES = [n for g in GROUPS for n in g]


class _Layer(nn.Module):
    """A Llama-shaped layer: q/k/v read one input, o the attention-like mix, gate/up one input, down their product."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = nn.Linear(d, 64), nn.Linear(d, 16), nn.Linear(d, 16)
        self.o = nn.Linear(96, d)
        self.gate, self.up, self.down = nn.Linear(d, 128), nn.Linear(d, 128), nn.Linear(128, d)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) / 10)
        self.copy_k_input = False  # a faulty family: k reads a copy of q's input

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h * 1.5
        k_in = x.clone() if self.copy_k_input else x
        a = torch.cat([self.q(x), self.k(k_in), self.v(x)], -1)
        h = h + self.o(torch.tanh(a))
        y = h * 0.5
        return h + self.down(nn.functional.silu(self.gate(y)) * self.up(y))


def _inputs(batches: int = 3, granularity: str = "module", importance: bool = True):
    g = torch.Generator().manual_seed(1)
    xs, weights = [], []
    for _ in range(batches):
        xs.append(torch.randn(2, 12, 64, generator=g))
        valid = torch.ones(2, 12, dtype=torch.bool)
        valid[1, 9:] = False
        imp = {n: torch.rand(2, 12, 1, generator=g) * valid[..., None] for n in NAMES} if importance else None
        if imp is not None and granularity == "input":
            imp = input_weights(imp, GROUPS)
        multiplier = (torch.rand(2, 12, generator=g) > 0.3).float() * 1.5 * valid
        weights.append(TokenWeights(valid, imp, multiplier))
    return xs, weights


def _run(quant: QuantArgs, *, share: bool, monkeypatch, metrics: bool, groups=GROUPS, granularity="module", **kw):
    """Calibrate a fresh layer; counts HessianAccumulator.add calls."""
    layer = _Layer()
    layer.copy_k_input = kw.pop("copy_k_input", False)
    fp = kw.pop("fp", False)
    xs, weights = _inputs(granularity=granularity, importance=kw.pop("importance", True))
    adds = []
    original_add = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, *a, **k: (adds.append(1), original_add(self, *a, **k)))
    with monkeypatch.context() as m:
        if not share:
            m.setattr(LayerStatistics, "_share", lambda self, members, same: None)
        stage = LayerStage(0, layer, groups, quant, metrics=metrics)
        outputs = stage.run(lambda b, h: layer(h), xs, weights, fp_inputs=[x.clone() for x in xs] if fp else None)
    return stage, outputs, len(adds)


def _assert_same(a: LayerStage, b: LayerStage, outputs_a, outputs_b) -> None:
    assert list(a.results) == list(b.results)
    for name in a.results:
        ra, rb = a.results[name], b.results[name]
        for field in ("codes", "scale", "zero"):
            assert torch.equal(getattr(ra, field), getattr(rb, field)), (name, field)
        for key in ("damp", "retries", "tokens", "rel_error", "weighted_rel_error"):
            assert ra.record[key] == rb.record[key], (name, key)
    assert all(torch.equal(x, y) for x, y in zip(outputs_a, outputs_b))


# method, quant overrides, metrics, granularity, (adds per batch shared, not shared), extra
CASES = {
    "gptq": ("gptq", {}, False, "module", (4, 7), {}),
    "gptq-metrics-w4a8": ("gptq", {"act_bits": 8}, True, "module", (4 + 7, 7 + 7), {}),  # + weighted report
    "gptq-fp-target": ("gptq", {"target": "fp"}, False, "module", (8, 14), {"fp": True}),
    "gptq-not-sequential": ("gptq", {"true_sequential": False}, False, "module", (4, 7), {}),
    "rtn-metrics": ("rtn", {}, True, "module", (4 + 7, 7 + 7), {}),
    "rtn-metrics-uniform": ("rtn", {}, True, "module", (4, 7), {"importance": False}),
    "tlq-input": ("tlq", {}, False, "input", (4, 7), {}),
    "tlq-module-metrics": ("tlq", {}, True, "module", (4 + 7 + 7, 7 + 7 + 7), {}),
    "tlq-uniform-fp-target": ("tlq", {"target": "fp"}, False, "module", (8, 14), {"fp": True, "importance": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shared_statistics_give_the_per_module_results(case, one_thread, monkeypatch):
    method, overrides, metrics, granularity, (shared_adds, own_adds), extra = CASES[case]
    quant = QuantArgs(method=method, bits=3, group_size=32, block_size=16, **overrides)
    kw = {"metrics": metrics, "granularity": granularity}
    shared, out_shared, n_shared = _run(quant, share=True, monkeypatch=monkeypatch, **kw, **dict(extra))
    own, out_own, n_own = _run(quant, share=False, monkeypatch=monkeypatch, **kw, **dict(extra))
    _assert_same(shared, own, out_shared, out_own)
    batches = 3
    assert (n_shared, n_own) == (shared_adds * batches, own_adds * batches)
    solved_with = {n: r.record["shared"] for n, r in shared.results.items()}
    if method == "rtn" or case in ("tlq-module-metrics",):
        assert set(solved_with.values()) == {1}
    else:
        assert solved_with == {"q": 3, "k": 3, "v": 3, "o": 1, "gate": 2, "up": 2, "down": 1}
    assert all(r.record["shared"] == 1 for r in own.results.values())


def test_a_module_reading_another_input_keeps_its_own_statistics(one_thread, monkeypatch):
    """A family whose k reads a copy of q's input: found on the first batch, k gets statistics of its own (same
    results); q and v still share."""
    quant = QuantArgs(method="gptq", bits=3, group_size=32, block_size=16)
    shared, out_shared, n_shared = _run(quant, share=True, monkeypatch=monkeypatch, metrics=False, copy_k_input=True)
    own, out_own, _ = _run(quant, share=False, monkeypatch=monkeypatch, metrics=False, copy_k_input=True)
    _assert_same(shared, own, out_shared, out_own)
    assert n_shared == 5 * 3
    assert shared.results["k"].record["shared"] == 1
    assert shared.results["q"].record["shared"] == 2


def test_an_input_that_stops_being_shared_is_an_error(one_thread):
    layer = _Layer()
    xs, weights = _inputs()

    def forward(b: int, h: torch.Tensor) -> torch.Tensor:
        layer.copy_k_input = b == 1
        return layer(h)

    stage = LayerStage(0, layer, GROUPS, QuantArgs(method="gptq", bits=3, group_size=32), metrics=False)
    with pytest.raises(RuntimeError, match="Layer 0: k and q read one input in the first batch but not in batch 1"):
        stage.run(forward, xs, weights)


def test_input_weights_are_one_tensor_per_input_group():
    _, weights = _inputs(granularity="input")
    imp = weights[0].importance
    assert imp["q"] is imp["k"] is imp["v"]
    assert imp["gate"] is imp["up"]
    assert imp["o"] is not imp["q"]
    _, own = _inputs()
    expected = torch.stack([own[0].importance[n] for n in ("q", "k", "v")]).mean(0)
    assert torch.equal(imp["q"], expected)
    assert torch.equal(imp["o"], own[0].importance["o"])


def test_granularity_is_validated():
    from lightning_tlq.config import ImportanceArgs

    assert ImportanceArgs().granularity == "module"
    with pytest.raises(ValueError, match="importance.granularity='token' is not supported; choose one of module"):
        ImportanceArgs(granularity="token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="importance.groups=2 weighs each module's output-channel groups apart"):
        ImportanceArgs(granularity="input", groups=2)


def test_statistics_of_one_pass(monkeypatch):
    """gptq: four accumulators for seven modules, solved in their input groups; the reference without sharing (used
    above) has seven."""
    layer = copy.deepcopy(_Layer())
    _, weights = _inputs()
    quant = QuantArgs(method="gptq", bits=3, group_size=32)
    modules = {n: layer.get_submodule(n) for n in NAMES}
    stats = LayerStatistics(modules, NAMES, GROUPS, quant, False, 1, weights, False)
    assert len(stats.accumulators(NAMES)) == 4
    assert stats.solve_groups(NAMES) == GROUPS
    monkeypatch.setattr(LayerStatistics, "_share", lambda self, members, same: None)
    stats = LayerStatistics(modules, NAMES, GROUPS, quant, False, 1, weights, False)
    assert len(stats.accumulators(NAMES)) == 7
    assert stats.solve_groups(NAMES) == [[n] for n in NAMES]


def test_input_granularity_shares_hessians_in_the_loop_and_the_vision_tower(one_thread):
    """tlq with importance.granularity=input on tiny LLaVA with its CLIP tower: every decoder layer and vision stage
    solves q/k/v on one Hessian (and the decoder's gate/up); the default's one per module: the cases above."""
    from lightning.fabric import Fabric

    from lightning_tlq.config import ImportanceArgs
    from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
    from lightning_tlq.loop import CalibrationLoop
    from lightning_tlq.models.tiny import build_tiny_vlm
    from lightning_tlq.module import TLQModule
    from lightning_tlq.settings import CalibrationSettings

    def shared_counts(granularity: str) -> tuple[dict, dict]:
        model, processor = build_tiny_vlm("llava", seed=0)
        module = TLQModule().attach(model, processor)
        encoded = [encode_sample(processor, s) for s in synthetic_samples(4, seed=3)]
        batches = make_batches(encoded, 2, module.adapter.pad_token_id)
        quant = QuantArgs(method="tlq", bits=4, group_size=32, vision=True)
        settings = CalibrationSettings(quant, ImportanceArgs(granularity=granularity), metrics=False)
        loop = CalibrationLoop(Fabric(accelerator="cpu", devices=1), module, settings)
        records = loop.run(batches)
        decoder = {n: r["shared"] for n, r in records[0]["modules"].items()}
        return decoder, {n: r["shared"] for n, r in loop.vision_records[0]["modules"].items()}

    decoder, vision = shared_counts("input")
    assert decoder == {"self_attn.q_proj": 3, "self_attn.k_proj": 3, "self_attn.v_proj": 3, "self_attn.o_proj": 1,
                       "mlp.gate_proj": 2, "mlp.up_proj": 2, "mlp.down_proj": 1}  # fmt: skip
    assert vision == {"self_attn.q_proj": 3, "self_attn.k_proj": 3, "self_attn.v_proj": 3, "self_attn.out_proj": 1,
                      "mlp.fc1": 1, "mlp.fc2": 1}  # fmt: skip
