"""Greedy answers decided by the teacher-forced logits equal what ``generate`` produces."""

import copy

import pytest
import torch

from lightning_tlq.actquant import apply_activation_quant
from lightning_tlq.data import collate, encode_sample
from lightning_tlq.eval_forward import _answer_logits
from lightning_tlq.eval_greedy import argmax_is_greedy, decided_answers, decided_tokens
from lightning_tlq.eval_models import _pad_id
from lightning_tlq.harness import evaluate_model, greedy_answers

EOS = {2}


@pytest.mark.parametrize(
    ("argmax", "sure", "reference", "max_new_tokens", "expected"),
    [
        ([5, 6, 2], [True] * 3, [5, 6, 2], 8, [5, 6, 2]),  # follows the reference to its eos
        ([5, 2, 9], [True] * 3, [5, 6, 2], 8, [5, 2]),  # stops early with a wrong answer
        ([5, 7, 9], [True] * 3, [5, 6, 2], 8, None),  # leaves the reference: the next token is unknown
        ([5, 7, 9], [True] * 3, [5, 6, 2], 2, [5, 7]),  # ... unless the length limit ends it there
        ([5, 6, 2], [True] * 3, [5, 6, 2], 2, [5, 6]),
        ([5, 6, 2], [True, False, True], [5, 6, 2], 8, None),  # a near tie: generate decides
        ([5, 6], [True] * 2, [5, 6], 8, None),  # the reference ends before decoding stops
    ],
)
def test_decided_tokens(argmax, sure, reference, max_new_tokens, expected):
    assert decided_tokens(argmax, sure, reference, EOS, max_new_tokens) == expected


@pytest.fixture(scope="module")
def scenes():
    """The embedded scenes model, a noisy copy of it that answers many questions wrongly, encoded samples."""
    from lightning_tlq.datamodule import scenes_samples
    from lightning_tlq.harness import load_module

    module = load_module("scenes-llava")
    broken = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(0)
    for name in broken.adapter.target_module_names():
        weight = broken.model.get_submodule(name).weight.data
        weight += weight.std() * torch.randn(weight.shape, generator=generator)
    samples = scenes_samples("validation", 16, seed=5)
    return module, broken, samples, [encode_sample(module.processor, s) for s in samples]


def test_decided_answers_equal_generated_ones(scenes):
    module, broken, samples, encoded = scenes
    counts = {True: 0, False: 0}  # decided, not
    generated, wrong_decided = {}, 0
    for name, m in (("trained", module), ("noisy", broken)):
        with torch.no_grad():
            logits, targets, rows = _answer_logits(m, collate(encoded, _pad_id(m)))
        for max_new_tokens in (8, 1):  # 1: the length limit ends every answer, wrong ones decided too
            decided = decided_answers(m, encoded, logits, targets, rows, max_new_tokens)
            generated[name, max_new_tokens] = greedy_answers(m, encoded, max_new_tokens)
            for ours, theirs, sample in zip(decided, generated[name, max_new_tokens], samples):
                assert ours is None or ours == theirs
                counts[ours is not None] += 1
                wrong_decided += ours is not None and ours != sample.answer and max_new_tokens == 1
    metrics = evaluate_model(broken, samples, batch_size=8, num_examples=None)  # both paths in one batch
    assert [e["prediction"] for e in metrics["examples"]] == generated["noisy", 8]
    assert counts[True] >= 48  # of 64
    assert counts[False] >= 2
    assert wrong_decided >= 2


def test_near_ties_and_generation_settings_leave_the_answer_to_generate(scenes):
    module, _, _, encoded = scenes
    with torch.no_grad():
        logits, targets, rows = _answer_logits(module, collate(encoded[:4], _pad_id(module)))
    assert None not in decided_answers(module, encoded[:4], logits, targets, rows, 8)
    tied = logits.clone()
    first = int((rows == 1).nonzero()[0])  # sample 1's first answer position
    top = tied[first].topk(2)
    tied[first, top.indices[1]] = top.values[0] - 1e-5  # within the float32 rounding margin
    undecided = [a is None for a in decided_answers(module, encoded[:4], tied, targets, rows, 8)]
    assert undecided == [False, True, False, False]

    with apply_activation_quant(module.model, 8, module.adapter.target_module_names()):  # W4A8 at inference
        assert decided_answers(module, encoded[:4], logits, targets, rows, 8) == [None] * 4

    model = copy.deepcopy(module.model)
    model.generation_config.temperature, model.generation_config.top_k = 0.5, 5  # sampling only: still greedy
    assert argmax_is_greedy(model)
    for key, value in (("repetition_penalty", 1.3), ("suppress_tokens", [5]), ("min_new_tokens", 2)):
        changed = copy.deepcopy(model)
        setattr(changed.generation_config, key, value)
        assert not argmax_is_greedy(changed), key
        other = type(module)().attach(changed, module.processor)
        assert decided_answers(other, encoded[:4], logits, targets, rows, 8) == [None] * 4
