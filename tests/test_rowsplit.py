"""Row-split solves over ranks: the plan, and the same codes from 1, 2 and 4 processes (gloo, CPU, one thread)."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_tlq import rowsplit
from lightning_tlq.config import QuantArgs
from lightning_tlq.distributed import Collective, shard_batches
from lightning_tlq.methods.registry import get_method
from lightning_tlq.rowsplit import ROW_UNIT, SolveCost, plan_group, row_slices, splittable
from lightning_tlq.stage import LayerStage
from lightning_tlq.tokenweights import TokenWeights

_7B = [
    {"q_proj": (3584, 3584), "k_proj": (512, 3584), "v_proj": (512, 3584)},
    {"o_proj": (3584, 3584)},
    {"gate_proj": (18944, 3584), "up_proj": (18944, 3584)},
    {"down_proj": (3584, 18944)},
]


def _lone(shapes):
    """Every module its own part (tlq, per-module importance, no metrics)."""
    return [[[n]] for n in shapes]


def _shared(shapes):
    """One part, one solve unit: the modules share one solve statistic (gptq)."""
    return [[list(shapes)]]


_FREE_LINKS = SolveCost(factor_fixed_s=0.0, block_s=0.0, link_gbps=1e12)


def test_row_slices_cover_in_whole_units():
    for rows, world in ((64, 4), (3584, 8), (130, 2), (100, 3)):
        slices = row_slices(rows, world)
        assert [i for s in slices for i in s] == list(range(rows))
        assert all(s.start % ROW_UNIT == 0 and len(s) >= ROW_UNIT for s in slices)
    with pytest.raises(ValueError, match="cannot be split"):
        row_slices(48, 4)


def test_plan_is_deterministic_and_splits_only_where_it_pays():
    for world in (1, 2, 4, 8):
        for shapes in _7B:
            for parts in (_lone(shapes), _shared(shapes)):
                plan = plan_group(parts, shapes, world)
                assert plan == plan_group(parts, dict(shapes), world)
                assert set(plan.owners) == set(shapes)
                assert all(0 <= r < world for r in plan.owners.values())
                if world == 1:
                    assert not plan.slices
                whole = plan_group(parts, shapes, world, split=False)
                assert plan.seconds <= whole.seconds
                assert not whole.slices
    # a lone module is split when moving its factor costs nothing; never with importance groups
    assert set(plan_group(_lone(_7B[3]), _7B[3], 2, cost=_FREE_LINKS).slices) == {"down_proj"}
    assert not plan_group(_lone(_7B[3]), _7B[3], 2, cost=_FREE_LINKS, groups=2).slices
    # the group of q, k, v: whole modules spread over ranks by cost when each is its own part
    owners = plan_group(_lone(_7B[0]), _7B[0], 2, cost=_FREE_LINKS, split=False).owners
    assert owners == {"q_proj": 0, "k_proj": 1, "v_proj": 1}


def test_a_part_has_one_owner_and_is_never_split():
    """Modules sharing a statistic (one reduction) go to one rank; sharing one solve statistic, one factor."""
    for world in (2, 4, 8):
        for shapes in _7B[:3:2]:  # q/k/v, gate/up
            plan = plan_group(_shared(shapes), shapes, world, cost=_FREE_LINKS)
            assert not plan.slices
            assert len(set(plan.owners.values())) == 1
            units = [[[n] for n in shapes]]  # one part (shared plain statistic), one factor per module
            assert len(set(plan_group(units, shapes, world, cost=_FREE_LINKS).owners.values())) == 1
    # a shared part costs one factor plus its rows in one column loop; per module a factor and a loop more
    cost, shapes = SolveCost(), _7B[2]
    one = plan_group(_shared(shapes), shapes, 1, cost=cost).seconds
    two = plan_group([[[n] for n in shapes]], shapes, 1, cost=cost).seconds
    assert two - one == pytest.approx(cost.factor(3584) + cost.columns(0, 3584))
    assert one == pytest.approx(cost.factor(3584) + cost.columns(2 * 18944, 3584) + cost.move(3 * 2 * 18944 * 3584))
    with pytest.raises(ValueError, match="each module"):
        plan_group([["q_proj"]], _7B[0], 2)


def test_only_gptq_solves_on_one_hessian_split():
    assert splittable(get_method("tlq"), 1)
    assert splittable(get_method("gptq"), 1)
    assert not splittable(get_method("tlq"), 2)
    assert not any(splittable(get_method(m), 1) for m in ("rtn", "awq", "smoothquant", "mbq"))


class _Block(nn.Module):
    """A decoder-like layer: two attention-like projections, an output projection, an MLP."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.o_proj = nn.Linear(2 * d, d, bias=False)
        self.up_proj, self.down_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        h = x + self.o_proj(self.q_proj(x) * torch.tanh(self.k_proj(x)))
        return h + self.down_proj(torch.relu(self.up_proj(h)))


