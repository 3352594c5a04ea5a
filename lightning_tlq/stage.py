"""One decoder layer's calibration as an explicit stage: accumulate -> reduce -> solve -> propagate.

Pure torch: on several ranks each module's statistics are reduced to the rank that owns it, the owner solves,
and the results are broadcast (:class:`lightning_tlq.distributed.Collective`, no-ops on one process).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.actquant import apply_activation_quant
from lightning_tlq.config import QuantArgs
from lightning_tlq.core.hessian import relative_output_error
from lightning_tlq.distributed import Collective, assign_owners
from lightning_tlq.hostmem import HostStaging
from lightning_tlq.module_stats import ModuleResult, ModuleStatistics, RowSelection, pack_record, unpack_record
from lightning_tlq.smoothing import LayerSmoothing
from lightning_tlq.tokenweights import TokenWeights


class _StopLayer(Exception):
    """Raised from a module hook to end a full-precision forward once the modules of interest have run."""


class LayerStage:
    """Calibrates one decoder layer in place.

    With ``quant.act_bits`` set, every forward of the layer (accumulate and propagate) runs with the inputs of its
    target modules fake-quantized per token, exactly as at inference, so the Hessians are built from the inputs the
    quantized modules really see and the next layer receives the quantized path's activations.

    With ``quant.target = "fp"`` (GPTAQ) :meth:`run` also takes the full-precision model's inputs of this layer:
    their full-precision outputs are computed first (:attr:`fp_outputs`, the next layer's full-precision inputs),
    and in each module group every batch runs twice, on the full-precision path (original weights of the modules
    already quantized, no activation quantization) and on the quantized path, so that each module's
    full-precision inputs ``x`` and quantized-path inputs ``x~`` are paired token by token in the cross term
    ``C = sum_t w_t (x_t - x~_t) x~_t^T`` that the solve uses (:func:`~lightning_tlq.core.gptq.gptq_quantize`).

    Args:
        index: decoder layer index (or a label such as ``"vision 0"`` for other stages).
        layer: the decoder layer (already on the compute device).
        module_groups: names (relative to ``layer``) of the linear modules, grouped in inference order.
        quant: quantization settings; ``quant.method``'s handler (:mod:`lightning_tlq.methods`) says which
            statistics to gather and solves each module.
        collective: reductions to module owners and broadcasts (no-ops on one process).
        metrics: also accumulate the unweighted and importance-weighted Hessians over all real tokens, to report
            each module's relative output error.
        groups: importance groups per module (Hessians per output-channel group).
        smoothing: awq / smoothquant / mbq: searches and folds the layer's input scales first (on the full-precision
            layer); its clipping (``quant.awq_clip``) and records are applied when the modules are rounded.
        staging: moves the codes, scales and zero points to the host (share one across stages: it keeps a
            page-locked buffer).
        lean_solve: solve with the least memory (``memory.profile=low``; same codes).
    """

    def __init__(
        self,
        index: int | str,
        layer: nn.Module,
        module_groups: Sequence[Sequence[str]],
        quant: QuantArgs,
        *,
        collective: Collective | None = None,
        metrics: bool = True,
        groups: int = 1,
        smoothing: LayerSmoothing | None = None,
        staging: HostStaging | None = None,
        lean_solve: bool = False,
    ) -> None:
        self.method = quant.handler
        if self.method.smoothing is not None and smoothing is None:
            raise ValueError(f"quant.method={quant.method} needs a LayerSmoothing for layer {index}.")
        self.smoothing = smoothing
        self.staging = staging or HostStaging()
        self.lean_solve = lean_solve
        self.index = index
        self.layer = layer
        self.module_groups = [list(g) for g in module_groups]
        self.quant = quant
        self.collective = collective or Collective()
        self.metrics = metrics
        self.groups = groups
        self.modules = {name: layer.get_submodule(name) for group in self.module_groups for name in group}
        for name, module in self.modules.items():
            quant.spec.check_shape(module.in_features, name=f"layer {index} {name}")
        self.results: dict[str, ModuleResult] = {}
        self.fp_outputs: list[Tensor] | None = None
        """With ``quant.target = "fp"``: the full-precision layer's outputs for :meth:`run`'s ``fp_inputs``."""
        self._original: dict[str, Tensor] = {}  # target fp: full-precision weights of the modules already solved
        self._stats: dict[str, ModuleStatistics] = {}
        self._owners: dict[str, int] = {}
        self._row_cache: dict[int, RowSelection] = {}
        self.seconds: dict[str, float] = {}
        self.layer_device = next(iter(self.modules.values())).weight.device

    def run(
        self,
        forward: Callable[[int, Tensor], Tensor],
        inputs: Sequence[Tensor],
        weights: Sequence[TokenWeights],
        fp_inputs: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        """Calibrate every module group in order, then return the quantized layer's outputs for ``inputs``.

        Args:
            forward: ``forward(batch_index, hidden)`` runs this layer on one batch.
            inputs: per batch, the layer's input (the quantized path's output of the previous layer).
            weights: per batch, token weights for this layer.
            fp_inputs: per batch, the full-precision model's input of this layer; required with
                ``quant.target = "fp"`` (and only then). Their outputs are left in :attr:`fp_outputs`.
        """
        if (fp_inputs is not None) != (self.quant.target == "fp"):
            raise ValueError(
                f"Layer {self.index}: quant.target={self.quant.target!r} "
                + ("needs the full-precision inputs (fp_inputs)." if fp_inputs is None else "takes no fp_inputs.")
            )
        if fp_inputs is not None:  # before any module of this layer is quantized
            self.fp_outputs = self._timed("propagate_fp", self.propagate_full_precision, forward, fp_inputs)
        groups = self.module_groups if self.quant.true_sequential else [sum(self.module_groups, [])]
        if self.smoothing is not None:
            self._timed("search", self.smoothing.run, forward, inputs, weights)
        for names in groups:
            self._timed("accumulate", self.accumulate, names, forward, inputs, weights, fp_inputs)
            self._timed("reduce", self.reduce, names)
            self._timed("solve", self.solve, names)
        return self._timed("propagate", self.propagate, forward, inputs)

    def _timed(self, step: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one step and add its wall time (device-synchronised) to :attr:`seconds`."""
        device = self.layer_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.profiler.record_function(f"tlq.layers.{step}"):  # a named range in profiler traces
            out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start
        return out

    # --- steps -------------------------------------------------------------------------------------------------
    def accumulate(
        self,
        names: Sequence[str],
        forward: Callable[[int, Tensor], Tensor],
        inputs: Sequence[Tensor],
        weights: Sequence[TokenWeights],
        fp_inputs: Sequence[Tensor] | None = None,
    ) -> None:
        """Run the layer over all batches, adding each module's weighted input statistics.

        Each pass stops as soon as every module of ``names`` has run (the rest of the layer cannot change their
        inputs). With ``fp_inputs`` each batch first runs on the full-precision path (up to the last module of
        ``names``), whose module inputs are then paired with the quantized path's for the cross terms.
        """
        has_importance = weights[0].importance is not None
        for name in names:
            module = self.modules[name]
            self._stats[name] = ModuleStatistics(
                module.in_features, self.groups, self.quant, self.metrics, has_importance, module.weight.device
            )
        if all(not self._stats[n].accumulators() for n in names):
            return  # rtn without metrics: nothing to measure
        current: dict[str, Any] = {"w": None, "fp": {}, "seen": set()}  # w is None while the fp path runs

        def add(name: str, x: Tensor) -> None:
            if current["w"] is None:
                return
            self._add(name, x, current["w"], current["fp"].get(name), current["b"])
            current["seen"].add(name)
            if len(current["seen"]) == len(names):
                raise _StopLayer  # the rest of the layer cannot change these statistics

        handles = [self.modules[n].register_forward_hook(lambda m, a, o, n=n: add(n, a[0])) for n in names]
        try:
            with torch.no_grad():
                for b, hidden in enumerate(inputs):
                    if fp_inputs is not None:
                        current["w"] = None
                        current["fp"] = self._fp_module_inputs(names, forward, b, fp_inputs[b])
                    current["w"], current["seen"], current["b"] = weights[b], set(), b
                    with self._activation_quant(), contextlib.suppress(_StopLayer):
                        forward(b, hidden)
        finally:
            for h in handles:
                h.remove()

    def _fp_module_inputs(
        self, names: Sequence[str], forward: Callable[[int, Tensor], Tensor], b: int, hidden: Tensor
    ) -> dict[str, Tensor]:
        """The inputs of ``names`` when the full-precision layer runs on ``hidden`` (stopped once all are seen)."""
        seen: dict[str, Tensor] = {}

        def hook(name: str, args: tuple) -> None:
            seen[name] = args[0].detach()
            if len(seen) == len(names):
                raise _StopLayer

        handles = [self.modules[n].register_forward_pre_hook(lambda m, a, n=n: hook(n, a)) for n in names]
        try:
            with self._full_precision():
                forward(b, hidden)
        except _StopLayer:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in seen]
        if missing:
            raise RuntimeError(f"Layer {self.index}: {missing} did not run on the full-precision path.")
        return seen

    def _rows(self, b: int, tw: TokenWeights, device: torch.device) -> RowSelection:
        """Batch ``b``'s row selection on ``device``, computed once per layer (index tensors: no device waits)."""
        sel = self._row_cache.get(b)
        if sel is not None:
            return sel
        valid = tw.valid.reshape(-1).cpu() if tw.valid is not None else None
        keep = multiplier = None
        if self.method.selects_tokens and tw.multiplier is not None:
            m = tw.multiplier.reshape(-1).cpu()
            m = m[valid] if valid is not None else m
            positions = (m > 0).nonzero().squeeze(1)
            keep, multiplier = positions.to(device), m[positions].to(device, torch.float32)
        valid_idx = valid.nonzero().squeeze(1).to(device) if valid is not None else None
        sel = self._row_cache[b] = RowSelection(valid_idx, keep, multiplier)
        return sel

    def _add(self, name: str, x: Tensor, tw: TokenWeights, fp: Tensor | None = None, b: int = 0) -> None:
        """Add one module's inputs for batch ``b``: every real token to the report Hessians (and the ``plain``
        solve statistic), the token set with importance x multiplier weights to a ``weighted`` solve statistic;
        tokens outside the set are left out, in-set tokens of zero importance enter with weight 0 (adding
        nothing)."""
        stats = self._stats[name]
        x = x.detach()
        sel = self._rows(b, tw, x.device)
        rows = sel.take(x)  # [N, in]
        fp_rows = sel.take(fp) if stats.cross is not None and fp is not None else None
        if stats.cross is not None and (fp_rows is None or fp_rows.shape != rows.shape):
            raise RuntimeError(f"Layer {self.index} {name}: no full-precision input matches the quantized path's.")
        if stats.plain is not None:
            stats.plain.add(rows)
            if self.method.solve_statistic == "plain" and fp_rows is not None:
                stats.cross.add(rows, left=fp_rows.float() - rows.float())
        imp = None
        if tw.importance is not None:
            imp = sel.take(tw.importance[name].to(x.device, non_blocking=True))
        if stats.weighted is not None:
            stats.weighted.add(rows, imp, validate=False)
        if self.method.solve_statistic == "weighted":
            w = imp if imp is not None else torch.ones(rows.shape[0], self.groups, device=x.device)
            if sel.keep is not None:
                rows, w = rows.index_select(0, sel.keep), w.index_select(0, sel.keep) * sel.multiplier.unsqueeze(-1)
                fp_rows = fp_rows.index_select(0, sel.keep) if fp_rows is not None else None
            stats.solve.add(rows, w, validate=False)
            if fp_rows is not None:
                stats.cross.add(rows, w, left=fp_rows.float() - rows.float(), validate=False)

    def reduce(self, names: Sequence[str]) -> None:
        """Sum each module's statistics over ranks into the rank that owns (will solve) it.

        Owners come from greedy bin packing on solve cost (``d_in^3`` per Hessian); one reduction per module and
        statistic, never per batch.
        """
        coll = self.collective
        costs = [float(self.modules[n].in_features) ** 3 * self.groups for n in names]
        for name, owner in zip(names, assign_owners(costs, coll.world_size)):
            self._owners[name] = owner
            for acc in self._stats[name].accumulators():
                acc.H = coll.reduce_to(acc.H, owner)
                counts = torch.tensor([float(acc.tokens), float(acc.weight_sum)], dtype=torch.float64)
                counts = coll.reduce_to(counts.to(acc.H.device), owner)
                acc.tokens, acc.weight_sum = int(round(float(counts[0]))), float(counts[1])

    def solve(self, names: Sequence[str]) -> None:
        """Owners quantize their modules; weights, codes, scales, zero points and records are broadcast."""
        for name in names:
            module, stats = self.modules[name], self._stats.pop(name)
            owner = self._owners.get(name, 0)
            if self.collective.rank == owner:
                res, record = self._solve_one(name, module.weight.detach(), stats)
            else:
                res, record = self._empty_result(module.weight), {}
            res = ModuleResult(
                *(self.collective.broadcast(t, owner) for t in (res.weight, res.codes, res.scale, res.zero))
            )
            record = unpack_record(self.collective.broadcast(pack_record(record), owner))
            if self.smoothing is not None:  # computed identically on every rank
                record.update(self.smoothing.records.get(name, {}))
            if self.quant.target == "fp":
                self._original[name] = module.weight.detach().clone()
            module.weight.data.copy_(res.weight)
            host = self.staging.to_host
            self.results[name] = ModuleResult(None, host(res.codes), host(res.scale), host(res.zero), record)

    def _solve_one(self, name: str, original: Tensor, stats: ModuleStatistics) -> tuple[ModuleResult, dict[str, Any]]:
        start = time.perf_counter()
        res = self.method.quantize(
            original,
            stats.for_solve(self.lean_solve),
            self.quant,
            module=name,
            where=f"layer {self.index} {name}",
            smoothing=self.smoothing,
        )
        record: dict[str, Any] = {"damp": getattr(res, "damp", None), "retries": getattr(res, "retries", 0)}
        record["seconds"] = time.perf_counter() - start
        record["tokens"] = stats.solve.tokens if stats.solve is not None else 0
        record.update(self._errors(original, res.weight, stats))
        return ModuleResult(res.weight, res.codes, res.scale, res.zero), record

    def _empty_result(self, weight: Tensor) -> ModuleResult:
        out_f, in_f = weight.shape
        spec = self.quant.spec
        groups = spec.n_groups(in_f)
        return ModuleResult(
            torch.empty_like(weight),
            torch.empty(out_f, in_f, dtype=spec.code_dtype, device=weight.device),
            torch.empty(out_f, groups, dtype=torch.float32, device=weight.device),
            torch.empty(out_f, groups, dtype=torch.float32, device=weight.device),
        )

    def _errors(self, original: Tensor, quantized: Tensor, stats: ModuleStatistics) -> dict[str, float | None]:
        out: dict[str, float | None] = {"rel_error": None, "weighted_rel_error": None}
        if stats.plain is not None and self.metrics:
            out["rel_error"] = relative_output_error(original, quantized, stats.plain.H)
            out["weighted_rel_error"] = out["rel_error"]
        if stats.weighted is not None:
            out["weighted_rel_error"] = relative_output_error(original, quantized, stats.weighted.H)
        return out

    def propagate(self, forward: Callable[[int, Tensor], Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
        """The quantized layer's outputs: the next layer's inputs on the quantized inference path."""
        with torch.no_grad(), self._activation_quant():
            return [forward(b, hidden) for b, hidden in enumerate(inputs)]

    def propagate_full_precision(
        self, forward: Callable[[int, Tensor], Tensor], fp_inputs: Sequence[Tensor]
    ) -> list[Tensor]:
        """The full-precision layer's outputs (original weights, no activation quantization): the next layer's
        inputs on the full-precision path."""
        with torch.no_grad(), self._full_precision():
            return [forward(b, hidden) for b, hidden in enumerate(fp_inputs)]

    @contextlib.contextmanager
    def _full_precision(self) -> Iterator[None]:
        """Temporarily put the original weights back into the modules already quantized in this stage."""
        quantized = {name: self.modules[name].weight.data for name in self._original}
        try:
            for name, weight in self._original.items():
                self.modules[name].weight.data = weight
            yield
        finally:
            for name, weight in quantized.items():
                self.modules[name].weight.data = weight

    def _activation_quant(self) -> Any:
        """Per-token activation fake-quant on every target module's input while the layer runs (no-op if None)."""
        return apply_activation_quant(None, self.quant.act_bits, self.modules.values())
