"""The CPU thread count of a lightning-tlq process: never more than the cores idle for it."""

import pytest
import torch

from lightning_tlq.threads import choose_threads, configure_threads, local_processes


@pytest.mark.parametrize(
    ("default", "cores", "processes", "idle", "expected"),
    [
        (2, 2, 1, 2, 2),  # idle 2-core box: torch's default
        (2, 2, 1, 1, 1),  # a load of 1 on 2 cores: one thread
        (2, 2, 1, 0, 1),  # overloaded: still one
        (16, 16, 4, 16, 4),  # 4 local processes share 16 cores
        (8, 16, 1, 16, 8),  # never more than torch's default
        (16, 4, 8, 4, 1),  # more processes than cores
    ],
)
def test_choose_threads(default, cores, processes, idle, expected):
    assert choose_threads(default, cores, processes, idle) == expected


def test_local_processes(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert local_processes(["calibrate", "--trainer.devices", "4"]) == 4
    assert local_processes(["calibrate", "--trainer.devices=2"]) == 2
    assert local_processes(["calibrate", "--trainer.devices", "auto"]) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert local_processes(["calibrate"]) == 3


def test_explicit_and_environment_choices_win(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert configure_threads(None) == 2  # OMP_NUM_THREADS set: torch's own setting is left alone
        with pytest.raises(ValueError, match="positive number"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)
