"""Model construction and loading."""

from lightning_tlq.models.tiny import DEFAULT_MODEL, TINY_MODELS, build_tiny_vlm, resolve_model, save_tiny_vlm

__all__ = ["DEFAULT_MODEL", "TINY_MODELS", "build_tiny_vlm", "resolve_model", "save_tiny_vlm"]
