"""Importance collected by the callback equals scores computed directly with autograd."""

import pytest
import torch
from torch import nn

from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.importance import TokenImportance
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule


def _module_and_batch(family):
    model, processor = build_tiny_vlm(family, seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(3, seed=1)]
    return module, make_batches(encoded, 3, module.adapter.pad_token_id)[0]


def _targets(module):
    layers = module.adapter.decoder_layers()
    return {
        f"{i}.{n}": layers[i].get_submodule(n)
        for i in range(len(layers))
        for g in module.adapter.module_groups(i)
        for n in g
    }


def _direct(module, batch, targets, score, groups):
    """Reference: retain the module outputs, take their .grad with autograd, reduce by the definition."""
    outputs = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in targets.items()]
    try:
        with torch.enable_grad():
            module.sft_loss(batch).backward()
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, out in outputs.items():
        g, y = out.grad.double(), out.detach().double()
        per_channel = {"fisher": g**2, "grad_abs": g.abs(), "taylor": (g * y).abs()}[score]
        result[name] = per_channel.unflatten(-1, (groups, -1)).mean(-1)
    return result


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(("score", "groups"), [("fisher", 1), ("grad_abs", 1), ("taylor", 1), ("fisher", 4)])
def test_callback_scores_equal_autograd(family, score, groups):
    module, batch = _module_and_batch(family)
    targets = _targets(module)
    expected = _direct(module, batch, targets, score, groups)
    collector = TokenImportance(score, groups)
    collector.on_importance_start(None, targets)
    collector.on_importance_batch_start(None, 0)
    with torch.enable_grad():
        module.sft_loss(batch).backward()
    collector.on_importance_batch_end(None, 0)
    collector.on_importance_end(None)
    assert set(collector.scores) == set(targets) == set(expected)
    for name, ref in expected.items():
        got = collector.scores[name][0]
        assert got.shape == (*batch["input_ids"].shape, groups)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-12)
    # padding and prompt tokens carry gradient through attention; answer tokens' outputs feed the loss
    assert all(collector.scores[n][0].sum() > 0 for n in targets)
    assert not any(m._forward_hooks for m in targets.values())


def test_missing_gradient_is_reported():
    module, batch = _module_and_batch("llava")
    targets = _targets(module)
    collector = TokenImportance()
    collector.on_importance_start(None, targets)
    with torch.no_grad():
        module(batch)
    collector.on_importance_batch_end(None, 0)
    with pytest.raises(RuntimeError, match="No output gradient"):
        collector.on_importance_end(None)
    assert not any(m._forward_hooks for m in targets.values())


def test_twice_called_module_is_refused():
    lin = nn.Linear(4, 4)
    collector = TokenImportance()
    collector.on_importance_start(None, {"lin": lin})
    x = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        (lin(x).sum() + lin(x).sum()).backward()
    collector.on_importance_end(None)


def test_sft_loss_is_a_sum_over_answer_tokens():
    module, batch = _module_and_batch("llava")
    logits = module(batch)
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    ref = -logp.gather(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].sum()
    assert module.sft_loss(batch).item() == pytest.approx(ref.item(), rel=1e-5)
    no_answer = dict(batch, labels=torch.full_like(labels, -100))
    with pytest.raises(ValueError, match="no answer tokens"):
        module.sft_loss(no_answer)
