"""Several images in one sample, for every supported family's tiny model: the model takes the images in order of
their placeholder spans, so the logits before the second image do not depend on it and those after it do."""

from __future__ import annotations

import pytest
import torch
from tiny_families import FAMILIES, IMAGE_ID, _image_span, _pixels, build_model

from lightning_tlq.adapters import get_adapter


def _two_image_batch(family: str, second_seed: int) -> tuple[dict[str, torch.Tensor], int]:
    words = torch.randint(3, IMAGE_ID, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    span = _image_span(family)
    row = [*words[:3], *span, *words[3:5], *span, *words[5:]]
    first = _pixels(family, 1, torch.Generator().manual_seed(1))
    second = _pixels(family, 1, torch.Generator().manual_seed(second_seed))
    pixels = {k: torch.cat([first[k], second[k]]) for k in first}
    if family in ("idefics3", "smolvlm"):  # one sample's images: [1, images, 3, H, W]
        pixels = {k: v.reshape(1, 2, *v.shape[2:]) for k, v in pixels.items()}
    ids = torch.tensor([row])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    return batch, 3 + len(span) + 2  # the position where the second image's span starts


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", *FAMILIES])
def test_two_images_in_one_sample(family):
    torch.manual_seed(0)
    model = build_model(family)
    if family == "gemma3":  # its projector weight starts at zero (every image feature 0): give it values
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    adapter = get_adapter(model)
    with torch.no_grad():
        logits = []
        for seed in (2, 3):
            batch, second = _two_image_batch(family, seed)
            logits.append(model(**adapter.forward_inputs(batch)).logits[0])
    torch.testing.assert_close(logits[0][:second], logits[1][:second], rtol=0, atol=1e-6)
    assert (logits[0][second:] - logits[1][second:]).abs().max() > 1e-4
