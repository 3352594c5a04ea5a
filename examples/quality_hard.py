"""The quality table of the hard-scenes benchmark models: methods x settings x seeds, several calibrations at once.

    PYTHONPATH=$PWD python examples/quality_hard.py --models llava=ckpt/hard-llava qwen2_vl=ckpt/hard-qwen2_vl \
        --workers 8 --max-seconds 280 --json out/quality.json --md out/quality.md
    python examples/quality_hard.py --smoke --json /tmp/q.json --md /tmp/q.md       # CPU: tiny random models

Each cell is a real ``lightning_tlq.calibrate`` call (calibration split of the task, ``--calib-n`` samples, the
cell's seed for data and token sets; output written and reloaded), then the harness on the first ``--test-n``
samples of the test split of the task variant the model was trained on (``config.tlq_task``): teacher-forced exact
match (equal to greedy: word-level tokenizer), answer NLL and KL to the FP model's logits (computed once per model
by the first worker that needs them, shared through a file). Cells run in priority order on ``--workers`` processes
side by side (the GPU when present): FP and rtn/gptq/tlq at W3A16 and W2A16, then W4A16 and W4A8, then the other
methods of ``--methods`` (in the order given), then the other seeds. Each finished cell is appended to
``<json>.jsonl`` and the JSON and Markdown are rewritten, so a run cut short keeps what it finished; no cell starts
after ``--max-seconds``. The JSON holds, per cell, the per-item correctness (hex bits) behind the paired bootstrap
95% intervals of TLQ minus GPTQ over test items (items averaged over the seeds both share): in exact match, and in
the share of items whose correctness differs from the FP model's ("changed vs FP": answers lost plus answers gained,
the damage exact match hides when both are equal).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

SETTINGS = {"W3A16 g128": (3, 128, None), "W2A16 g64": (2, 64, None), "W4A16 g128": (4, 128, None),
            "W4A8 g128": (4, 128, 8), "W3A16 g64": (3, 64, None)}  # fmt: skip  # (bits, group, act_bits), by priority
CORE = ("rtn", "gptq", "tlq")
METHODS = ("rtn", "gptq", "tlq", "gptq_fp", "tlq_fp", "awq", "mbq", "smoothquant")  # *_fp: quant.target = fp


def plan(models: list[str], methods: list[str], settings: list[str], seeds: list[int]) -> list[dict]:
    """Every cell, most important first (see the module docstring)."""
    cells = []
    for si, seed in enumerate(seeds):
        for mi, method in enumerate(methods):
            for ti, setting in enumerate(settings):
                base = method.split("@")[0]  # a variant's method
                if base == "smoothquant" and SETTINGS[setting][2] is None:
                    continue  # smoothquant needs activation quantization
                if base == "rtn" and si > 0:
                    continue  # deterministic: one run
                for di, model in enumerate(models):
                    core = method in CORE
                    order = (si, not core, ti if core else mi, mi if core else ti, di)
                    cells.append((order, {"model": model, "method": method, "setting": setting, "seed": seed}))
    return [c for _, c in sorted(cells, key=lambda x: x[0])]


def ablation(spec: str) -> str:
    """``"floor=0.5,keep_mass=0.9"`` -> the TLQ variant's method name ``"tlq@floor=0.5,keep_mass=0.9"``; a spec
    naming its method (``"rtn@vision=true"``) is that method's variant. Checked."""
    from lightning_tlq.config import ImportanceArgs, QuantArgs, TokenSetArgs

    method, at, overrides = spec.partition("@")
    if not at:
        method, overrides = "tlq", spec
    if method not in METHODS:
        raise SystemExit(f"--ablations {spec!r}: {method!r} is not one of {', '.join(METHODS)}")
    _overrides(overrides, QuantArgs, ImportanceArgs, TokenSetArgs)
    return f"{method}@{overrides}"


