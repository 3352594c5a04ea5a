"""Token-weighted Hessian accumulation for one linear module, and the output-error metrics.

For a linear module with inputs ``x_t`` (rows of ``[N, in]``) and token weights ``w_t`` the
layer-wise objective is ``sum_t w_t ||dW x_t||^2 = tr(dW H dW^T)`` with ``H = sum_t w_t x_t x_t^T``.
With output-channel groups (GuidedQuant style) each group ``g`` of contiguous output rows has its
own weights ``w_{t,g}`` and Hessian ``H[g]``; ``H`` then has shape ``[groups, in, in]``.

The same accumulator sums GPTAQ's cross term ``C = sum_t w_t (x_t - x~_t) x~_t^T`` (``add(x~, w, left=x - x~)``),
with the same float64 running sum, so it is as independent of the number of ranks as ``H``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def _tf32_for_half_inputs(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Let CUDA matmuls use TF32 while accumulating bf16/fp16 inputs (fp32 accumulation either way).

    A bf16 value has 8 significant bits and an fp16 value 11, TF32 keeps 11: the inputs enter the tensor cores
    exactly (only the token-weighted side is rounded, to 2^-11 relative). fp32 inputs keep full fp32 matmuls.
    """
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


_LOWER_BLOCKS = 4
"""Row blocks of a wide symmetric ``H`` (:func:`_lower_blocks`)."""
_LOWER_MIN_WIDTH: int | None = None
"""Inputs at least this wide are accumulated by lower block rows on CUDA; None: never (experimental, off until measured
on a GPU: ``benchmark_speed.py --experimental lower-hessian`` sets 8192, i.e. a 7B ``down_proj``'s 18944 and not
q/k/v, o, gate/up at 3584, where the saving is small against the extra launches; predicted -0.5 s per 7B run)."""


