"""llm-compressor's GPTQ W4A16 on exactly the workload of ``benchmark_speed.py`` (same model, same data).

The peer baseline of the speed benchmark: the same random-init Qwen2-VL (2B or 7B shapes), the same 128 samples x
(256 image + 256 text + 2 marker tokens) in the same batches of 8, GPTQ W4A16 (group 128, symmetric, static
act-order, llm-compressor's defaults otherwise) on every decoder-layer linear, the vision tower and ``lm_head``
left alone, llm-compressor's sequential pipeline (one decoder layer at a time on the GPU, as TLQ's
``memory.layerwise``). It needs ``llmcompressor`` (0.14, which accepts transformers 5.17) and its requirements;
``lightning-tlq`` does not depend on it.

    python examples/benchmark_llmcompressor.py --shape 7b --json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from benchmark_speed import SHAPES, build_batches, build_model


def _placeholder_tokenizer():
    """oneshot insists on a processor when given data; the batches are already token ids, so any will do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))


def run(args: argparse.Namespace) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = build_model(args.shape, args.layers)
    model.to("cpu")
    config_dir = tempfile.mkdtemp(prefix="tlq-bench-config-")  # oneshot re-reads the config from name_or_path
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    batches = build_batches(args.samples, args.image_tokens, args.text_tokens, args.batch_size, range(args.samples))
    keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    batches = [{k: v for k, v in b.items() if k in keep} for b in batches]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*visual.*"],
                          block_size=128, dampening_frac=0.01, actorder="static")  # fmt: skip
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(model=model, processor=_placeholder_tokenizer(), dataset=loader, recipe=recipe,
            num_calibration_samples=args.samples, pipeline="sequential",
            sequential_targets=["Qwen2VLDecoderLayer"])  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    result = {
        "tool": "llm-compressor", "shape": args.shape, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
        "samples": args.samples, "tokens_per_sample": args.image_tokens + args.text_tokens + 2, "wall_s": wall,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(parse())
