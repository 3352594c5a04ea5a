"""Wall time of the everyday commands, each a fresh process as a user runs it.

    python examples/benchmark_cli.py                      # --help, calibrate --help, evaluate (64 samples)
    python examples/benchmark_cli.py --calibrate          # + the README's main job (calibrate --overwrite true)
    python examples/benchmark_cli.py --threads 1 2 auto   # evaluate with each thread setting

Each command runs ``--repeat`` times (the minimum and all runs are reported) in a temporary directory, with
``HF_HUB_OFFLINE=1``; ``auto`` lets lightning-tlq choose the CPU thread count (:mod:`lightning_tlq.threads`), a
number sets ``OMP_NUM_THREADS``. The 1-minute load average before each run is recorded: on a shared machine it
explains most of the spread, and the CPU time (user + system of the child) is what the command would take on an
idle core. ``--json FILE`` appends one record per run (``--label`` names the code measured, e.g. before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, args: list[str], threads: str, cwd: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("OMP_NUM_THREADS", None)
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_tlq", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0,):
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {
        "command": name,
        "args": args,
        "threads": threads,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "load_1min": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", nargs="+", default=["auto"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--calibrate", action="store_true", help="also time the README's main job")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--label", default=None, help="stored in every record, e.g. the code version measured")
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        jobs = [("lightning-tlq --help", ["--help"], "auto"), ("calibrate --help", ["calibrate", "--help"], "auto")]
        for threads in args.threads:
            evaluate = ["evaluate", "--data.num_samples", str(args.samples), "--quiet", "true", "--overwrite", "true"]
            jobs.append((f"evaluate scenes-llava {args.samples} samples", evaluate, threads))
            if args.calibrate:
                jobs.append(
                    ("calibrate --overwrite true", ["calibrate", "--overwrite", "true", "--quiet", "true"], threads)
                )
        for name, argv, threads in jobs:
            runs = [run(name, argv, threads, cwd) for _ in range(args.repeat)]
            best = min(r["seconds"] for r in runs)
            loads = ", ".join(f"{r['load_1min']:.1f}" for r in runs)
            cpu = [r["cpu_seconds"] for r in runs]
            print(f"{name:<40} threads={threads:<5} min {best:7.2f} s  runs {[r['seconds'] for r in runs]}  "
                  f"CPU s {cpu}  load {loads}")  # fmt: skip
            records += [{**r, **machine, "date": time.strftime("%Y-%m-%d"), "label": args.label} for r in runs]
    if args.json is not None:
        with args.json.open("a") as file:
            for record in records:
                file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
