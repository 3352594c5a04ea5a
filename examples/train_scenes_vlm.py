"""Train the embedded ``scenes-llava`` model: a small LLaVA on the procedural scenes task, from scratch.

Reproduces the shipped checkpoint (``lightning_tlq/checkpoints/scenes-llava``) on one GPU in under 10 minutes:

    PYTHONPATH=$PWD python examples/train_scenes_vlm.py --minutes 7 --out scenes-llava

Training data is an endless stream of the task's ``train`` split (never its ``validation`` or ``test`` split),
rendered by DataLoader workers. The learning-rate schedule is set by a wall-clock budget: after a short warm-up
the step time is measured and the cosine schedule is stretched to end when ``--minutes`` are spent. At the end the
script saves the model in bf16 with its processor and measures greedy exact match on the validation and test
splits, in full precision and after plain round-to-nearest weight quantization of the language model (W4 g128,
W3 g128, W2 g64), writing everything to ``<out>/training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from vlm_training import RTN_SETTINGS, TrainStream, fit, rtn_copy

from lightning_tlq.evaluate import normalize_answer
from lightning_tlq.models.scenes import (
    FastEncoder,
    ScenesModelShape,
    build_scenes_config,
    build_scenes_processor,
    pixel_values,
)
from lightning_tlq.tasks import scenes


@torch.no_grad()
def greedy_exact_match(model, encoder: FastEncoder, examples, device, batch_size: int = 512, max_new: int = 6):
    """Exact match of greedy answers, overall and per kind; prompts are grouped by length (no padding)."""
    by_len = defaultdict(list)
    for e in examples:
        ids, start = encoder.ids(e.question, e.answer)
        by_len[start].append((ids[:start], e))
    inv = {i: w for w, i in encoder.vocab.items()}
    hits, totals = defaultdict(int), defaultdict(int)
    for group in by_len.values():
        for lo in range(0, len(group), batch_size):
            chunk = group[lo : lo + batch_size]
            ids = torch.tensor([p for p, _ in chunk], device=device)
            pix = pixel_values(torch.from_numpy(np.stack([e.image for _, e in chunk])).to(device))
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            out = []
            for _ in range(max_new):
                logits = model(input_ids=ids, pixel_values=pix, use_cache=False).logits[:, -1]
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, encoder.eos), nxt)
                out.append(nxt)
                done |= nxt == encoder.eos
                ids = torch.cat([ids, nxt[:, None]], 1)
                if done.all():
                    break
            gen = torch.stack(out, 1).tolist()
            for row, (_, e) in zip(gen, chunk):
                words = [inv[t] for t in (row[: row.index(encoder.eos)] if encoder.eos in row else row)]
                ok = normalize_answer(" ".join(words)) == normalize_answer(e.answer)
                hits[e.kind] += ok
                totals[e.kind] += 1
    per_kind = {k: hits[k] / totals[k] for k in sorted(totals)}
    return {"exact_match": sum(hits.values()) / sum(totals.values()), "per_kind": per_kind}


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    from transformers import AutoModelForImageTextToText

    processor = build_scenes_processor()
    shape = ScenesModelShape(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, vision_hidden_size=args.vision_hidden,
        vision_intermediate_size=4 * args.vision_hidden, vision_layers=args.vision_layers,
    )  # fmt: skip
    config = build_scenes_config(processor.tokenizer, shape)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    encoder = FastEncoder(processor.tokenizer)
    log = []

    def on_log(entry: dict) -> None:
        log.append(entry)
        print(json.dumps(entry), flush=True)

    def loss_fn(model, batch):
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=pixel_values(batch.pop("images")), labels=batch["labels"], use_cache=False,
        ).loss  # fmt: skip

    stream = TrainStream(scenes.examples, encoder, args.batch_size, args.seed)
    step, train_s = fit(model, stream, device, args, args.minutes * 60, loss_fn, on_log)
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = model.to(torch.bfloat16)
    shipped.generation_config.pad_token_id = encoder.pad
    shipped.generation_config.eos_token_id = encoder.eos
    shipped.save_pretrained(out, max_shard_size=args.max_shard_size)
    processor.save_pretrained(out)
    model = shipped.float()  # evaluate what ships: bf16 weights, fp32 compute
    results = {"train_seconds": train_s, "steps": step, "batch_size": args.batch_size, "params": n_params,
               "shape": vars(shape), "args": vars(args), "log": log, "device": torch.cuda.get_device_name()
               if device.type == "cuda" else "cpu", "torch": torch.__version__}  # fmt: skip
    evals = {split: scenes.take(split, args.eval_n) for split in ("validation", "test")}
    for name, setting in RTN_SETTINGS.items():
        m = model if setting is None else rtn_copy(model, *setting)
        results[name] = {split: greedy_exact_match(m, encoder, ex, device) for split, ex in evals.items()}
        print(name, json.dumps(results[name]), flush=True)
    (out / "training.json").write_text(json.dumps(results, indent=1))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scenes-llava")
    p.add_argument("--minutes", type=float, default=8.2, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=2500)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--max-shard-size", default="8MB")
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(parse())
