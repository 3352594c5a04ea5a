"""Typed argument groups for TLQ calibration.

Each group is a dataclass that LightningCLI / jsonargparse reads directly (attribute docstrings become help
text) and that validates itself in ``__post_init__``, naming the offending field and the allowed values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

from lightning_tlq.core.actquant import check_act_bits
from lightning_tlq.core.quantizer import QuantSpec

Method = Literal["rtn", "gptq", "tlq", "awq", "smoothquant", "mbq"]
Score = Literal["fisher", "grad_abs", "taylor"]
ImportanceMode = Literal["token", "modality", "none"]
DataSplit = Literal["calibration", "validation", "test"]
Target = Literal["quantized", "fp"]

log = logging.getLogger(__name__)

_METHODS = ("rtn", "gptq", "tlq", "awq", "smoothquant", "mbq")
_SMOOTHING_METHODS = ("awq", "smoothquant", "mbq")
"""Methods that search per-input-channel scales, fold them into the producing ops, then round to nearest."""
_SCORES = ("fisher", "grad_abs", "taylor")
_MODES = ("token", "modality", "none")
_TARGETS = ("quantized", "fp")


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {', '.join(allowed)}.")


def _check_range(field: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{field}={value} is out of range; it must lie in {bracket}{lo}, {hi}].")


@dataclass
class QuantArgs:
    """Weight quantization settings."""

    method: Method = "tlq"
    """Calibration method: ``rtn`` (round to nearest), ``gptq`` (uniform token weights), ``tlq``, or the scale-search
    baselines ``awq`` (activation-aware scales, MSE grid search), ``smoothquant`` (W-A settings: fixed-alpha
    smoothing) and ``mbq`` (modality-balanced: AWQ/SmoothQuant scales searched on a vision/answer-weighted MAE, with
    gradient-derived vision weights). The baselines fold their scales into the previous norm / linear and round the
    weights to nearest; GPTQ settings (``act_order``, ``block_size``, ``damp``) do not apply to them."""
    bits: int = 4
    """Weight bit width, 2..8."""
    group_size: int = 128
    """Input channels per quantization group; -1 means one group per output channel."""
    symmetric: bool = True
    """Symmetric (zero point 0) or asymmetric (integer zero point) quantization."""
    act_order: bool = True
    """GPTQ: process columns in order of decreasing Hessian diagonal (static groups, no runtime g_idx)."""
    block_size: int = 128
    """GPTQ: columns per lazy block update."""
    damp: float = 0.01
    """GPTQ: relative damping, added as ``damp * mean(diag H)``; raised x10 up to 3 times on failure."""
    true_sequential: bool = True
    """Solve q,k,v -> o -> gate,up -> down in order, each group seeing the already-quantized ones before it."""
    act_bits: int | None = None
    """Activation bits: None = weight-only; 8 = W4A8, per-token dynamic symmetric int8 on every quantized Linear's
    input, applied during calibration (quantized path) and recorded in the saved config."""
    vision: bool = False
    """Also quantize the vision tower and projector: layer by layer on the quantized path, before the language
    model (which is then calibrated on the quantized tower's features). Default: keep them in full precision."""
    scale_grid: int = 20
    """awq / mbq: number of alpha grid points searched, ``alpha in {0, 1/n, ..., (n-1)/n}`` (AWQ uses 20); 1 searches
    only alpha = 0, which is plain round to nearest for awq and weight-only mbq."""
    smoothquant_alpha: float = 0.5
    """smoothquant: migration strength alpha in ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)``, in [0, 1]."""
    awq_clip: bool = False
    """awq / mbq: after the scales, also search a max-abs clipping ratio per (output row, weight group) of each
    module (AWQ's clip search: ratios 1.0, 0.95, ..., 0.55 on the output MSE; q and k projections are not clipped)."""
    target: Target = "quantized"
    """What each module's output is matched to: ``quantized`` minimises ``||(Q - W) X~||^2`` on the quantized path's
    inputs ``X~``; ``fp`` (GPTAQ asymmetric calibration) minimises ``||Q X~ - W X||^2``, ``X`` the full-precision
    model's inputs, at the cost of a second (full-precision) activation stream and a second forward per module
    group. gptq and tlq only; not with ``vision``."""

    def __post_init__(self) -> None:
        _check_choice("quant.method", self.method, _METHODS)
        _check_choice("quant.target", self.target, _TARGETS)
        if self.target == "fp" and self.method not in ("gptq", "tlq"):
            raise ValueError(
                f"quant.target='fp' needs a GPTQ-based method (gptq or tlq), not quant.method={self.method!r}."
            )
        if self.target == "fp" and self.vision:
            raise ValueError(
                "quant.target='fp' is not supported with quant.vision=true (the vision tower's full-precision "
                "stream is not implemented); use quant.target='quantized' or quant.vision=false."
            )
        if self.block_size < 1:
            raise ValueError(f"quant.block_size={self.block_size} must be a positive number of columns.")
        _check_range("quant.damp", self.damp, 0.0, 1.0, lo_open=True)
        self.spec  # validates bits and group size
        if self.act_bits is not None:
            try:
                check_act_bits(self.act_bits)
            except ValueError as err:
                msg = f"quant.act_bits={self.act_bits!r} is invalid: use null (weight-only) or an integer in 2..8."
                raise ValueError(msg) from err
        self._check_smoothing()

    def _check_smoothing(self) -> None:
        if isinstance(self.scale_grid, bool) or not isinstance(self.scale_grid, int) or self.scale_grid < 1:
            raise ValueError(f"quant.scale_grid={self.scale_grid!r} must be a positive integer (grid points of alpha).")
        _check_range("quant.smoothquant_alpha", self.smoothquant_alpha, 0.0, 1.0)
        if self.method == "smoothquant" and self.act_bits is None:
            raise ValueError(
                "quant.method=smoothquant migrates activation outliers into the weights for weight-activation "
                "quantization and needs quant.act_bits (e.g. 8 for W4A8); for weight-only settings use "
                "quant.method=awq or mbq."
            )
        if self.awq_clip and self.method not in ("awq", "mbq"):
            raise ValueError(f"quant.awq_clip=true applies to quant.method awq or mbq, not {self.method!r}.")
        if self.vision and self.is_smoothing:
            raise ValueError(
                f"quant.method={self.method} quantizes the language model only: quant.vision=true is not supported "
                "with awq, smoothquant or mbq. Use quant.vision=false, or quant.method rtn, gptq or tlq."
            )

    @property
    def is_smoothing(self) -> bool:
        """Whether the method searches and folds per-channel scales (awq, smoothquant, mbq), then rounds to nearest."""
        return self.method in _SMOOTHING_METHODS

    @property
    def uses_gptq(self) -> bool:
        """Whether modules are solved with GPTQ (gptq, tlq) rather than rounded to nearest."""
        return self.method in ("gptq", "tlq")

    @property
    def spec(self) -> QuantSpec:
        """The pure-torch quantizer spec these settings describe."""
        try:
            return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)
        except ValueError as err:
            raise ValueError(str(err).replace("QuantSpec.", "quant.")) from err