def _overrides(spec: str, *classes) -> list[dict]:
    """Per class, the ``key=value`` items of ``spec`` that name one of its fields (values typed by the default)."""
    out: list[dict] = [{} for _ in classes]
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        owner = next((i for i, c in enumerate(classes) if key in c.__dataclass_fields__), None)
        if not sep or owner is None:
            raise SystemExit(f"--ablations {spec!r}: {item!r} is not key=value of quant.*, importance.* or token_set.*")
        default = classes[owner].__dataclass_fields__[key].default
        if isinstance(default, bool):
            if value not in ("true", "false"):
                raise SystemExit(f"--ablations {spec!r}: {key} takes true or false, got {value!r}")
            out[owner][key] = value == "true"
        else:
            out[owner][key] = type(default)(value) if isinstance(default, (int, float)) else value
    return out


def _quant_args(cell: dict, calib_n: int):
    from lightning_tlq.config import DataArgs, ImportanceArgs, QuantArgs, TokenSetArgs

    bits, group, act = SETTINGS[cell["setting"]]
    name, _, spec = cell["method"].partition("@")  # tlq@floor=0.5: a TLQ ablation
    method, _, target = name.partition("_")
    quant_kw, importance, token_set = _overrides(spec, QuantArgs, ImportanceArgs, TokenSetArgs)
    quant = QuantArgs(
        **{"method": method, "bits": bits, "group_size": group, "act_bits": act, "target": target or "quantized",
           **quant_kw}
    )  # fmt: skip
    data = DataArgs(num_samples=calib_n, batch_size=8, seed=cell["seed"], split="calibration")
    return data, quant, ImportanceArgs(**importance), TokenSetArgs(**{"seed": cell["seed"], **token_set})


def _summary(metrics: dict) -> dict:
    correct = [bool(r["correct"]) for r in metrics["examples"]]
    bits = int("".join("1" if c else "0" for c in correct) or "0", 2)
    return {"exact_match": metrics["exact_match"], "nll": metrics["nll"], "kl": metrics.get("kl_to_reference"),
            "per_type": {k: v["exact_match"] for k, v in metrics["per_type"].items()},
            "n": len(correct), "correct_hex": format(bits, "x")}  # fmt: skip


