"""Adapters of the Qwen2.5-VL, LLaVA-OneVision, Idefics3, SmolVLM, InternVL, Gemma3 and Qwen3-VL families.

For each family: layer-by-layer replay equals the model's forward, module groups cover the decoder linears, TLQ
calibrates end to end on the quantized path the model really runs, and the result reloads and generates.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import pytest
import torch
import transformers
from lightning.fabric import Fabric
from tiny_families import FAMILIES, IMAGE_ID, build_model, config, make_batch
from torch import Tensor, nn

from lightning_tlq.adapters import (
    Gemma3Adapter,
    Idefics3Adapter,
    InternVLAdapter,
    LlavaOnevisionAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    SmolVLMAdapter,
    UnsupportedModelError,
    VLMAdapter,
    get_adapter,
)
from lightning_tlq.config import MemoryArgs, QuantArgs
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings

ADAPTERS: dict[str, type[VLMAdapter]] = {
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": SmolVLMAdapter,
    "internvl": InternVLAdapter,
    "gemma3": Gemma3Adapter,
    "qwen3_vl": Qwen3VLAdapter,
}
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
GROUP_SIZE, BITS = 64, 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # Tiny matrices: thread hand-offs cost more than they save, badly so on a busy 2-core box (6-9x measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request: pytest.FixtureRequest) -> VLMAdapter:
    return get_adapter(build_model(request.param))


def _family(adapter: VLMAdapter) -> str:
    return adapter.model.config.model_type


def _replay(adapter: VLMAdapter, batch: dict[str, Tensor], *, deltas: bool = True) -> Tensor:
    """Logits from capture -> run_layer for each layer (+ residual deltas) -> head."""
    with torch.no_grad():
        captured = adapter.capture(batch)
        hidden = captured.hidden
        for i in range(adapter.num_layers):
            hidden = adapter.run_layer(i, hidden, captured.layer_kwargs[i])
            hidden = captured.add_residual_delta(i, hidden) if deltas else hidden
        return adapter.head(hidden)


def _max_diff(adapter: VLMAdapter, batch: dict[str, Tensor], logits: Tensor) -> float:
    with torch.no_grad():
        expected = adapter.model(**adapter.forward_inputs(batch)).logits
    valid = batch["attention_mask"].bool()
    assert logits.shape == expected.shape
    return (logits[valid] - expected[valid]).abs().max().item()


# --------------------------------------------------------------------------------------------- structure
def test_registry_picks_the_family_adapter(adapter: VLMAdapter) -> None:
    assert type(adapter) is ADAPTERS[_family(adapter)]
    assert adapter.image_token_id == IMAGE_ID
    assert adapter.num_layers == 2


@pytest.mark.parametrize(
    ("padded", "side"), [(False, "right"), (True, "right"), (True, "left")], ids=["unpadded", "right", "left"]
)
def test_layerwise_replay_matches_model_forward(adapter: VLMAdapter, padded: bool, side: str) -> None:
    batch = make_batch(_family(adapter), padded=padded, side=side)
    assert bool((batch["attention_mask"] == 0).any()) == padded
    assert _max_diff(adapter, batch, _replay(adapter, batch)) < 1e-4


def test_capture_without_running_the_layers_gives_the_same_inputs(adapter: VLMAdapter) -> None:
    # The loop captures with identity layers (decoder layers stay on the CPU); kwargs and deltas must not change.
    batch = make_batch(_family(adapter), padded=True, side="left")
    full, skipped = adapter.capture(batch), adapter.capture(batch, skip_layers=True)
    assert torch.equal(full.hidden, skipped.hidden)
    for kw_full, kw_skipped in zip(full.layer_kwargs, skipped.layer_kwargs, strict=True):
        assert kw_full.keys() == kw_skipped.keys()
        for key in kw_full:
            torch.testing.assert_close(kw_skipped[key], kw_full[key], rtol=0, atol=0)
    assert (full.residual_delta is None) == (skipped.residual_delta is None)
    for d_full, d_skipped in zip(full.residual_delta or [], skipped.residual_delta or [], strict=True):
        assert (d_full is None) == (d_skipped is None)
        if d_full is not None:
            torch.testing.assert_close(d_skipped, d_full, rtol=0, atol=1e-6)


def test_module_groups_cover_every_decoder_linear(adapter: VLMAdapter) -> None:
    for i, layer in enumerate(adapter.decoder_layers()):
        grouped = [name for group in adapter.module_groups(i) for name in group]
        linears = [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        assert grouped == LINEARS
        assert sorted(grouped) == sorted(linears)


def test_every_weight_matrix_is_quantized_or_kept(adapter: VLMAdapter) -> None:
    # Non-Linear weights too (Gemma3's raw mm_input_projection_weight): each 2-D parameter is a target's weight,
    # lies under the full-precision prefixes (vision, projector, head), or is the input embedding.
    targets = {f"{name}.weight" for name in adapter.target_module_names()}
    assert len(targets) == 7 * adapter.num_layers
    embedding = adapter.model.get_input_embeddings().weight
    for name, param in adapter.model.named_parameters(remove_duplicate=False):
        if param.dim() >= 2 and param is not embedding:
            assert (name in targets) != adapter.is_ignored(name), name


def test_forward_inputs_add_family_extras(adapter: VLMAdapter) -> None:
    batch = make_batch(_family(adapter), padded=True)
    inputs = adapter.forward_inputs({**batch, "sample_id": torch.tensor([0, 1])})
    assert inputs["use_cache"] is False
    assert not {"labels", "sample_id"} & inputs.keys()
    extras = {k for k in batch if k not in ("labels", "input_ids", "attention_mask", "pixel_values")}
    assert extras <= inputs.keys()  # image_grid_thw, image_sizes, pixel_attention_mask are forwarded
    image = (batch["input_ids"] == IMAGE_ID).int()
    if isinstance(adapter, Qwen2_5_VLAdapter | Qwen3VLAdapter):
        assert torch.equal(inputs["mm_token_type_ids"], image)
    if isinstance(adapter, Gemma3Adapter):
        assert torch.equal(inputs["token_type_ids"], image)
        given = torch.zeros_like(batch["input_ids"])
        assert adapter.forward_inputs({**batch, "token_type_ids": given})["token_type_ids"] is given


# --------------------------------------------------------------------------------------------- pitfalls
def test_gemma3_layers_replay_with_their_own_kwargs() -> None:
    adapter = get_adapter(build_model("gemma3"))
    assert adapter.model.config.text_config.layer_types == ["sliding_attention", "full_attention"]
    batch = make_batch("gemma3")  # unpadded, yet every layer gets a mask: sliding window and image blocks
    captured = adapter.capture(batch)
    sliding, full = (kw["attention_mask"][0, 0] for kw in captured.layer_kwargs)
    assert not torch.equal(sliding, full)
    rope = [kw["position_embeddings"][0] for kw in captured.layer_kwargs]
    assert not torch.equal(rope[0], rope[1])  # local and global RoPE bases
    # token_type_ids make the image block bidirectional: the first image token sees the last one
    image = (batch["input_ids"][0] == IMAGE_ID).nonzero().flatten()
    assert bool(full[image[0], image[-1]])
    assert not bool(full[image[0] - 1, image[0]])
    with torch.no_grad():
        hidden = adapter.run_layer(0, captured.hidden, captured.layer_kwargs[0])
        right = adapter.run_layer(1, hidden, captured.layer_kwargs[1])
        wrong = adapter.run_layer(1, hidden, captured.layer_kwargs[0])
    assert (right - wrong).abs().max().item() > 1e-2


def test_qwen3_vl_deepstack_deltas_are_recorded_and_needed() -> None:
    adapter = get_adapter(build_model("qwen3_vl"))
    batch = make_batch("qwen3_vl", padded=True)
    captured = adapter.capture(batch)
    first, last = captured.residual_delta
    assert last is None  # one deepstack level, injected after layer 0 only
    image = batch["input_ids"] == IMAGE_ID
    assert bool((first[image] != 0).any(-1).all())
    assert not bool(first[~image].any())
    assert _max_diff(adapter, batch, _replay(adapter, batch, deltas=False)) > 1e-3
    moved = captured.to("cpu", torch.float64)
    assert moved.residual_delta[0].dtype == torch.float64
    assert moved.residual_delta[1] is None

    class NoDeepstack(Qwen3VLAdapter):  # not registered
        injects_residuals: ClassVar[bool] = False

    with pytest.raises(UnsupportedModelError, match=r"between decoder layers \[0\].*injects_residuals = True"):
        NoDeepstack(adapter.model).capture(batch)


def test_qwen3_vl_deepstack_after_the_last_layer_is_recorded_too() -> None:
    # Capture then runs the last layer and stops at the final norm, to see what is added after it.
    cfg = config("qwen3_vl")
    cfg.vision_config.deepstack_visual_indexes = [0, 1]  # injected after both text layers
    torch.manual_seed(0)
    adapter = get_adapter(transformers.AutoModelForImageTextToText.from_config(cfg).eval())
    batch = make_batch("qwen3_vl")
    assert all(delta is not None for delta in adapter.capture(batch).residual_delta)
    assert _max_diff(adapter, batch, _replay(adapter, batch)) < 1e-4


@pytest.mark.parametrize("family", ["internvl", "gemma3"])
def test_tied_lm_head_is_never_a_target(family: str) -> None:
    adapter = get_adapter(build_model(family))
    model = adapter.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert "lm_head" in adapter.ignore_prefixes
    q_proj = adapter.decoder_layers()[0].self_attn.q_proj
    assert q_proj.weight.shape == model.get_input_embeddings().weight.shape
    q_proj.weight = model.get_input_embeddings().weight  # a (hypothetical) tie into a decoder layer
    with pytest.raises(UnsupportedModelError, match=r"self_attn\.q_proj.*tied.*overwrite"):
        adapter.module_groups(0)


# --------------------------------------------------------------------------------------------- end to end
class _LayerInputs:
    """Records every decoder layer's hidden-states input, call by call."""

    def __init__(self, adapter: VLMAdapter) -> None:
        self.inputs: list[list[Tensor]] = [[] for _ in range(adapter.num_layers)]
        self._handles = [
            layer.register_forward_pre_hook(partial(self._record, i), with_kwargs=True)
            for i, layer in enumerate(adapter.decoder_layers())
        ]

    def _record(self, index: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.inputs[index].append((args[0] if args else kwargs["hidden_states"]).detach())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture(scope="module", params=FAMILIES)
def calibrated(request: pytest.FixtureRequest) -> dict[str, Any]:
    """TLQ W4 g64 on two hand-collated batches (one padded); the loop's layer inputs are recorded."""
    family = request.param
    module = TLQModule().attach(build_model(family), processor=None)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    batches = [make_batch(family, seed=0), make_batch(family, padded=True, seed=1)]
    fabric = Fabric(accelerator="cpu", devices=1)
    loop = CalibrationLoop(
        fabric, module, CalibrationSettings(QuantArgs(method="tlq", bits=BITS, group_size=GROUP_SIZE))
    )
    recorder = _LayerInputs(module.adapter)
    try:
        records = loop.run(batches)
    finally:
        recorder.remove()
    # The propagate step is each layer's last run: one call per batch, on the quantized path's inputs.
    fed = [calls[-len(batches) :] for calls in recorder.inputs]
    scores = loop.collector.scores
    return {"family": family, "module": module, "before": before, "batches": batches, "records": records, "fed": fed,
            "scores": scores}  # fmt: skip


def test_tlq_records_are_complete_and_finite(calibrated: dict[str, Any]) -> None:
    records = calibrated["records"]
    assert [r["index"] for r in records] == [0, 1]
    for record in records:
        assert 0 < record["tokens_kept"] <= record["tokens_total"]
        assert sorted(record["modules"]) == sorted(LINEARS)
        for name, mod in record["modules"].items():
            assert mod["tokens"] > 0, name
            assert math.isfinite(mod["rel_error"]), name
            assert math.isfinite(mod["weighted_rel_error"]), name
            assert 0 < mod["weighted_rel_error"] < 1, name


def test_tlq_puts_targets_on_the_grid_and_keeps_the_rest(calibrated: dict[str, Any]) -> None:
    module, before = calibrated["module"], calibrated["before"]
    adapter = module.adapter
    state = module.model.state_dict()
    targets = {f"{name}.weight" for name in adapter.target_module_names()}
    for name, value in state.items():
        if name not in targets:
            assert torch.equal(value, before[name]), f"{name} must stay in full precision"
            continue
        assert not torch.equal(value, before[name]), name
        groups = value.reshape(value.shape[0], -1, GROUP_SIZE)
        distinct = max(len(torch.unique(groups[r, g])) for r in range(groups.shape[0]) for g in range(groups.shape[1]))
        assert distinct <= 2**BITS, name
    model = module.model
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (calibrated["family"] in ("internvl", "gemma3"))  # and both stayed unchanged (checked above)


def test_loop_replays_the_quantized_models_own_path(calibrated: dict[str, Any]) -> None:
    # Each layer was calibrated on the inputs that the quantized model really feeds it (Qwen3-VL: including the
    # deepstack features added after layer 0, which the loop adds back from the captured residual deltas).
    module = calibrated["module"]
    adapter = module.adapter
    for b, batch in enumerate(calibrated["batches"]):
        recorder = _LayerInputs(adapter)
        try:
            with torch.no_grad():
                module.model(**adapter.forward_inputs(batch))
        finally:
            recorder.remove()
        valid = batch["attention_mask"].bool()
        for i in range(adapter.num_layers):
            real, fed = recorder.inputs[i][0], calibrated["fed"][i][b]
            assert (real[valid] - fed[valid]).abs().max().item() < 1e-4, f"layer {i} batch {b}"


def test_layerwise_importance_equals_whole_model_backward(calibrated: dict[str, Any]) -> None:
    # The calibrated run back-propagated one decoder layer at a time (the default); here the whole model at once.
    module = TLQModule().attach(build_model(calibrated["family"]), processor=None)
    fabric = Fabric(accelerator="cpu", devices=1)
    quant = QuantArgs(method="rtn", bits=BITS, group_size=GROUP_SIZE)  # importance comes before any solve
    memory = MemoryArgs(layerwise=False)
    loop = CalibrationLoop(fabric, module, CalibrationSettings(quant, memory=memory))
    loop.run(calibrated["batches"])
    whole, layered = loop.collector.scores, calibrated["scores"]
    assert sorted(whole) == sorted(layered)
    assert len(whole) == 7 * module.adapter.num_layers
    for name in whole:
        for a, b in zip(whole[name], layered[name], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-10)


def test_quantized_model_reloads_and_generates(calibrated: dict[str, Any], tmp_path: Any) -> None:
    module = calibrated["module"]
    module.model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(reloaded) is type(module.model)
    adapter = get_adapter(reloaded)
    batch = calibrated["batches"][0]  # unpadded
    with torch.no_grad():
        expected = module.model(**module.adapter.forward_inputs(batch)).logits
        logits = reloaded(**adapter.forward_inputs(batch)).logits
    assert torch.allclose(logits, expected, atol=1e-5)
    inputs = {k: v for k, v in adapter.forward_inputs(batch).items() if k != "use_cache"}
    generated = reloaded.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prompt = batch["input_ids"]
    assert generated.shape == (prompt.shape[0], prompt.shape[1] + 3)
    assert torch.equal(generated[:, : prompt.shape[1]], prompt)


# ------------------------------------------------------------------------ batching different crop counts
def test_collate_pads_crop_stacks_and_refuses_other_shape_mismatches() -> None:
    from lightning_tlq.data import collate

    def item(crops: int, side: int = 4) -> dict[str, Tensor]:
        return {
            "input_ids": torch.tensor([[5, 6, 7]]),
            "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "pixel_values": torch.randn(1, crops, 3, side, side),
            "pixel_attention_mask": torch.ones(1, crops, side, side, dtype=torch.bool),
        }

    a, b = item(1), item(3)
    batch = collate([a, b], pad_token_id=0)
    assert batch["pixel_values"].shape == (2, 3, 3, 4, 4)
    assert torch.equal(batch["pixel_values"][0, :1], a["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1], b["pixel_values"][0])
    assert not batch["pixel_values"][0, 1:].any()
    assert batch["pixel_attention_mask"].dtype == torch.bool
    assert batch["pixel_attention_mask"][0, 0].all()
    assert not batch["pixel_attention_mask"][0, 1:].any()
    with pytest.raises(ValueError, match=r"Cannot batch 'pixel_values'.*data.batch_size 1"):
        collate([a, item(1, side=5)], pad_token_id=0)


def test_idefics3_batch_with_different_crop_counts_equals_each_sample_alone() -> None:
    """What the collated batch means is what each sample means alone: padded crops are dropped by the model."""
    from lightning_tlq.data import collate

    model = build_model("idefics3")
    g = torch.Generator().manual_seed(0)

    def sample(crops: int) -> dict[str, Tensor]:
        words = torch.randint(3, IMAGE_ID, (7,), generator=g).tolist()
        ids = torch.tensor([[*words[:3], *[IMAGE_ID] * (4 * crops), *words[3:]]])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, crops, 3, 32, 32, generator=g),
            "pixel_attention_mask": torch.ones(1, crops, 32, 32, dtype=torch.bool),
        }

    samples = [sample(1), sample(2)]
    with torch.no_grad():
        batched = model(**collate(samples, pad_token_id=0)).logits
        for i, s in enumerate(samples):
            alone = model(**s).logits[0]
            torch.testing.assert_close(batched[i, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
