"""Test-wide settings: offline hub, and Triton's CPU interpreter where no GPU is present."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton decides between compiling and interpreting when a kernel is decorated, so this must precede imports.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
