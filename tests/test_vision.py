"""Vision-tower support: layer-by-layer replay, used layers and targets, importance into the tower, and the
vision stages feeding the language model's calibration."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_tlq.actquant import apply_activation_quant
from lightning_tlq.adapters import LlavaAdapter, UnsupportedModelError, VLMAdapter, get_adapter
from lightning_tlq.adapters.vision import VisionAdapter, vision_adapter
from lightning_tlq.config import MemoryArgs, QuantArgs
from lightning_tlq.data import encode_sample, make_batches, synthetic_samples
from lightning_tlq.importance import TokenImportance
from lightning_tlq.keys import ModuleKey
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.tiny import build_tiny_vlm
from lightning_tlq.module import TLQModule
from lightning_tlq.settings import CalibrationSettings
from lightning_tlq.vision import VisionCalibration

FAMILIES = ("llava", "qwen2_vl")


def _module(family: str, **config: object) -> TLQModule:
    model, processor = build_tiny_vlm(family, seed=0)
    for key, value in config.items():
        setattr(model.config, key, value)
    return TLQModule().attach(model, processor)


def _batches(module: TLQModule, n: int = 3, batch_size: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    encoded = [encode_sample(module.processor, s) for s in synthetic_samples(n, seed=seed)]
    return make_batches(encoded, batch_size, module.adapter.pad_token_id)


def _layerwise_features(adapter: VisionAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    captured = adapter.vision_capture(batch)
    states = {0: captured.hidden}
    hidden = captured.hidden
    for i in range(len(adapter.vision_layers())):
        hidden = adapter.run_vision_layer(i, hidden, captured.layer_kwargs[i])
        states[i + 1] = hidden
    out = adapter.run_projector(adapter.projector_input(states))
    return out.reshape(-1, out.shape[-1])


_LLAVA_VARIANTS = [
    {},
    {"vision_feature_layer": -2},
    {"vision_feature_layer": [-2, -1]},
    {"vision_feature_layer": 1, "vision_feature_select_strategy": "full"},
]


@pytest.mark.parametrize(
    ("family", "config"),
    [("llava", c) for c in _LLAVA_VARIANTS] + [("qwen2_vl", {})],
    ids=["llava", "llava-layer-2", "llava-layers-2-1", "llava-full", "qwen2_vl"],
)
def test_layerwise_vision_replay_equals_the_towers_output(family: str, config: dict) -> None:
    module = _module(family, **config)
    if "vision_feature_layer" in config and isinstance(config["vision_feature_layer"], list):
        # the projector reads the concatenation of two layers: widen linear_1 to match
        proj = module.model.model.multi_modal_projector
        proj.linear_1 = nn.Linear(2 * proj.linear_1.in_features, proj.linear_1.out_features)
    adapter = vision_adapter(module.adapter)
    batch = _batches(module)[0]
    with torch.no_grad():
        expected = adapter.image_features(batch)
        got = _layerwise_features(adapter, batch)
        n_tokens = int((batch["input_ids"] == adapter.image_token_id).sum())
    if config.get("vision_feature_select_strategy") == "full":
        n_tokens += 3  # CLS kept: one more feature per image (the processor would then insert 17 tokens)
    assert expected.shape == got.shape == (n_tokens, module.model.config.text_config.hidden_size)
    assert (got - expected).abs().max().item() < 1e-4


def test_qwen_replay_with_images_of_different_sizes() -> None:
    module = _module("qwen2_vl")
    adapter = vision_adapter(module.adapter)
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 4], [1, 4, 8], [1, 8, 4]])  # 16, 32 and 32 patches -> 4, 8 and 8 image tokens
    batch = {"pixel_values": torch.randn(80, 96, generator=g), "image_grid_thw": grid}
    with torch.no_grad():
        expected = adapter.image_features(batch)
        got = _layerwise_features(adapter, batch)
    assert got.shape == (20, 128)
    assert (got - expected).abs().max().item() < 1e-4
    assert adapter.vision_rows_per_image(batch, 80) == [16, 32, 32]  # patches, in the vision blocks
    assert adapter.vision_rows_per_image(batch, 20) == [4, 8, 8]  # image tokens, in the merger (4:1)
    with pytest.raises(ValueError, match="do not split"):
        adapter.vision_rows_per_image(batch, 33)


def _vision_linears(model: nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefixes)}


def test_vision_targets_cover_used_linears_and_skip_unused_layers() -> None:
    module = _module("llava")
    adapter = vision_adapter(module.adapter)
    all_vision = _vision_linears(module.model, adapter.vision_prefixes)
    assert set(adapter.vision_target_module_names()) == all_vision  # feature layer -1: every CLIP layer is used
    assert len(adapter.vision_layers()) == 2

    module = _module("llava", vision_feature_layer=-2)  # LLaVA's usual setting: the last CLIP layer is unused
    adapter = vision_adapter(module.adapter)
    targets = set(adapter.vision_target_module_names())
    assert len(adapter.vision_layers()) == 1
    assert targets == {n for n in all_vision if ".encoder.layers.1." not in n}
    assert not any("post_layernorm" in n for n in targets)

    qwen = vision_adapter(_module("qwen2_vl").adapter)
    assert set(qwen.vision_target_module_names()) == _vision_linears(qwen.model, qwen.vision_prefixes)
    assert qwen.vision_module_groups(0) == [["attn.qkv"], ["attn.proj"], ["mlp.fc1"], ["mlp.fc2"]]
    with pytest.raises(IndexError, match="out of range"):
        qwen.vision_module_groups(2)


def test_unsupported_family_and_bad_structure_fail_clearly() -> None:
    model, _ = build_tiny_vlm("llava")

    class PlainLlava(VLMAdapter):  # not registered: an adapter without vision support
        model_types = ("llava",)

    with pytest.raises(UnsupportedModelError, match=r"quant.vision=true is not supported.*quant.vision=false"):
        vision_adapter(PlainLlava(model))

    class Broken(LlavaAdapter):
        vision_linear_groups = (("self_attn.qkv",),)

    with pytest.raises(UnsupportedModelError, match=r"nn.Linear at 'self_attn.qkv' in vision layer 0"):
        Broken(model).vision_targets()
    model.config.vision_feature_layer = -4
    with pytest.raises(UnsupportedModelError, match="out of range"):
        LlavaAdapter(model).vision_layers()


def test_vision_group_size_must_divide_tower_widths() -> None:
    module = _module("llava")  # CLIP width 32: group size 64 cannot work
    with pytest.raises(ValueError, match=r"group_size=64 does not divide in_features=32.*quant.vision=false"):
        VisionCalibration(module.adapter, CalibrationSettings(QuantArgs(group_size=64, vision=True)))


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_backward_continues_into_the_tower(family: str) -> None:
    module = _module(family)
    adapter = vision_adapter(module.adapter)
    batch = _batches(module)[0]
    targets = adapter.vision_targets()
    collector = TokenImportance("fisher", 1)
    collector.on_importance_start(None, targets)
    with torch.enable_grad():
        module.sft_loss(batch, vision_grads=True).backward()
    collector.on_importance_batch_end(None, 0)
    collector.on_importance_end(None)
    if family == "llava":  # [images, CLS + 16 patches] in the tower; CLS dropped before the projector
        assert collector.scores[ModuleKey("vision.0", "self_attn.q_proj")][0].shape == (3, 17, 1)
        assert collector.scores[ModuleKey("projector", "linear_2")][0].shape == (3, 16, 1)
    else:  # 3 x 64 packed patches in the blocks; 4:1 merged to 3 x 16 image tokens in the merger
        assert collector.scores[ModuleKey("vision.0", "attn.qkv")][0].shape == (192, 1)
        assert collector.scores[ModuleKey("projector", "mlp.2")][0].shape == (48, 1)
    assert all(scores[0].sum() > 0 for scores in collector.scores.values())

    # without vision gradients the frozen tower is not part of the backward graph: refused loudly
    collector.on_importance_start(None, targets)
    with torch.enable_grad():
        module.sft_loss(batch).backward()
    collector.on_importance_batch_end(None, 0)
    with pytest.raises(RuntimeError, match="No output gradient"):
        collector.on_importance_end(None)


def _vision_loop(
    family: str, layerwise: bool = True, weighted_metrics: bool = False, **quant: object
) -> tuple[CalibrationLoop, list, list]:
    module = _module(family)
    batches = _batches(module, n=6)
    seen: list = []
    capture = module.adapter.capture
    module.adapter.capture = lambda inputs, **kw: seen.append(capture(inputs, **kw)) or seen[-1]
    fabric = Fabric(accelerator="cpu", devices=1)
    args = QuantArgs(**{"method": "tlq", "bits": 4, "group_size": 32, "vision": True, **quant})
    memory = MemoryArgs(layerwise=layerwise)
    loop = CalibrationLoop(fabric, module, CalibrationSettings(args, memory=memory, weighted_metrics=weighted_metrics))
    loop.run(batches)
    return loop, batches, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_vision_importance_equals_whole_model_backward(family: str) -> None:
    # layer by layer, the backward reaches the tower through dL/dh_0 at the image positions
    # gptq needs no importance: weighted metrics ask for the backward
    whole, _, _ = _vision_loop(family, layerwise=False, weighted_metrics=True, method="gptq")
    layered, _, _ = _vision_loop(family, layerwise=True, weighted_metrics=True, method="gptq")
    names = set(vision_adapter(whole.adapter).vision_targets())
    assert names <= set(whole.collector.scores) == set(layered.collector.scores)
    for name in names:
        for a, b in zip(whole.collector.scores[name], layered.collector.scores[name], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-12)
    for a, b in zip(whole.vision_records, layered.vision_records, strict=True):
        assert a["modules"].keys() == b["modules"].keys()
        for name in a["modules"]:
            got, ref = b["modules"][name]["weighted_rel_error"], a["modules"][name]["weighted_rel_error"]
            assert got == pytest.approx(ref, rel=1e-3), name


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_is_captured_through_the_quantized_tower(family: str) -> None:
    fp_model, _ = build_tiny_vlm(family, seed=0)
    loop, batches, seen = _vision_loop(family, act_bits=8)
    module = loop.module
    assert len(seen) == 2 * len(batches)  # once for the importance pass (FP), once after the tower is quantized
    seen = seen[len(batches) :]

    adapter = vision_adapter(module.adapter)
    assert len(loop.vision_records) == len(adapter.vision_layers()) + 1
    assert {k for k in loop.results if k.is_vision} == set(adapter.vision_targets())
    fp_adapter = vision_adapter(get_adapter(fp_model))
    for b, batch in enumerate(batches):
        image = batch["input_ids"] == adapter.image_token_id
        lm_input = seen[b].hidden[image]
        with torch.no_grad(), apply_activation_quant(None, 8, adapter.vision_targets().values()):
            quantized_tower = adapter.image_features(batch)
        # the decoder inputs at image positions are the quantized tower's W4A8 features ...
        torch.testing.assert_close(lm_input, quantized_tower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loop.vision.outputs[b].reshape(lm_input.shape), lm_input, rtol=1e-5, atol=1e-5)
        # ... not the full-precision tower's
        with torch.no_grad():
            assert (lm_input - fp_adapter.image_features(batch)).abs().max() > 1e-3
    # the vision modules were quantized, and no activation-quant hook is left behind
    assert all(not m._forward_pre_hooks for m in module.model.modules())
