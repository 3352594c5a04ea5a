"""Tests for the tiny random-init VLMs and model resolution."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor, Qwen2VLProcessor

from lightning_tlq.data import SYNTHETIC_WORDS, collate, encode_sample, synthetic_samples
from lightning_tlq.models import DEFAULT_MODEL, build_tiny_vlm, resolve_model, save_tiny_vlm
from lightning_tlq.models.tiny import IMAGE_TOKENS, build_tokenizer

FAMILIES = ["llava", "qwen2_vl"]


def _batch(processor, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    encoded = [encode_sample(processor, sample) for sample in synthetic_samples(n, seed=seed)]
    return collate(encoded, processor.tokenizer.pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_shapes_and_processor_class(family):
    model, processor = build_tiny_vlm(family, num_layers=3)
    expected = LlavaProcessor if family == "llava" else Qwen2VLProcessor
    assert isinstance(processor, expected)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads) == (128, 256, 4)
    assert (text.num_key_value_heads, text.max_position_embeddings) == (2, 512)
    assert text.vocab_size == len(processor.tokenizer)
    assert len(model.get_decoder().layers) == 3
    assert model.config.image_token_id == processor.image_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_finite(family):
    model, processor = build_tiny_vlm(family)
    batch = _batch(processor)
    loss = model(**batch, use_cache=False).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_runs(family):
    model, processor = build_tiny_vlm(family)
    sample = synthetic_samples(1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[sample.image], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", FAMILIES)
def test_image_token_count_matches_vision_features(family):
    model, processor = build_tiny_vlm(family)
    encoded = encode_sample(processor, synthetic_samples(1)[0])
    vision_inputs = {k: v for k, v in encoded.items() if k in ("pixel_values", "image_grid_thw")}
    with torch.no_grad():
        features = model.model.get_image_features(**vision_inputs).pooler_output[0]
    n_image_tokens = int((encoded["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == features.shape[0] == IMAGE_TOKENS


def test_seed_controls_weights_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, _ = build_tiny_vlm("llava", seed=1)
    b, _ = build_tiny_vlm("llava", seed=1)
    c, _ = build_tiny_vlm("llava", seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_knows_every_synthetic_word(family):
    tokenizer = build_tokenizer(family)
    vocab = tokenizer.get_vocab()
    assert set(SYNTHETIC_WORDS) <= set(vocab)
    ids = tokenizer(" ".join(SYNTHETIC_WORDS), add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_gives_identical_logits(family, tmp_path):
    path = save_tiny_vlm(tmp_path / family, family, seed=3)
    assert (path / "model.safetensors").is_file()
    model, processor = build_tiny_vlm(family, seed=3)
    reloaded = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    reloaded_processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert type(reloaded) is type(model)
    assert type(reloaded_processor) is type(processor)
    sample = synthetic_samples(1)[0]
    original, again = encode_sample(processor, sample), encode_sample(reloaded_processor, sample)
    assert original.keys() == again.keys()
    for key in original:  # where torchvision exists the reload may pick the torchvision image processor:
        if key == "pixel_values":  # same maths, float rounding differs (2.4e-7 seen on transformers 5.17)
            torch.testing.assert_close(again[key], original[key], rtol=0, atol=1e-5)
        else:
            assert torch.equal(original[key], again[key]), key
    with torch.no_grad():
        expected = model(**original, use_cache=False).logits
        actual = reloaded(**original, use_cache=False).logits
    assert torch.equal(expected, actual)


def test_resolve_model_names_paths_and_dtype(tmp_path):
    model, processor = resolve_model()
    assert DEFAULT_MODEL == "scenes-llava"  # the embedded trained model
    assert isinstance(processor, LlavaProcessor)
    qwen, _ = resolve_model("tiny-qwen2_vl", dtype="bfloat16")
    assert next(qwen.parameters()).dtype == torch.bfloat16
    path = save_tiny_vlm(tmp_path / "saved", "qwen2_vl")
    loaded, loaded_processor = resolve_model(path, dtype="float32")
    assert isinstance(loaded_processor, Qwen2VLProcessor)
    assert next(loaded.parameters()).dtype == torch.float32
    assert not loaded.training


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in model .* nor a Hugging Face hub id"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="Unsupported dtype 'int3'"):
        resolve_model("tiny-llava", dtype="int3")
    with pytest.raises(ValueError, match="Unknown tiny VLM family"):
        build_tiny_vlm("gemma3")  # type: ignore[arg-type]
