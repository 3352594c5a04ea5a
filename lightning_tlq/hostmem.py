"""Host memory that copies to and from a CUDA device at DMA speed, without a page-locked allocation per tensor.

Three tools, each measured on one H200 machine (docs/performance.md):

- :class:`PinnedArena` hands out many small page-locked tensors carved from a few large slabs. One
  ``cudaHostAlloc`` costs ~0.2-0.5 ms, even for a few KB; importance scores are one small tensor per module and
  batch (thousands per run).
- :class:`HostStaging` copies device tensors to fresh (pageable) host tensors through one reusable page-locked
  buffer: the device-to-host copy runs as DMA, the host-side copy on all of torch's threads. A plain ``.cpu()``
  of a pageable destination runs at ~1.7 GB/s for int8 codes (68 MB in 40 ms).
- :func:`registered` page-locks existing host tensors in place (``cudaHostRegister``) for a block: the decoder
  layers, copied to the device and back once or twice per layer and run. Registering 2.9 GB took 0.12 s;
  copies from it then run at 55 GB/s instead of 9 GB/s, and no longer hold the host thread that issues them.

All are no-ops (plain host tensors) without CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_ALIGN = 64  # bytes: any dtype's alignment, and a cache line


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
    ``min_bytes`` (and host tensors) take the plain ``.cpu()`` path.
    """

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
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


def _enabled() -> bool:
    return os.environ.get("LIGHTNING_TLQ_PIN_LAYERS", "1") != "0"


def _storages(tensors: Iterable[Tensor], min_bytes: int) -> list[tuple[int, int, object]]:
    """(data pointer, bytes, storage) of each distinct host storage of at least ``min_bytes``."""
    out, seen = [], set()
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
def registered(tensors: Iterable[Tensor], min_bytes: int = 1 << 20) -> Iterator[int]:
    """Page-lock the host storages of ``tensors`` in place for the block; yields the bytes registered.

    The storages must stay alive and unresized until the block ends (they are referenced here until then).
    Calls run on a helper thread: a refused registration (e.g. a locked-memory limit) leaves its error in that
    thread's CUDA runtime state, where no later kernel-launch check of the calling thread can pick it up; the
    storage is then simply used as it is (pageable, slower copies), with one warning.
    ``LIGHTNING_TLQ_PIN_LAYERS=0`` disables registration.
    """
    if not (torch.cuda.is_available() and _enabled()):
        yield 0
        return
    storages = _storages(tensors, min_bytes)
    cudart = torch.cuda.cudart()
    with ThreadPoolExecutor(1, thread_name_prefix="tlq-host-register") as pool:
        codes = pool.submit(lambda: [int(cudart.cudaHostRegister(p, n, 0)) for p, n, _ in storages]).result()
        done = [s for s, code in zip(storages, codes) if code == 0]
        if len(done) < len(storages):
            failed = next(code for code in codes if code != 0)
            log.warning(
                "cudaHostRegister refused %d of %d host storages (error %d); their copies to and from the device run "
                "from pageable memory (slower). Raise the locked-memory limit or set LIGHTNING_TLQ_PIN_LAYERS=0.",
                len(storages) - len(done),
                len(storages),
                failed,
            )
        try:
            yield sum(n for _, n, _ in done)
        finally:
            torch.cuda.synchronize()  # no copy may still read or write the pages
            pool.submit(lambda: [cudart.cudaHostUnregister(p) for p, _, _ in done]).result()
