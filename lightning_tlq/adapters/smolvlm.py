"""Adapter for SmolVLM (``model_type="smolvlm"``): Idefics3's architecture under its own model type."""

from __future__ import annotations

from typing import ClassVar

from lightning_tlq.adapters.base import register_adapter
from lightning_tlq.adapters.idefics3 import Idefics3Adapter


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM models: same module layout and inputs as Idefics3 (``model.text_model``, ``model.connector``)."""

    model_types: ClassVar[tuple[str, ...]] = ("smolvlm",)
