"""The fused GPTQ column loop replayed from CUDA graphs: one graph per problem shape, a bounded cache of them.

The fused loop (:func:`fused_loop`) launches, per block of ``block_size`` columns, one Triton block step
(:mod:`lightning_tlq.core.gptq_triton`) and one ``addmm_``, with Python slicing and argument checks between them:
host time that, in a calibration run, competes with the run's other threads (on an H200 the loop alone is GPU-bound;
in a 7B run graphs saved about 0.6 s of solve, ``docs/performance.md``). A model repeats the same module shapes in
every layer, so the whole loop of one shape is captured once into a ``torch.cuda.CUDAGraph`` over static buffers and
replayed for every later module of that shape: copy the inputs in, ``replay()``, read the codes out. The replay runs
the captured kernels with the captured arguments in the captured order, so its codes are bit-identical to the eager
fused loop's.

First call of a shape (:class:`GraphCache`): the static buffers are allocated and filled, the fused loop runs once
eagerly on them on a side stream (it compiles the Triton kernel for exactly these pointers' alignments and sets
up cuBLAS for that stream: nothing is compiled or allocated during capture); its codes are the result. Then the
loop is captured on the same side stream (``capture_error_mode="thread_local"``: helper threads of the calibration
loop may use CUDA meanwhile; ``capture_begin``/``capture_end`` directly, without the ``gc.collect()`` and
``empty_cache()`` of ``torch.cuda.graph``, which would hand the calibration's cached memory back to the driver
mid-run). Later calls replay.

Static buffers of one graph (all 4 bytes an element; ``r`` rows, ``n`` columns, ``g`` groups, block ``b``):

* ``W`` float32 ``[r, n]``: the weights in, the codes out (the block step writes a block's codes over its
  weights, which nothing reads again): ``4 r n``;
* ``U`` float32 ``[n, n]``, the inverse-Hessian factor: ``4 n^2``;
* scale and zero float32 ``[r, g]`` and the column's group int32 ``[n]`` (gathered in the kernel instead of
  materialising per-column ``[r, n]`` parameters): ``8 r g + 4 n``;
* the block's errors float32 ``[r, b]``: ``4 r b``.

So :func:`static_bytes` ``= 4 (r n + n^2 + 2 r g + n + r min(b, n))``. The 7B shapes with 128-column groups and
blocks: 3584 x 3584 (q, o) 105.4 MB; 512 x 3584 (k, v) 59.1 MB; 18944 x 3584 (gate, up) 336.9 MB; 3584 x 18944
(down) 1.71 GB (``U`` alone is 1.44 GB). Under the default budget of 1 GiB (1073.7 MB) the first three fit together
(501.4 MB) and ``down_proj`` runs the eager fused loop. Beyond the static buffers: the warm-up gives the side stream
cuBLAS's workspace (one per device, 32 MiB measured on an H200, kept by PyTorch), and a column-major ``U`` (as the
factorisations give it) has each diagonal block copied row-major by the block step, 64 KiB at a time, inside the
graph's private pool (one small segment per graph, reserved, not allocated between replays).

Memory is bounded by the cache's budget (:data:`DEFAULT_BUDGET_BYTES`, :func:`set_budget`): a shape whose
buffers alone exceed it is never captured; a new shape drops least recently used graphs until it fits (vision
tower shapes give way to the decoder's). A shape that was dropped is captured again only into free room: a run
cycles through its layer's shapes, and when they do not all fit, LRU re-captures would drop each graph before
its next use (a capture per call); so the graphs captured first stay and the rest run the eager fused loop.
:func:`clear` frees every graph; the calibration loop runs inside :func:`released`, which clears the cache when a run
ends (normally or not).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lightning_tlq.core import gptq_triton

logger = logging.getLogger(__name__)
__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "GraphCache",
    "GraphKey",
    "cache",
    "clear",
    "fused_loop",
    "released",
    "set_budget",
    "static_bytes",
]

DEFAULT_BUDGET_BYTES = 1 << 30
"""Static GPU memory the graphs of the process-wide cache may hold together (1 GiB)."""


def fused_loop(
    W: torch.Tensor,
    U: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    groups: torch.Tensor,
    qmin: int,
    qmax: int,
    block_size: int,
    errors: torch.Tensor,
) -> torch.Tensor:
    """The fused GPTQ column loop in place: ``W [r, n]`` float32 (permuted) in, its codes out (``W`` returned).

    ``scale``/``zero`` float32 ``[r, g]`` per group, ``groups`` int32 ``[n]`` each column's group, ``errors``
    float32 ``[r, >= min(block_size, n)]`` scratch. Views in, results written in place: two launches per block.
    """
    n = W.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        err = errors[:, : i2 - i1]
        block = W[:, i1:i2]
        gptq_triton.block_step(
            block, U[i1:i2, i1:i2], scale, zero, qmin, qmax, codes=block, errors=err, groups=groups[i1:i2]
        )
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)
    return W


def static_bytes(rows: int, n: int, n_groups: int, block_size: int) -> int:
    """Bytes of one graph's static buffers (see the module docstring)."""
    return 4 * (rows * n + n * n + 2 * rows * n_groups + n + rows * min(block_size, n))