def _lower_blocks(n: int, device: torch.device) -> list[int] | None:
    """Block boundaries ``[0, b_1, ..., n]`` (multiples of 128) for accumulating only the lower block triangle of an
    ``[n, n]`` Hessian, or None to accumulate it whole. Block row ``i`` adds ``X_w[:, rows_i]^T X[:, :b_{i+1}]``:
    10/16 of the products and of the float64 adds with 4 blocks; the upper blocks are mirrored once when ``H`` is
    read."""
    if device.type != "cuda" or _LOWER_MIN_WIDTH is None or n < _LOWER_MIN_WIDTH:
        return None
    step = -(-n // (_LOWER_BLOCKS * 128)) * 128
    return [min(i * step, n) for i in range(_LOWER_BLOCKS)] + [n]


class HessianAccumulator:
    """Accumulates ``H = sum_t w_t x_t x_t^T`` (a sum, not a mean), by default in float64.

    Each :meth:`add` computes its partial ``X^T W X`` in float32 (fast matmuls; bit-identical for identical inputs)
    and adds it to ``H`` in ``dtype``. In float64 the running sum is exact enough that any order or grouping of the
    same partials (one process summing every batch, or ranks summing their batches and then being reduced) rounds
    to the same float32 Hessian for the solve: GPTQ amplifies last-bit differences in ``H`` into flipped codes,
    so float32 accumulation would make results depend on the number of ranks. ``dtype=torch.float32`` halves
    the memory of ``H`` (and saves a float32 scratch per add) at the price of that invariance.

    Attributes:
        in_features: Input width of the module.
        groups: Number of output-channel groups; 1 gives ``H`` of shape ``[in, in]``, more give
            ``[groups, in, in]``.
        H: The Hessian sum, in ``dtype``.
        tokens: Number of input rows added so far (rows with weight 0 included).
        weight_sum: Sum of the row weights (python float); with per-group weights ``[N, groups]``
            each row counts with its mean weight over groups. Equals ``tokens`` when unweighted.
    """

    def __init__(
        self,
        in_features: int,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        """Create an empty accumulator.

        Args:
            in_features: Input width of the module.
            groups: Number of output-channel groups (>= 1).
            device: Device holding ``H``; inputs are moved there.
            dtype: Accumulation dtype of ``H``: ``torch.float64`` (default; order-invariant) or ``torch.float32``.

        Raises:
            ValueError: If ``in_features`` or ``groups`` is not positive, or ``dtype`` is not float32/float64.
        """
        if in_features <= 0:
            raise ValueError(f"HessianAccumulator: in_features must be positive, got {in_features}.")
        if groups <= 0:
            raise ValueError(f"HessianAccumulator: groups must be >= 1, got {groups}.")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HessianAccumulator: dtype must be torch.float32 or torch.float64, got {dtype}.")
        self.dtype = dtype
        self.in_features = in_features
        self.groups = groups
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``H``: ``(in, in)`` or ``(groups, in, in)``."""
        n = self.in_features
        return (n, n) if self.groups == 1 else (self.groups, n, n)

    def reset(self) -> None:
        """Zero ``H``, ``tokens`` and ``weight_sum``."""
        self.H = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.tokens = 0
        self.weight_sum = 0.0
        self._symmetric = True  # only x x^T terms so far: lower block rows may be added alone

    @property
    def H(self) -> torch.Tensor:
        """The Hessian sum (symmetric: upper blocks accumulated by lower block rows are mirrored here, once)."""
        if self._mirror is not None:
            bounds, self._mirror = self._mirror, None
            for h in self._H.unsqueeze(0) if self._H.dim() == 2 else self._H:
                for i in range(len(bounds) - 1):
                    for j in range(i + 1, len(bounds) - 1):
                        rows, cols = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
                        h[rows, cols] = h[cols, rows].mT
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H, self._mirror = value, None

    @property
    def weight_sum(self) -> float:
        """Sum of the row weights (see the class docstring); reading it waits for the device once."""
        if self._pending_weight is not None:
            self._weight_sum += float(self._pending_weight)
            self._pending_weight = None
        return self._weight_sum

    @weight_sum.setter
    def weight_sum(self, value: float) -> None:
        self._weight_sum, self._pending_weight = float(value), None

    def add(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        *,
        left: torch.Tensor | None = None,
        validate: bool = True,
    ) -> None:
        """Add input rows with optional non-negative token weights.

        Args:
            x: Inputs ``[..., in]`` (typically ``[N, in]``), any float dtype; leading dims are flattened.
            weight: None (every row weighs 1), ``[...]`` (one weight per row, shared by all groups)
                or ``[..., groups]`` (one weight per row and output-channel group).
            left: Rows shaped like ``x`` to put on the left instead of ``x``: adds ``sum_t w_t left_t x_t^T``
                (a cross term such as GPTAQ's ``(x - x~) x~^T``; ``H`` is then not symmetric). None adds
                ``x_t x_t^T``.
            validate: check that the weights are non-negative. The check waits for the device; callers whose
                weights are non-negative by construction (the calibration stages) pass False. ``add`` itself
                never waits for the device otherwise (the weight sum is kept on the device until read).

        Raises:
            ValueError: If shapes do not match or a weight is negative.
        """
        x2, w2 = self._flatten(x, weight, validate)
        xf = x2.to(device=self.device, dtype=torch.float32)
        if left is not None and tuple(left.shape) != tuple(x.shape):
            raise ValueError(f"HessianAccumulator.add: left {tuple(left.shape)} must have x's shape {tuple(x.shape)}.")
        lf = xf if left is None else left.reshape(xf.shape).to(device=self.device, dtype=torch.float32)
        bounds = _lower_blocks(self.in_features, xf.device) if left is None and self._symmetric else None
        if bounds is None and self._mirror is not None:
            _ = self.H  # a whole add next: mirror the upper blocks first
        if left is not None:
            self._symmetric = False
        H = self._H.unsqueeze(0) if self.groups == 1 else self._H
        # A difference x - x~ of half-precision rows is not exact in TF32: full fp32 matmuls for cross terms.
        with _tf32_for_half_inputs(x.dtype if left is None else torch.float32, xf.device):
            for g in range(self.groups):
                xw = lf if w2 is None else lf * w2[:, g : g + 1]
                # whole: one span; symmetric and wide: the lower block rows only (mirrored when H is read)
                spans = zip(bounds[:-1], bounds[1:]) if bounds is not None else [(0, self.in_features)]
                for lo, hi in spans:
                    if H.dtype == torch.float32:
                        H[g][lo:hi, :hi].addmm_(xw[:, lo:hi].T, xf[:, :hi])
                    else:  # float32 partial (deterministic for these rows), exact widening add
                        H[g][lo:hi, :hi].add_(xw[:, lo:hi].T @ xf[:, :hi])
        if bounds is not None:
            self._mirror = bounds
        self.tokens += xf.shape[0]
        # Summed in float64 in add order (the same value as summing python floats), on the device once a weighted
        # add has happened, so that add never waits for the device.
        part = float(xf.shape[0]) if w2 is None else w2.sum(dtype=torch.float64) / self.groups
        if self._pending_weight is not None:
            self._pending_weight = self._pending_weight + part
        elif w2 is None:
            self._weight_sum += part
        else:
            self._pending_weight, self._weight_sum = part + self._weight_sum, 0.0

    def _flatten(
        self, x: torch.Tensor, weight: torch.Tensor | None, validate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``x`` as ``[N, in]`` and the weights as float32 ``[N, groups]`` (or None)."""
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator.add: expected x of shape [N, {self.in_features}], got {tuple(x.shape)}."
            )
        if not x.is_floating_point():
            raise ValueError(f"HessianAccumulator.add: x must be a float tensor, got {x.dtype}.")
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        if weight is None:
            return x2, None
        if tuple(weight.shape) == lead:
            w2 = weight.reshape(-1, 1).expand(-1, self.groups)
        elif tuple(weight.shape) == (*lead, self.groups):
            w2 = weight.reshape(-1, self.groups)
        else:
            raise ValueError(
                f"HessianAccumulator.add: weight must have shape {list(lead)} (per row) or "
                f"{[*lead, self.groups]} (per row and group), got {list(weight.shape)}."
            )
        w2 = w2.to(device=self.device, dtype=torch.float32)
        if validate and w2.numel() and bool((w2 < 0).any()):
            raise ValueError("HessianAccumulator.add: token weights must be non-negative (H must stay PSD).")
        return x2, w2

    def merge_(self, other: HessianAccumulator) -> HessianAccumulator:
        """Add another accumulator's statistics into this one (in place) and return self.

        Raises:
            ValueError: If the two accumulators have different shapes.
        """
        if other.shape != self.shape:
            raise ValueError(f"HessianAccumulator.merge_: shape mismatch {self.shape} vs {other.shape}.")
        self.H += other.H.to(self.device)
        self._symmetric = self._symmetric and other._symmetric
        self.tokens += other.tokens
        self.weight_sum += other.weight_sum
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return ``{"H", "tokens", "weight_sum"}`` as tensors (suitable for ``torch.save`` or all-reduce)."""
        return {
            "H": self.H,
            "tokens": torch.tensor(self.tokens, dtype=torch.int64, device=self.device),
            "weight_sum": torch.tensor(self.weight_sum, dtype=torch.float64, device=self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load statistics produced by :meth:`state_dict` (copied onto this accumulator's device).

        Raises:
            ValueError: If keys are missing or ``H`` has the wrong shape.
        """
        missing = {"H", "tokens", "weight_sum"} - set(state)
        if missing:
            raise ValueError(f"HessianAccumulator.load_state_dict: missing keys {sorted(missing)}.")
        if tuple(state["H"].shape) != self.shape:
            raise ValueError(f"HessianAccumulator.load_state_dict: H shape {tuple(state['H'].shape)} != {self.shape}.")
        self.H = state["H"].to(device=self.device, dtype=self.dtype).clone()
        # symmetric but for the rounding of whole diagonal blocks: only x x^T terms were added (a cross term's H is not)
        scale = float(self._H.abs().max()) if self._H.numel() else 0.0
        self._symmetric = bool(torch.allclose(self._H, self._H.mT, rtol=1e-5, atol=1e-6 * scale))
        self.tokens = int(state["tokens"])
        self.weight_sum = float(state["weight_sum"])


def _quadratic_form_trace(M: torch.Tensor, H: torch.Tensor) -> float:
    """Return ``tr(M H M^T)`` in float64; grouped ``H [G, in, in]`` splits rows of ``M`` into G blocks."""
    M = M.to(torch.float64)
    H = H.to(device=M.device, dtype=torch.float64)
    if M.dim() != 2 or H.shape[-1] != M.shape[1] or H.shape[-2] != M.shape[1]:
        raise ValueError(f"Shape mismatch: weight {tuple(M.shape)} vs Hessian {tuple(H.shape)}.")
    if H.dim() == 2:
        return float(((M @ H) * M).sum())
    if H.dim() != 3 or M.shape[0] % H.shape[0] != 0:
        raise ValueError(
            f"Grouped Hessian {tuple(H.shape)} needs out_features ({M.shape[0]}) divisible by its group count."
        )
    Mg = M.reshape(H.shape[0], -1, M.shape[1])
    return float((torch.bmm(Mg, H) * Mg).sum())


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Layer-wise output error ``tr((Wq - W) H (Wq - W)^T)``, computed in float64.

    Args:
        W: Reference weight ``[out, in]``.
        Wq: Quantized weight ``[out, in]``.
        H: Hessian ``[in, in]`` or grouped ``[G, in, in]`` (rows split into G contiguous equal blocks).

    Returns:
        The error as a python float.
    """
    return _quadratic_form_trace(Wq.to(torch.float64) - W.to(torch.float64), H)


def relative_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``output_error(W, Wq, H) / tr(W H W^T)``; 0/0 gives 0.0 and x/0 gives inf."""
    num = output_error(W, Wq, H)
    den = _quadratic_form_trace(W, H)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
