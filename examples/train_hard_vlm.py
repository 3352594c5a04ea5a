"""Train a benchmark model of the hard scenes task (LLaVA or Qwen2-VL, realistic shapes) from scratch.

Both families fit side by side on one H200 (two processes, each with its own DataLoader workers):

    PYTHONPATH=$PWD python examples/train_hard_vlm.py --family llava --out ckpt/hard-llava &
    PYTHONPATH=$PWD python examples/train_hard_vlm.py --family qwen2_vl --out ckpt/hard-qwen2_vl &
    wait
    python examples/train_hard_vlm.py --family llava --out /tmp/smoke --smoke     # CPU: a few steps, tiny sizes

``--task scenes_finer`` (or ``scenes_fine``) trains the variant with colour shades in place of read/add
(:data:`lightning_tlq.tasks.scenes_hard.VARIANTS`); the checkpoint's ``config.tlq_task`` names it, so calibration
and ``quality_hard.py`` draw that variant's kinds.

Training data is an endless stream of the task's ``train`` split, rendered by DataLoader workers. As in
``train_scenes_vlm.py``, the learning rate follows the wall clock: warm-up, then a cosine that ends when
``--max-seconds`` are spent. Every ``--log-every`` steps the loss and a quick validation exact match (512 samples)
are printed. At the end the model is saved in bf16 (shards) with its processor, and teacher-forced exact match
(equal to greedy here: word-level tokenizer, tested for the easy task) is measured on ``--eval-n`` validation
samples in full precision and after round-to-nearest of the language model's Linears (W4 g128, W3 g128, W2 g64);
everything goes to ``<out>/training.json`` (and ``--json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from qwen_training import batch_vision_attention, shared_positions
from vlm_training import RTN_SETTINGS, TrainStream, fit, rtn_copy

from lightning_tlq.models.scenes_hard import SMOKE_SHAPE, HardEncoder, HardModelShape, build_hard_model
from lightning_tlq.tasks import scenes_hard


def forward_inputs(model, encoder: HardEncoder, batch: dict) -> dict:
    """The model's inputs for a batch; Qwen2-VL gets its rope positions once per batch (``qwen_training``)."""
    inputs = encoder.model_inputs(batch)
    if encoder.family == "qwen2_vl":
        inputs["position_ids"] = shared_positions(model, inputs)
    return inputs


@torch.no_grad()
def exact_match(model, encoder: HardEncoder, batches, device) -> dict:
    """Teacher-forced exact match (every answer token and eos the argmax), overall and per kind, and the loss."""
    hits, totals, loss, n = defaultdict(int), defaultdict(int), 0.0, 0
    for kinds, batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**forward_inputs(model, encoder, batch), labels=batch["labels"], use_cache=False)
        labels = batch["labels"][:, 1:]
        ok = ((out.logits[:, :-1].argmax(-1) == labels) | (labels == -100)).all(1).tolist()
        for kind, good in zip(kinds, ok):
            hits[kind] += good
            totals[kind] += 1
        loss, n = loss + out.loss.item() * len(kinds), n + len(kinds)
    per_kind = {k: hits[k] / totals[k] for k in sorted(totals)}
    return {"exact_match": sum(hits.values()) / sum(totals.values()), "loss": loss / n, "per_kind": per_kind}


def eval_batches(encoder: HardEncoder, examples, batch_size: int):
    return [([e.kind for e in chunk], encoder.batch(chunk))
            for chunk in (examples[i : i + batch_size] for i in range(0, len(examples), batch_size))]  # fmt: skip


def train(args, model, encoder, device, val) -> tuple[list, int, float]:
    log = []

    def on_log(entry: dict) -> None:
        model.eval()
        quick = exact_match(model, encoder, val[: max(1, 512 // args.eval_batch_size)], device)
        model.train()
        entry = {**entry, "s": round(entry["s"], 1), "val_exact_match": quick["exact_match"],
                 "val_per_kind": quick["per_kind"]}  # fmt: skip
        log.append(entry)
        print(args.family, json.dumps(entry), flush=True)

    def loss_fn(model, batch):
        return model(**forward_inputs(model, encoder, batch), labels=batch["labels"], use_cache=False).loss

    kinds = scenes_hard.variant_kinds(args.task)
    stream = TrainStream(functools.partial(scenes_hard.examples, kinds=kinds), encoder, args.batch_size, args.seed)
    steps, seconds = fit(model, stream, device, args, args.max_seconds, loss_fn, on_log)
    return log, steps, seconds


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = SMOKE_SHAPE if args.smoke else HardModelShape()
    model, processor = build_hard_model(args.family, shape, seed=args.seed, task=args.task)
    if args.init:  # continue from a saved checkpoint's weights (a fresh optimizer and schedule)
        model, info = type(model).from_pretrained(args.init, config=model.config, dtype=torch.float32,
                                                  output_loading_info=True)  # fmt: skip
        if info["missing_keys"] or info["unexpected_keys"]:
            raise SystemExit(f"--init {args.init} does not fit the {args.family} benchmark model: {info}")
    model = model.to(device).train()
    if args.family == "qwen2_vl":  # one attention call per block instead of one per image
        batch_vision_attention(model, (scenes_hard.IMAGE_SIZE // 4) ** 2)
    encoder = HardEncoder(processor, args.family)
    kinds = scenes_hard.variant_kinds(args.task)
    val = eval_batches(encoder, scenes_hard.take("validation", args.eval_n, kinds=kinds), args.eval_batch_size)
    log, steps, train_s = train(args, model, encoder, device, val)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    processor.save_pretrained(out)
    model = model.float()  # evaluate what ships: bf16 weights, fp32 (bf16-autocast on GPU) compute
    results = {"family": args.family, "train_seconds": train_s, "steps": steps, "samples": steps * args.batch_size,
               "params": sum(p.numel() for p in model.parameters()), "shape": vars(shape), "args": vars(args),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "log": log}  # fmt: skip
    for name, setting in RTN_SETTINGS.items():
        m = model if setting is None else rtn_copy(model, *setting)
        results[name] = exact_match(m, encoder, val, device)
        print(args.family, name, json.dumps(results[name]), flush=True)
        del m
    text = json.dumps(results, indent=1)
    (out / "training.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    return results


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("llava", "qwen2_vl"), default="llava")
    p.add_argument("--task", choices=tuple(scenes_hard.VARIANTS), default="scenes_hard",
                   help="the task variant (its kinds): scenes_fine trades read/add for shades")  # fmt: skip
    p.add_argument("--out", default=None, help="checkpoint directory (default hard-<family>)")
    p.add_argument("--json", default=None, help="also write training.json here")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (its *.safetensors shards)")
    p.add_argument("--max-seconds", type=float, default=200.0, help="wall-clock training budget (excl. eval, save)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                   help="DataLoader workers rendering the train split (default: the cores but two, <= 14)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=2000, help="validation samples of the final evaluation")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--max-shard-size", default="16MB")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 3 steps, no workers (CPU check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.workers, args.warmup = args.steps or 3, 4, 0, 2
        args.eval_n, args.eval_batch_size, args.log_every, args.max_shard_size = 8, 4, 2, "200KB"
    args.out = args.out or f"hard-{args.family}"
    return args


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(parse())
