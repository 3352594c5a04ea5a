"""Test-wide settings (offline hub, Triton's CPU interpreter where no GPU is present) and shared fixtures: a small
CLI runner and a 4-layer tiny LLaVA saved as a Hugging Face directory."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The command line picks its CPU thread count from the machine's load unless OMP_NUM_THREADS is set (see
# lightning_tlq.threads); tests comparing exact codes of in-process CLI runs with subprocess runs need one fixed
# count in every process, so the suite fixes it to torch's default here (children inherit it).
# Triton decides between compiling and interpreting when a kernel is decorated, so this must precede imports.
# Exact codes also depend on the CPU's vector instructions (ATen's and oneDNN's AVX-512 paths round differently
# from their AVX2 paths): every test computes with AVX2, as the golden fixture was recorded (tests/golden.py).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
try:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch

from lightning_tlq.cli import main
from lightning_tlq.models import save_tiny_vlm
from lightning_tlq.report import REPORT_NAME

SMALL = ["--model.model_name_or_path", "tiny-llava", "--data.num_samples", "8", "--data.batch_size", "4",
         "--trainer.accelerator", "cpu", "--quiet", "true"]  # fmt: skip


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it.

    float32 matmuls of different shapes (or the same shape with another thread count) round differently, so tests
    comparing exact codes of two computations pin the thread count rather than depend on the machine's default.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calibrate_cli():
    """``calibrate_cli(out, *flags)`` runs ``lightning-tlq calibrate`` on 8 samples and returns the report."""

    def run(out, *extra):
        main(["calibrate", *SMALL, "--output_dir", str(out), *extra])
        return json.loads((out / REPORT_NAME).read_text())

    return run


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory):
    """A 4-layer tiny LLaVA saved with ``save_pretrained`` (model + processor)."""
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny4") / "model", family="llava", num_layers=4)


def leftovers(out):
    """Everything a run writing ``out`` may leave beside it: the output, temporary copies, the checkpoint."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}")))