@dataclass(frozen=True)
class GraphKey:
    """What one captured loop is specific to. ``tf32``: whether ``addmm_`` may use TF32 (fixed at capture);
    ``u_columns``: ``U`` is column-major (as the factorisations give it), its static buffer is too, so that every
    ``addmm_`` sees the operand layout of the eager loop (cuBLAS may pick another kernel for another layout)."""

    rows: int
    n: int
    n_groups: int
    block_size: int
    qmin: int
    qmax: int
    device: str
    tf32: bool
    u_columns: bool = False

    @classmethod
    def of(
        cls, W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, block_size: int
    ) -> GraphKey:
        rows, n = W.shape
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        u_columns = n > 1 and U.stride(0) == 1 and U.stride(1) != 1
        return cls(rows, n, scale.shape[1], block_size, int(qmin), int(qmax), str(W.device), tf32, u_columns)

    @property
    def bytes(self) -> int:
        return static_bytes(self.rows, self.n, self.n_groups, self.block_size)


class _Graph:
    """One captured loop and its static buffers."""

    def __init__(self, key: GraphKey, stream: torch.cuda.Stream) -> None:
        kw = {"dtype": torch.float32, "device": torch.device(key.device)}
        self.key, self.stream, self.graph = key, stream, None
        self.W = torch.empty(key.rows, key.n, **kw)
        self.U = torch.empty(key.n, key.n, **kw).mT if key.u_columns else torch.empty(key.n, key.n, **kw)
        self.scale = torch.empty(key.rows, key.n_groups, **kw)
        self.zero = torch.empty(key.rows, key.n_groups, **kw)
        self.groups = torch.empty(key.n, dtype=torch.int32, device=self.W.device)
        self.errors = torch.empty(key.rows, min(key.block_size, key.n), **kw)

    def _fill(self, *inputs: torch.Tensor) -> None:
        for dst, src in zip((self.W, self.U, self.scale, self.zero, self.groups), inputs):
            dst.copy_(src)

    def _loop(self) -> None:
        k = self.key
        fused_loop(self.W, self.U, self.scale, self.zero, self.groups, k.qmin, k.qmax, k.block_size, self.errors)

    def warm(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Fill the buffers and run the loop eagerly on the side stream: its codes (``self.W``) are the result."""
        with torch.cuda.device(self.W.device):
            self._fill(*inputs)
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self._loop()
            current.wait_stream(self.stream)
        return self.W

    def capture(self) -> None:
        """Record the loop on the side stream (after :meth:`warm`; nothing runs, the buffers keep its codes)."""
        with torch.cuda.device(self.W.device):
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.stream(self.stream):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._loop()
                finally:
                    graph.capture_end()
        self.graph = graph

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        assert self.graph is not None
        with torch.cuda.device(self.W.device):  # the copies and the replay on that device's current stream
            self._fill(*inputs)
            self.graph.replay()
        return self.W


Builder = Callable[[GraphKey], _Graph]


class GraphCache:
    """Captured column loops by :class:`GraphKey`, at most ``budget_bytes`` of static buffers in all (LRU).

    ``build(key)`` makes an uncaptured graph (tests substitute it). Counters: ``captures``, ``replays``,
    ``evictions``, ``eager`` (calls run by the eager fused loop: over budget, dropped and no free room, or capture
    failed). :meth:`clear` empties the cache and forgets dropped and failed shapes (the counters stay).
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, build: Builder | None = None) -> None:
        self.budget_bytes = int(budget_bytes)
        self._build = build or self._new_graph
        self._graphs: OrderedDict[GraphKey, _Graph] = OrderedDict()
        self._failed: set[GraphKey] = set()
        self._dropped: set[GraphKey] = set()
        self._streams: dict[str, torch.cuda.Stream] = {}
        self.captures = self.replays = self.evictions = self.eager = 0

    @property
    def bytes(self) -> int:
        """Static bytes the cached graphs hold."""
        return sum(k.bytes for k in self._graphs)

    def lru_keys(self) -> list[GraphKey]:
        """Cached keys, least recently used first."""
        return list(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its buffers (the memory returns to PyTorch's caching allocator)."""
        self._graphs.clear()
        self._failed.clear()
        self._dropped.clear()

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget, dropping least recently used graphs until the rest fit."""
        self.budget_bytes = int(budget_bytes)
        self._evict(0)

    def _evict(self, need: int) -> None:
        while self._graphs and self.bytes + need > self.budget_bytes:
            self._dropped.add(self._graphs.popitem(last=False)[0])
            self.evictions += 1

    def _new_graph(self, key: GraphKey) -> _Graph:
        if key.device not in self._streams:
            self._streams[key.device] = torch.cuda.Stream(torch.device(key.device))
        return _Graph(key, self._streams[key.device])

    def run(
        self,
        W: torch.Tensor,
        U: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        groups: torch.Tensor,
        qmin: int,
        qmax: int,
        block_size: int,
    ) -> torch.Tensor:
        """The codes of :func:`fused_loop` on these inputs (float32 ``[r, n]``), from a graph where one fits.

        The result may be a static buffer that the next call of this shape overwrites: copy or convert it first.
        ``W`` may be modified (it is when the eager loop runs: also for a ``W`` that is not contiguous, whose
        row stride the static buffer would not reproduce).
        """
        key = GraphKey.of(W, U, scale, qmin, qmax, block_size)
        inputs = (W, U, scale, zero, groups)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            self.replays += 1
            return graph.replay(*inputs)
        no_room = key in self._dropped and self.bytes + key.bytes > self.budget_bytes
        if key.bytes > self.budget_bytes or key in self._failed or no_room or not W.is_contiguous():
            self.eager += 1
            errors = torch.empty(W.shape[0], min(block_size, W.shape[1]), dtype=torch.float32, device=W.device)
            return fused_loop(W, U, scale, zero, groups, qmin, qmax, block_size, errors)
        self._evict(key.bytes)
        graph = self._build(key)
        codes = graph.warm(*inputs)
        try:
            graph.capture()
        except RuntimeError as e:  # the warm-up's codes are still the result; this shape stays eager
            logger.warning("GPTQ column loop %s: CUDA graph capture failed (%s); using the eager loop.", key, e)
            self._failed.add(key)
            self.eager += 1
            return codes
        self._graphs[key] = graph
        self.captures += 1
        return codes


cache = GraphCache()
"""The process-wide cache that :func:`lightning_tlq.core.gptq.gptq_quantize` uses (``kernel`` auto or graph)."""


def clear() -> None:
    """Free every graph of the process-wide cache."""
    cache.clear()


@contextlib.contextmanager
def released() -> Iterator[None]:
    """Free every graph of the process-wide cache when the block ends, however it ends (a calibration run)."""
    try:
        yield
    finally:
        clear()


def set_budget(budget_bytes: int) -> None:
    """Set the process-wide cache's budget of static bytes (graphs over it run the eager fused loop)."""
    cache.set_budget(budget_bytes)
