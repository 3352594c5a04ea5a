"""The saved model keeps the checkpoint's dtype (``--model.dtype auto``) while calibration computes in float32."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from lightning_tlq.cli import main
from lightning_tlq.export import read_qparams
from lightning_tlq.models import save_tiny_vlm
from lightning_tlq.savedtype import checkpoint_dtype, resolve_dtypes

FLAGS = ["--data.num_samples", "4", "--trainer.accelerator", "cpu", "--quiet", "true", "--quant.method", "gptq",
         "--quant.group_size", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    path = save_tiny_vlm(tmp_path_factory.mktemp("bf16") / "model", family="llava")
    AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return path


def test_resolve_dtypes(bf16_dir):
    assert checkpoint_dtype(str(bf16_dir)) == "bfloat16"
    assert checkpoint_dtype("scenes-llava") == "bfloat16"  # the embedded model
    assert resolve_dtypes("auto", str(bf16_dir)) == ("float32", "bfloat16")
    assert resolve_dtypes("auto", "tiny-llava") == ("float32", None)  # built in float32: nothing to cast
    assert resolve_dtypes("bfloat16", str(bf16_dir)) == ("bfloat16", None)
    assert resolve_dtypes("float32", str(bf16_dir)) == ("float32", None)


def test_bf16_checkpoint_saved_in_bf16_with_the_float32_codes(bf16_dir, tmp_path):
    auto, fp32 = tmp_path / "auto", tmp_path / "fp32"
    main(["calibrate", "--model.model_name_or_path", str(bf16_dir), *FLAGS, "--output_dir", str(auto)])
    main(["calibrate", "--model.model_name_or_path", str(bf16_dir), *FLAGS, "--output_dir", str(fp32),
          "--model.dtype", "float32"])  # fmt: skip
    assert json.loads((auto / "tlq_report.json").read_text())["settings"]["save_dtype"] == "bfloat16"
    qp = read_qparams(auto)
    with (
        safe_open(str(auto / "tlq_qparams.safetensors"), "pt") as q_auto,
        safe_open(str(fp32 / "tlq_qparams.safetensors"), "pt") as q_fp32,
        safe_open(str(auto / "model.safetensors"), "pt") as weights,
    ):
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
        for name, info in qp.modules.items():
            assert torch.equal(q_auto.get_tensor(f"{name}.codes"), q_fp32.get_tensor(f"{name}.codes")), name
            codes, scale, zero = qp.load(q_auto, name)
            assert torch.equal(scale, scale.bfloat16().float())  # scales representable in the saved dtype
            group = qp.spec.group_len(codes.shape[1])
            expected = ((codes - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)).bfloat16()
            assert torch.equal(weights.get_tensor(f"{info['checkpoint']}.weight"), expected), name
