"""The built-in model names: the checkpoint shipped inside the package (``scenes-llava``, and where it lives) and
the random tiny models built from configs (``tiny-llava``, ``tiny-qwen2_vl``).

Kept apart from :mod:`lightning_tlq.models.scenes` (how that model is built and trained) so that model loading
(:func:`lightning_tlq.models.tiny.resolve_model`, :mod:`lightning_tlq.preflight`) can resolve the name without
importing the model's construction code, which itself builds on :mod:`lightning_tlq.models.tiny`.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODELS: dict[str, str] = {"tiny-llava": "llava", "tiny-qwen2_vl": "qwen2_vl"}
"""Built-in random tiny models (name -> family), built by :func:`lightning_tlq.models.tiny.build_tiny_vlm`."""
SCENES_MODEL = "scenes-llava"
"""Name of the embedded trained model (the package's default model)."""
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / SCENES_MODEL
"""Directory of the shipped checkpoint (bf16 safetensors, config, processor)."""


def embedded_path(name_or_path: str) -> str:
    """The shipped checkpoint's directory for ``scenes-llava``; any other name or path unchanged.

    Raises:
        FileNotFoundError: For ``scenes-llava`` when the checkpoint is missing from the installed package.
    """
    if str(name_or_path) != SCENES_MODEL:
        return str(name_or_path)
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded model {SCENES_MODEL!r} is missing from {CHECKPOINT_DIR} (an incomplete install?). "
            "Reinstall lightning-tlq, or train it again with examples/train_scenes_vlm.py."
        )
    return str(CHECKPOINT_DIR)
