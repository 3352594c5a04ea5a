"""Tests for the model-family adapters: layer-by-layer replay, module groups, registry and hooks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import transformers
from tiny_families import IMAGE_ID, PAD_ID, TEXT
from tiny_families import build_model as _build_model
from torch import nn

from lightning_tlq.adapters import (
    CapturedInputs,
    LlavaAdapter,
    Qwen2VLAdapter,
    UnsupportedModelError,
    VLMAdapter,
    get_adapter,
    move_to,
    supported_model_types,
)

FAMILIES = ("llava", "qwen2_vl")


def _sequence(family: str, text_after: int, generator: torch.Generator) -> list[int]:
    """One sample: 3 text tokens, the image tokens (with Qwen vision start/end markers), then text."""

    def words(n: int) -> list[int]:
        return torch.randint(3, IMAGE_ID, (n,), generator=generator).tolist()

    if family == "llava":
        return [*words(3), *[IMAGE_ID] * 16, *words(text_after)]
    return [*words(2), IMAGE_ID + 2, *[IMAGE_ID] * 4, IMAGE_ID + 3, *words(text_after)]


def _batch(family: str, padded: bool, seed: int = 0, side: str = "right") -> dict[str, torch.Tensor]:
    """Two samples with one image each; padded on ``side`` to the longer one when ``padded``."""
    generator = torch.Generator().manual_seed(seed)
    rows = [_sequence(family, 5, generator), _sequence(family, 2 if padded else 5, generator)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((2, length), PAD_ID)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone()}
    if family == "llava":
        batch["pixel_values"] = torch.randn(2, 3, 32, 32, generator=generator)
    else:  # 2 images x 16 patches of 3 * 2 * 4 * 4 values; grid 1x4x4 -> 4 tokens after 2x2 merging
        batch["pixel_values"] = torch.randn(32, 96, generator=generator)
        batch["image_grid_thw"] = torch.tensor([[1, 4, 4]] * 2)
    return batch


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request: pytest.FixtureRequest) -> VLMAdapter:
    return get_adapter(_build_model(request.param))


def _family(adapter: VLMAdapter) -> str:
    return adapter.model.config.model_type


def _linear_names(layer: nn.Module) -> list[str]:
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


@pytest.mark.parametrize(
    ("padded", "side"), [(False, "right"), (True, "right"), (True, "left")], ids=["unpadded", "right", "left"]
)
def test_layerwise_replay_matches_model_forward(adapter: VLMAdapter, padded: bool, side: str) -> None:
    # Left padding also checks that the captured mask is replayed: with right padding, the causal mask alone
    # already hides the pads from valid positions.
    batch = _batch(_family(adapter), padded, side=side)
    with torch.no_grad():
        expected = adapter.model(**adapter.forward_inputs(batch)).logits
        captured = adapter.capture(batch)
        hidden = captured.hidden
        for i in range(adapter.num_layers):
            hidden = adapter.run_layer(i, hidden, captured.layer_kwargs[i])
        logits = adapter.head(hidden)

    valid = batch["attention_mask"].bool()
    assert bool((~valid).any()) == padded
    assert logits.shape == expected.shape
    assert (logits[valid] - expected[valid]).abs().max().item() < 1e-4


def test_captured_kwargs_hold_tensors_only(adapter: VLMAdapter) -> None:
    captured = adapter.capture(_batch(_family(adapter), padded=True))
    assert captured.hidden.shape[:2] == _batch(_family(adapter), padded=True)["input_ids"].shape
    assert len(captured.layer_kwargs) == adapter.num_layers
    for kwargs in captured.layer_kwargs:
        assert "position_embeddings" in kwargs
        assert kwargs["attention_mask"].dim() == 4  # padded batch -> explicit (B, 1, S, S) mask
        assert not {"cache", "use_cache", "past_key_values", "hidden_states"} & kwargs.keys()

    unpadded = adapter.capture(_batch(_family(adapter), padded=False))
    assert "attention_mask" not in unpadded.layer_kwargs[0]  # None (pure causal) is dropped


def test_capture_stops_before_last_layer_runs(adapter: VLMAdapter) -> None:
    calls: list[str] = []
    last = adapter.decoder_layers()[-1]
    handles = [
        last.register_forward_hook(lambda *_: calls.append("last_layer")),
        adapter.text_model().norm.register_forward_hook(lambda *_: calls.append("norm")),
    ]
    try:
        adapter.capture(_batch(_family(adapter), padded=False))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


def test_capture_removes_hooks_also_on_error(adapter: VLMAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = adapter.decoder_layers()
    adapter.capture(_batch(_family(adapter), padded=False))
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)

    def broken_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("layer exploded")

    monkeypatch.setattr(layers[0], "forward", broken_forward)
    with pytest.raises(RuntimeError, match="layer exploded"):
        adapter.capture(_batch(_family(adapter), padded=False))
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)


def test_module_groups_cover_every_linear_once(adapter: VLMAdapter) -> None:
    for i, layer in enumerate(adapter.decoder_layers()):
        grouped = [name for group in adapter.module_groups(i) for name in group]
        assert sorted(grouped) == sorted(_linear_names(layer))
        assert len(grouped) == len(set(grouped))
    assert adapter.module_groups(0)[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def test_module_groups_reject_missing_linear(adapter: VLMAdapter) -> None:
    class Broken(type(adapter)):  # not registered: only used to check validation
        linear_groups: ClassVar[tuple[tuple[str, ...], ...]] = (("self_attn.qkv_proj",),)

    with pytest.raises(UnsupportedModelError, match=r"self_attn\.qkv_proj.*override linear_groups"):
        Broken(adapter.model).module_groups(0)
    with pytest.raises(IndexError, match="out of range"):
        adapter.module_groups(adapter.num_layers)


def test_every_linear_is_quantized_or_ignored(adapter: VLMAdapter) -> None:
    targets = set(adapter.target_module_names())
    assert len(targets) == 7 * adapter.num_layers
    for name in _linear_names(adapter.model):
        assert (name in targets) != adapter.is_ignored(name), name
    assert "lm_head" in adapter.ignore_prefixes
    assert adapter.layer_name(1) == "model.language_model.layers.1"


def test_get_adapter_picks_family() -> None:
    assert {"llava", "qwen2_vl"} <= set(supported_model_types())
    assert isinstance(get_adapter(_build_model("llava")), LlavaAdapter)
    assert isinstance(get_adapter(_build_model("qwen2_vl")), Qwen2VLAdapter)
    with pytest.raises(UnsupportedModelError, match="handles model types"):
        Qwen2VLAdapter(_build_model("llava"))


ALL_FAMILIES = (
    "gemma3", "idefics3", "internvl", "llava", "llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm",
)  # fmt: skip


def test_supported_model_types_lists_every_family() -> None:
    assert supported_model_types() == ALL_FAMILIES


@pytest.mark.parametrize("model_type", ["mllama", None])
def test_get_adapter_rejects_unsupported_model(model_type: str | None) -> None:
    model = nn.Linear(2, 2)
    if model_type is not None:
        model.config = SimpleNamespace(model_type=model_type)
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    message = str(err.value)
    assert repr(model_type) in message
    assert f"Supported model types: {', '.join(ALL_FAMILIES)}." in message
    assert "@register_adapter" in message
    assert "docs/adapters.md" in message


def test_get_adapter_rejects_text_only_model() -> None:
    # A common mistake: a causal LM checkpoint instead of the image-text-to-text one.
    config = transformers.LlamaConfig(**dict(TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    with pytest.raises(UnsupportedModelError, match=r"No adapter for model type 'llama' \(LlamaForCausalLM\)"):
        get_adapter(transformers.LlamaForCausalLM(config))


def test_forward_inputs(adapter: VLMAdapter) -> None:
    batch = _batch(_family(adapter), padded=True)
    inputs = adapter.forward_inputs({**batch, "sample_id": [3, 4]})
    assert "labels" not in inputs
    assert "sample_id" not in inputs
    assert inputs["use_cache"] is False
    if isinstance(adapter, Qwen2VLAdapter):
        assert torch.equal(inputs["mm_token_type_ids"], (batch["input_ids"] == IMAGE_ID).int())
        given = torch.zeros_like(batch["input_ids"])
        assert adapter.forward_inputs({**batch, "mm_token_type_ids": given})["mm_token_type_ids"] is given
    with pytest.raises(KeyError, match="input_ids"):
        adapter.forward_inputs({"pixel_values": batch["pixel_values"]})


def test_token_ids(adapter: VLMAdapter) -> None:
    assert adapter.image_token_id == IMAGE_ID
    assert adapter.pad_token_id == PAD_ID
    assert adapter.num_layers == 2


def test_run_layer_accepts_tuple_output(adapter: VLMAdapter, monkeypatch: pytest.MonkeyPatch) -> None:
    captured = adapter.capture(_batch(_family(adapter), padded=False))
    layer = adapter.decoder_layers()[0]
    with torch.no_grad():
        expected = adapter.run_layer(0, captured.hidden, captured.layer_kwargs[0])
        original = layer.forward
        monkeypatch.setattr(layer, "forward", lambda *a, **kw: (original(*a, **kw), None))
        assert torch.equal(adapter.run_layer(0, captured.hidden, captured.layer_kwargs[0]), expected)


def test_captured_inputs_to_casts_floats_and_keeps_sharing() -> None:
    rope = (torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    kwargs = {"position_embeddings": rope, "attention_mask": mask, "position_ids": torch.arange(4)[None]}
    captured = CapturedInputs(hidden=torch.randn(2, 4, 8), layer_kwargs=[kwargs, dict(kwargs)])

    moved = captured.to("cpu", torch.bfloat16)
    assert moved.hidden.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in moved.layer_kwargs[0]["position_embeddings"])
    assert moved.layer_kwargs[0]["attention_mask"].dtype == torch.bool
    assert moved.layer_kwargs[0]["position_ids"].dtype == torch.long
    assert moved.layer_kwargs[0]["position_embeddings"] is moved.layer_kwargs[1]["position_embeddings"]

    nested = move_to({"a": [torch.ones(1)], "b": 3}, "cpu", torch.float16)
    assert nested["a"][0].dtype == torch.float16
    assert nested["b"] == 3
