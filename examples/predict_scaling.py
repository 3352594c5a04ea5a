"""Predict multi-GPU wall time from a 1-GPU run of ``examples/benchmark_speed.py`` (a prediction, not a measurement).

Reads one JSON line the benchmark wrote (phase seconds of rank 0, per-module solve seconds) and prices N ranks for
two schedules of the solves: ``today`` (whole parts, owners by ``d_in^3`` per factor: the schedule before rowsplit)
and ``rowsplit`` (the plan of ``lightning_tlq/rowsplit.py``: whole parts packed by cost, a lone dominant module's
rows split over every rank). ``--sharing`` says which modules share one solve statistic and so one factor and one
column loop (``lightning_tlq/shared_stats.py``): ``module`` none (tlq's default ``importance.granularity=module``),
``input`` q/k/v and gate/up (gptq; tlq with ``importance.granularity=input``). Every assumption is a flag and is
printed with the table:

- data-parallel phases (capture, importance compute, accumulate, propagate) divide by N;
- replicated on every rank: the time outside the phases (layer registration, batch moves), the token sets
  (chosen over all ranks' gathered scores), the importance pass's fixed part (layer copies, post-processing),
  and the part of the solve step the cost model does not price (results to the host, waits): every rank copies
  every module's results today;
- Hessians are reduced to their owners in float64 and results broadcast at ``--link-gbps`` (ring: (N-1)/N of the
  bytes per rank);
- the solve of a group takes the cost model's makespan (``rowsplit.SolveCost``), scaled so that N = 1 with one
  factor per module reproduces the run's modules' solve seconds (the recorded runs predate shared statistics:
  ``--sharing input`` at N = 1 is then a prediction below the measured run, by the factors, loops and Hessian
  moves it saves; the accumulate phase is the run's, its saved Hessian adds are not priced).

    python examples/predict_scaling.py docs/performance_runs_2026-12-03-redesign.jsonl --line 0 --sharing input
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from lightning_tlq.distributed import assign_owners
from lightning_tlq.rowsplit import SolveCost, part_seconds, plan_group

SHAPES = {"7b": (3584, 18944, 512, 28), "2b": (1536, 8960, 256, 28)}  # hidden, MLP, k/v width, layers


Group = tuple[list[list[list[str]]], dict[str, tuple[int, int]]]  # (parts, name -> (out, in)), as plan_group takes


def groups_of(shape: str, sharing: str = "module") -> list[Group]:
    """One decoder layer's true-sequential groups: their parts (solve units of modules sharing one factor) and
    shapes ``name -> (out, in)``."""
    d, m, kv, _ = SHAPES[shape]
    groups = [
        {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d)},
        {"self_attn.o_proj": (d, d)},
        {"mlp.gate_proj": (m, d), "mlp.up_proj": (m, d)},
        {"mlp.down_proj": (d, m)},
    ]
    return [([[list(g)]] if sharing == "input" else [[[n]] for n in g], g) for g in groups]


def today_seconds(group: Group, world: int, cost: SolveCost) -> float:
    """Owners by greedy packing of ``d_in^3`` per factor (the schedule before rowsplit), results broadcast."""
    parts, shapes = group
    owners = assign_owners([len(p) * float(shapes[p[0][0]][1]) ** 3 for p in parts], world)
    loads = [0.0] * world
    for part, r in zip(parts, owners):
        loads[r] += part_seconds(part, shapes, cost)
    return max(loads) + sum(cost.move(3 * o * i) for o, i in shapes.values())


def rowsplit_seconds(group: Group, world: int, cost: SolveCost) -> float:
    return plan_group(*group, world, cost=cost).seconds


def predict(run: dict, world: int, cost: SolveCost, args) -> dict[str, float]:
    ph, layers = run["phases_s_rank0"], SHAPES[run["shape"]][3]
    groups = groups_of(run["shape"], args.sharing)
    fixed_importance = min(args.importance_fixed_s, ph["importance"])
    other = run["wall_s"] - ph["capture"] - ph["importance"] - ph["layers"]
    layer_rest = ph["layers"] - sum(v for k, v in ph.items() if k.startswith("layers."))
    modelled_1 = layers * sum(rowsplit_seconds(g, 1, cost) for g in groups_of(run["shape"]))  # as the run solved
    measured_modules = sum(run["solve_s_by_module"].values()) - args.warmup_s
    scale = measured_modules / modelled_1  # the cost model calibrated on this run's solve seconds
    unpriced = ph["layers.solve"] - sum(run["solve_s_by_module"].values())  # results to host, waits
    h_bytes = layers * sum(8 * g[1][u[0]][1] ** 2 for g in groups for p in g[0] for u in p)  # float64 H per factor
    ring = (world - 1) / world
    out = {
        "replicated": other
        + layer_rest
        + ph["layers.token_set"]
        + ph.get("layers.reduce", 0.0)
        + fixed_importance
        + unpriced
        + args.warmup_s,
        "data-parallel": (ph["capture"] + ph["importance"] - fixed_importance + ph["layers.accumulate"]) / world
        + ph["layers.propagate"] / world,
        "reduce": ring * h_bytes / (args.link_gbps * 1e9),
    }
    for name, fn in (("today", today_seconds), ("rowsplit", rowsplit_seconds)):
        out[f"solve {name}"] = layers * sum(fn(g, world, cost) for g in groups) * scale
    for name in ("today", "rowsplit"):
        reduce = out["reduce"] if world > 1 else 0.0
        out[f"total {name}"] = out["replicated"] + out["data-parallel"] + reduce + out[f"solve {name}"]
    # not built: each result copied to the host by the rank that solved it only (the step's unpriced part split)
    out["total rowsplit, host copies split (not built)"] = out["total rowsplit"] - unpriced * (1 - 1 / world)
    widest = max(i for g in groups for _, i in g[1].values())
    out["+ widest factor over ranks (not built)"] = out["total rowsplit, host copies split (not built)"] - layers * (
        scale * cost.factor(widest) * (1 - factor_fraction(world)) - (world > 1) * 3 * cost.move(widest**2)
    )
    out["bound: all but the factor chain split"] = 0.0  # filled below
    out["factor chain"] = layers * scale * sum(max(cost.factor(i) for _, i in g[1].values()) for g in groups)
    wall_1 = run["wall_s"] - measured_modules + layers * sum(rowsplit_seconds(g, 1, cost) for g in groups) * scale
    out["bound: all but the factor chain split"] = out["factor chain"] + (wall_1 - out["factor chain"]) / world
    return out


def factor_fraction(world: int) -> float:
    """Flops-only estimate of a 2 x 2 block factor over ``world`` ranks (``n = 2h``), relative to one GPU's
    ``16 h^3 / 3``: Cholesky of the first block, of the Schur complement and the inverse of the second block stay
    serial (``h^3``); the triangular solve, the Schur update and the two off-diagonal products of the inverse
    (``4 h^3``) split by rows; the first block's inverse overlaps them."""
    return 1.0 if world == 1 else (1 + 4 / world) / (16 / 3)


