"""Vision calibration over 2 processes (gloo, CPU) matches 1 process: same token sets, same vision weights.

Decoder weights are compared by tests/test_distributed.py (their 1-vs-2 agreement is the distributed loop's concern).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lightning_tlq.report import REPORT_NAME

_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RANK")
_ARGS = ["--model.model_name_or_path", "tiny-qwen2_vl", "--data.num_samples", "10", "--data.batch_size", "2",
         "--quant.bits", "4", "--quant.group_size", "32", "--quant.act_bits", "8", "--quant.vision", "true",
         "--trainer.accelerator", "cpu", "--quiet", "true"]  # fmt: skip


def _run(out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("LT_")}
    env.update(HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "lightning_tlq", "calibrate", *_ARGS, "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / REPORT_NAME).read_text())


@pytest.mark.slow
def test_two_processes_match_one_with_vision(tmp_path):
    one = _run(tmp_path / "one")
    two = _run(tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert two["settings"]["world_size"] == 2
    for a, b in zip(one["vision"]["layers"], two["vision"]["layers"], strict=True):
        assert a["index"] == b["index"]
        for key in ("tokens_total", "tokens_kept", "tokens_by_mass"):
            assert a[key] == b[key], (a["index"], key)
    w_one, w_two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # the decoder's token sets come from the same (full-precision) importance pass: identical too
    assert [r["token_set_fingerprint"] for r in one["layers"]] == [r["token_set_fingerprint"] for r in two["layers"]]
    vision = [k for k in w_one if "visual." in k and k.endswith(".weight") and w_one[k].dim() == 2]
    assert len(vision) == 10
    same = sum(int((w_one[k] == w_two[k]).sum()) for k in vision)
    assert same / sum(w_one[k].numel() for k in vision) >= 0.999
    untouched = [k for k in w_one if k.endswith("bias") or "norm" in k or "embed" in k or "lm_head" in k]
    assert all(torch.equal(w_one[k], w_two[k]) for k in untouched)