def _worker(rank: int, opts: dict, tasks, results) -> None:
    """Take cells from ``tasks`` until None or the deadline; report every FP reference and every cell."""
    import torch
    import transformers

    from lightning_tlq.calibrate import calibrate
    from lightning_tlq.data import Sample
    from lightning_tlq.harness import evaluate_model, load_module, reference_logits
    from lightning_tlq.models.scenes import model_task
    from lightning_tlq.models.scenes_hard import HardEncoder
    from lightning_tlq.tasks import scenes_hard

    torch.set_num_threads(opts["threads"])
    device = "cuda" if torch.cuda.is_available() and not opts["cpu"] else "cpu"
    tests: dict[str, tuple] = {}

    def test_set(name: str) -> tuple:
        """The first ``test_n`` test examples of the task variant ``name``'s model was trained on, and as samples."""
        if name not in tests:
            task = model_task(transformers.AutoConfig.from_pretrained(opts["models"][name])) or "scenes_hard"
            examples = scenes_hard.take("test", opts["test_n"], kinds=scenes_hard.variant_kinds(task))
            tests[name] = examples, [Sample(e.pil(), e.question, e.answer, e.kind) for e in examples]
        return tests[name]

    eval_kw = {"batch_size": opts["batch_size"], "exact_match": "teacher_forced", "num_examples": None}
    fp: dict[str, tuple] = {}
    scratch = Path(tempfile.mkdtemp(prefix=f"tlq_hard_{rank}_"))

    def reference(name: str) -> tuple:
        """The FP model's encodings and logits: computed by the first worker that needs them, shared by file."""
        if name in fp:
            return fp[name]
        cache = Path(opts["fp_dir"]) / f"{name}.pt"
        try:
            os.close(os.open(cache.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another worker computes it: wait (its failure or the deadline ends the wait)
            while not cache.exists() and not cache.with_suffix(".failed").exists() and time.time() < opts["deadline"]:
                time.sleep(0.2)
            if cache.exists():
                fp[name] = torch.load(cache, weights_only=False)
                return fp[name]
        start = time.perf_counter()
        examples, samples = test_set(name)
        try:
            module = load_module(opts["models"][name], device=device)
            encoded = HardEncoder(module.processor, module.model.config.model_type).items(examples)
            ref = reference_logits(module, samples, encoded=encoded, batch_size=opts["batch_size"])
            metrics = evaluate_model(module, samples, encoded=encoded, **eval_kw)
        except Exception:
            cache.with_suffix(".failed").touch()
            raise
        fp[name] = (encoded, ref)
        torch.save(fp[name], cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
        results.put({"fp": name, **_summary(metrics), "eval_s": time.perf_counter() - start, "worker": rank})
        return fp[name]

    try:
        while time.time() < opts["deadline"]:
            cell = tasks.get()
            if cell is None:
                break
            path = opts["models"][cell["model"]]
            try:
                data, quant, importance, token_set = _quant_args(cell, opts["calib_n"])
                out, start = scratch / "out", time.perf_counter()
                calibrate(path, data, quant, importance, token_set, output_dir=str(out), overwrite=True,
                          checkpoint=False, accelerator=device, metrics=False, seed=cell["seed"],
                          quiet=True)  # fmt: skip
                calib_s = time.perf_counter() - start
                encoded, ref = reference(cell["model"])  # after the calibration: a wait for it overlaps that
                start = time.perf_counter()
                module = load_module(str(out), device=device)
                metrics = evaluate_model(module, test_set(cell["model"])[1], encoded=encoded, reference=ref, **eval_kw)
                del module
                shutil.rmtree(out, ignore_errors=True)
                record = {**cell, **_summary(metrics), "calibration_s": calib_s, "eval_s": time.perf_counter() - start}
                results.put({**record, "worker": rank})
            except Exception as err:  # report and go on: one bad cell must not stop the table
                results.put({**cell, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        results.put({"done": rank})


# ------------------------------------------------------------------------------------------------ report
def _bits(record: dict) -> np.ndarray:
    n = record["n"]
    return np.array([c == "1" for c in format(int(record["correct_hex"], 16), f"0{n}b")], dtype=float)


def changed(cell: dict, fp: dict) -> np.ndarray:
    """Per test item, 1 where the cell's correctness differs from the FP model's (an answer lost or gained)."""
    return (_bits(cell) != _bits(fp)).astype(float)


def bootstrap(cells: list[dict], resamples: int = 2000, seed: int = 0, fp: dict | None = None) -> dict:
    """Per (model, setting): TLQ minus GPTQ exact match, items averaged over shared seeds, paired bootstrap 95%;
    TLQ variants (``tlq@X``) against GPTQ's same variant ``gptq@X`` where it ran, else against GPTQ, keyed
    ``"<model> | <setting> | <variant>"``. With the FP records (``fp``: model -> record) also TLQ minus GPTQ in the
    share of items whose correctness differs from FP (``changed``, ``changed_lo``, ``changed_hi``): damage that
    exact match hides when answers are lost and gained in equal numbers."""
    by = {}
    for c in cells:
        if c["method"].partition("@")[0] in ("gptq", "tlq"):
            by.setdefault((c["model"], c["setting"]), {}).setdefault(c["method"], {})[c["seed"]] = c
    out, rng = {}, np.random.default_rng(seed)
    for (model, setting), m in by.items():
        for variant in sorted(v for v in m if v.startswith("tlq")):
            spec = variant.partition("@")[2]
            base = f"gptq@{spec}" if f"gptq@{spec}" in m else "gptq"  # tlq@X against gptq@X where it ran
            seeds = sorted(set(m[variant]) & set(m.get(base, {})))
            if not seeds:
                continue
            n = m[variant][seeds[0]]["n"]
            idx = rng.integers(0, n, size=(resamples, n))

            def interval(per_item) -> tuple[float, float, float]:
                """Mean over items of ``per_item(variant) - per_item(base)`` (seeds averaged) and its 95% interval."""
                diff = np.mean([per_item(m[variant][s]) - per_item(m[base][s]) for s in seeds], axis=0)
                lo, hi = np.percentile(diff[idx].mean(1), [2.5, 97.5])
                return float(diff.mean()), float(lo), float(hi)

            key = (
                f"{model} | {setting}"
                + ("" if variant == "tlq" else f" | {variant}")
                + ("" if base == "gptq" else f" (vs {base})")
            )
            out[key] = dict(zip(("diff", "lo", "hi"), interval(_bits)), seeds=seeds)
            if fp and model in fp and fp[model]["n"] == n:
                fp_bits = _bits(fp[model])  # decoded once, not per cell
                values = interval(lambda cell: (_bits(cell) != fp_bits).astype(float))
                out[key].update(zip(("changed", "changed_lo", "changed_hi"), values))
    return out


def _fmt(values: list[float], scale: float, digits: int) -> str:
    v = np.array(values) * scale
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def markdown(state: dict) -> str:
    lines = [f"Hard-scenes quality table ({state['status']}; {len(state['cells'])} cells, {state['test_n']} test "
             f"items, device {state['device']}, {state['elapsed_s']:.0f} s)", ""]  # fmt: skip
    head = (
        "| model | setting | method | seeds | exact match (%) | retained (%) | changed vs FP (%) | answer NLL | "
        "KL (x1e-3) | calib (s) |"
    )
    lines += [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for model, fp in state["fp"].items():
        lines.append(f"| {model} | - | FP | - | {100 * fp['exact_match']:.2f} | 100 | 0 | {fp['nll']:.4f} | 0 | - |")
        for setting in SETTINGS:
            for method in dict.fromkeys([*METHODS, *(c["method"] for c in state["cells"])]):
                g = [c for c in state["cells"] if (c["model"], c["setting"], c["method"]) == (model, setting, method)]
                if g:
                    acc = [c["exact_match"] for c in g]
                    lines.append(f"| {model} | {setting} | {method} | {len(g)} | {_fmt(acc, 100, 2)} | "
                                 f"{_fmt([a / max(fp['exact_match'], 1e-9) for a in acc], 100, 1)} | "
                                 f"{_fmt([changed(c, fp).mean() for c in g], 100, 2)} | "
                                 f"{_fmt([c['nll'] for c in g], 1, 4)} | {_fmt([c['kl'] for c in g], 1e3, 2)} | "
                                 f"{_fmt([c['calibration_s'] for c in g], 1, 1)} |")  # fmt: skip
    lines += ["", "TLQ - GPTQ exact match (points), paired bootstrap 95% over test items:", ""]
    lines += [f"- {k}: {100 * v['diff']:+.2f} [{100 * v['lo']:+.2f}, {100 * v['hi']:+.2f}] (seeds {v['seeds']})"
              for k, v in state["bootstrap"].items()]  # fmt: skip
    lines += ["", "TLQ - GPTQ share of items whose correctness differs from FP (points, lower is better):", ""]
    lines += [f"- {k}: {100 * v['changed']:+.2f} [{100 * v['changed_lo']:+.2f}, {100 * v['changed_hi']:+.2f}]"
              for k, v in state["bootstrap"].items() if "changed" in v]  # fmt: skip
    lines += per_kind(state)
    lines += [f"- error: {e['model']} {e['setting']} {e['method']} seed {e['seed']}: {e['error']}"
              for e in state["errors"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def per_kind(state: dict) -> list[str]:
    """Markdown lines: exact match (%) per question kind, FP and each (setting, method) averaged over its seeds."""
    lines = []
    for model, fp in state["fp"].items():
        kinds = sorted(fp.get("per_type", {}))
        if not kinds:
            continue
        lines += ["", f"Exact match per kind (%), {model}:", "", "| setting | method | " + " | ".join(kinds) + " |",
                  "|---|---|" + "---|" * len(kinds), "| - | FP | " + " | ".join(
                      f"{100 * fp['per_type'][k]:.1f}" for k in kinds) + " |"]  # fmt: skip
        groups: dict[tuple, list] = {}
        for c in state["cells"]:
            if c["model"] == model:
                groups.setdefault((c["setting"], c["method"]), []).append(c)
        order = list(dict.fromkeys([*METHODS, *(c["method"] for c in state["cells"])]))
        for (setting, method), g in sorted(groups.items(), key=lambda kv: (list(SETTINGS).index(kv[0][0]),
                                                                           order.index(kv[0][1]))):  # fmt: skip
            means = [100 * float(np.mean([c["per_type"][k] for c in g])) for k in kinds]
            lines.append(f"| {setting} | {method} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    return lines


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run(args: argparse.Namespace) -> dict:
    import multiprocessing as mp

    import torch

    start = time.time()
    models = dict(m.split("=", 1) for m in args.models)
    cells = plan(list(models), args.methods + [ablation(a) for a in args.ablations], args.settings, args.seeds)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for cell in cells:
        tasks.put(cell)
    for _ in range(args.workers):
        tasks.put(None)
    opts = {"models": models, "test_n": args.test_n, "calib_n": args.calib_n, "batch_size": args.batch_size,
            "threads": max(1, (os.cpu_count() or 1) // args.workers), "cpu": args.cpu,
            "deadline": start + args.max_seconds, "fp_dir": tempfile.mkdtemp(prefix="tlq_hard_fp_")}  # fmt: skip
    procs = [ctx.Process(target=_worker, args=(r, opts, tasks, results), daemon=True) for r in range(args.workers)]
    for p in procs:
        p.start()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    state = {"status": "running", "device": device, "test_n": args.test_n, "calib_n": args.calib_n,
             "planned": len(cells), "fp": {}, "cells": [], "errors": [], "bootstrap": {}, "elapsed_s": 0.0,
             "args": vars(args)}  # fmt: skip
    json_path, runs = Path(args.json), Path(args.json).with_suffix(".jsonl")
    done, hard_deadline = 0, start + args.max_seconds + args.grace
    while done < args.workers and time.time() < hard_deadline:
        try:
            r = results.get(timeout=2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break  # every worker is gone (crashed without saying so)
            continue
        if "done" in r:
            done += 1
            continue
        with runs.open("a") as f:
            f.write(json.dumps(r) + "\n")
        if "fp" in r:
            state["fp"].setdefault(r["fp"], r)
        else:
            state["errors" if "error" in r else "cells"].append(r)
            what = r.get("error") or f"em {r['exact_match']:.4f} kl {r['kl']:.3g}"
            print(f"[{len(state['cells'])}/{len(cells)}] {time.time() - start:.0f}s", r["model"], r["setting"],
                  r["method"], r["seed"], what, flush=True)  # fmt: skip
        state["bootstrap"], state["elapsed_s"] = bootstrap(state["cells"], fp=state["fp"]), time.time() - start
        _write(json_path, json.dumps(state))
        _write(Path(args.md), markdown(state))
    for p in procs:
        p.terminate() if p.is_alive() else None
    shutil.rmtree(opts["fp_dir"], ignore_errors=True)
    state["status"] = "complete" if len(state["cells"]) + len(state["errors"]) == len(cells) else "partial"
    state["bootstrap"], state["elapsed_s"] = bootstrap(state["cells"], fp=state["fp"]), time.time() - start
    _write(json_path, json.dumps(state))
    _write(Path(args.md), markdown(state))
    return state


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llava=hard-llava", "qwen2_vl=hard-qwen2_vl"], help="name=path")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="in priority order")
    p.add_argument("--ablations", nargs="*", default=[], help="variants after the methods: TLQ's, e.g. floor=0.5 "
                   "mode=modality keep_mass=0.9,p_rest=0.2, or any method's, e.g. gptq@vision=true "
                   "(quant.* / importance.* / token_set.* fields)")  # fmt: skip
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--test-n", type=int, default=2000)
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=280.0, help="no cell starts after this")
    p.add_argument("--grace", type=float, default=40.0, help="then wait this long for running cells")
    p.add_argument("--json", default="quality_hard.json")
    p.add_argument("--md", default="quality_hard.md")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny random models, 2 workers, few items (CPU check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.test_n, args.calib_n, args.batch_size, args.workers, args.cpu = 16, 8, 8, 2, True
    return args


def smoke_models(root: Path) -> list[str]:
    """Save a tiny random benchmark model of each family under ``root`` (for ``--smoke``)."""
    from lightning_tlq.models.scenes_hard import SMOKE_SHAPE, build_hard_model

    out = []
    for family in ("llava", "qwen2_vl"):
        model, processor = build_hard_model(family, SMOKE_SHAPE)
        model.to(__import__("torch").bfloat16).save_pretrained(root / family)
        processor.save_pretrained(root / family)
        out.append(f"{family}={root / family}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    a = parse()
    if a.smoke and a.models == parse([]).models:
        a.models = smoke_models(Path(tempfile.mkdtemp(prefix="tlq_hard_smoke_")))
    run(a)
