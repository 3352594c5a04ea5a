"""The hard-benchmark quality runner's plan (priority order) and its paired bootstrap (pure Python, no models)."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quality_hard.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("quality_hard", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_runs_the_core_cells_first(runner):
    cells = runner.plan(["a", "b"], list(runner.METHODS), list(runner.SETTINGS), [0, 1, 2])
    keys = [(c["setting"], c["method"], c["seed"], c["model"]) for c in cells]
    assert len(keys) == len(set(keys)) == 2 * (5 + 6 * 5 * 3 + 3)  # rtn once, smoothquant only at W4A8
    first = {(s, m) for s, m, _, _ in keys[:12]}
    assert first == {(s, m) for s in ("W3A16 g128", "W2A16 g64") for m in ("rtn", "gptq", "tlq")}
    assert all(seed == 0 for _, _, seed, _ in keys[:72])
    variants = runner.plan(["a"], ["rtn@vision=true", "smoothquant@alpha=0.5"], list(runner.SETTINGS), [0, 1])
    seed1 = [(c["method"], c["setting"]) for c in variants if c["seed"] == 1]
    assert seed1 == [("smoothquant@alpha=0.5", "W4A8 g128")]  # a variant of rtn runs once, of smoothquant at W4A8
    assert {m for s, m, _, _ in keys if s != "W4A8 g128"} == set(runner.METHODS) - {"smoothquant"}


def test_ablations_are_tlq_variants_with_typed_overrides(runner):
    name = runner.ablation("floor=0.5,keep_mass=0.9,mode=modality")
    assert name == "tlq@floor=0.5,keep_mass=0.9,mode=modality"
    cell = {"setting": "W2A16 g64", "method": name, "seed": 2}
    data, quant, importance, token_set = runner._quant_args(cell, 64)
    assert (quant.method, quant.bits, quant.group_size, data.seed) == ("tlq", 2, 64, 2)
    assert (importance.floor, importance.mode, token_set.keep_mass, token_set.seed) == (0.5, "modality", 0.9, 2)
    assert runner._quant_args({**cell, "method": "tlq"}, 64)[2].floor == 0.1  # the default
    with pytest.raises(SystemExit, match="'flor=0.5' is not key=value"):
        runner.ablation("flor=0.5")
    with pytest.raises(ValueError, match=r"importance.floor"):
        runner._quant_args({**cell, "method": "tlq@floor=2"}, 64)
    cells = runner.plan(["a"], ["gptq", "tlq", name], ["W3A16 g128"], [0])
    assert [c["method"] for c in cells] == ["gptq", "tlq", name]
    vision = runner.ablation("rtn@vision=true,floor=0.3")  # any method's variant; quant.* fields too
    quant, importance = runner._quant_args({**cell, "method": vision}, 64)[1:3]
    assert (vision, quant.method, quant.vision, quant.bits, importance.floor) == (
        "rtn@vision=true,floor=0.3",
        "rtn",
        True,
        2,
        0.3,
    )
    with pytest.raises(SystemExit, match="vision takes true or false"):
        runner.ablation("gptq@vision=yes")
    with pytest.raises(SystemExit, match="'awq2' is not one of"):
        runner.ablation("awq2@vision=true")


def _cell(method, correct, seed=0):
    bits = runner_bits(correct)
    return {"model": "m", "setting": "W3A16 g128", "method": method, "seed": seed, **bits}


def runner_bits(correct):
    return {"n": len(correct), "correct_hex": format(int("".join("1" if c else "0" for c in correct), 2), "x")}


def test_bootstrap_interval(runner):
    base = [False] * 3 + [True] * 97  # leading zeros survive the hex round trip
    assert runner._bits(_cell("gptq", base)).tolist() == [float(c) for c in base]
    same = runner.bootstrap([_cell("gptq", base), _cell("tlq", base)])["m | W3A16 g128"]
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    better = [True] * 50 + base[50:]
    result = runner.bootstrap([_cell("gptq", base), _cell("tlq", better), _cell("tlq", better, seed=1)])
    got = result["m | W3A16 g128"]
    assert got["seeds"] == [0]
    assert got["diff"] == pytest.approx(0.03)
    assert 0 <= got["lo"] <= 0.03 <= got["hi"] <= 0.1  # every paired difference is >= 0
    variant = runner.bootstrap([_cell("gptq", base), _cell("tlq@labels=model", better)])
    assert list(variant) == ["m | W3A16 g128 | tlq@labels=model"]
    assert variant["m | W3A16 g128 | tlq@labels=model"]["diff"] == pytest.approx(0.03)
    fp = {"m": runner_bits(base)}  # gptq changes 50 answers of FP (gains them), tlq@x none
    flips = runner.bootstrap([_cell("gptq", better), _cell("tlq@x=1", base)], fp=fp)["m | W3A16 g128 | tlq@x=1"]
    assert flips["changed"] == pytest.approx(-0.03)  # 3 of the first 50 items were wrong in FP: gptq changed 3
    assert flips["changed_lo"] <= -0.03 <= flips["changed_hi"] <= 0
    assert runner.changed(_cell("gptq", better), fp["m"]).sum() == 3
    paired = runner.bootstrap([_cell("gptq", better), _cell("gptq@vision=true", base), _cell("tlq@vision=true", base)])
    assert paired["m | W3A16 g128 | tlq@vision=true (vs gptq@vision=true)"]["diff"] == 0.0  # its own GPTQ variant


@pytest.mark.slow
def test_train_and_table_smoke(tmp_path):
    """Both scripts end to end on tiny shapes: 3 training steps per family, then rtn/gptq/tlq on both models."""
    import json
    import subprocess
    import sys

    root = EXAMPLE.parent.parent
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(root), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    models = []
    for family in ("llava", "qwen2_vl"):
        out = tmp_path / family
        cmd = [sys.executable, str(root / "examples" / "train_hard_vlm.py"), "--smoke", "--family", family]
        task = ["--task", "scenes_finer"] if family == "qwen2_vl" else []  # each model is tested on its own variant
        subprocess.run([*cmd, *task, "--out", str(out)], env=env, check=True, timeout=300, capture_output=True)
        assert json.loads((out / "training.json").read_text())["steps"] == 3
        models.append(f"{family}={out}")
    more = tmp_path / "llava_more"  # --init continues from a checkpoint's weights
    subprocess.run([*cmd[:-1], "llava", "--init", str(tmp_path / "llava"), "--out", str(more)], env=env, check=True,
                   timeout=300, capture_output=True)  # fmt: skip
    assert json.loads((more / "training.json").read_text())["args"]["init"] == str(tmp_path / "llava")
    table = tmp_path / "q.json"
    subprocess.run([sys.executable, str(EXAMPLE), "--smoke", "--models", *models, "--methods", "rtn", "gptq", "tlq",
                    "--settings", "W2A16 g64", "--seeds", "0", "--json", str(table), "--md", str(tmp_path / "q.md"),
                    "--max-seconds", "600"], env=env, check=True, timeout=900, capture_output=True)  # fmt: skip
    state = json.loads(table.read_text())
    assert state["status"] == "complete"
    assert not state["errors"]
    assert sorted(state["fp"]) == ["llava", "qwen2_vl"]
    records = [json.loads(line) for line in table.with_suffix(".jsonl").read_text().splitlines()]
    assert sorted(r["fp"] for r in records if "fp" in r) == ["llava", "qwen2_vl"]  # once per model, not per worker
    assert {(c["model"], c["method"]) for c in state["cells"]} == {
        (m, k) for m in ("llava", "qwen2_vl") for k in ("rtn", "gptq", "tlq")
    }
    assert all(c["n"] == 16 and c["kl"] >= 0 for c in state["cells"])
    kinds = {m: {k for c in state["cells"] if c["model"] == m for k in c["per_type"]} for m in ("llava", "qwen2_vl")}
    assert kinds == {"llava": {"read", "colors", "count", "add", "relation"},
                     "qwen2_vl": {"fine_shades", "colors", "count", "relation"}}  # fmt: skip
    assert "| setting | method | colors | count | fine_shades | relation |" in (tmp_path / "q.md").read_text()
