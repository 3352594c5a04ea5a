"""Calibration over ranks: sharding, owners, layer-wise importance, and 1-vs-N-process invariance (gloo, CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from safetensors.torch import load_file

from lightning_tlq.calibrate import calibrate
from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.distributed import assign_owners, shard_batches, shard_range
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.report import REPORT_NAME
from lightning_tlq.settings import CalibrationSettings

_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RANK")


def test_shards_cover_without_padding_or_repetition():
    for n in (5, 8, 13):
        for world in (1, 2, 3, 4):
            shards = [shard_range(n, world, r) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="without repetition"):
        shard_range(1, 2, 0)


def test_batches_are_global_and_sharded_whole():
    for n in (5, 10, 13):
        for batch in (1, 2, 4):
            reference = shard_batches(n, batch, 1, 0)
            assert reference == [range(i, min(n, i + batch)) for i in range(0, n, batch)]
            for world in (2, 3):
                if -(-n // batch) < world:
                    continue
                shards = [shard_batches(n, batch, world, r) for r in range(world)]
                assert [b for s in shards for b in s] == reference  # same batches, contiguous, no repetition
                assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # fewer batches than ranks: smaller batches so that every rank gets one
    shards = [shard_batches(5, 4, 3, r) for r in range(3)]
    assert [[list(b) for b in s] for s in shards] == [[[0], [1]], [[2], [3]], [[4]]]
    with pytest.raises(ValueError, match="without repetition"):
        shard_batches(1, 2, 2, 0)


def test_owners_balance_solve_cost():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_owners(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [10.0, 10.0]
    assert assign_owners(costs, 1) == [0] * 6
    assert owners == assign_owners(costs, 2)  # deterministic


def _loop_scores(family, layerwise):
    model, processor = build_tiny_vlm(family, seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(6, seed=3)]
    batches = make_batches(encoded, 3, module.adapter.pad_token_id)
    fabric = Fabric(accelerator="cpu", devices=1)
    settings = CalibrationSettings(
        QuantArgs(method="tlq", group_size=64), ImportanceArgs(), TokenSetArgs(), MemoryArgs(layerwise=layerwise)
    )
    loop = CalibrationLoop(fabric, module, settings)
    records = loop.run(batches)
    return loop.collector.scores, records, {k: r.codes for k, r in loop.results.items()}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_layerwise_importance_equals_whole_model_backward(family, one_thread):
    """The layer-by-layer backward gives the whole-model backward's importance, token sets and codes.

    The two backward passes multiply matrices of different shapes (the layer-wise head runs on answer positions
    only), so their scores agree to float32 rounding, not bit for bit. GPTQ turns such last-bit differences into a
    few flipped codes, more of them with more intra-op threads (2 threads: ~95% equal), hence one thread
    (``one_thread``) for the code comparison; the next test checks what holds at another thread count.
    """
    whole, rec_whole, codes_whole = _loop_scores(family, layerwise=False)
    layered, rec_layered, codes_layered = _loop_scores(family, layerwise=True)
    assert set(whole) == set(layered)
    for name in whole:
        for a, b in zip(whole[name], layered[name]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-10)
    assert [r["token_set_fingerprint"] for r in rec_whole] == [r["token_set_fingerprint"] for r in rec_layered]
    same = sum(int((codes_whole[k] == codes_layered[k]).sum()) for k in codes_whole)
    assert same / sum(c.numel() for c in codes_whole.values()) > 0.999


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_layerwise_importance_matches_whole_with_two_threads(family):
    """What must hold whatever the thread count: scores to float32 rounding, the same token sets, and the run's
    total weighted output error within 0.5% (codes may flip where GPTQ meets a last-bit difference)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole, rec_whole, _ = _loop_scores(family, layerwise=False)
        layered, rec_layered, _ = _loop_scores(family, layerwise=True)
    finally:
        torch.set_num_threads(before)
    for name in whole:
        for a, b in zip(whole[name], layered[name]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-10)
    assert [r["token_set_fingerprint"] for r in rec_whole] == [r["token_set_fingerprint"] for r in rec_layered]
    assert _total_error(rec_layered) == pytest.approx(_total_error(rec_whole), rel=5e-3)


