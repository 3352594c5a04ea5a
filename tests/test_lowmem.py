"""``memory.profile=low`` gives the codes of the fast profile: the lean GPTQ solve computes the same IEEE operations
on the same values (exact equality on one thread), and placement never changes a result (its moves only exist on
an accelerator: the CUDA case runs on the GPU machine)."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning.fabric import Fabric

from lightning_tlq.activations import LayerReplay
from lightning_tlq.config import MemoryArgs, QuantArgs
from lightning_tlq.core import gptq_lean
from lightning_tlq.core.gptq import gptq_quantize, gptq_quantize_shared
from lightning_tlq.core.gptq_lean import flip_, gathered, gptq_quantize_lean, gptq_quantize_shared_lean
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.lowmem import MemoryPlan
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # exact codes compared: one intra-op thread (conftest)


def test_chunked_flip_and_gather_are_exact(monkeypatch) -> None:
    monkeypatch.setattr(gptq_lean, "CHUNK_BYTES", 3 * 8 * 64)  # a few rows per chunk: every boundary case
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 8, 64, 129):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        assert torch.equal(flip_(m.clone()), m.flip(0, 1)), n
        order = torch.randperm(n, generator=g)
        assert torch.equal(gathered(m, order, m.device), m.float()[order][:, order]), n


def test_lean_gptq_equals_gptq(monkeypatch) -> None:
    monkeypatch.setattr(gptq_lean, "CHUNK_BYTES", 3 * 8 * 32)  # several chunks per gather and flip
    g = torch.Generator().manual_seed(1)
    cases = itertools.product((96,), (1, 2), (True, False), (False, True), (torch.float64, torch.float32))
    for in_f, groups, act_order, cross, dtype in cases:
        W = torch.randn(64, in_f, generator=g).to(torch.bfloat16)
        X = torch.randn(300, in_f, generator=g)
        X[:, 5] = 0  # a dead input
        H = (X.T @ X).to(dtype)
        if groups > 1:
            H = torch.stack([H, 2 * H + torch.eye(in_f, dtype=dtype)])
        C = 0.01 * torch.randn(H.shape, generator=g, dtype=dtype) if cross else None
        H_before = H.clone()
        kw = {"act_order": act_order, "cross": C, "block_size": 32}
        spec = QuantSpec(bits=3, group_size=32)
        fast = gptq_quantize(W, H, spec, **kw)
        for reuse in (False, True):
            lean = gptq_quantize_lean(W, H, spec, **kw, reuse_h=reuse)
            case = (in_f, groups, act_order, cross, dtype, reuse)
            assert torch.equal(fast.codes, lean.codes), case
            assert torch.equal(fast.scale, lean.scale), case
            assert torch.equal(fast.weight, lean.weight), case
            assert (fast.damp, fast.retries) == (lean.damp, lean.retries), case
            # read only unless reused (then a float64 H holds the factorisation)
            assert torch.equal(H, H_before) != (reuse and dtype == torch.float64), case
            H.copy_(H_before)


@pytest.mark.parametrize("concat_rows", [True, False])
def test_lean_shared_gptq_equals_shared_gptq(monkeypatch, concat_rows: bool) -> None:
    monkeypatch.setattr(gptq_lean, "CHUNK_BYTES", 3 * 8 * 32)
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(rows, 96, generator=g).to(torch.bfloat16) for rows in (64, 32, 32)]  # q, k, v
    X = torch.randn(300, 96, generator=g)
    H = (X.T @ X).double()
    fast = gptq_quantize_shared(weights, H, QuantSpec(bits=4, group_size=32), block_size=32, concat_rows=concat_rows)
    lean = gptq_quantize_shared_lean(
        weights, H, QuantSpec(bits=4, group_size=32), block_size=32, concat_rows=concat_rows, reuse_h=True
    )
    for a, b in zip(fast, lean):
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.scale, b.scale)


def test_lean_gptq_retries_like_gptq(caplog) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    H = x @ x.T - 0.02 * torch.eye(64, dtype=torch.float64) * float(torch.diagonal(x @ x.T).mean())  # indefinite
    W = torch.randn(16, 64, generator=g)
    spec = QuantSpec(bits=4, group_size=32)
    fast = gptq_quantize(W, H, spec, block_size=16)
    for reuse in (False, True):
        lean = gptq_quantize_lean(W, H.clone(), spec, block_size=16, reuse_h=reuse)
        assert fast.retries == lean.retries > 0
        assert fast.damp == lean.damp
        assert torch.equal(fast.codes, lean.codes)
    assert sum("retrying" in r.message for r in caplog.records) == 3 * fast.retries


def _codes(profile: str, method: str, target: str = "quantized", metrics: bool = True) -> tuple[dict, list]:
    model, processor = build_tiny_vlm("qwen2_vl", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(6, seed=2)]
    batches = make_batches(encoded, 3, module.adapter.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fabric = Fabric(accelerator=device, devices=1)
    quant = QuantArgs(method=method, bits=3, group_size=32, target=target)
    settings = CalibrationSettings(quant, memory=MemoryArgs(profile=profile), metrics=metrics)
    loop = CalibrationLoop(fabric, module, settings)
    records = loop.run(batches)
    untimed = [{k: {f: x for f, x in v.items() if f != "seconds"} for k, v in r["modules"].items()} for r in records]
    return {k: (r.codes, r.scale) for k, r in loop.results.items()}, untimed


@pytest.mark.parametrize(
    ("method", "target", "metrics"),
    [("tlq", "quantized", True), ("gptq", "fp", True), ("gptq", "quantized", False)],  # the last reuses H's storage
)
def test_low_profile_gives_the_fast_profiles_codes(method: str, target: str, metrics: bool) -> None:
    fast, fast_records = _codes("fast", method, target, metrics)
    low, low_records = _codes("low", method, target, metrics)
    assert fast.keys() == low.keys()
    for name, (codes, scale) in fast.items():
        assert torch.equal(codes, low[name][0]), name
        assert torch.equal(scale, low[name][1]), name
    assert fast_records == low_records  # tokens, damping, errors


def test_memory_plan_and_profile_validation() -> None:
    assert MemoryPlan.from_args(MemoryArgs()) == MemoryPlan(False, False, False, True, False)
    assert MemoryPlan.from_args(MemoryArgs(profile="low")) == MemoryPlan(True, True, True, False, True)
    assert MemoryPlan.from_args(MemoryArgs(offload_activations=True)).offload_activations
    with pytest.raises(ValueError, match="memory.profile='tiny' is not supported; choose one of fast, low"):
        MemoryArgs(profile="tiny")  # type: ignore[arg-type]


def test_check_finite_trusts_store_flags_and_names_the_batch() -> None:
    replay = LayerReplay(adapter=None, device=torch.device("cpu"))
    good, bad = torch.ones(2, 3), torch.tensor([[1.0, float("nan")]])
    replay._finite[id(good)] = torch.tensor(True)  # as store() records for its host copies
    replay.check_finite(0, [good, good])
    with pytest.raises(FloatingPointError, match="Decoder layer 4 .* batch 1 on the quantized path"):
        replay.check_finite(4, [good, bad])  # no flag: scanned
    lying = torch.tensor([[float("inf")]])
    replay._finite[id(lying)] = torch.tensor(False)
    with pytest.raises(FloatingPointError, match="batch 2 on the full-precision path"):
        replay.check_finite(1, [good, good, lying], path="full-precision")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (activations offloaded, head parked)")
def test_low_profile_lowers_the_cuda_peak() -> None:
    peaks = {}
    for profile in ("fast", "low"):
        torch.cuda.reset_peak_memory_stats()
        _codes(profile, "tlq")
        peaks[profile] = torch.cuda.max_memory_allocated()
    assert peaks["low"] < peaks["fast"]


def test_layers_are_page_locked_within_the_budget() -> None:
    from lightning_tlq.placement import lock_budget, within_budget

    groups = [[torch.zeros(250, dtype=torch.uint8), torch.zeros(50, dtype=torch.uint8)] for _ in range(4)]
    assert within_budget(groups, 10**6) == groups
    assert within_budget(groups, 600) == groups[:2]
    assert within_budget(groups, 599) == groups[:1]
    assert within_budget(groups, 0) == []
    assert lock_budget() > 0
