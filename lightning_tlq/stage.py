"""One decoder layer's calibration as an explicit stage: accumulate -> reduce -> solve -> propagate.

Pure torch: on several ranks each module's statistics are reduced to the rank that owns it, the owner solves,
and the results are broadcast (:class:`lightning_tlq.distributed.Collective`, no-ops on one process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tlq.actquant import apply_activation_quant
from lightning_tlq.config import QuantArgs
from lightning_tlq.core.codepack import PackedCodes, pack_codes
from lightning_tlq.core.hessian import relative_output_error
from lightning_tlq.distributed import Collective
from lightning_tlq.hostmem import HostStaging
from lightning_tlq.module_stats import ModuleResult, ModuleStatistics, RowSelection, pack_record, unpack_record
from lightning_tlq.rowsplit import GroupPlan, empty_result, plan_group, solve_split, splittable
from lightning_tlq.shared_stats import LayerStatistics
from lightning_tlq.smoothing import LayerSmoothing
from lightning_tlq.tokenweights import TokenWeights


class _StopLayer(Exception):
    """Raised from a module hook to end a full-precision forward once the modules of interest have run."""


def _common_parent(names: Sequence[str]) -> str:
    """The innermost submodule path holding every module of ``names`` ("" for the layer itself)."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


class _KeptInputs:
    """One submodule's call arguments per batch, kept by one accumulate pass for the next
    (:meth:`LayerStage.accumulate`).

    Each tensor's version counter is recorded: one changed in place since is not replayed (that batch runs the whole
    layer instead)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: dict[int, tuple[tuple, dict, list[tuple[Tensor, int]]] | None] = {}
        """Per batch its call, or None where the submodule ran twice (its inputs are not one call's)."""

    def add(self, b: int, args: tuple, kwargs: dict) -> None:
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        self.calls[b] = None if b in self.calls else (args, dict(kwargs), [(t, t._version) for t in tensors])

    def call(self, b: int) -> tuple[tuple, dict] | None:
        """Batch ``b``'s arguments, or None where they cannot be replayed."""
        entry = self.calls.get(b)
        if entry is None:
            return None
        args, kwargs, versions = entry
        if any(t._version != v for t, v in versions):
            return None
        return args, kwargs


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
        replay_submodules: let an accumulate pass start at the submodule holding its modules, from that submodule's
            inputs kept from the pass before (:meth:`accumulate`); costs one layer-input-sized tensor per batch on the
            device between the two passes (off where activations are offloaded).
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
        replay_submodules: bool = True,
    ) -> None:
        self.method = quant.handler
        if self.method.smoothing is not None and smoothing is None:
            raise ValueError(f"quant.method={quant.method} needs a LayerSmoothing for layer {index}.")
        self.smoothing = smoothing
        self.staging = staging or HostStaging()
        self.lean_solve = lean_solve
        self.replay_submodules = replay_submodules
        self._kept: _KeptInputs | None = None  # a submodule's inputs from the last pass, for the next one
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
        self._stats: LayerStatistics | None = None  # the current accumulate pass's statistics
        self._plan = GroupPlan({})  # the current group's owners and split modules (rowsplit.py)
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
        for i, names in enumerate(groups):
            keep = self._keep_for(names, groups[i + 1]) if i + 1 < len(groups) and fp_inputs is None else None
            self._timed("accumulate", self.accumulate, names, forward, inputs, weights, fp_inputs, keep)
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
    def _keep_for(self, names: Sequence[str], following: Sequence[str]) -> str | None:
        """The submodule whose inputs the pass over ``names`` keeps for the pass over ``following``: the innermost
        submodule holding all of ``following``, provided it also holds all of ``names`` (then quantizing ``names``
        leaves its inputs unchanged, and the next pass can start there). None when there is none (or it would be
        the layer itself)."""
        if not self.replay_submodules:
            return None
        path = _common_parent(following)
        if not path or not all(n.startswith(path + ".") for n in names):
            return None
        return path

    def accumulate(
        self,
        names: Sequence[str],
        forward: Callable[[int, Tensor], Tensor],
        inputs: Sequence[Tensor],
        weights: Sequence[TokenWeights],
        fp_inputs: Sequence[Tensor] | None = None,
        keep: str | None = None,
    ) -> None:
        """Run the layer over all batches, adding each module's weighted input statistics.

        Each pass stops as soon as every module of ``names`` has run (the rest of the layer cannot change their
        inputs). With ``fp_inputs`` each batch first runs on the full-precision path (up to the last module of
        ``names``), whose module inputs are then paired with the quantized path's for the cross terms.

        ``keep``: a submodule (path in the layer) whose inputs this pass keeps, per batch, for the next pass. A pass
        whose modules all sit in the submodule the previous pass kept starts there: it calls that submodule on the
        kept inputs instead of running the layer (e.g. the ``down_proj`` pass runs ``mlp`` alone, on the inputs the
        ``gate_proj``/``up_proj`` pass gave it: quantizing those two cannot change them). The same modules see the
        same tensors, so the statistics are the same as from a full forward.
        """
        kept, self._kept = self._kept, None
        if kept is not None and (fp_inputs is not None or _common_parent(names) != kept.path):
            kept = None
        self._stats = None  # the previous pass's statistics are solved: free them before allocating these
        stats = self._stats = LayerStatistics(
            self.modules, names, self.module_groups, self.quant, self.metrics, self.groups, weights,
            self.method.selects_tokens, self._row_cache,
        )  # fmt: skip
        if not stats.accumulators(names):
            return  # rtn without metrics: nothing to measure
        current: dict[str, Any] = {"w": None, "fp": {}, "seen": set()}  # w is None while the fp path runs

        def raw(name: str, x: Tensor) -> None:
            if current["w"] is not None:
                stats.raw_input(name, x)

        def add(name: str, x: Tensor) -> None:
            if current["w"] is None:
                return
            stats.add(name, x, current["w"], current["fp"].get(name), current["b"], f"Layer {self.index}")
            current["seen"].add(name)
            if len(current["seen"]) == len(names):
                raise _StopLayer  # the rest of the layer cannot change these statistics

        handles = [self.modules[n].register_forward_hook(lambda m, a, o, n=n: add(n, a[0])) for n in names]
        handles += [  # before activation quantization: which modules read one tensor
            self.modules[n].register_forward_pre_hook(lambda m, a, n=n: raw(n, a[0]), prepend=True) for n in names
        ]
        keeping = _KeptInputs(keep) if keep is not None else None
        if keeping is not None:
            handles.append(
                self.layer.get_submodule(keep).register_forward_pre_hook(
                    lambda m, a, k: keeping.add(current["b"], a, k), with_kwargs=True
                )
            )
        try:
            with torch.no_grad():
                for b, hidden in enumerate(inputs):
                    if fp_inputs is not None:
                        current["w"] = None
                        current["fp"] = self._fp_module_inputs(names, forward, b, fp_inputs[b])
                    current["w"], current["seen"], current["b"] = weights[b], set(), b
                    start = kept.call(b) if kept is not None else None
                    with self._activation_quant(), contextlib.suppress(_StopLayer):
                        if start is not None:
                            self.layer.get_submodule(kept.path)(*start[0], **start[1])
                        else:
                            forward(b, hidden)
                    stats.end_batch()
        finally:
            for h in handles:
                h.remove()
        if keeping is not None and len(keeping.calls) == len(inputs):
            self._kept = keeping

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

    def reduce(self, names: Sequence[str]) -> None:
        """Sum each statistic over ranks into the rank that owns (will solve) its modules.

        Modules sharing a statistic have one owner; owners (and lone modules whose rows every rank solves) come from
        :func:`~lightning_tlq.rowsplit.plan_group`; one reduction per distinct statistic, never per batch.
        """
        coll, stats = self.collective, self._stats
        assert stats is not None
        parts = stats.components(names)
        shapes = {n: tuple(self.modules[n].weight.shape) for n in names}
        split = splittable(self.method, self.groups)
        plan = self._plan = plan_group(
            [stats.solve_groups(p) for p in parts], shapes, coll.world_size, split=split, groups=self.groups
        )
        for part in parts:
            owner = plan.owners[part[0]]
            for acc in stats.accumulators(part):
                acc.H = coll.reduce_to(acc.H, owner)
                counts = torch.tensor([float(acc.tokens), float(acc.weight_sum)], dtype=torch.float64)
                counts = coll.reduce_to(counts.to(acc.H.device), owner)
                acc.tokens, acc.weight_sum = int(round(float(counts[0]))), float(counts[1])

    def solve(self, names: Sequence[str]) -> None:
        """Owners quantize their modules (those sharing a solve statistic together); weights, codes, scales, zero
        points and records are broadcast."""
        assert self._stats is not None
        together = {n: g for g in self._stats.solve_groups(names) for n in g}
        solved: dict[str, tuple[ModuleResult, dict[str, Any]]] = {}
        for name in names:
            module, owner, st = self.modules[name], self._plan.owners.get(name, 0), self._stats.stats[name]
            if name in self._plan.slices:  # every rank solves a slice of rows (rowsplit.py); results gathered
                w, where, plan, coll = module.weight.detach(), f"layer {self.index} {name}", self._plan, self.collective
                res, record = solve_split(name, w, st, self.quant, plan, coll, where, self._errors, self.lean_solve)
            elif self.collective.rank == owner:
                if name not in solved:
                    solved.update(self._solve_together(together[name]))
                res, record = solved.pop(name)
            else:
                res, record = empty_result(module.weight, self.quant.spec), {}
            if name not in self._plan.slices:
                res = ModuleResult(
                    *(self.collective.broadcast(t, owner) for t in (res.weight, res.codes, res.scale, res.zero))
                )
            record = unpack_record(self.collective.broadcast(pack_record(record), owner))
            if self.smoothing is not None:  # computed identically on every rank
                record.update(self.smoothing.records.get(name, {}))
            if self.quant.target == "fp":
                self._original[name] = module.weight.detach().clone()
            module.weight.data.copy_(res.weight)
            scale, zero = self.staging.to_host(res.scale), self.staging.to_host(res.zero)
            self.results[name] = ModuleResult(None, self._host_codes(res.codes), scale, zero, record)
            self._stats.stats.pop(name)  # its Hessians go once every module reading them is solved
        self._stats = None

    def _solve_together(self, names: list[str]) -> dict[str, tuple[ModuleResult, dict[str, Any]]]:
        """Solve modules sharing one solve statistic (one factorisation); their results and records."""
        assert self._stats is not None
        stats = [self._stats.stats[n] for n in names]
        originals = [self.modules[n].weight.detach() for n in names]
        start = time.perf_counter()
        results = self.method.quantize_shared(
            originals,
            stats[0].for_solve(self.lean_solve),
            self.quant,
            modules=names,
            wheres=[f"layer {self.index} {n}" for n in names],
            smoothing=self.smoothing,
        )
        seconds = (time.perf_counter() - start) / len(names)
        out = {}
        for name, original, st, res in zip(names, originals, stats, results):
            record: dict[str, Any] = {"damp": getattr(res, "damp", None), "retries": getattr(res, "retries", 0)}
            record.update(seconds=seconds, tokens=st.solve.tokens if st.solve is not None else 0, shared=len(names))
            record.update(self._errors(original, res.weight, st))
            out[name] = (ModuleResult(res.weight, res.codes, res.scale, res.zero), record)
        return out

    def _host_codes(self, codes: Tensor) -> Tensor | PackedCodes:
        """The codes for the host: packed where they are (codes of <= 4 bits, two or four to a byte), then copied."""
        packed = pack_codes(codes, self.quant.bits, self.quant.spec.qmin)
        if isinstance(packed, Tensor):
            return self.staging.to_host(packed)
        return dataclasses.replace(packed, data=self.staging.to_host(packed.data))

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