def factor_sharing(shape: str, cost: SolveCost, world: int) -> str:
    """Critical-path cost of the two ways to give every rank the factor of the widest module, per layer."""
    n = max(i for g in groups_of(shape) for _, i in g[1].values())
    ring = (world - 1) / world
    bcast_h = ring * cost.move(8 * n * n)  # float64 H to every rank, then every rank factors
    bcast_u = ring * cost.move(4 * n * n)  # the leader factors, float32 U to every rank
    return (f"n = {n}, {world} ranks: after the reduce to the leader, broadcasting H (float64) costs "
            f"{1e3 * bcast_h:.1f} ms per layer, broadcasting U (float32) {1e3 * bcast_u:.1f} ms; the factor "
            f"({1e3 * cost.factor(n):.0f} ms) is on the critical path either way: rowsplit broadcasts U")  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", help="JSON lines written by examples/benchmark_speed.py --json")
    p.add_argument("--line", type=int, default=0, help="which line (a 1-GPU run)")
    p.add_argument("--link-gbps", type=float, default=150.0, help="assumed NVLink collective bandwidth, GB/s")
    p.add_argument(
        "--importance-fixed-s",
        type=float,
        default=1.0,
        help="assumed per-rank fixed part of the importance pass (layer copies, post-processing)",
    )
    p.add_argument("--warmup-s", type=float, default=0.57, help="one-time Triton compile inside the first solve")
    p.add_argument("--ranks", default="1,2,4,8")
    p.add_argument(
        "--sharing",
        choices=("module", "input"),
        default="module",
        help="modules sharing one factor: module (none: tlq's default), input (q/k/v, gate/up: gptq, tlq with "
        "importance.granularity=input)",
    )
    args = p.parse_args(argv)  # fmt: skip
    with open(args.runs) as f:
        run = json.loads(f.read().splitlines()[args.line])
    if run.get("devices", 1) != 1:
        raise SystemExit(f"{args.runs} line {args.line} is a {run['devices']}-GPU run; give a 1-GPU run.")
    cost = replace(SolveCost(), link_gbps=args.link_gbps)
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = {n: predict(run, n, cost, args) for n in ranks}
    print(f"PREDICTION from {args.runs} line {args.line}: {run['shape']} {run['method']}, {run['gpu']}, "
          f"measured 1-GPU wall {run['wall_s']:.1f} s (one factor per module); sharing: {args.sharing}")  # fmt: skip
    print(f"assumptions: link {args.link_gbps:g} GB/s (reduce + broadcast, ring), importance fixed part "
          f"{args.importance_fixed_s:g} s per rank, Triton warm-up {args.warmup_s:g} s, cost model {cost}")  # fmt: skip
    print(factor_sharing(run["shape"], cost, max(ranks)))
    keys = list(rows[ranks[0]])
    print("| seconds | " + " | ".join(f"{n} GPU" for n in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{rows[n][k]:.1f}" for n in ranks) + " |")
    for name in ("total today", "total rowsplit", "total rowsplit, host copies split (not built)",
                 "+ widest factor over ranks (not built)", "bound: all but the factor chain split"):  # fmt: skip
        base = rows[ranks[0]]["total today"]
        print(f"| speed-up, {name} | " + " | ".join(f"{base / rows[n][name]:.2f}x" for n in ranks) + " |")


if __name__ == "__main__":
    main()
