"""Make the reference structure of a compressed-tensors export with llm-compressor (the reference writer).

``tests/test_export_reference.py`` checks that ``lightning-tlq export`` writes what llm-compressor writes for the
same tiny model and scheme: ``quantization_config`` fields, tensor names, dtypes and shapes, ignore list, format
names. This script produces the JSON it compares against (``tests/fixtures/export_reference/<scheme>.json``):
llm-compressor's ``QuantizationModifier`` (round to nearest; the structure of a GPTQ run is the same, up to
``actorder``) applied to the tiny LLaVA and Qwen2-VL of ``lightning_tlq.models.tiny`` in bfloat16, saved
compressed, then for every tensor of the safetensors its name, dtype and shape, and the ``quantization_config``
without its version-specific fields (``version``, observer settings).

llm-compressor is not a dependency of lightning-tlq (it pins transformers <= 5.17): run it in its own venv. The
tiny models are saved by the project's venv first (model + processor; llm-compressor needs a processor and a real
local ``name_or_path``). The committed fixtures were made on 2026-12-03 on the 2-core CPU dev box with::

    python3 -m venv /work/lcvenv && /work/lcvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    for f in llava qwen2_vl; do HF_HUB_OFFLINE=1 .venv/bin/python -c \\
        "from lightning_tlq.models.tiny import save_tiny_vlm; save_tiny_vlm('/tmp/ref-tiny-$f', '$f')"; done
    HF_HUB_OFFLINE=1 /work/lcvenv/bin/python examples/make_export_reference.py \\
        --models /tmp/ref-tiny-llava /tmp/ref-tiny-qwen2_vl --out tests/fixtures/export_reference

(llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu; each scheme takes
about a second.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import safe_open

# scheme name: (llm-compressor preset, what lightning-tlq calls it: bits, group_size, symmetric, act_bits)
SCHEMES = {
    "w4a16_g128_sym": ("W4A16", {"bits": 4, "group_size": 128, "symmetric": True, "act_bits": None}),
    "w4a16_g128_asym": ("W4A16_ASYM", {"bits": 4, "group_size": 128, "symmetric": False, "act_bits": None}),
    "w8a8_channel_sym": ("W8A8", {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8}),
    "w4a8_g128_sym": ("W4A8", {"bits": 4, "group_size": 128, "symmetric": True, "act_bits": 8}),
}
# Modules kept in full precision, as llm-compressor's own VLM examples write them.
IGNORE = ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*visual.*"]
# Fields that change between compressed-tensors releases or describe how scales were observed, not the format.
DROPPED = {
    "top": ("version", "transform_config", "sparsity_config"),
    "args": ("observer", "observer_kwargs"),
}


def _args(args: dict | None) -> dict | None:
    return None if args is None else {k: v for k, v in sorted(args.items()) if k not in DROPPED["args"]}


def _config(raw: dict) -> dict:
    out = {k: v for k, v in sorted(raw.items()) if k not in DROPPED["top"]}
    groups = {}
    for name, group in raw["config_groups"].items():
        groups[name] = {
            k: _args(v) if k.endswith("activations") or k == "weights" else v for k, v in sorted(group.items())
        }
    out["config_groups"] = groups
    return out


def _tensors(directory: Path) -> dict[str, dict]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                sl = f.get_slice(key)
                out[key] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
    return dict(sorted(out.items()))


def reference(model_dir: Path, preset: str, work: Path) -> dict:
    """Quantize ``model_dir`` with llm-compressor's ``preset`` (no calibration data needed) and describe the
    saved checkpoint."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, local_files_only=True)
    recipe = QuantizationModifier(targets="Linear", scheme=preset, ignore=IGNORE)
    oneshot(model=model, recipe=recipe, processor=str(model_dir))
    out = work / preset
    model.save_pretrained(out, save_compressed=True)
    config = json.loads((out / "config.json").read_text())
    return {
        "model_type": config["model_type"],
        "model_class": type(model).__name__,
        "quantization_config": _config(config["quantization_config"]),
        "tensors": _tensors(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="saved tiny models (save_tiny_vlm)")
    parser.add_argument("--out", required=True, help="fixture directory")
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    for scheme in args.schemes:
        preset, ours = SCHEMES[scheme]
        record = {"scheme": scheme, "preset": preset, "lightning_tlq": ours, "ignore_patterns": IGNORE}
        record["dropped_fields"] = {k: list(v) for k, v in DROPPED.items()}
        record["versions"], record["models"] = versions, {}
        for model_dir in map(Path, args.models):
            work = Path(tempfile.mkdtemp(prefix="lc-ref-"))
            try:
                described = reference(model_dir, preset, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            record["models"][described["model_type"]] = described
        path = out / f"{scheme}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{path}: {', '.join(record['models'])}")


if __name__ == "__main__":
    main()
