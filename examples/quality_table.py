"""The quality table of docs/quality.md: every method x setting x calibration seed on the embedded scenes-llava.

Each run is a real ``lightning_tlq.calibrate`` call (the path ``lightning-tlq calibrate`` takes: calibration split
of the scenes task, ``--data.seed`` / ``--token_set.seed`` = the run's seed, output written and reloaded) followed
by the evaluation harness on the fixed test split, against the full-precision model's logits computed once:

    HF_HUB_OFFLINE=1 python examples/quality_table.py --runs docs/quality_runs.jsonl            # all runs
    HF_HUB_OFFLINE=1 python examples/quality_table.py --runs docs/quality_runs.jsonl --report   # the tables

Finished runs are appended to ``--runs`` (one JSON line each) and skipped when the command is started again, so an
interrupted table resumes. ``--report`` prints the Markdown tables (mean and std over seeds) from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

SETTINGS = {  # name: (bits, group_size, act_bits)
    "W4A16 g128": (4, 128, None),
    "W3A16 g128": (3, 128, None),
    "W2A16 g64": (2, 64, None),
    "W4A8 g128": (4, 128, 8),
}
EXACT_MATCH = "teacher_forced"  # equals greedy exact match for the scenes model's word-level tokenizer (tested)
METHODS = ("rtn", "gptq", "awq", "smoothquant", "mbq", "tlq")
ABLATION_SETTINGS = ("W3A16 g128", "W2A16 g64")
ABLATIONS = {  # name: TLQ overrides (section -> field -> value); "default" is the main table's tlq run
    "score=grad_abs": {"importance": {"score": "grad_abs"}},
    "score=taylor": {"importance": {"score": "taylor"}},
    "floor=0": {"importance": {"floor": 0.0}},
    "floor=0.5": {"importance": {"floor": 0.5}},
    "keep_mass=0.9": {"token_set": {"keep_mass": 0.9}},
    "keep_mass=1 (all tokens)": {"token_set": {"keep_mass": 1.0}},
    "groups=4": {"importance": {"groups": 4}},
    "target=fp": {"quant": {"target": "fp"}},
    "granularity=input": {"importance": {"granularity": "input"}},
}


def applicable(method: str, setting: str) -> bool:
    act = SETTINGS[setting][2]
    return act is not None if method == "smoothquant" else True


def planned(seeds: list[int], ablations: bool) -> list[dict]:
    runs = []
    for setting in SETTINGS:
        for method in METHODS:
            if applicable(method, setting):
                for seed in [seeds[0]] if method == "rtn" else seeds:  # rtn uses no calibration data
                    runs.append({"method": method, "setting": setting, "variant": "default", "seed": seed})
    if ablations:
        for setting in ABLATION_SETTINGS:
            for variant in ABLATIONS:
                runs += [{"method": "tlq", "setting": setting, "variant": variant, "seed": s} for s in seeds]
    return runs


def key(run: dict) -> tuple:
    return run["method"], run["setting"], run["variant"], run["seed"]


def _args(run: dict, calib_n: int):
    from lightning_tlq.config import DataArgs, ImportanceArgs, QuantArgs, TokenSetArgs

    bits, group, act = SETTINGS[run["setting"]]
    sections = {"quant": {"method": run["method"], "bits": bits, "group_size": group, "act_bits": act},
                "importance": {}, "token_set": {"seed": run["seed"]}}  # fmt: skip
    for section, values in ABLATIONS.get(run["variant"], {}).items():
        sections[section].update(values)
    data = DataArgs(num_samples=calib_n, batch_size=8, seed=run["seed"], split="calibration")
    return (
        data,
        QuantArgs(**sections["quant"]),
        ImportanceArgs(**sections["importance"]),
        TokenSetArgs(**sections["token_set"]),
    )


def run_all(args: argparse.Namespace) -> None:
    import torch

    from lightning_tlq.calibrate import calibrate
    from lightning_tlq.config import DataArgs
    from lightning_tlq.datamodule import load_samples
    from lightning_tlq.harness import evaluate_model, load_module, reference_logits

    torch.set_num_threads(args.threads)
    runs_path = Path(args.runs)
    done = set()
    if runs_path.exists():
        done = {key(json.loads(line)) for line in runs_path.read_text().splitlines() if line.strip()}
    todo = [r for r in planned(args.seeds, not args.no_ablations) if key(r) not in done]
    if args.only:
        todo = [r for r in todo if r["method"] in args.only]
    if args.variants:
        todo = [r for r in todo if r["variant"] in args.variants]
    if args.settings:
        todo = [r for r in todo if r["setting"] in args.settings]
    print(f"{len(done)} runs done, {len(todo)} to go", flush=True)
    samples = load_samples(DataArgs(num_samples=args.test_n, split="test"), "scenes")
    fp = load_module(args.model)
    encoded = _encode(fp, samples)
    reference = reference_logits(fp, samples, encoded=encoded, batch_size=args.batch_size)
    fp_metrics = evaluate_model(fp, samples, encoded=encoded, reference=reference, batch_size=args.batch_size,
                                exact_match=EXACT_MATCH)  # fmt: skip
    fp_greedy = evaluate_model(fp, samples, encoded=encoded, batch_size=args.batch_size)  # the same number, generated
    header = {"fp": _summary(fp_metrics), "fp_greedy_exact_match": fp_greedy["exact_match"],
              "test_n": args.test_n, "calib_n": args.calib_n, "model": args.model,
              "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    (runs_path.parent / (runs_path.stem + "_fp.json")).write_text(json.dumps(header, indent=1))
    print("fp", json.dumps(header["fp"]), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="tlq_quality_"))
    try:
        for i, run in enumerate(todo):
            data, quant, importance, token_set = _args(run, args.calib_n)
            out = scratch / "out"
            start = time.perf_counter()
            report = calibrate(
                args.model, data, quant, importance, token_set, output_dir=str(out), overwrite=True,
                checkpoint=False, accelerator="cpu", metrics=False, seed=run["seed"], quiet=True,
            )  # fmt: skip
            calib_s = time.perf_counter() - start
            metrics = evaluate_model(load_module(str(out)), samples, encoded=encoded, reference=reference,
                                     batch_size=args.batch_size, exact_match=EXACT_MATCH)  # fmt: skip
            record = {**run, **_summary(metrics), "calibration_s": calib_s,
                      "settings": {"quant": asdict(quant), "importance": asdict(importance),
                                   "token_set": asdict(token_set), "data": asdict(data)}}  # fmt: skip
            record["loop_seconds"] = report["seconds"]
            with runs_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[{i + 1}/{len(todo)}] {run} acc {record['exact_match']:.4f} kl {record['kl']:.4g} "
                  f"calib {calib_s:.1f}s", flush=True)  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _encode(module, samples):
    from lightning_tlq.data import encode_sample

    return [encode_sample(module.processor, s) for s in samples]


def _summary(metrics: dict) -> dict:
    return {"exact_match": metrics["exact_match"], "nll": metrics["nll"], "kl": metrics.get("kl_to_reference"),
            "per_type": {k: v["exact_match"] for k, v in metrics["per_type"].items()}}  # fmt: skip


# ------------------------------------------------------------------------------------------------ report
def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


_HEADER = (
    "| setting | {name} | seeds | exact match (%) | retained (%) | answer NLL | KL to FP (x1e-3) | calibration (s) |\n"
    "|---|---|---|---|---|---|---|---|"
)


def report(args: argparse.Namespace) -> None:
    runs_path = Path(args.runs)
    rows = [json.loads(line) for line in runs_path.read_text().splitlines() if line.strip()]
    fp = json.loads((runs_path.parent / (runs_path.stem + "_fp.json")).read_text())
    fp_acc = fp["fp"]["exact_match"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"], r["variant"]), []).append(r)
    print(f"FP (bf16 weights, fp32 compute): exact match {100 * fp_acc:.2f}%, answer NLL {fp['fp']['nll']:.4f}\n")
    print(_HEADER.format(name="method"))
    for setting in SETTINGS:
        for method in METHODS:
            g = groups.get((setting, method, "default"))
            if g:
                print(_row(setting, method, g, fp_acc))
    print("\nTLQ ablations (one change each from the defaults):\n")
    print(_HEADER.format(name="variant"))
    for setting in ABLATION_SETTINGS:
        for variant in ["default", *ABLATIONS]:
            g = groups.get((setting, "tlq", variant))
            if g:
                print(_row(setting, variant, g, fp_acc))
    print("\nPer question type, exact match (%), mean over seeds:\n")
    kinds = sorted(fp["fp"]["per_type"])
    print("| setting | method | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    print("| - | FP | " + " | ".join(f"{100 * fp['fp']['per_type'][k]:.1f}" for k in kinds) + " |")
    for setting in SETTINGS:
        for method in METHODS:
            g = groups.get((setting, method, "default"))
            if g:
                cells = [f"{100 * statistics.mean(r['per_type'][k] for r in g):.1f}" for k in kinds]
                print(f"| {setting} | {method} | " + " | ".join(cells) + " |")


def _row(setting: str, name: str, g: list[dict], fp_acc: float) -> str:
    acc = [r["exact_match"] for r in g]
    cells = [setting, name, str(len(g)), _ms(acc, 100), _ms([a / fp_acc for a in acc], 100, 1),
             _ms([r["nll"] for r in g], 1, 4), _ms([r["kl"] for r in g], 1e3, 2),
             _ms([r["calibration_s"] for r in g], 1, 1)]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="docs/quality_runs.jsonl")
    p.add_argument("--report", action="store_true", help="print the tables from --runs and exit")
    p.add_argument("--model", default="scenes-llava")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib-n", type=int, default=128, help="calibration samples per run")
    p.add_argument("--test-n", type=int, default=1200, help="first N samples of the test split")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="run only these methods")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--variants", nargs="*", default=None, help="run only these variants (default, granularity=input..)")
    p.add_argument("--settings", nargs="*", default=None, help="run only these settings (e.g. 'W2A16 g64')")
    return p.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = parse()
    report(a) if a.report else run_all(a)
