"""The checkpoint keeps module keys in their string form: a checkpoint written before :class:`ModuleKey` existed
(keys formatted as ``"<layer>.<module>"``, ``"vision.<i>.<module>"``, ``"projector.<module>"``) restores under
typed keys, and what the hooks write now is that same layout."""

import json

import torch
from torch import nn

from lightning_tlq.keys import ModuleKey
from lightning_tlq.module_stats import ModuleResult
from lightning_tlq.resume import STATE_NAME, LayerCheckpoint

SETTINGS = {"quant": {"method": "tlq", "bits": 3}}
DECODER = ("self_attn.q_proj", "mlp.down_proj")
VISION = {
    ModuleKey("vision.0", "mlp.fc1"): "vision.0.mlp.fc1",
    ModuleKey("projector", "linear_1"): "projector.linear_1",
}


class _Fabric:
    """One process: what the checkpoint asks of Fabric."""

    is_global_zero, world_size, global_rank = True, 1, 0

    def barrier(self) -> None:
        pass


def _layer(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {"self_attn": nn.ModuleDict({"q_proj": nn.Linear(4, 4)}), "mlp": nn.ModuleDict({"down_proj": nn.Linear(4, 4)})}
    )


def _result(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 8, (4, 4), generator=g)
    return {"codes": codes, "scale": torch.rand(4, 1, generator=g), "zero": torch.zeros(4, 1), "record": {"n": seed}}


def _old_checkpoint(directory, layer0: nn.Module, vision: dict[str, nn.Module]) -> dict:
    """What ``LayerCheckpoint`` wrote before typed keys, file by file: layer 0 of 2 done, the vision tower done."""
    directory.mkdir()
    state = {"version": 1, "next_layer": 1, "num_layers": 2, "vision_done": True, "world_size": 1, "settings": SETTINGS}
    (directory / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    layer_results = {name: _result(i) for i, name in enumerate(DECODER)}
    torch.save(
        {"state": layer0.state_dict(), "results": layer_results, "record": {"index": 0}}, directory / "layer_0000.pt"
    )
    scores = {f"{i}.{n}": [torch.rand(2, 5, 1)] for i in range(2) for n in DECODER}
    vision_scores = {key: [torch.rand(3, 1)] for key in vision}
    method_state = {"0.mlp.down_proj": 0.25, "1.mlp.down_proj": 0.5}
    torch.save(
        {"decoder": scores, "vision": vision_scores, "method_state": method_state}, directory / "importance.rank0.pt"
    )
    torch.save([torch.rand(2, 5, 4)], directory / "hidden_0000.rank0.pt")
    vision_results = {key: _result(10 + i) for i, key in enumerate(vision)}
    vision_state = {key: m.state_dict() for key, m in vision.items()}
    torch.save(
        {"state": vision_state, "results": vision_results, "records": [{"index": "vision.0"}]}, directory / "vision.pt"
    )
    return {
        "layer": layer_results,
        "scores": scores,
        "vision_scores": vision_scores,
        "method_state": method_state,
        "vision_results": vision_results,
    }


def _restore(directory, vision_modules):
    layers = [_layer(5), _layer(6)]
    restored = LayerCheckpoint(directory, SETTINGS, resume=True).restore(_Fabric(), layers, vision_modules)
    return restored, layers


def test_a_checkpoint_with_string_keys_restores_under_typed_keys(tmp_path) -> None:
    layer0 = _layer(1)
    vision = {text: nn.Linear(4, 4) for text in VISION.values()}
    old = _old_checkpoint(tmp_path / "ckpt", layer0, vision)
    vision_modules = {key: nn.Linear(4, 4) for key in VISION}
    restored, layers = _restore(tmp_path / "ckpt", vision_modules)
    assert restored is not None
    assert restored.next_layer == 1
    assert all(torch.equal(a, b) for a, b in zip(layers[0].state_dict().values(), layer0.state_dict().values()))
    for key, module in vision_modules.items():
        assert torch.equal(module.weight, vision[VISION[key]].weight)
    assert restored.importance.keys() == {ModuleKey(i, n) for i in range(2) for n in DECODER}
    for key, got in restored.importance.items():
        assert torch.equal(got[0], old["scores"][str(key)][0])
    assert restored.vision_scores.keys() == VISION.keys()
    assert restored.method_state == {ModuleKey(0, "mlp.down_proj"): 0.25, ModuleKey(1, "mlp.down_proj"): 0.5}
    assert restored.results.keys() == {ModuleKey(0, n) for n in DECODER}
    for key, res in {**restored.results, **restored.vision_results}.items():
        saved = old["layer"][key.module] if key.stage == 0 else old["vision_results"][str(key)]
        assert isinstance(res, ModuleResult)
        assert res.weight is None
        assert res.record == saved["record"]
        assert torch.equal(res.codes, saved["codes"])
        assert torch.equal(res.scale, saved["scale"])


def test_the_hooks_write_string_keys_and_restore_typed_keys(tmp_path) -> None:
    fabric, directory = _Fabric(), tmp_path / "ckpt"
    checkpoint = LayerCheckpoint(directory, SETTINGS)
    checkpoint.restore(fabric, [_layer(1), _layer(2)])  # a fresh run
    scores = {ModuleKey(i, n): [torch.rand(2, 5, 1)] for i in range(2) for n in DECODER}
    vision_scores = {key: [torch.rand(3, 1)] for key in VISION}
    state = {ModuleKey(0, "mlp.down_proj"): 0.25}
    checkpoint.on_importance_ready(fabric, scores, vision_scores, state)
    vision_modules = {key: nn.Linear(4, 4) for key in VISION}
    vision_results = {key: ModuleResult(None, **_result(i)) for i, key in enumerate(VISION)}
    checkpoint.on_vision_end(fabric, vision_modules, vision_results, [{"index": "vision.0"}])
    layer = _layer(3)
    results = {name: ModuleResult(None, **_result(20 + i)) for i, name in enumerate(DECODER)}
    checkpoint.on_layer_end(fabric, 0, {"index": 0}, layer, results, [torch.rand(2, 5, 4)])

    # on disk: the string form, which torch.load(weights_only=True) reads (it refuses unknown classes)
    saved = torch.load(directory / "importance.rank0.pt", weights_only=True)
    assert set(saved["decoder"]) == {str(k) for k in scores}
    assert set(saved["vision"]) == set(VISION.values())
    assert saved["method_state"] == {"0.mlp.down_proj": 0.25}
    vision_file = torch.load(directory / "vision.pt", weights_only=True)
    assert set(vision_file["state"]) == set(vision_file["results"]) == set(VISION.values())
    assert set(torch.load(directory / "layer_0000.pt", weights_only=True)["results"]) == set(DECODER)

    fresh = {key: nn.Linear(4, 4) for key in VISION}
    restored, layers = _restore(directory, fresh)
    assert restored.importance.keys() == scores.keys()
    assert restored.vision_scores.keys() == VISION.keys()
    assert all(torch.equal(restored.importance[k][0], scores[k][0]) for k in scores)
    assert restored.method_state == state
    assert restored.results.keys() == {ModuleKey(0, n) for n in DECODER}
    assert all(torch.equal(restored.results[ModuleKey(0, n)].codes, results[n].codes) for n in DECODER)
    assert restored.vision_results.keys() == VISION.keys()
    assert all(torch.equal(fresh[k].weight, vision_modules[k].weight) for k in VISION)
    assert all(torch.equal(a, b) for a, b in zip(layers[0].state_dict().values(), layer.state_dict().values()))
