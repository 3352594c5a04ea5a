"""Our entry points release the process group they made (barrier, destroy) and leave a caller's own alone."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import torch.distributed as dist

from lightning_tlq.launch import build_fabric, release_process_group, run_on_ranks


def _one_rank_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def test_an_owned_group_is_destroyed_after_the_barrier() -> None:
    _one_rank_group()
    calls = []
    release_process_group(SimpleNamespace(tlq_owns_process_group=True, barrier=lambda: calls.append("barrier")))
    assert calls == ["barrier"]
    assert not dist.is_initialized()


def test_a_callers_group_is_left_alone() -> None:
    _one_rank_group()
    fabric = build_fabric("cpu", 1, 1, "auto")
    assert fabric.tlq_owns_process_group is False  # it existed before build_fabric
    assert run_on_ranks(fabric, lambda f, x: x + 1, 41) == 42
    assert dist.is_initialized()
    dist.destroy_process_group()


def test_a_single_process_run_has_nothing_to_release() -> None:
    fabric = build_fabric("cpu", 1, 1, "auto")
    assert fabric.tlq_owns_process_group is True
    assert run_on_ranks(fabric, lambda f: "done") == "done"
    assert not dist.is_initialized()
