"""Measure what an export saves: file sizes and in-memory bytes of the quantized layers, plus output agreement.

Builds a random VLM from config (the built-in tiny one, or a bigger text model), calibrates it with RTN (sizes do
not depend on the method), exports it, loads it with ``load_packed`` and with transformers + compressed-tensors,
and prints one markdown table row. Example (the README's table)::

    HF_HUB_OFFLINE=1 python examples/export_footprint.py --family llava --hidden 2048 --layers 4
    HF_HUB_OFFLINE=1 python examples/export_footprint.py --family qwen2_vl --tiny
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

import lightning_tlq.models  # noqa: F401  (AutoProcessor for the tiny Qwen2-VL)
from lightning_tlq.calibrate import calibrate
from lightning_tlq.config import DataArgs, QuantArgs
from lightning_tlq.data import collate, encode_sample, synthetic_samples
from lightning_tlq.export import PACKED_DIRNAME
from lightning_tlq.models.tiny import build_config, build_processor, load_processor
from lightning_tlq.nn import load_packed, packed_memory

MIB = 2**20


def build_model_dir(out: Path, family: str, hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> Path:
    """A random VLM with the tiny vision tower and a bigger text model (Llama / Qwen2 shapes, GQA 4:1)."""
    processor = build_processor(family)
    base = build_config(family, processor.tokenizer, layers).to_dict()
    heads = hidden // 128
    text = dict(base["text_config"])
    text.pop("head_dim", None)
    text.update(hidden_size=hidden, intermediate_size=(hidden * 11 // 4 + 127) // 128 * 128, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), vocab_size=vocab)  # fmt: skip
    if family == "qwen2_vl":
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [16, 24, 24]}  # sums to head_dim/2
        base["vision_config"]["hidden_size"] = hidden  # the merger feeds the text model
    base["text_config"] = text
    config = type(build_config(family, processor.tokenizer, 1)).from_dict(base)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def quantized_file_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of quantized-layer tensors, bytes of everything) in a directory's safetensors files."""
    quantized = total = 0
    for file in directory.glob("model*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_slice(key)
                n = torch.tensor(t.get_shape()).prod().item() if t.get_shape() else 1
                size = int(n) * {"I32": 4, "I64": 8, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}[t.get_dtype()]
                total += size
                if key.rpartition(".")[2].startswith(
                    ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                ):
                    quantized += size
    return quantized, total


def peak_rss(kind: str, directory: Path) -> float:
    """Growth of peak resident memory (MiB) of a fresh process that loads the model and runs one forward pass
    (transformers maps safetensors lazily, so loading alone would not touch the weights)."""
    code = (
        "import re, torch, lightning_tlq.models\n"
        "def hwm():  # peak RSS of this process image in KiB (ru_maxrss would include the parent's, kept over exec)\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "from lightning_tlq.nn import load_packed\n"
        "from lightning_tlq.data import collate, encode_sample, synthetic_samples\n"
        "from lightning_tlq.models.tiny import load_processor\n"
        "from transformers import AutoModelForImageTextToText as A\n"
        f"d = {str(directory)!r}\n"
        "p = load_processor(d)\n"
        "b = collate([encode_sample(p, s) for s in synthetic_samples(2, seed=1)], p.tokenizer.pad_token_id)\n"
        "b.pop('labels')\n"
        "base = hwm()\n"
        f"m = load_packed(d) if {kind!r} == 'packed' else A.from_pretrained(d, local_files_only=True, dtype='auto')\n"
        "with torch.no_grad():\n"
        "    m(**b)\n"
        "print(hwm() - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["llava", "qwen2_vl"], default="llava")
    p.add_argument("--tiny", action="store_true", help="the built-in tiny model (fp32) instead of a bigger one")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--asymmetric", action="store_true")
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    a = p.parse_args()
    work = Path(a.out or tempfile.mkdtemp(prefix="tlq-footprint-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.tiny:
        model, dtype, label = f"tiny-{a.family}", "float32", f"tiny-{a.family} (text hidden 128, 2 layers)"
    else:
        model = str(build_model_dir(work / "base", a.family, a.hidden, a.layers, a.vocab, torch.bfloat16))
        dtype, label = "bfloat16", f"random {a.family} (text hidden {a.hidden}, {a.layers} layers, vocab {a.vocab})"
    calib = work / "calibrated"
    quant = QuantArgs(method="rtn", bits=a.bits, group_size=a.group_size, symmetric=not a.asymmetric)
    start = time.perf_counter()
    data = DataArgs(num_samples=4, batch_size=2)
    report = calibrate(model=model, data=data, quant=quant, output_dir=str(calib), overwrite=True, dtype=dtype,
                       accelerator="cpu", metrics=False, quiet=True, export=True)  # fmt: skip
    seconds = time.perf_counter() - start
    packed_dir = calib / PACKED_DIRNAME
    fake_q, fake_total = quantized_file_bytes(calib)  # fake-quantized weights: "weight" tensors, not counted here
    q_bytes, packed_total = quantized_file_bytes(packed_dir)
    loaded = load_packed(packed_dir)
    mem = packed_memory(loaded)
    model_bytes = sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()])
    ref = AutoModelForImageTextToText.from_pretrained(calib, local_files_only=True, dtype="auto").eval()
    ref_bytes = sum(t.numel() * t.element_size() for t in [*ref.parameters(), *ref.buffers()])
    processor = load_processor(calib)
    batch = collate(
        [encode_sample(processor, s) for s in synthetic_samples(2, seed=1)], processor.tokenizer.pad_token_id
    )
    batch.pop("labels")
    client = AutoModelForImageTextToText.from_pretrained(packed_dir, local_files_only=True, dtype="auto").eval()
    with torch.no_grad():
        want, got, theirs = (m(**batch).logits.float() for m in (ref, loaded, client))
        exact = ref.float()(**batch).logits  # the fake-quantized model in float32: the bf16 noise floor
    rss_packed, rss_fake = peak_rss("packed", packed_dir), peak_rss("fake", calib)
    row = {
        "model": label,
        "scheme": f"W{a.bits}A16 g{a.group_size} {'asym' if a.asymmetric else 'sym'} ({dtype})",
        "fake-quant weights MiB": round(fake_total / MIB, 1),
        "tlq_qparams MiB": round((calib / "tlq_qparams.safetensors").stat().st_size / MIB, 1),
        "packed weights MiB": round(packed_total / MIB, 1),
        "quantized layers: packed / bf16 MiB": f"{mem['packed_bytes'] / MIB:.1f} / {mem['bf16_bytes'] / MIB:.1f} "
        f"({mem['packed_bytes'] / mem['bf16_bytes']:.3f})",
        "model in memory MiB (load_packed / from_pretrained)": f"{model_bytes / MIB:.1f} / {ref_bytes / MIB:.1f}",
        "RSS growth load+forward MiB (load_packed / from_pretrained)": f"{rss_packed:.0f} / {rss_fake:.0f}",
        "logits rel. diff: vs compressed-tensors / vs fake-quant / fake-quant bf16 vs fp32": " / ".join(
            f"{_rel(a, b):.1e}" for a, b in ((theirs, got), (want, got), (exact, want))
        ),
        "scale-dtype moved weights": f"{report['export']['weights_moved_by_scale_dtype']:.1%}",
        "calibrate+export s": round(seconds, 1),
    }
    assert fake_q == 0, "the fake-quantized directory holds no packed tensors"
    assert q_bytes > 0, "the export holds packed tensors"
    print(json.dumps(row, indent=1))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    print(f"(peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
