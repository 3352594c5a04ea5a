"""Accumulate passes that start at a submodule (LayerStage(replay_submodules=True), the default): the down_proj pass
runs ``mlp`` alone on the inputs the gate/up pass kept, the o_proj pass ``self_attn`` alone; codes, scales, errors
and outputs are exactly those of running the whole layer in every pass."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from tiny_families import FAMILIES, build_model, make_batch
from torch import nn

from lightning_tlq import stage
from lightning_tlq.config import QuantArgs
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings
from lightning_tlq.stage import LayerStage, _common_parent
from lightning_tlq.tokenweights import TokenWeights

GROUPS = [["self_attn.q", "self_attn.k", "self_attn.v"], ["self_attn.o"], ["mlp.gate", "mlp.up"], ["mlp.down"]]
NAMES = [n for g in GROUPS for n in g]


def _linear(d_in: int, d_out: int, g: torch.Generator) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / d_in**0.5)
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) / 10)
    return lin


class _Attention(nn.Module):
    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (_linear(64, 64, g) for _ in range(4))

    def forward(self, hidden_states: torch.Tensor, *, bias: torch.Tensor) -> tuple[torch.Tensor, None]:
        scores = self.q(hidden_states) @ self.k(hidden_states).transpose(-1, -2) / 8 + bias
        return self.o(scores.softmax(-1) @ self.v(hidden_states)), None  # HF-style (output, attention weights)


class _MLP(nn.Module):
    def __init__(self, g: torch.Generator, in_place: bool) -> None:
        super().__init__()
        self.gate, self.up, self.down = _linear(64, 96, g), _linear(64, 96, g), _linear(96, 64, g)
        self.in_place = in_place

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.in_place:  # a family that writes into its input: the kept tensor must not be replayed
            y.mul_(1.0)
        return self.down(nn.functional.silu(self.gate(y)) * self.up(y))


class _Layer(nn.Module):
    """A Llama-shaped layer with attention and MLP submodules; the attention takes a keyword tensor."""

    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.self_attn, self.mlp = _Attention(g), _MLP(g, in_place)
        self.calls = 0

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = h + self.self_attn(hidden_states=torch.nn.functional.rms_norm(h, (64,)), bias=bias)[0]
        return h + self.mlp(torch.nn.functional.rms_norm(h, (64,)))


def _calibrate(quant: QuantArgs, replay: bool, in_place: bool = False, metrics: bool = True):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 10, 64, generator=g) for _ in range(3)]
    bias = torch.randn(10, 10, generator=g) / 4
    weights = []
    for _ in xs:
        valid = torch.ones(2, 10, dtype=torch.bool)
        valid[1, 8:] = False
        imp = {n: torch.rand(2, 10, 1, generator=g) * valid[..., None] for n in NAMES}
        weights.append(TokenWeights(valid, imp, (torch.rand(2, 10, generator=g) > 0.3).float() * 1.5 * valid))
    layer = _Layer(in_place)
    stage = LayerStage(0, layer, GROUPS, quant, metrics=metrics, replay_submodules=replay)
    outputs = stage.run(lambda b, h: layer(h, bias), xs, weights)
    return stage, outputs, layer.calls


@pytest.mark.parametrize(
    "quant",
    [
        QuantArgs(method="gptq", bits=3, group_size=32, block_size=16),
        QuantArgs(method="tlq", bits=2, group_size=32, block_size=16),
        QuantArgs(method="tlq", bits=4, group_size=32, act_bits=8),
        QuantArgs(method="rtn", bits=3, group_size=32),
    ],
    ids=["gptq-w3", "tlq-w2", "tlq-w4a8", "rtn-metrics"],
)
def test_replayed_passes_give_exactly_the_whole_layer_results(one_thread, quant: QuantArgs) -> None:
    replayed, out_replayed, calls_replayed = _calibrate(quant, replay=True)
    whole, out_whole, calls_whole = _calibrate(quant, replay=False)
    assert list(replayed.results) == NAMES
    for name in NAMES:
        a, b = replayed.results[name], whole.results[name]
        for field in ("codes", "scale", "zero"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
        for key in ("tokens", "rel_error", "weighted_rel_error"):
            assert a.record[key] == b.record[key], (name, key)
    assert all(torch.equal(x, y) for x, y in zip(out_replayed, out_whole))
    # 3 batches: whole layer in 4 passes + propagate; replayed: only the q/k/v and gate/up passes run the layer
    assert calls_whole == 3 * 5
    assert calls_replayed == 3 * 3


def test_an_input_changed_in_place_is_not_replayed(one_thread) -> None:
    quant = QuantArgs(method="gptq", bits=3, group_size=32, block_size=16)
    replayed, out_replayed, calls = _calibrate(quant, replay=True, in_place=True)
    whole, out_whole, _ = _calibrate(quant, replay=False, in_place=True)
    assert all(torch.equal(replayed.results[n].codes, whole.results[n].codes) for n in NAMES)
    assert all(torch.equal(x, y) for x, y in zip(out_replayed, out_whole))
    assert calls == 3 * 4  # the o_proj pass still starts at self_attn; the down_proj pass runs the layer


def test_which_submodule_a_pass_starts_at() -> None:
    assert _common_parent(["mlp.gate", "mlp.up"]) == "mlp"
    assert _common_parent(["mlp.down"]) == "mlp"
    assert _common_parent(["self_attn.q", "self_attn.k"]) == "self_attn"
    assert _common_parent(["block.attn.q", "block.mlp.up"]) == "block"
    assert _common_parent(["q", "k"]) == ""
    stage = LayerStage(0, _Layer(), GROUPS, QuantArgs(method="gptq", bits=4, group_size=32), metrics=False)
    assert stage._keep_for(GROUPS[0], GROUPS[1]) == "self_attn"
    assert stage._keep_for(GROUPS[1], GROUPS[2]) is None  # o_proj is outside mlp: mlp's input changes
    assert stage._keep_for(GROUPS[2], GROUPS[3]) == "mlp"
    off = LayerStage(0, _Layer(), GROUPS, QuantArgs(method="gptq", bits=4, group_size=32), replay_submodules=False)
    assert off._keep_for(GROUPS[2], GROUPS[3]) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_replays_with_the_same_codes(one_thread, family: str, monkeypatch) -> None:
    """Each adapter family's real decoder layers: kept inputs are replayed, and the calibrated weights equal those of
    whole-layer passes bit for bit."""
    hits: list[bool] = []
    call = stage._KeptInputs.call

    def counted(self, b):
        out = call(self, b)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(stage._KeptInputs, "call", counted)

    def calibrate(replay: bool) -> dict[str, torch.Tensor]:
        with pytest.MonkeyPatch.context() as m:
            if not replay:
                m.setattr(stage.LayerStage, "_keep_for", lambda self, names, following: None)
            module = TLQModule().attach(build_model(family), processor=None)
            batches = [make_batch(family, seed=0), make_batch(family, padded=True, seed=1)]
            quant = QuantArgs(method="tlq", bits=3, group_size=32)
            CalibrationLoop(Fabric(accelerator="cpu", devices=1), module, CalibrationSettings(quant)).run(batches)
            return {k: v.clone() for k, v in module.model.state_dict().items()}

    replayed = calibrate(True)
    assert hits
    assert all(hits)
    hits.clear()
    whole = calibrate(False)
    assert not hits
    assert replayed.keys() == whole.keys()
    assert all(torch.equal(replayed[k], whole[k]) for k in replayed)
