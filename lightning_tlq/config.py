"""Typed argument groups for TLQ calibration.

Each group is a dataclass that LightningCLI / jsonargparse reads directly (attribute docstrings become help
text) and that validates itself in ``__post_init__``, naming the offending field and the allowed values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

from lightning_tlq.core.actquant import check_act_bits
from lightning_tlq.core.factor import FACTOR_PRECISIONS, FactorPrecision
from lightning_tlq.core.gptq import KERNELS, Kernel
from lightning_tlq.core.quantizer import QuantSpec
from lightning_tlq.losses import LABEL_SOURCES, LabelSource
from lightning_tlq.methods import Method, get_method, method_names

MethodName = Literal[method_names()]  # type: ignore[valid-type]  # the registered methods
Score = Literal["fisher", "grad_abs", "taylor"]
ImportanceMode = Literal["token", "modality", "none"]
Granularity = Literal["module", "input"]
Target = Literal["quantized", "fp"]
MemoryProfile = Literal["fast", "low"]

log = logging.getLogger(__name__)

_SCORES = ("fisher", "grad_abs", "taylor")
_MODES = ("token", "modality", "none")
_GRANULARITIES = ("module", "input")
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

    method: MethodName = "tlq"
    """Calibration method: ``tlq``, or the baselines ``rtn``, ``gptq`` (uniform token weights), ``awq``,
    ``smoothquant`` (needs ``act_bits``) and ``mbq``; what each needs and does: docs/methods.md."""
    bits: int = 4
    """Weight bit width, 2..8."""
    group_size: int = 128
    """Input channels per quantization group; -1 means one group per output channel."""
    symmetric: bool = True
    """Symmetric (zero point 0) or asymmetric (integer zero point)."""
    act_order: bool = True
    """GPTQ: columns by decreasing Hessian diagonal (static groups)."""
    block_size: int = 128
    """GPTQ: columns per lazy block update."""
    damp: float = 0.01
    """GPTQ: damping ``damp * mean(diag H)`` (x10 up to 3 times on failure)."""
    kernel: Kernel = "auto"
    """GPTQ column loop: ``auto`` (graph on CUDA), ``graph`` (Triton step in CUDA graphs), ``triton`` or ``torch``."""
    factor_precision: FactorPrecision = "auto"
    """GPTQ factor: ``tf32x3`` (fp32 from 3 TF32 products) on CUDA, else ``fp32``."""
    true_sequential: bool = True
    """Solve q,k,v -> o -> gate,up -> down in order, each after the ones before it are quantized."""
    act_bits: int | None = None
    """Activation bits: None = weight-only; 8 = W4A8 (per-token dynamic symmetric int8 on every quantized
    Linear's input, during calibration and recorded in the saved config)."""
    vision: bool = False
    """Also quantize the vision tower and projector, layer by layer, before the language model (which then
    sees the quantized tower's features). Default: keep them in full precision."""
    scale_grid: int = 20
    """awq / mbq: alpha grid points searched, ``{0, 1/n, ..., (n-1)/n}`` (AWQ: 20)."""
    smoothquant_alpha: float = 0.5
    """smoothquant: migration strength alpha in ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)``, in [0, 1]."""
    awq_clip: bool = False
    """awq / mbq: also search AWQ's max-abs clipping ratio per output row and weight group."""
    target: Target = "quantized"
    """``quantized`` matches ``Q X~`` to ``W X~`` on the quantized path's inputs; ``fp`` (GPTAQ) to the
    full-precision model's ``W X`` (a second activation stream). gptq and tlq only; not with ``vision``."""

    def __post_init__(self) -> None:
        handler = get_method(self.method)
        _check_choice("quant.target", self.target, _TARGETS)
        if self.target == "fp" and self.vision:
            raise ValueError(
                "quant.target='fp' is not supported with quant.vision=true (the vision tower's full-precision "
                "stream is not implemented); use quant.target='quantized' or quant.vision=false."
            )
        if self.block_size < 1:
            raise ValueError(f"quant.block_size={self.block_size} must be a positive number of columns.")
        _check_choice("quant.kernel", self.kernel, KERNELS)
        _check_choice("quant.factor_precision", self.factor_precision, FACTOR_PRECISIONS)
        if self.kernel in ("triton", "graph") and self.block_size > 128:
            raise ValueError(
                f"quant.kernel={self.kernel!r} runs blocks of at most 128 columns, got "
                f"quant.block_size={self.block_size}; lower quant.block_size or use quant.kernel='auto'."
            )
        _check_range("quant.damp", self.damp, 0.0, 1.0, lo_open=True)
        self.spec  # validates bits and group size
        if self.act_bits is not None:
            try:
                check_act_bits(self.act_bits)
            except ValueError as err:
                msg = f"quant.act_bits={self.act_bits!r} is invalid: use null (weight-only) or an integer in 2..8."
                raise ValueError(msg) from err
        if isinstance(self.scale_grid, bool) or not isinstance(self.scale_grid, int) or self.scale_grid < 1:
            raise ValueError(f"quant.scale_grid={self.scale_grid!r} must be a positive integer (grid points of alpha).")
        _check_range("quant.smoothquant_alpha", self.smoothquant_alpha, 0.0, 1.0)
        handler.validate(self)

    @property
    def handler(self) -> Method:
        """The method's handler (:mod:`lightning_tlq.methods`): what it needs and how it solves."""
        return get_method(self.method)

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
    granularity: Granularity = "module"
    """Hessian token weights: ``module`` each module's own; ``input`` one per token for the modules reading one
    input (q/k/v, gate/up: the mean of their weights), so they share one Hessian and one factorisation."""
    labels: LabelSource = "data"
    """Next tokens the importance loss scores: ``data`` the calibration answers, ``model`` tokens drawn from the
    full-precision model's own distribution at the answer positions (seeded per sample): the gradients then
    estimate the Fisher information, the curvature of the KL divergence to the full-precision outputs."""

    def __post_init__(self) -> None:
        _check_choice("importance.score", self.score, _SCORES)
        _check_choice("importance.labels", self.labels, LABEL_SOURCES)
        _check_choice("importance.mode", self.mode, _MODES)
        _check_choice("importance.granularity", self.granularity, _GRANULARITIES)
        if self.groups < 1:
            raise ValueError(f"importance.groups={self.groups} must be >= 1.")
        if self.groups > 1 and self.granularity == "input":
            raise ValueError(
                f"importance.groups={self.groups} weighs each module's output-channel groups apart, "
                "importance.granularity='input' one weight per token for all modules of an input: use one of them."
            )
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
    """JSONL of {"image", "question", "answer"} or chat-format ({"messages"} / {"conversations"}) records; None uses
    the built-in synthetic set."""
    image_root: str | None = None
    """Folder that relative image paths start from (default: the JSONL's or dataset file's folder)."""
    num_samples: int = 64
    """Calibration samples to use (the first N of the file; synthetic: N generated)."""
    batch_size: int = 4
    """Samples per forward pass."""
    max_length: int | None = None
    """Reject samples longer than this many tokens (default: the model's limit). Never truncates."""
    seed: int = 0
    """Seed of the synthetic data (and of ``shuffle``)."""
    split: str | None = None
    """Built-in task (no ``path`` / ``dataset``): ``calibration`` (the task's training split), ``validation`` or
    ``test`` (never calibrated on); None = the subcommand's default (``calibrate``: calibration, ``evaluate``:
    test). The scenes task of the embedded model has disjoint splits; the tiny models' shapes task has none (use
    another ``seed`` for held-out data). With ``dataset``: any split of it, with an optional slice (``train``,
    ``test[:200]``, ``train[10%:20%]``); None = ``train``."""
    dataset: str | None = None
    """Hugging Face ``datasets`` source (needs ``pip install lightning-tlq[datasets]``): a hub name, a directory
    written by ``Dataset.save_to_disk``, a folder of data files, or a ``.parquet`` / ``.arrow`` / ``.json(l)`` /
    ``.csv`` file."""
    shuffle: bool = False
    """Shuffle the file's / dataset's records with ``seed`` before taking the first ``num_samples``."""
    image_column: str | None = None
    """Dataset column of the image(s) (PIL images, bytes, ``{"bytes", "path"}`` or paths); None: ``images`` or
    ``image``."""
    messages_column: str | None = None
    """Dataset column of chat turns (OpenAI ``messages`` or LLaVA ``conversations``); None: ``messages`` or
    ``conversations`` if present."""
    question_column: str | None = None
    """Dataset column of the question (samples without chat turns); None: ``question``, ``query`` or ``prompt``."""
    answer_column: str | None = None
    """Dataset column of the answer; None: ``answer``, ``response`` or ``caption`` (a list: its first entry)."""
    chat_template: str | None = None
    """Jinja file rendering the samples instead of the processor's chat template (needed for chat-format samples
    when the model has none); {"image", "question", "answer"} samples are then rendered as one-turn chats."""

    def __post_init__(self) -> None:
        if self.dataset is not None and self.path is not None:
            raise ValueError("data.path and data.dataset are both set; give one source of calibration data.")
        if self.split is not None and self.dataset is None:
            _check_choice("data.split", self.split, ("calibration", "validation", "test"))
        if self.split is not None and not self.split.strip():
            raise ValueError("data.split is empty; name a split of the dataset (e.g. train or test[:200]).")
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
    pin_layers: bool = True
    """With ``layerwise`` on a CUDA device: page-lock the decoder layers' host memory in place for the calibration
    (``cudaHostRegister``), so layer copies both ways run as background DMA. False keeps it pageable (slower
    copies; e.g. where the locked-memory limit is low). Results do not depend on it."""
    profile: MemoryProfile = "fast"
    """``fast``: activations, the head and the next layer stay on the accelerator. ``low``: least accelerator
    memory for the same codes (activations in page-locked host memory, head parked, no layer prefetched during a
    layer's solve, GPTQ factorised without full-size temporaries; :mod:`lightning_tlq.lowmem`)."""

    def __post_init__(self) -> None:
        _check_choice("memory.profile", self.profile, ("fast", "low"))
        if self.max_gpu_memory_gib is not None and self.max_gpu_memory_gib <= 0:
            raise ValueError(f"memory.max_gpu_memory_gib={self.max_gpu_memory_gib} must be positive (GiB) or null.")


def importance_for(quant: QuantArgs, importance: ImportanceArgs) -> ImportanceArgs:
    """The importance settings a run really uses: a method that needs a particular score (``mbq`` derives its vision
    weights from mean ``|dL/dy|`` per token, so it collects ``grad_abs``) gets it, logged when ``importance.score``
    said otherwise and recorded in the report's settings (its importance-weighted errors then use those weights
    too). Other methods: unchanged."""
    score = quant.handler.importance_score
    if score is None or importance.score == score:
        return importance
    log.info(
        "quant.method=%s needs importance.score=%s: collecting it instead of %s.", quant.method, score, importance.score
    )
    return replace(importance, score=score)
