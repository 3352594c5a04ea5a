"""lightning_tlq: token-level, quantization-exposed, layer-wise quantization of vision-language models."""

from lightning_tlq.actquant import apply_activation_quant, apply_saved_activation_quant
from lightning_tlq.adapters import VLMAdapter, get_adapter, register_adapter, supported_model_types
from lightning_tlq.callbacks import TLQCallback
from lightning_tlq.config import DataArgs, ImportanceArgs, QuantArgs, TokenSetArgs
from lightning_tlq.datamodule import CalibrationDataModule
from lightning_tlq.evaluate import evaluate
from lightning_tlq.harness import ReferenceLogits, evaluate_model, reference_logits
from lightning_tlq.importance import TokenImportance
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

__version__ = "0.1.0"

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