_GROUPS = [["q_proj", "k_proj"], ["o_proj"], ["up_proj"], ["down_proj"]]
_N_BATCHES, _BATCH, _SEQ = 8, 3, 12


def _batch(k: int):
    """Global batch ``k``: inputs, real tokens, importance per module, token-set multipliers (seeded by ``k``)."""
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(_BATCH, _SEQ, 64, generator=g)
    valid = torch.ones(_BATCH, _SEQ, dtype=torch.bool)
    valid[:, -2:] = k % 2 == 0  # some pad tokens
    imp = {n: torch.rand(_BATCH, _SEQ, 1, generator=g) + 0.1 for group in _GROUPS for n in group}
    multiplier = (torch.rand(_BATCH, _SEQ, generator=g) > 0.2).float() * 1.25
    return x, TokenWeights(valid, imp, multiplier)


_CASES = {
    "tlq": ("tlq", "quantized", False),
    "tlq-fp": ("tlq", "fp", False),
    "gptq": ("gptq", "quantized", False),
    "gptq-low": ("gptq", "quantized", True),
}
"""method, target, lean solve: tlq (per-module importance: q/k one part, two factors), tlq-fp (GPTAQ's cross terms
travel with the factor), gptq (q/k one solve statistic: one factor, one column loop), gptq-low (memory.profile=low:
the lean factor)."""


