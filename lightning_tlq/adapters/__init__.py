"""Model-family adapters and their registry.

Importing this package registers the built-in families. To add a family, subclass
:class:`~lightning_tlq.adapters.base.VLMAdapter` in ``lightning_tlq/adapters/<family>.py``, decorate it with
:func:`register_adapter` and import the module below; ``docs/adapters.md`` is the guide.
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
from lightning_tlq.adapters.gemma3 import Gemma3Adapter
from lightning_tlq.adapters.idefics3 import Idefics3Adapter
from lightning_tlq.adapters.internvl import InternVLAdapter
from lightning_tlq.adapters.llava import LlavaAdapter
from lightning_tlq.adapters.llava_onevision import LlavaOnevisionAdapter
from lightning_tlq.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from lightning_tlq.adapters.qwen2_vl import Qwen2VLAdapter
from lightning_tlq.adapters.qwen3_vl import Qwen3VLAdapter
from lightning_tlq.adapters.smolvlm import SmolVLMAdapter

__all__ = [
    "CapturedInputs",
    "Gemma3Adapter",
    "Idefics3Adapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaOnevisionAdapter",
    "Qwen2VLAdapter",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "SmolVLMAdapter",
    "UnsupportedModelError",
    "VLMAdapter",
    "get_adapter",
    "move_to",
    "register_adapter",
    "supported_model_types",
]
