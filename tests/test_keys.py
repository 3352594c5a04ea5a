"""``ModuleKey``: the typed (stage, module) key and its string form, the one written to files and logs."""

import pickle

import pytest

from lightning_tlq.keys import PROJECTOR, ModuleKey, vision_stage

KEYS = [
    (ModuleKey(0, "self_attn.q_proj"), "0.self_attn.q_proj"),
    (ModuleKey(12, "mlp.down_proj"), "12.mlp.down_proj"),
    (ModuleKey(vision_stage(0), "self_attn.q_proj"), "vision.0.self_attn.q_proj"),
    (ModuleKey(vision_stage(23), "mlp.fc1"), "vision.23.mlp.fc1"),
    (ModuleKey(PROJECTOR, "linear_1"), "projector.linear_1"),
    (ModuleKey(PROJECTOR, "mlp.2"), "projector.mlp.2"),  # a module name with a numeric part
]


@pytest.mark.parametrize(("key", "text"), KEYS, ids=[t for _, t in KEYS])
def test_string_form_round_trips(key: ModuleKey, text: str) -> None:
    assert str(key) == f"{key}" == text
    assert ModuleKey.parse(text) == key
    assert hash(ModuleKey.parse(text)) == hash(key)
    assert pickle.loads(pickle.dumps(key)) == key
    assert key.is_vision == (not text[0].isdigit())


def test_keys_of_decoder_layers_and_vision_stages_never_collide() -> None:
    assert ModuleKey(0, "a") != ModuleKey(vision_stage(0), "a")
    assert len({k for k, _ in KEYS} | {ModuleKey.parse(t) for _, t in KEYS}) == len(KEYS)


@pytest.mark.parametrize(
    "text", ["mlp", "3", "3.", ".mlp", "03.mlp", "+3.mlp", "-1.mlp", "vision.mlp", "vision.0", "vision.01.a",
             "projector", "projector.", "lm_head.weight", "model.layers.0.mlp"],
)  # fmt: skip
def test_parse_rejects_anything_but_the_three_forms(text: str) -> None:
    with pytest.raises(ValueError, match="is not a module key: expected '<layer>.<module>'"):
        ModuleKey.parse(text)


@pytest.mark.parametrize(
    ("stage", "module", "message"),
    [(-1, "a", "index >= 0"), (True, "a", "layer index or a vision stage"), ("vision", "a", "not a vision stage"),
     ("vision.x", "a", "not a vision stage"), ("0", "a", "not a vision stage"), (0, "", "non-empty")],
)  # fmt: skip
def test_construction_checks_the_stage_and_module(stage, module, message) -> None:
    with pytest.raises(ValueError, match=message):
        ModuleKey(stage, module)


def test_sorted_by_layer_index_then_vision_stages_then_projector() -> None:
    keys = [
        ModuleKey(PROJECTOR, "a"),
        ModuleKey(vision_stage(10), "a"),
        ModuleKey(10, "a"),
        ModuleKey(vision_stage(2), "b"),
        ModuleKey(2, "b"),
        ModuleKey(2, "a"),
    ]
    assert [str(k) for k in sorted(keys)] == ["2.a", "2.b", "10.a", "vision.2.b", "vision.10.a", "projector.a"]