@dataclass
class ImportanceArgs:
    """Gradient-guided token importance (METHOD.md section 1)."""

    score: Score = "fisher"
    """Per-token score from the output gradient g: ``fisher`` mean g^2, ``grad_abs`` mean |g|, ``taylor`` mean |g*y|."""
    groups: int = 1
    """Output-channel groups per module, one score per group (1 = token level)."""
    floor: float = 0.1
    """Mix weight lam in ``(1 - lam) * s_t + lam * mean_modality(s)``; keeps vision tokens in the Hessian."""
    clip_quantile: float = 0.999
    """Clip weights above this quantile of the module's token weights (1.0 disables)."""
    mode: ImportanceMode = "token"
    """``token`` per-token weights, ``modality`` one weight per modality per module (MBQ-style), ``none`` all 1."""

    def __post_init__(self) -> None:
        _check_choice("importance.score", self.score, _SCORES)
        _check_choice("importance.mode", self.mode, _MODES)
        if self.groups < 1:
            raise ValueError(f"importance.groups={self.groups} must be >= 1.")
        _check_range("importance.floor", self.floor, 0.0, 1.0)
        _check_range("importance.clip_quantile", self.clip_quantile, 0.0, 1.0, lo_open=True)


@dataclass
class TokenSetArgs:
    """Token-level calibration set (METHOD.md section 2)."""

    keep_mass: float = 0.99
    """Keep the smallest set of tokens covering this share of each layer's importance mass."""
    p_rest: float = 0.1
    """Keep this uniform random fraction of the remaining tokens, their weights divided by it (unbiased)."""
    seed: int = 0
    """Seed of the random draw; the set depends only on it, never on the number of ranks."""

    def __post_init__(self) -> None:
        _check_range("token_set.keep_mass", self.keep_mass, 0.0, 1.0, lo_open=True)
        _check_range("token_set.p_rest", self.p_rest, 0.0, 1.0)


