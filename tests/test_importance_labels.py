"""``importance.labels="model"``: the importance loss scores next tokens drawn from the model's own distribution."""

import pytest
import torch
from lightning.fabric import Fabric

from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.losses import answer_loss, answer_loss_from_hidden, model_draws
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings


def test_draws_depend_only_on_the_sample_and_its_rows():
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    together = model_draws(logits, [3, 4], [5, 9])
    apart = torch.cat([model_draws(logits[:3], [3], [5]), model_draws(logits[3:], [4], [9])])
    assert torch.equal(together, apart)
    assert torch.equal(model_draws(logits, [3, 4], [5, 9]), together)  # seeded: the same draws every call
    assert not torch.equal(model_draws(logits, [3, 4], [6, 9])[:3], together[:3])  # another sample, other draws


def test_draws_follow_the_distribution():
    logits = torch.full((4000, 5), float("-inf"))
    logits[:, 1], logits[:, 3] = 0.0, torch.log(torch.tensor(3.0))  # p = 1/4, 3/4; tokens 0, 2, 4 impossible
    draws = model_draws(logits, [1000] * 4, [0, 1, 2, 3])
    assert set(draws.tolist()) <= {1, 3}
    share = (draws == 3).double().mean().item()
    assert abs(share - 0.75) < 0.03  # 4000 draws: the standard deviation of the share is 0.007
    peaked = torch.zeros(6, 9)
    peaked[torch.arange(6), torch.tensor([0, 8, 3, 3, 1, 7])] = 60.0
    assert model_draws(peaked, [2, 4], [11, 12]).tolist() == [0, 8, 3, 3, 1, 7]


def test_draws_refuse_rows_that_do_not_match_the_counts():
    with pytest.raises(ValueError, match="5 rows, counts"):
        model_draws(torch.zeros(5, 3), [2, 2], [0, 1])


def test_losses_score_the_drawn_tokens():
    """With draw ids both losses are the cross-entropy of the drawn tokens at the answer positions; the hidden
    variant (head on answer positions only) equals the full-logits one."""
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 13)
    hidden = torch.randn(2, 6, 8, generator=gen)
    labels = torch.full((2, 6), -100)
    labels[0, 3:5], labels[1, 2:6] = torch.tensor([4, 7]), torch.tensor([1, 2, 3, 4])
    ids = torch.tensor([40, 41])
    logits = head(hidden)
    keep = labels[:, 1:] != -100
    draws = model_draws(logits[:, :-1][keep], [2, 4], [40, 41])  # 2 and 4 next-token positions
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], draws, reduction="sum")
    torch.testing.assert_close(answer_loss(logits, labels, ids), expected)
    torch.testing.assert_close(answer_loss_from_hidden(head, hidden, labels, ids), expected)
    data = answer_loss(logits, labels)
    torch.testing.assert_close(data, answer_loss_from_hidden(head, hidden, labels))


def _scores(family, layerwise, labels, batch_size=3, metrics=False):
    model, processor = build_tiny_vlm(family, seed=0)
    module = TLQModule().attach(model, processor)
    encoded = [encode_sample(processor, s) for s in synthetic_samples(6, seed=3)]
    batches = make_batches(encoded, batch_size, module.adapter.pad_token_id)
    settings = CalibrationSettings(
        QuantArgs(method="tlq", group_size=64),
        ImportanceArgs(labels=labels),
        TokenSetArgs(),
        MemoryArgs(layerwise=layerwise),
        metrics=metrics,
    )
    loop = CalibrationLoop(Fabric(accelerator="cpu", devices=1), module, settings)
    records = loop.run(batches)
    return loop.collector.scores, records


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_model_labels_layerwise_equal_whole_and_differ_from_data(family):
    whole, rec_whole = _scores(family, layerwise=False, labels="model")
    layered, rec_layered = _scores(family, layerwise=True, labels="model")
    data, _ = _scores(family, layerwise=False, labels="data")
    for name in whole:
        for a, b in zip(whole[name], layered[name]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-10)
    assert [r["token_set_fingerprint"] for r in rec_whole] == [r["token_set_fingerprint"] for r in rec_layered]
    name = next(iter(whole))
    assert all(torch.isfinite(s).all() for s in whole[name])
    assert not all(torch.allclose(a, b, rtol=1e-2) for a, b in zip(whole[name], data[name]))


def test_model_labels_do_not_depend_on_batching():
    """Each sample's draws are seeded by its global id: batches of 2 and of 3 score every token alike."""
    by3, _ = _scores("llava", layerwise=True, labels="model", batch_size=3)
    by2, _ = _scores("llava", layerwise=True, labels="model", batch_size=2)
    for name in by3:
        a = [row[: _real(row)] for batch in by3[name] for row in batch]
        b = [row[: _real(row)] for batch in by2[name] for row in batch]
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-10)


def _real(row: torch.Tensor) -> int:
    """Tokens before the right padding (padding scores 0; real tokens score > 0 in these runs)."""
    nonzero = (row.flatten(1) != 0).any(-1).nonzero()
    return int(nonzero.max()) + 1


def test_labels_setting_is_validated():
    assert ImportanceArgs().labels == "data"
    with pytest.raises(ValueError, match="importance.labels='answers' is not supported; choose one of data, model"):
        ImportanceArgs(labels="answers")


def test_cli_flag_reaches_the_run(tmp_path, calibrate_cli):
    report = calibrate_cli(tmp_path / "out", "--importance.labels", "model")
    assert report["settings"]["importance"]["labels"] == "model"
    with pytest.raises(SystemExit):  # jsonargparse refuses values outside data / model
        calibrate_cli(tmp_path / "bad", "--importance.labels", "answers")
    assert not (tmp_path / "bad").exists()
