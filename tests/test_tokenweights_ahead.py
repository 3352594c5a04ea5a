"""Token weights chosen a layer ahead on a helper thread are those chosen in turn (and never ahead across ranks)."""

import threading
from types import SimpleNamespace

import pytest
import torch

from lightning_tlq.config import TokenSetArgs
from lightning_tlq.keys import ModuleKey
from lightning_tlq.tokenweights import LayerWeightsAhead, decoder_token_weights

GROUPS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


class _Local:
    """The collective of one process (what :class:`~lightning_tlq.distributed.Collective` is without ranks)."""

    world_size = 1

    def all_reduce(self, t, op="sum"):
        return t

    def gather_cat(self, t):
        return t


def _inputs(layers=4, batches=3, b=2, s=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(batches):
        pad = torch.zeros(b, s, dtype=torch.bool)
        pad[1, 30:] = True
        image = torch.zeros(b, s, dtype=torch.bool)
        image[:, 2:20] = True
        answer = torch.zeros(b, s, dtype=torch.bool)
        answer[:, 24:28] = True
        masks.append(SimpleNamespace(pad=pad, image=image, answer=answer))
    names = [n for grp in GROUPS for n in grp]
    importance = {ModuleKey(i, n): [torch.rand(b, s, 1, generator=g).exp() for _ in range(batches)]
                  for i in range(layers) for n in names}  # fmt: skip
    ids = [torch.arange(k * b, (k + 1) * b) for k in range(batches)]
    return importance, masks, ids


def _same(a, b):
    (wa, ra), (wb, rb) = a, b
    assert ra == rb
    for x, y in zip(wa, wb, strict=True):
        assert torch.equal(x.valid, y.valid)
        assert torch.equal(x.multiplier, y.multiplier)
        assert x.importance.keys() == y.importance.keys()
        assert all(torch.equal(x.importance[k], y.importance[k]) for k in x.importance)


@pytest.mark.parametrize("share_inputs", [False, True])
def test_chosen_ahead_equals_chosen_in_turn(share_inputs):
    importance, masks, ids = _inputs()
    kw = {"select": True, "token_set": TokenSetArgs(keep_mass=0.8, p_rest=0.3), "collective": _Local()}
    threads = set()

    def groups_of(index):
        threads.add(threading.current_thread().name)
        return GROUPS

    with LayerWeightsAhead(groups_of, importance, masks, ids, **kw, share_inputs=share_inputs) as ahead:
        got = [ahead.get(0)]
        for i in range(1, 4):
            ahead.start(i)
            got.append(ahead.get(i))
    assert any(name.startswith("tlq-token-weights") for name in threads)  # layers 1-3 ran on the helper
    for i in range(4):
        names = [n for g in GROUPS for n in g]
        expected = decoder_token_weights(i, names, importance, masks, ids, **kw,
                                         input_groups=GROUPS if share_inputs else None)  # fmt: skip
        _same(got[i], expected)
    assert got[1][1]["tokens_kept"] < got[1][1]["tokens_total"]  # a real selection, not everything


def test_never_ahead_across_ranks_and_errors_reach_the_caller():
    importance, masks, ids = _inputs()
    ranks = _Local()
    ranks.world_size = 2
    threads = set()

    def groups_of(index):
        threads.add(threading.current_thread().name)
        if index == 3:
            raise ValueError("layer 3 has no groups")
        return GROUPS

    kw = {"select": True, "token_set": TokenSetArgs(), "share_inputs": False}
    with LayerWeightsAhead(groups_of, importance, masks, ids, collective=ranks, **kw) as ahead:
        ahead.start(1)
        ahead.get(1)
    assert threads == {threading.current_thread().name}  # two ranks: everything in turn, on the caller's thread
    with LayerWeightsAhead(groups_of, importance, masks, ids, collective=_Local(), **kw) as ahead:
        ahead.start(3)
        with pytest.raises(ValueError, match="layer 3 has no groups"):
            ahead.get(3)