@dataclass
class DataArgs:
    """Calibration data."""

    path: str | None = None
    """JSONL of {"image", "question", "answer"}; None uses the built-in synthetic set."""
    image_root: str | None = None
    """Folder that relative image paths start from (default: the JSONL's folder)."""
    num_samples: int = 64
    """Calibration samples to use (the first N of the file; synthetic: N generated)."""
    batch_size: int = 4
    """Samples per forward pass."""
    max_length: int | None = None
    """Reject samples longer than this many tokens (default: the model's limit). Never truncates."""
    seed: int = 0
    """Seed of the synthetic data."""
    split: DataSplit | None = None
    """Split of the built-in task when ``path`` is None: ``calibration`` (the task's training split),
    ``validation`` or ``test`` (never calibrated on); None = the subcommand's default (``calibrate``: calibration,
    ``evaluate``: test). The scenes task of the embedded model has disjoint splits; the tiny models' shapes task
    has none (use another ``seed`` for held-out data)."""

    def __post_init__(self) -> None:
        if self.split is not None:
            _check_choice("data.split", self.split, ("calibration", "validation", "test"))
        if self.num_samples < 1:
            raise ValueError(f"data.num_samples={self.num_samples} must be >= 1.")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1.")


@dataclass
class MemoryArgs:
    """Where weights and activations live during calibration (METHOD.md section 4)."""

    layerwise: bool = True
    """Keep the decoder layers on the CPU and move one at a time to the accelerator (the next one prefetched);
    the importance pass then also runs layer by layer (forward storing layer inputs, backward recomputing one
    layer at a time). False puts the whole model on the accelerator and back-propagates through it at once."""
    offload_activations: bool = False
    """Keep calibration activations (layer inputs of every sample) in pinned CPU memory instead of on the GPU."""
    max_gpu_memory_gib: float | None = None
    """Cap the GPU memory this process may allocate (e.g. 24 to emulate 24 GiB cards); None = no cap."""

    def __post_init__(self) -> None:
        if self.max_gpu_memory_gib is not None and self.max_gpu_memory_gib <= 0:
            raise ValueError(f"memory.max_gpu_memory_gib={self.max_gpu_memory_gib} must be positive (GiB) or null.")


def importance_for(quant: QuantArgs, importance: ImportanceArgs) -> ImportanceArgs:
    """The importance settings a run really uses: ``mbq`` derives its vision weights from mean ``|dL/dy|`` per token,
    so it always collects ``grad_abs`` scores (logged when ``importance.score`` said otherwise, and recorded in the
    report's settings; its importance-weighted errors then use ``grad_abs`` weights too). Other methods: unchanged."""
    if quant.method != "mbq" or importance.score == "grad_abs":
        return importance
    log.info(
        "quant.method=mbq weighs vision against answer tokens by their mean |gradient|: collecting "
        "importance.score=grad_abs instead of %s.",
        importance.score,
    )
    return replace(importance, score="grad_abs")
