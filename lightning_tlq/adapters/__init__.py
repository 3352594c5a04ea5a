"""Model-family adapters and their registry.

Importing this package registers the built-in families. To add a family, subclass
:class:`~lightning_tlq.adapters.base.VLMAdapter` in ``lightning_tlq/adapters/<family>.py``, decorate it with
:func:`register_adapter` and import the module below.
"""

from lightning_tlq.adapters.base import (
    CapturedInputs,
    UnsupportedModelError,
    VLMAdapter,
    get_adapter,
    move_to,
    register_adapter,
    supported_model_types,
)
from lightning_tlq.adapters.llava import LlavaAdapter
from lightning_tlq.adapters.qwen2_vl import Qwen2VLAdapter

__all__ = [
    "CapturedInputs",
    "LlavaAdapter",
    "Qwen2VLAdapter",
    "UnsupportedModelError",
    "VLMAdapter",
    "get_adapter",
    "move_to",
    "register_adapter",
    "supported_model_types",
]
