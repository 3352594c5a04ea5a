"""Host memory that copies to and from a CUDA device at DMA speed, without a page-locked allocation per tensor.

Three tools:

- :class:`PinnedArena` hands out many small page-locked tensors carved from a few large slabs: one page-locked
  allocation per slab, not per tensor (importance scores are one small tensor per module and batch).
- :class:`HostStaging` copies device tensors to fresh (pageable) host tensors through one reusable page-locked
  buffer: the device-to-host copy runs as DMA, the host-side copy on all of torch's threads.
- :class:`Registration` (and :func:`registered`) page-locks existing host tensors in place (``cudaHostRegister``),
  on a helper thread: the decoder layers, copied to the device and back once or twice per layer and run. Copies
  from registered memory run as DMA and do not hold the host thread that issues them.

All are no-ops (plain host tensors) without CUDA. Measured costs and copy rates: ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_ALIGN = 64  # bytes: any dtype's alignment, and a cache line


MIN_STAGING_BYTES = 1 << 20
"""Device tensors smaller than this go to the host by a plain ``.cpu()`` (:class:`HostStaging`)."""


class PinnedArena:
    """Bump allocator of page-locked host tensors in ``slab_bytes`` slabs.

    A slab is freed when the last tensor carved from it is (each view keeps its slab alive); :meth:`reset` only
    starts a fresh slab for the next tensors.

    Args:
        slab_bytes: size of each slab; a tensor larger than this gets a slab of its own.
        pin: page-lock the slabs (False: plain host memory, e.g. without CUDA).
    """

    def __init__(self, slab_bytes: int = 32 << 20, pin: bool | None = None) -> None:
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be positive, got {slab_bytes}.")
        self.slab_bytes = slab_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.slabs = 0
        """How many slabs were allocated (for tests and reports)."""
        self._slab: Tensor | None = None
        self._used = 0

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous host tensor of ``shape`` and ``dtype``, page-locked if :attr:`pin`."""
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        start = -(-self._used // _ALIGN) * _ALIGN
        if self._slab is None or start + n > self._slab.numel():
            self._slab = torch.empty(max(n, self.slab_bytes), dtype=torch.uint8, pin_memory=self.pin)
            self.slabs += 1
            start = 0
        self._used = start + n
        return self._slab[start : start + n].view(dtype).view(shape)

    def reset(self) -> None:
        """Start the next tensor in a fresh slab (tensors handed out so far stay valid)."""
        self._slab, self._used = None, 0


class HostStaging:
    """Device-to-host copies into fresh pageable tensors through one reusable page-locked buffer.

    The buffer grows to the largest tensor copied and is kept until the object is dropped. Tensors smaller than
    ``min_bytes`` (default :data:`MIN_STAGING_BYTES`; and host tensors) take the plain ``.cpu()`` path.
    """

    def __init__(self, min_bytes: int | None = None) -> None:
        self.min_bytes = MIN_STAGING_BYTES if min_bytes is None else min_bytes
        self._buffer: Tensor | None = None

    def to_host(self, t: Tensor) -> Tensor:
        """A host copy of ``t`` (``t`` itself if it is on the host already); synchronises with ``t``'s stream."""
        nbytes = t.numel() * t.element_size()
        if not t.is_cuda or nbytes < self.min_bytes:
            return t.cpu()
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None  # free the old buffer before taking the larger one
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        stage = self._buffer[:nbytes].view(t.dtype).view(t.shape)
        stage.copy_(t)  # blocking: the buffer is reusable once it returns
        return torch.empty(t.shape, dtype=t.dtype).copy_(stage)


MIN_REGISTER_BYTES = 1 << 20
"""Host storages smaller than this are left pageable (registration has a fixed cost per call)."""


class Registration:
    """Page-locks groups of host tensors in place (``cudaHostRegister``), group after group, on a helper thread,
    until :meth:`close`. Work that needs group ``i`` calls :meth:`wait` first; the rest overlaps.

    The storages are referenced here, so they stay alive until :meth:`close`; they must not be resized meanwhile.
    Calls run on the helper thread: a refused registration (e.g. a locked-memory limit) leaves its error in that
    thread's CUDA runtime state, where no later kernel-launch check of the calling thread can pick it up; the
    storage is then simply used as it is (pageable, slower copies), with one warning.

    Args:
        groups: host tensors per group (each storage is registered once, with the first group that has it).
        min_bytes: storages smaller than this stay pageable (default :data:`MIN_REGISTER_BYTES`).
        enabled: False registers nothing (``memory.pin_layers=false``); without CUDA nothing is registered either.
    """

    def __init__(self, groups: Sequence[Iterable[Tensor]], min_bytes: int | None = None, enabled: bool = True) -> None:
        self.enabled = enabled and torch.cuda.is_available()
        """Whether storages are registered at all."""
        self.bytes = 0
        """Bytes registered (final once :meth:`close` ran)."""
        self._futures: list[Future] = []
        self._collected: set[int] = set()  # groups whose outcome was taken into bytes / warnings
        self._done: list[tuple[int, int, object]] = []
        self._pool: ThreadPoolExecutor | None = None
        if not self.enabled:
            return
        limit = MIN_REGISTER_BYTES if min_bytes is None else min_bytes
        self._cudart = torch.cuda.cudart()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tlq-host-register")
        seen: set[int] = set()
        for group in groups:
            self._futures.append(self._pool.submit(self._register, _storages(group, limit, seen)))

    def _register(self, storages: list[tuple[int, int, object]]) -> tuple[list[tuple[int, int, object]], int, int]:
        codes = [int(self._cudart.cudaHostRegister(ptr, nbytes, 0)) for ptr, nbytes, _ in storages]
        done = [s for s, code in zip(storages, codes) if code == 0]
        return done, len(storages) - len(done), next((c for c in codes if c != 0), 0)

    def wait(self, index: int) -> None:
        """Return once group ``index`` is registered (or refused)."""
        if self.enabled and 0 <= index < len(self._futures):
            self._collect(index)

    def wait_all(self) -> int:
        """Wait for every group; return the bytes registered."""
        for index in range(len(self._futures)):
            self._collect(index)
        return self.bytes

    def _collect(self, index: int) -> None:
        if index in self._collected:
            return
        done, refused, code = self._futures[index].result()
        self._collected.add(index)
        self._done.extend(done)
        self.bytes += sum(nbytes for _, nbytes, _ in done)
        if refused:
            log.warning(
                "cudaHostRegister refused %d of %d host storages (error %d); their copies to and from the device run "
                "from pageable memory (slower). Raise the locked-memory limit or set memory.pin_layers=false.",
                refused,
                refused + len(done),
                code,
            )

    def close(self) -> None:
        """Wait for the device (no copy may still use the pages), then unregister everything registered."""
        if self._pool is None:
            return
        self.wait_all()
        torch.cuda.synchronize()
        done, self._done = self._done, []
        self._pool.submit(lambda: [self._cudart.cudaHostUnregister(ptr) for ptr, _, _ in done]).result()
        self._pool.shutdown(wait=True)
        self._pool = None


def _storages(tensors: Iterable[Tensor], min_bytes: int, seen: set[int]) -> list[tuple[int, int, object]]:
    """(data pointer, bytes, storage) of each host storage of at least ``min_bytes`` not in ``seen`` (updated)."""
    out = []
    for t in tensors:
        if t.device.type != "cpu" or t.is_pinned():
            continue
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes >= min_bytes and ptr not in seen:
            seen.add(ptr)
            out.append((ptr, nbytes, storage))
    return out


@contextlib.contextmanager
def registered(tensors: Iterable[Tensor], min_bytes: int | None = None, enabled: bool = True) -> Iterator[int]:
    """Page-lock the host storages of ``tensors`` in place for the block (see :class:`Registration`); yields the
    bytes registered."""
    registration = Registration([tensors], min_bytes, enabled)
    try:
        yield registration.wait_all()
    finally:
        registration.close()
