"""Host-memory helpers: arena tensors are disjoint, aligned and stable; staging copies equal ``.cpu()``;
registration dedupes storages, unregisters exactly what it registered, and survives a refused registration."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_tlq import hostmem
from lightning_tlq.hostmem import HostStaging, PinnedArena, registered


def test_arena_hands_out_disjoint_aligned_tensors_that_keep_their_values() -> None:
    arena = PinnedArena(slab_bytes=4096, pin=False)
    g = torch.Generator().manual_seed(0)
    shapes = [((3, 5), torch.float32), ((7,), torch.int8), ((2, 2, 3), torch.float64), ((1,), torch.bfloat16)] * 20
    out, want = [], []
    for shape, dtype in shapes:
        t = arena.empty(shape, dtype)
        assert t.shape == shape
        assert t.dtype == dtype
        assert t.is_contiguous()
        assert t.data_ptr() % 64 == 0
        value = torch.randn(shape, generator=g).to(dtype)
        t.copy_(value)
        out.append(t)
        want.append(value)
    assert all(torch.equal(t, w) for t, w in zip(out, want))  # nothing was overwritten by a later tensor
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in out)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert arena.slabs == 2  # 20 x (64 + 64 + 128 + 64) = 6400 aligned bytes in 4096-byte slabs


def test_arena_gives_an_oversized_tensor_its_own_slab_and_reset_starts_a_new_one() -> None:
    arena = PinnedArena(slab_bytes=1024, pin=False)
    small = arena.empty((4,), torch.float32)
    big = arena.empty((1000,), torch.float32)  # 4000 bytes > slab
    assert arena.slabs == 2
    assert big.untyped_storage().nbytes() == 4000
    after = arena.empty((4,), torch.float32)  # the big slab is full: a third one
    assert arena.slabs == 3
    arena.reset()
    arena.empty((1,), torch.int8)
    assert arena.slabs == 4
    small.fill_(1.0)
    after.fill_(2.0)
    assert torch.equal(small, torch.ones(4))
    assert torch.equal(after, torch.full((4,), 2.0))
    with pytest.raises(ValueError, match="slab_bytes"):
        PinnedArena(slab_bytes=0)


def test_staging_on_the_host_is_a_plain_copy() -> None:
    t = torch.arange(12, dtype=torch.int8).reshape(3, 4)
    assert torch.equal(HostStaging(min_bytes=0).to_host(t), t)


class _FakeCudart:
    def __init__(self, refuse: set[int]) -> None:
        self.refuse = refuse
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        if ptr in self.refuse:
            return 712  # cudaErrorHostMemoryAlreadyRegistered: any non-zero code
        self.registered.append((ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


def _fake_cuda(monkeypatch, cudart: _FakeCudart) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: False)


def test_registration_dedupes_storages_skips_small_ones_and_unregisters_what_it_registered(monkeypatch) -> None:
    big, other, small = torch.zeros(1 << 18), torch.zeros(1 << 18), torch.zeros(10)
    cudart = _FakeCudart(refuse=set())
    _fake_cuda(monkeypatch, cudart)
    with registered([big, big[5:], big.view(2, -1), other, small], min_bytes=1 << 20) as nbytes:
        assert nbytes == 2 * (1 << 20)
        assert sorted(cudart.registered) == sorted([(big.data_ptr(), 1 << 20), (other.data_ptr(), 1 << 20)])
        assert cudart.unregistered == []
    assert sorted(cudart.unregistered) == sorted([big.data_ptr(), other.data_ptr()])


def test_a_refused_registration_warns_and_is_never_unregistered(monkeypatch, caplog) -> None:
    a, b = torch.zeros(1 << 18), torch.zeros(1 << 18)
    cudart = _FakeCudart(refuse={b.data_ptr()})
    _fake_cuda(monkeypatch, cudart)
    with caplog.at_level(logging.WARNING, logger=hostmem.__name__), registered([a, b]) as nbytes:
        assert nbytes == 1 << 20
    assert "refused 1 of 2" in caplog.text
    assert "memory.pin_layers=false" in caplog.text
    assert cudart.unregistered == [a.data_ptr()]


def test_registration_is_off_without_cuda_or_when_disabled(monkeypatch) -> None:
    t = torch.zeros(1 << 18)
    with registered([t]) as nbytes:  # this machine: no CUDA
        assert nbytes == (1 << 20 if torch.cuda.is_available() else 0)
    cudart = _FakeCudart(refuse=set())
    _fake_cuda(monkeypatch, cudart)
    with registered([t], enabled=False) as nbytes:
        assert nbytes == 0
    assert cudart.registered == []
    assert cudart.unregistered == []