def _total_error(records):
    """Sum of every module's importance-weighted relative output error (single flipped codes move one module's
    error by a few percent; the sum stays put)."""
    return sum(mod["weighted_rel_error"] for layer in records for mod in layer["modules"].values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(model="tiny-llava", bits=3, group_size=64):
    return ["--model.model_name_or_path", model, "--data.num_samples", "10", "--data.batch_size", "2",
            "--quant.bits", str(bits), "--quant.group_size", str(group_size), "--trainer.accelerator", "cpu",
            "--quiet", "true"]  # fmt: skip


_ARGS = _cli_args()
# GPTQ turns last-bit differences in a Hessian into flipped codes that propagate (layer 1 of tiny-qwen2_vl W4 g32
# was only ~90.6% identical before batches were made global and Hessians summed in float64); check that setting too.
_QWEN_ARGS = _cli_args("tiny-qwen2_vl", bits=4, group_size=32)


def _run_cli(out, *extra, env=None, args=_ARGS):
    cmd = [sys.executable, "-m", "lightning_tlq", "calibrate", *args, "--output_dir", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("LT_")}
    root = str(Path(__file__).resolve().parents[1])
    # One intra-op thread in every process: Lightning gives each of N CPU ranks cpu_count // N threads (1 on a 2-core
    # box), and float32 matmuls round differently with 1 and 2 threads, which alone made layer 1 of the 1-process
    # reference ~81-99% identical to the 2-process run. With the same thread count the runs are bit-identical.
    env.update(HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=root, OMP_NUM_THREADS="1", **extra)
    return env


def _grid_steps(a: torch.Tensor, b: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per element, how many grid steps apart two fake-quantized weights are.

    The step of a group is its scale: the smallest gap between the distinct values the two runs put in it (both
    lie on the same grid, static groups from the same original weights; a group with one value counts as exact).
    """
    ga, gb = (t.reshape(t.shape[0], -1, group_size) for t in (a, b))
    steps = torch.zeros_like(ga)
    for r in range(ga.shape[0]):
        for g in range(ga.shape[1]):
            diff = (ga[r, g] - gb[r, g]).abs()
            if not diff.any():
                continue
            values = torch.unique(torch.cat([ga[r, g], gb[r, g]]))
            step = (values[1:] - values[:-1]).min()
            steps[r, g] = torch.round(diff / step)
    return steps.reshape(a.shape)


def _compare(reference: Path, other: Path, group_size: int = 64, world_size: int = 2, max_steps: int = 1):
    ref, got = json.loads((reference / REPORT_NAME).read_text()), json.loads((other / REPORT_NAME).read_text())
    assert got["settings"]["world_size"] == world_size
    assert got["data"] == ref["data"]
    for a, b in zip(ref["layers"], got["layers"]):
        assert a["token_set_fingerprint"] == b["token_set_fingerprint"]
        assert a["tokens_kept"] == b["tokens_kept"]
    w_ref, w_got = load_file(reference / "model.safetensors"), load_file(other / "model.safetensors")
    decoder = [k for k in w_ref if "visual" not in k and "vision" not in k]  # Qwen2-VL: model.layers.*
    quantized = [k for k in decoder if ".layers." in k and k.endswith("proj.weight")]
    assert quantized
    same = total = 0
    for k in quantized:
        equal = w_ref[k] == w_got[k]
        same, total = same + int(equal.sum()), total + equal.numel()
        if not equal.all():
            assert _grid_steps(w_ref[k], w_got[k], group_size).max() <= max_steps, k
    assert same / total >= 0.999, same / total
    others = [k for k in w_ref if k not in quantized]
    assert all(torch.equal(w_ref[k], w_got[k]) for k in others)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    proc = _run_cli(out, env=_clean_env())
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    return out


def test_two_processes_match_one(single_process_run, tmp_path):
    out = tmp_path / "two"
    proc = _run_cli(out, "--trainer.devices", "2", "--trainer.strategy", "ddp", env=_clean_env())
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    _compare(single_process_run, out)


@pytest.fixture(scope="module")
def single_process_qwen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_qwen") / "out"
    proc = _run_cli(out, env=_clean_env(), args=_QWEN_ARGS)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    return out


@pytest.mark.slow
def test_two_processes_match_one_qwen2_vl_w4_g32(single_process_qwen_run, tmp_path):
    out = tmp_path / "two_qwen"
    proc = _run_cli(out, "--trainer.devices", "2", "--trainer.strategy", "ddp", env=_clean_env(), args=_QWEN_ARGS)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    _compare(single_process_qwen_run, out, group_size=32)


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one(single_process_run, tmp_path):
    out = tmp_path / "nodes"
    port = str(_free_port())
    procs = [
        _run_cli(out, "--trainer.num_nodes", "2", "--trainer.strategy", "ddp",
                 env=_clean_env(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for rank in range(2)
    ]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    _compare(single_process_run, out)


def test_ddp_spawn_in_process(tmp_path):
    """The Python API under ddp_spawn (what notebooks use): rank 0 writes, the report says 2 ranks."""
    report = calibrate(
        model="tiny-qwen2_vl", quant=QuantArgs(group_size=64), output_dir=str(tmp_path / "spawn"),
        accelerator="cpu", devices=2, strategy="ddp_spawn", quiet=True,
    )  # fmt: skip
    assert report["settings"]["world_size"] == 2
    assert (tmp_path / "spawn" / REPORT_NAME).exists()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(single_process_run, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "lightning_tlq.calibrate", *_ARGS, "--trainer.devices", "2",
           "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _compare(single_process_run, out)


@pytest.mark.slow
def test_fabric_run_two_processes_match_one(single_process_run, tmp_path):
    pytest.importorskip("click")
    import lightning_tlq

    entry = Path(lightning_tlq.__file__).with_name("calibrate.py")  # the script `fabric run` is given
    out = tmp_path / "fabric_run"
    cmd = [sys.executable, "-m", "lightning.fabric.cli", "--accelerator", "cpu", "--devices", "2",
           "--main-port", str(_free_port()), str(entry), *_ARGS, "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _compare(single_process_run, out)


@pytest.mark.slow
def test_eight_processes_match_one(tmp_path):
    """The 8-rank code path (owners spread over 8 ranks, one whole batch per rank) on CPU with gloo."""
    args = [a if a != "10" else "16" for a in _ARGS]  # 16 samples, batch 2: 8 global batches
    one, eight = tmp_path / "one", tmp_path / "eight"
    ref = _run_cli(one, env=_clean_env(), args=args)
    log = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, log
    proc = _run_cli(eight, "--trainer.devices", "8", "--trainer.strategy", "ddp", env=_clean_env(), args=args)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log
    # Observed 2026-11-26: 99.98% of codes identical to 1 process; a few differ by 2 grid steps (GPTQ feeds one
    # flipped code's error into the rest of its row), so this checks <= 2 steps where 1-vs-2 processes check 1.
    _compare(one, eight, world_size=8, max_steps=2)
