"""Methods as handlers: the registry, what each built-in declares, and that the loop asks handlers (a method added
from outside the package calibrates without touching the loop)."""

import pytest
import torch
from lightning.fabric import Fabric

from lightning_tlq import CalibrationObserver, CalibrationSettings, QuantArgs, TLQModule, get_method, method_names
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.methods.base import GPTQSolve
from lightning_tlq.methods.registry import _REGISTRY, register_method
from lightning_tlq.models.tiny import build_tiny_vlm


def test_registry_lists_the_builtin_methods_in_order():
    assert method_names()[:6] == ("rtn", "gptq", "tlq", "awq", "smoothquant", "mbq")
    with pytest.raises(ValueError, match="quant.method='nope' is not supported; choose one of rtn, gptq, tlq"):
        get_method("nope")
    with pytest.raises(ValueError, match="quant.method='nope'"):
        QuantArgs(method="nope")


def test_handlers_declare_what_each_method_needs():
    table = {
        name: (m.selects_tokens, m.solve_statistic, m.smoothing is not None, m.importance_score)
        for name, m in ((n, get_method(n)) for n in ("rtn", "gptq", "tlq", "awq", "smoothquant", "mbq"))
    }
    assert table == {
        "rtn": (False, "none", False, None),
        "gptq": (False, "plain", False, None),
        "tlq": (True, "weighted", False, None),
        "awq": (False, "none", True, None),
        "smoothquant": (False, "none", True, None),
        "mbq": (False, "none", True, "grad_abs"),
    }


class _Events(CalibrationObserver):
    def __init__(self):
        self.importance_starts = 0

    def on_importance_start(self, fabric, targets):
        self.importance_starts += 1


def _run(method, **settings):
    model, processor = build_tiny_vlm("llava", seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(4, seed=1)]
    batches = make_batches(encoded, 2, module.adapter.pad_token_id)
    events = _Events()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[events])
    quant = QuantArgs(method=method, bits=4, group_size=64, **({"act_bits": 8} if method == "smoothquant" else {}))
    loop = CalibrationLoop(fabric, module, CalibrationSettings(quant, **settings))
    records = loop.run(batches)
    return loop, records, events


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant"])
def test_methods_without_importance_skip_the_backward_unless_weighted_metrics(method):
    loop, records, events = _run(method)
    assert events.importance_starts == 0
    assert loop.collector.scores == {}
    for layer in records:  # the report's weighted error falls back to the plain one
        for mod in layer["modules"].values():
            assert mod["weighted_rel_error"] == mod["rel_error"]
    loop, records, events = _run(method, weighted_metrics=True)
    assert events.importance_starts == 1
    assert any(m["weighted_rel_error"] != m["rel_error"] for layer in records for m in layer["modules"].values())


def test_tlq_and_mbq_always_run_the_backward():
    for method in ("tlq", "mbq"):
        assert _run(method)[2].importance_starts == 1


def test_a_method_registered_from_outside_calibrates_through_the_loop():
    @register_method
    class AnswerGPTQ(GPTQSolve):
        """GPTQ on the importance-weighted Hessian of every real token (no token set)."""

        name = "test_weighted_gptq"
        solve_statistic = "weighted"

        def needs_importance(self, importance):
            return True

    try:
        loop, records, events = _run("test_weighted_gptq")
        tlq_loop, *_ = _run("tlq")
    finally:
        del _REGISTRY["test_weighted_gptq"]
    assert events.importance_starts == 1
    assert all("tokens_kept" not in layer for layer in records)  # no token set
    assert all(m["damp"] > 0 for layer in records for m in layer["modules"].values())  # solved by GPTQ
    # same importance-weighted Hessian over every token as tlq's over its token set (keep_mass 0.99 + 10% of the
    # rest): the codes agree closely but not exactly
    same = sum(int((loop.results[k].codes == r.codes).sum()) for k, r in tlq_loop.results.items())
    total = sum(r.codes.numel() for r in tlq_loop.results.values())
    assert 0.5 < same / total < 1.0
    assert torch.isfinite(torch.tensor([m["rel_error"] for layer in records for m in layer["modules"].values()])).all()
