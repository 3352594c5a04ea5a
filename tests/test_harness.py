"""The in-process evaluation harness, checked against independent one-sample-at-a-time computations."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_tlq.adapters import get_adapter
from lightning_tlq.core.quantizer import QuantSpec, fake_quantize
from lightning_tlq.data import IGNORE_INDEX, Sample, encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.harness import (
    ReferenceLogits,
    evaluate_model,
    greedy_answers,
    normalize_answer,
    reference_logits,
)
from lightning_tlq.models import build_tiny_vlm
from lightning_tlq.module import TLQModule

FAMILIES = ["llava", "qwen2_vl"]


def _module(family, seed=1):
    return TLQModule().attach(*build_tiny_vlm(family, seed=seed))


def _quantized(module, bits=3):
    """A copy whose decoder Linears are RTN fake-quantized (group 64)."""
    model = copy.deepcopy(module.model)
    for layer in get_adapter(model).decoder_layers():
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.data = fake_quantize(linear.weight.data, QuantSpec(bits=bits, group_size=64))
    return TLQModule().attach(model, module.processor)


@pytest.fixture(scope="module", params=FAMILIES)
def family_models(request):
    """(fp module, 3-bit quantized module, samples) of one family."""
    fp = _module(request.param)
    return fp, _quantized(fp), synthetic_samples(10, seed=2)


def _one_at_a_time(model, processor, sample, max_new_tokens=8):
    enc = encode_sample(processor, sample)
    inputs = prompt_inputs(enc)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _answer_log_probs(model, processor, sample):
    """Full-sequence logits of one unpadded sample, log-softmax at the positions predicting answer tokens."""
    enc = encode_sample(processor, sample)
    logits = model(**{k: v for k, v in enc.items() if k != "labels"}, use_cache=False).logits[0, :-1]
    mask = enc["labels"][0, 1:] != IGNORE_INDEX
    return torch.log_softmax(logits[mask].double(), dim=-1), enc["labels"][0, 1:][mask]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_answers_equal_one_at_a_time(family):
    module = _module(family)
    samples = synthetic_samples(12, seed=5)
    encoded = [encode_sample(module.processor, s) for s in samples]
    lengths = {prompt_inputs(e)["input_ids"].shape[1] for e in encoded[:6]}
    assert len(lengths) > 1, "the batch must need left padding"
    batched = greedy_answers(module, encoded[:6]) + greedy_answers(module, encoded[6:])
    with torch.no_grad():
        single = [_one_at_a_time(module.model, module.processor, s) for s in samples]
    assert batched == single
    assert len(set(single)) > 1, "the tiny model should not answer everything alike"


def test_nll_perplexity_and_kl_match_an_independent_computation(family_models):
    fp, quantized, samples = family_models
    metrics = evaluate_model(quantized, samples, reference=fp, batch_size=4, num_examples=None)
    nll, kl, tokens = 0.0, 0.0, 0
    per_sample_kl = []
    with torch.no_grad():
        for sample in samples:
            q, targets = _answer_log_probs(quantized.model, quantized.processor, sample)
            p, _ = _answer_log_probs(fp.model, fp.processor, sample)
            nll += F.nll_loss(q, targets, reduction="sum").item()
            sample_kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q) per token
            kl, tokens = kl + sample_kl.sum().item(), tokens + len(targets)
            per_sample_kl.append(sample_kl.mean().item())
    assert metrics["answer_tokens"] == tokens
    assert metrics["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=1e-5)
    assert metrics["kl_to_reference"] == pytest.approx(kl / tokens, rel=1e-5)
    assert metrics["kl_to_reference"] > 1e-4, "3-bit weights must move the answer distributions"
    assert [r["kl_to_reference"] for r in metrics["examples"]] == pytest.approx(per_sample_kl, rel=1e-5)


def test_kl_of_a_model_to_itself_is_zero(family_models):
    fp, _, samples = family_models
    live = evaluate_model(fp, samples, reference=fp, batch_size=4)
    stored = evaluate_model(fp, samples, reference=reference_logits(fp, samples, batch_size=3), batch_size=4)
    for metrics in (live, stored):
        assert abs(metrics["kl_to_reference"]) < 1e-7
        assert all(abs(v["kl_to_reference"]) < 1e-7 for v in metrics["per_type"].values())
    assert live["kl_to_reference"] == 0.0  # same batches, same logits: exactly zero
    assert stored["nll"] == live["nll"]


def test_precomputed_reference_gives_the_live_reference_metrics(family_models):
    fp, quantized, samples = family_models
    reference = reference_logits(fp, samples, batch_size=4)
    assert [t.shape[0] for t in reference.logits] == [
        int((encode_sample(fp.processor, s)["labels"][0, 1:] != IGNORE_INDEX).sum()) for s in samples
    ]
    live = evaluate_model(quantized, samples, reference=fp, batch_size=4)
    stored = evaluate_model(quantized, samples, reference=reference, batch_size=4)
    assert stored["kl_to_reference"] == pytest.approx(live["kl_to_reference"], rel=1e-6)
    for kind, values in live["per_type"].items():
        assert stored["per_type"][kind]["kl_to_reference"] == pytest.approx(values["kl_to_reference"], rel=1e-6)


def test_per_type_accuracy_matches_a_manual_count():
    module = _module("llava")
    base = synthetic_samples(9, seed=4)
    with torch.no_grad():
        own = [_one_at_a_time(module.model, module.processor, s) for s in base]
    assert all(normalize_answer(a) for a in own)
    # kinds a/b/untyped; every third answer is the model's own (correct), the others are wrong
    kinds = ["a", "b", "", "a", "a", "b", "", "", "a"]
    samples = [
        Sample(s.image, s.question, own[i] if i % 3 == 0 else "definitely wrong", kinds[i]) for i, s in enumerate(base)
    ]
    metrics = evaluate_model(module, samples, batch_size=4, num_examples=None)
    assert list(metrics["per_type"]) == ["", "a", "b"]
    for kind, values in metrics["per_type"].items():
        members = [i for i, k in enumerate(kinds) if k == kind]
        correct = sum(i % 3 == 0 for i in members)
        assert (values["samples"], values["correct"]) == (len(members), correct)
        assert values["exact_match"] == correct / len(members)
        labels = [encode_sample(module.processor, samples[i])["labels"] for i in members]
        assert values["answer_tokens"] == sum(int((x != IGNORE_INDEX).sum()) for x in labels)
    assert metrics["exact_match"] == 3 / 9
    assert sum(v["answer_tokens"] for v in metrics["per_type"].values()) == metrics["answer_tokens"]
    assert [r["correct"] for r in metrics["examples"]] == [i % 3 == 0 for i in range(9)]
    assert "kl_to_reference" not in metrics


def test_bad_input_fails_with_a_clear_message(family_models):
    fp, quantized, samples = family_models
    other = _module("qwen2_vl" if fp.model.config.model_type == "llava" else "llava")
    with pytest.raises(ValueError, match="logits per position"):
        evaluate_model(quantized, samples, reference=other)
    reference = reference_logits(fp, samples[:3])
    with pytest.raises(ValueError, match="cover 3 samples, not 10"):
        evaluate_model(quantized, samples, reference=reference)
    shifted = ReferenceLogits([reference.logits[0][:-1], *reference.logits[1:]])  # one token short
    with pytest.raises(ValueError, match="do not match their answer tokens"):
        evaluate_model(quantized, samples[:3], reference=shifted)
    with pytest.raises(ValueError, match="empty"):
        evaluate_model(quantized, [])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        evaluate_model(quantized, samples, max_new_tokens=0)
    with pytest.raises(TypeError, match="TLQModule"):
        evaluate_model(quantized.model, samples)
    with pytest.raises(ValueError, match=r"types \['color'\] are not in kinds"):
        evaluate_model(quantized, samples, kinds=["count", "exists", "position", "shape"])


def test_teacher_forced_exact_match_equals_greedy_on_the_scenes_model():
    """Word-level tokenizer: greedy reproduces the answer iff every teacher-forced argmax (eos included) matches."""
    from lightning_tlq.core.quantizer import QuantSpec, rtn
    from lightning_tlq.datamodule import scenes_samples
    from lightning_tlq.harness import evaluate_model, load_module

    module = load_module("scenes-llava")
    samples = scenes_samples("validation", 48, seed=5)
    broken = copy.deepcopy(module)  # 2-bit per-channel rounding: many wrong answers to compare too
    for name in broken.adapter.target_module_names():
        linear = broken.model.get_submodule(name)
        linear.weight.data.copy_(rtn(linear.weight.data, QuantSpec(bits=2, group_size=-1)).weight)
    for m in (module, broken):
        greedy = evaluate_model(m, samples, batch_size=16, num_examples=None)
        forced = evaluate_model(m, samples, batch_size=16, num_examples=None, exact_match="teacher_forced")
        assert [e["correct"] for e in forced["examples"]] == [e["correct"] for e in greedy["examples"]]
        assert forced["nll"] == greedy["nll"]
    assert sum(not e["correct"] for e in greedy["examples"]) >= 2  # the broken copy does get answers wrong
    with pytest.raises(ValueError, match="exact_match='beam'"):
        evaluate_model(module, samples[:2], exact_match="beam")
