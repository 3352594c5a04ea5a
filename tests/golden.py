"""Golden calibration runs: a fixed set of (family, method, scheme, processes) whose codes, scales, zero points and
saved weights must not change when the code is restructured.

``python tests/golden.py`` (re)writes ``tests/fixtures/golden_runs.json``; do that only for a change that is meant
to change results, and say so in the commit. Every run uses one intra-op thread per process: float32 matmuls
round differently with other thread counts, so exact digests are only comparable at a fixed count. Likewise the CPU's
vector instructions: ATen's kernels and oneDNN's matmuls take other code paths (and round differently) on an AVX-512
machine than on an AVX2 one, so runs are pinned to AVX2 (:data:`PINNED_ISA`, set before torch computes anything;
the fixture was recorded that way, and any x86-64 machine of this project has AVX2).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PINNED_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""The instruction set every exact-code computation runs with (conftest.py sets it for the whole suite)."""
for _key, _value in PINNED_ISA.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402  (after the pin: oneDNN reads it when first used, ATen when first dispatching)
from safetensors import safe_open  # noqa: E402

GOLDEN = Path(__file__).parent / "fixtures" / "golden_runs.json"
ROOT = Path(__file__).resolve().parents[1]

# name: (model, CLI flags). One process each unless the name ends in "-2p" (2 CPU processes, gloo).
RUNS: dict[str, tuple[str, list[str]]] = {
    "llava-rtn-w4g64": ("tiny-llava", ["--quant.method", "rtn", "--quant.bits", "4", "--quant.group_size", "64"]),
    "llava-gptq-w3g64": ("tiny-llava", ["--quant.method", "gptq", "--quant.bits", "3", "--quant.group_size", "64"]),
    "llava-tlq-w4g64": ("tiny-llava", ["--quant.method", "tlq", "--quant.bits", "4", "--quant.group_size", "64"]),
    "llava-tlq-w2g32-asym": (
        "tiny-llava",
        ["--quant.method", "tlq", "--quant.bits", "2", "--quant.group_size", "32", "--quant.symmetric", "false"],
    ),
    "llava-tlq-w3g64-groups2-taylor": (
        "tiny-llava",
        [
            "--quant.method",
            "tlq",
            "--quant.bits",
            "3",
            "--quant.group_size",
            "64",
            "--importance.groups",
            "2",
            "--importance.score",
            "taylor",
        ],
    ),  # fmt: skip
    "llava-awq-w3g64-clip": (
        "tiny-llava",
        ["--quant.method", "awq", "--quant.bits", "3", "--quant.group_size", "64", "--quant.awq_clip", "true"],
    ),
    "llava-smoothquant-w4a8g64": (
        "tiny-llava",
        ["--quant.method", "smoothquant", "--quant.bits", "4", "--quant.group_size", "64", "--quant.act_bits", "8"],
    ),
    "llava-mbq-w3g64": ("tiny-llava", ["--quant.method", "mbq", "--quant.bits", "3", "--quant.group_size", "64"]),
    "llava-tlq-fp-w3g64": (
        "tiny-llava",
        ["--quant.method", "tlq", "--quant.bits", "3", "--quant.group_size", "64", "--quant.target", "fp"],
    ),
    "llava-gptq-vision-w4g32": (
        "tiny-llava",
        ["--quant.method", "gptq", "--quant.bits", "4", "--quant.group_size", "32", "--quant.vision", "true"],
    ),
    "qwen-rtn-w3g32": ("tiny-qwen2_vl", ["--quant.method", "rtn", "--quant.bits", "3", "--quant.group_size", "32"]),
    "qwen-gptq-w4g32": ("tiny-qwen2_vl", ["--quant.method", "gptq", "--quant.bits", "4", "--quant.group_size", "32"]),
    "qwen-tlq-w3g64": ("tiny-qwen2_vl", ["--quant.method", "tlq", "--quant.bits", "3", "--quant.group_size", "64"]),
    "qwen-tlq-w2g64": ("tiny-qwen2_vl", ["--quant.method", "tlq", "--quant.bits", "2", "--quant.group_size", "64"]),
    "qwen-tlq-vision-w4g32": (
        "tiny-qwen2_vl",
        ["--quant.method", "tlq", "--quant.bits", "4", "--quant.group_size", "32", "--quant.vision", "true"],
    ),
    "qwen-awq-w4g32": ("tiny-qwen2_vl", ["--quant.method", "awq", "--quant.bits", "4", "--quant.group_size", "32"]),
    "qwen-mbq-w4a8g32": (
        "tiny-qwen2_vl",
        ["--quant.method", "mbq", "--quant.bits", "4", "--quant.group_size", "32", "--quant.act_bits", "8"],
    ),
    "qwen-gptq-fp-w3g32": (
        "tiny-qwen2_vl",
        ["--quant.method", "gptq", "--quant.bits", "3", "--quant.group_size", "32", "--quant.target", "fp"],
    ),
    "llava-tlq-w3g64-2p": ("tiny-llava", ["--quant.method", "tlq", "--quant.bits", "3", "--quant.group_size", "64"]),
    "qwen-awq-w3g32-2p": ("tiny-qwen2_vl", ["--quant.method", "awq", "--quant.bits", "3", "--quant.group_size", "32"]),
}
COMMON = ["--data.num_samples", "8", "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--quiet", "true",
          "--checkpoint", "false"]  # fmt: skip
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RANK")


def digest_dir(directory: Path) -> dict[str, str]:
    """Short sha256 of every tensor in the saved weights and ``tlq_qparams.safetensors`` (name -> digest)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key).contiguous()
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                out[f"{path.name}:{key}"] = h.hexdigest()[:16]
    return out


def run(name: str, out: Path) -> dict[str, str]:
    """Calibrate golden run ``name`` into ``out`` with one intra-op thread per process; its digests.

    One-process runs go through the CLI in this process (threads pinned for the call), two-process runs through a
    subprocess launching 2 CPU ranks.
    """
    model, flags = RUNS[name]
    args = ["--model.model_name_or_path", model, *COMMON, *flags]
    if not name.endswith("-2p"):
        from lightning_tlq.cli import main as cli

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cli(["calibrate", *args, "--output_dir", str(out)])
        finally:
            torch.set_num_threads(threads)
        return digest_dir(out)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("LT_")}
    env.update(HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lightning_tlq", "calibrate", *args, "--trainer.devices", "2"]
    cmd += ["--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"golden run {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return digest_dir(out)


def main(argv: list[str]) -> None:
    import tempfile

    names = argv or list(RUNS)
    golden: dict[str, Any] = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            golden[name] = run(name, Path(tmp) / name)
            print(name, len(golden[name]), "tensors", flush=True)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