def _calibrate(world_size: int, rank: int, case: str = "tlq") -> dict:
    """One layer calibrated on this rank's global batches; codes, scales, outputs, records' sharing and the plans."""
    method, target, lean = _CASES[case]
    torch.manual_seed(0)
    block = _Block()
    ranges = shard_batches(_N_BATCHES * _BATCH, _BATCH, world_size, rank)
    data = [_batch(r.start // _BATCH) for r in ranges]
    quant = QuantArgs(method=method, bits=4, group_size=32, block_size=32, kernel="torch", target=target)
    stage = LayerStage(0, block, _GROUPS, quant, collective=Collective(), metrics=True, lean_solve=lean)
    plans = []
    solve = stage.solve
    stage.solve = lambda names: (
        plans.append({n: [len(r) for r in s] for n, s in stage._plan.slices.items()}),
        solve(names),
    )
    inputs = [x for x, _ in data]
    fp_inputs = inputs if target == "fp" else None  # layer 0: both paths see the same inputs
    outputs = stage.run(lambda b, h: block(h), inputs, [w for _, w in data], fp_inputs=fp_inputs)
    return {
        "codes": {n: r.codes for n, r in stage.results.items()},
        "scale": {n: r.scale for n, r in stage.results.items()},
        "errors": {n: r.record["weighted_rel_error"] for n, r in stage.results.items()},
        "shared": {n: r.record["shared"] for n, r in stage.results.items()},
        "outputs": dict(zip((r.start // _BATCH for r in ranges), outputs)),
        "plans": plans,
    }


def _worker(rank: int, world_size: int, store: str, out: str, case: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    rowsplit.DEFAULT_COST = _FREE_LINKS  # split every module that may be split
    try:
        result = _calibrate(world_size, rank, case)
        outputs = [None] * world_size
        dist.all_gather_object(outputs, result["outputs"])
        if rank == 0:
            result["outputs"] = {k: v for part in outputs for k, v in part.items()}
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _run(world_size: int, tmp_path, case: str = "tlq") -> dict:
    out = tmp_path / f"world{world_size}.pt"
    store = str(tmp_path / f"store{world_size}")
    torch.multiprocessing.spawn(_worker, args=(world_size, store, str(out), case), nprocs=world_size)
    return torch.load(out)


def _assert_same(ref: dict, got: dict) -> None:
    for n in ref["codes"]:
        assert torch.equal(ref["codes"][n], got["codes"][n]), n
        assert torch.equal(ref["scale"][n], got["scale"][n]), n
    assert ref["errors"] == got["errors"]
    assert ref["shared"] == got["shared"]
    assert sorted(ref["outputs"]) == sorted(got["outputs"])
    assert all(torch.equal(ref["outputs"][k], got["outputs"][k]) for k in ref["outputs"])


@pytest.fixture(scope="module")
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {case: _calibrate(1, 0, case) for case in _CASES if case != "gptq-low"}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # ~15 s on the 2-core box
@pytest.mark.parametrize("case", list(_CASES))
def test_two_processes_with_split_rows_match_one(one_process, tmp_path, case):
    two = _run(2, tmp_path, case)
    assert two["plans"] == [{}, {"o_proj": [32] * 2}, {"up_proj": [128] * 2}, {"down_proj": [32] * 2}]  # rows per rank
    q_k = 2 if case.startswith("gptq") else 1  # solved together (one factor) under gptq
    assert two["shared"] == {"q_proj": q_k, "k_proj": q_k, "o_proj": 1, "up_proj": 1, "down_proj": 1}
    _assert_same(one_process["gptq" if case == "gptq-low" else case], two)  # low: the fast profile's codes


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tlq", "gptq"])
def test_four_processes_with_split_rows_match_one(one_process, tmp_path, case):
    four = _run(4, tmp_path, case)
    assert four["plans"] == [{}, {"o_proj": [16] * 4}, {"up_proj": [64] * 4}, {"down_proj": [16] * 4}]
    _assert_same(one_process[case], four)


def test_prediction_reproduces_the_measured_run_and_never_beats_its_bound(capsys):
    """examples/predict_scaling.py on the recorded 7B run: N = 1 gives the measured wall time, more ranks never take
    longer, and no schedule beats the bound where only the serial factor chain stays."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("predict_scaling", root / "examples" / "predict_scaling.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    runs = root / "docs" / "performance_runs_2026-12-03-redesign.jsonl"
    run = json.loads(runs.read_text().splitlines()[0])
    for sharing in ("module", "input"):
        args = type("Args", (), {"importance_fixed_s": 1.0, "warmup_s": 0.57, "link_gbps": 150.0, "sharing": sharing})
        rows = {n: script.predict(run, n, SolveCost(), args()) for n in (1, 2, 4, 8)}
        for name in ("total today", "total rowsplit"):
            if sharing == "module":  # as the run solved: N = 1 is the measured run
                assert rows[1][name] == pytest.approx(run["wall_s"], rel=1e-9)
            else:  # fewer factors and column loops: less solve time at N = 1
                assert rows[1][name] < run["wall_s"]
                assert rows[1][name] == pytest.approx(rows[1]["bound: all but the factor chain split"], rel=1e-9)
            assert all(rows[a][name] >= rows[b][name] for a, b in ((1, 2), (2, 4), (4, 8)))
        assert all(rows[n]["total rowsplit"] >= rows[n]["bound: all but the factor chain split"] for n in rows)
    script.main([str(runs), "--sharing", "input"])
    assert "PREDICTION" in capsys.readouterr().out
