"""lightning_tlq: token-level, quantization-exposed, layer-wise quantization of vision-language models.

The public names are imported on first use (PEP 562), so ``lightning-tlq --help`` and ``import lightning_tlq.cli``
do not pay for torch, transformers and Lightning before a command needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_activation_quant": "actquant",
    "apply_saved_activation_quant": "actquant",
    "VLMAdapter": "adapters",
    "get_adapter": "adapters",
    "register_adapter": "adapters",
    "supported_model_types": "adapters",
    "calibrate": "run_calibration",
    "Calibration": "pipeline",
    "CalibrationObserver": "observers",
    "CalibrationSettings": "settings",
    "Method": "methods",
    "get_method": "methods",
    "method_names": "methods",
    "register_method": "methods",
    "TLQCallback": "callbacks",
    "DataArgs": "config",
    "ImportanceArgs": "config",
    "QuantArgs": "config",
    "TokenSetArgs": "config",
    "CalibrationDataModule": "datamodule",
    "evaluate": "evaluate",
    "ReferenceLogits": "harness",
    "evaluate_model": "harness",
    "reference_logits": "harness",
    "TokenImportance": "importance",
    "ModuleKey": "keys",
    "CalibrationLoop": "loop",
    "TLQModule": "module",
    "CalibrationProgress": "progress",
    "LayerCheckpoint": "resume",
    "LayerStage": "stage",
    "VisionCalibration": "vision",
}

__all__ = [
    "Calibration",
    "CalibrationDataModule",
    "CalibrationLoop",
    "CalibrationObserver",
    "CalibrationProgress",
    "CalibrationSettings",
    "DataArgs",
    "ImportanceArgs",
    "LayerCheckpoint",
    "LayerStage",
    "Method",
    "ModuleKey",
    "QuantArgs",
    "ReferenceLogits",
    "TLQCallback",
    "TLQModule",
    "TokenImportance",
    "TokenSetArgs",
    "VLMAdapter",
    "VisionCalibration",
    "__version__",
    "apply_activation_quant",
    "apply_saved_activation_quant",
    "calibrate",
    "evaluate",
    "evaluate_model",
    "get_adapter",
    "get_method",
    "method_names",
    "reference_logits",
    "register_adapter",
    "register_method",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_tlq' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_tlq.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``calibrate`` and ``evaluate`` name both a submodule and its entry function; importing the submodule sets
    the package attribute to the module, which must not hide the function (as the eager imports did before)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in ("calibrate", "evaluate"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from lightning_tlq.actquant import apply_activation_quant, apply_saved_activation_quant
    from lightning_tlq.adapters import VLMAdapter, get_adapter, register_adapter, supported_model_types
    from lightning_tlq.callbacks import TLQCallback
    from lightning_tlq.config import DataArgs, ImportanceArgs, QuantArgs, TokenSetArgs
    from lightning_tlq.datamodule import CalibrationDataModule
    from lightning_tlq.evaluate import evaluate
    from lightning_tlq.harness import ReferenceLogits, evaluate_model, reference_logits
    from lightning_tlq.importance import TokenImportance
    from lightning_tlq.keys import ModuleKey
    from lightning_tlq.loop import CalibrationLoop
    from lightning_tlq.methods import Method, get_method, method_names, register_method
    from lightning_tlq.module import TLQModule
    from lightning_tlq.observers import CalibrationObserver
    from lightning_tlq.pipeline import Calibration
    from lightning_tlq.progress import CalibrationProgress
    from lightning_tlq.resume import LayerCheckpoint
    from lightning_tlq.run_calibration import calibrate
    from lightning_tlq.settings import CalibrationSettings
    from lightning_tlq.stage import LayerStage
    from lightning_tlq.vision import VisionCalibration
