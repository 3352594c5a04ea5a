"""Where TLQ's token importance goes: per decoder layer and module, the share of the token-weight mass on image,
question (other text) and answer tokens, beside those kinds' shares of the tokens, plus the token-set sizes.

Runs a TLQ calibration of a saved checkpoint on its task's calibration split (as ``lightning-tlq calibrate``
does), reads the final token weights through a :class:`~lightning_tlq.observers.CalibrationObserver`
(``on_importance_ready``) and the per-layer records ``CalibrationLoop.run`` returns, and prints markdown tables.

    python examples/importance_breakdown.py --model hard-llava --samples 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from lightning.fabric import Fabric

from lightning_tlq import CalibrationObserver, CalibrationSettings, QuantArgs, TLQModule
from lightning_tlq.config import DataArgs
from lightning_tlq.data import token_masks
from lightning_tlq.datamodule import encode_samples, load_samples
from lightning_tlq.loop import CalibrationLoop
from lightning_tlq.models.scenes import model_task
from lightning_tlq.preflight import model_max_length, resolve_max_length
from lightning_tlq.run_calibration import rank_batches

KINDS = ("image", "text", "answer")


class ImportanceGrab(CalibrationObserver):
    """Keeps the post-processed decoder token weights: ``(layer, module)`` -> per batch ``[B, S, G]``."""

    def __init__(self) -> None:
        self.importance: dict = {}

    def on_importance_ready(self, fabric, importance, vision_scores, method_state):
        self.importance = {k: [w.detach().cpu() for w in v] for k, v in importance.items()}


def kind_masks(batch: dict, image_token_id: int) -> dict[str, torch.Tensor]:
    """``[B, S]`` masks: image, question/other text (not image, answer or pad), answer (disjoint, pads in none);
    ``pre_answer``: the text positions just before an answer label (whose hidden state predicts it), a subset."""
    m = token_masks(batch, image_token_id)
    out = {"image": m.image, "text": m.text & ~m.answer & ~m.pad, "answer": m.answer & ~m.pad}
    out["pre_answer"] = out["text"] & torch.nn.functional.pad(out["answer"][:, 1:], (0, 1))  # text before a label
    return out


def breakdown(module: TLQModule, batches: list[dict], quant: QuantArgs) -> dict:
    """Calibrate ``module`` in place on ``batches`` and return the importance shares and token-set records."""
    grab = ImportanceGrab()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[grab])
    masks = [kind_masks(b, module.adapter.image_token_id) for b in batches]
    records = CalibrationLoop(fabric, module, CalibrationSettings(quant)).run(batches)
    counts = {k: sum(int(m[k].sum()) for m in masks) for k in (*KINDS, "pre_answer")}
    n_tokens = sum(counts[k] for k in KINDS)
    out = {"token_share": {k: counts[k] / n_tokens for k in KINDS}, "tokens": counts, "modules": {}, "layers": []}
    for key, per_batch in sorted(grab.importance.items()):
        mass, tokens, samples = dict.fromkeys((*KINDS, "pre_answer"), 0.0), [], []
        for w, m in zip(per_batch, masks):
            assert w.shape[:2] == m["image"].shape, f"{key}: weights {tuple(w.shape)} vs batch {m['image'].shape}"
            score = w.double().mean(-1)  # one weight per token (mean over importance groups)
            for k in mass:
                mass[k] += float(score[m[k]].sum())
            tokens.append(score[m["image"] | m["text"] | m["answer"]])
            samples.append((score * (m["image"] | m["text"] | m["answer"])).sum(1))
        total = sum(mass[k] for k in KINDS)
        shares = {k: v / total for k, v in mass.items()}
        tokens, samples = torch.cat(tokens).sort(descending=True)[0], torch.cat(samples).sort(descending=True)[0]
        shares["top1pct"] = float(tokens[: max(1, len(tokens) // 100)].sum()) / total  # mass on the top 1% tokens
        shares["half_samples"] = (int((samples.cumsum(0) < total / 2).sum()) + 1) / len(samples)  # hold half of it
        out["modules"].setdefault(key.stage, {})[key.module] = shares
    for r in records:
        mods = {n: {k: v for k, v in rec.items() if k != "seconds"} for n, rec in r["modules"].items()}
        out["layers"].append({k: v for k, v in r.items() if k not in ("modules", "seconds")} | {"modules": mods})
    return out


def markdown(result: dict) -> str:
    share, mods = result["token_share"], result["modules"]
    lines = [f"Tokens: {result['tokens']} (shares " + ", ".join(f"{k} {share[k]:.3f}" for k in KINDS) + ")", ""]
    lines += ["| layer | image mass | text mass | answer mass | lowest-image module (img/text/ans) | "
              "highest-image module (img/text/ans) |", "|---|---|---|---|---|---|"]  # fmt: skip
    fmt = "/".join(["{:.3f}"] * 3)
    for i, rows in mods.items():
        mean = {k: sum(s[k] for s in rows.values()) / len(rows) for k in KINDS}
        lo, hi = (f(rows, key=lambda n, rows=rows: rows[n]["image"]) for f in (min, max))
        lines.append(f"| {i} | " + " | ".join(f"{mean[k]:.3f}" for k in KINDS)
                     + f" | {lo} {fmt.format(*(rows[lo][k] for k in KINDS))}"
                     + f" | {hi} {fmt.format(*(rows[hi][k] for k in KINDS))} |")  # fmt: skip
    lines += ["", "Per module kind, mean over layers: mass share (mass share / token share); pre-answer: share of "
              "the mass on the text positions just before an answer label (part of text); top 1%: share on the top "
              "1% of tokens; half-mass samples: share of samples holding half the mass:", "",
              "| module | image | text | answer | pre-answer | top 1% | half-mass samples |",
              "|---" * 7 + "|"]  # fmt: skip
    for name in sorted({n for rows in mods.values() for n in rows}):
        rows = [layer[name] for layer in mods.values() if name in layer]
        mean = {k: sum(s[k] for s in rows) / len(rows) for k in rows[0]}
        cells = [f"{mean[k]:.3f} ({mean[k] / share[k]:.2f}x)" for k in KINDS]
        cells += [f"{mean[k]:.3f}" for k in ("pre_answer", "top1pct", "half_samples")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| layer | tokens | kept | kept % | kept by mass | mass covered | kept img/non-img/ans | "
              "module tokens (min-max) | rel_error (mean) | weighted rel_error (mean) |",
              "|---" * 10 + "|"]  # fmt: skip
    for r in result["layers"]:
        kept, share_k, mods_r = r.get("tokens_kept", r["tokens_total"]), r.get("kept_share", {}), r["modules"]
        tok = [m.get("tokens", 0) for m in mods_r.values()]
        errs = [_mean([m.get(e) for m in mods_r.values()]) for e in ("rel_error", "weighted_rel_error")]
        lines.append(f"| {r['index']} | {r['tokens_total']} | {kept} | {100 * kept / r['tokens_total']:.1f} | "
                     f"{r.get('tokens_by_mass', '-')} | {r.get('mass_covered', float('nan')):.3f} | "
                     + "/".join(f"{share_k.get(k, float('nan')):.3f}" for k in ("vision", "text", "answer"))
                     + f" | {min(tok)}-{max(tok)} | " + " | ".join(f"{e:.4g}" for e in errs) + " |")  # fmt: skip
    return "\n".join(lines)


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def load(path: str, num_samples: int, batch_size: int, seed: int) -> tuple[TLQModule, list[dict]]:
    """The checkpoint and its task's calibration batches, built as ``lightning-tlq calibrate`` builds them."""
    module = TLQModule(path, dtype="float32")
    module.configure_model()
    data = DataArgs(num_samples=num_samples, batch_size=batch_size, seed=seed)
    samples = load_samples(data, model_task(module.model.config))
    encoded = encode_samples(module.processor, samples, resolve_max_length(None, model_max_length(module.model)))
    return module, rank_batches(encoded, batch_size, module.adapter.pad_token_id)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hard-llava")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the full result (per module shares, layer records) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    module, batches = load(args.model, args.samples, args.batch_size, args.seed)
    result = breakdown(module, batches, QuantArgs(method="tlq", bits=args.bits, group_size=args.group_size))
    result["args"] = vars(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
