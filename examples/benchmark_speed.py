"""Calibration speed and memory on Qwen2-VL-shaped random-init models (no hub access needed).

Builds a Qwen2-VL with the 2B, 7B or (language sizes of Qwen2.5-VL-) 32B shapes from a config (random bf16
weights, the 7B's vision tower), a workload of N samples x (image tokens + text tokens), and runs TLQ through
:class:`lightning_tlq.CalibrationLoop` on 1..N GPUs with Fabric. Rank 0 prints (and writes with ``--json``) wall
time per phase, peak GPU memory per rank and per phase (``gpu_peak_gib_by_phase``), the host's peak resident set,
the peaks ``examples/memory_model.py`` predicts, and, from the measured per-layer costs, a 72B-shaped
**estimate** (``estimate_72b``; labelled as such).

    python examples/benchmark_speed.py --shape 7b --devices 2 --json out.json
    python examples/benchmark_speed.py --shape 7b --memory-profile low --json out.json
    python examples/benchmark_speed.py --shape 32b --layers 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from bench_probes import HostPeak, MemoryProbe, estimate, max_rss_bytes, per_layer, rss_bytes
from memory_model import predict

PROBE = MemoryProbe()  # GPU peak per phase (a Fabric callback)
SHAPES = {  # Qwen2-VL-2B / -7B language and vision sizes; "tiny" for a CPU smoke test
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "vocab_size": 151936},
    "2b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
               "num_key_value_heads": 2, "vocab_size": 151936},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "vocab_size": 152064},
    "32b": {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
               "num_key_value_heads": 8, "vocab_size": 152064},  # Qwen2.5-VL-32B's language model
}  # fmt: skip
IMAGE, VIDEO, V_START, V_END = 151655, 151656, 151652, 151653


def build_model(shape: str, layers: int | None, seed: int = 0) -> torch.nn.Module:
    """A Qwen2-VL of the given shape with random N(0, 0.02) bf16 weights, built on the CPU without slow init: the
    parameters are allocated in bf16 (no fp32 detour) and each is drawn on the GPU (if any) and copied into place,
    so the host holds the bf16 model once (32B: ~65 GB) and nothing more."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    try:  # the location moved between transformers 5.x releases
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    text = dict(SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})  # fmt: skip
    if layers:
        text["num_hidden_layers"] = layers
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": text["hidden_size"], "num_heads": 16, "mlp_ratio": 4,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=V_START, vision_end_token_id=V_END)  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate in bf16 directly (no 30 GB fp32 detour for 7B)
    try:
        with no_init_weights():
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # draw on the GPU: ~30x faster than the CPU
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02))
    return model.eval()


def build_batches(n: int, image_tokens: int, text_tokens: int, batch_size: int, ids: range, seed: int = 0):
    """Samples ``ids`` of a fixed workload: vision block + text, labels on the last 32 text tokens."""
    side = int(round((image_tokens * 4) ** 0.5))  # patches per side before the 2x2 merge
    assert side * side == image_tokens * 4, "image_tokens must be a square number times 1"
    batches = []
    ids = list(ids)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        rows, pixels = [], []
        for sid in chunk:
            gen = torch.Generator().manual_seed(seed * 100003 + sid)
            text = torch.randint(1000, 150000, (text_tokens,), generator=gen)
            rows.append(torch.cat([torch.tensor([V_START]), torch.full((image_tokens,), IMAGE),
                                   torch.tensor([V_END]), text]))  # fmt: skip
            pixels.append(torch.randn(side * side, 3 * 2 * 14 * 14, generator=gen))
        input_ids = torch.stack(rows)
        labels = torch.full_like(input_ids, -100)
        labels[:, -32:] = input_ids[:, -32:]
        batches.append({
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "mm_token_type_ids": (input_ids == IMAGE).int(), "pixel_values": torch.cat(pixels).to(torch.bfloat16),
            "image_grid_thw": torch.tensor([[1, side, side]] * len(chunk)), "sample_id": torch.tensor(chunk),
        })  # fmt: skip
    return batches


def _timed_cuda(fn, reps: int, device) -> float:
    """Mean seconds of ``fn()`` over ``reps`` runs after two warm-ups (device-synchronised)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps


def measure_ceilings(device, widths: list[int]) -> dict:
    """This GPU's rates for the kinds of work calibration does, measured now: matmuls (bf16 for layer forwards,
    TF32 for Hessians, fp32 for GPTQ's lazy updates), host<->device copies, and the inverse-Hessian factor
    (one Cholesky + one triangular inverse, the solver's own routine) at each module input width."""
    from lightning_tlq.core.factor import inverse_upper_factor as _inverse_upper_factor

    out: dict = {}
    n = 8192
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):  # fmt: skip
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            sec = _timed_cuda(lambda a=a, b=b: a @ b, 5, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        out[f"matmul_{name}_tflops"] = 2 * n**3 / sec / 1e12
        del a, b
    size = 2**30  # 1 GiB, about two 7B-shaped decoder layers
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    for kind, host in (("pageable", torch.ones(size, dtype=torch.uint8)),
                       ("pinned", torch.ones(size, dtype=torch.uint8).pin_memory())):  # fmt: skip
        h2d = _timed_cuda(lambda d=dev, h=host: d.copy_(h, non_blocking=True), 3, device)
        d2h = _timed_cuda(lambda d=dev, h=host: h.copy_(d, non_blocking=True), 3, device)
        out[f"h2d_{kind}_gbps"], out[f"d2h_{kind}_gbps"] = size / h2d / 1e9, size / d2h / 1e9
    del dev
    for w in sorted(set(widths)):
        x = torch.randn(w, 2 * w, device=device)
        h = x @ x.T / (2 * w) + torch.eye(w, device=device)
        out[f"factor_s_{w}"] = _timed_cuda(lambda h=h: _inverse_upper_factor(h), 3, device)
        del x, h
    torch.cuda.empty_cache()
    return out


def floor_seconds(model, records: list[dict], tokens: int, samples: int, seq: int, ceilings: dict) -> dict:
    """The least time the same work takes at the measured ceilings, per phase (no overlap assumed between phases,
    perfect overlap of copies with compute, so ``transfers`` is listed apart and not added to ``total``).

    Work counted per decoder layer, with T = all calibration tokens: the importance pass (forward, recomputed
    forward, input-gradient backward: 3 forwards), the statistics passes (each true-sequential group's forward
    stops after its modules: 4 x qkv + 3 x (attention + o) + 2 x (gate + up) + down), one TF32 Hessian ``X^T W X``
    per distinct statistic over its kept tokens and one inverse factor per distinct statistic (measured at that
    width): modules solved together on one Hessian (the record's ``shared``: q/k/v and gate/up under gptq or
    ``importance.granularity=input``) count once; plus GPTQ's fp32 lazy updates (``out x in^2`` multiply-adds) per
    module, one propagation forward, and the weights copied 3 times to the device and once back.
    """
    layers = model.model.language_model.layers
    tf = 1e12
    out = {"importance": 0.0, "accumulate": 0.0, "solve": 0.0, "propagate": 0.0, "transfers": 0.0}
    for layer, record in zip(layers, records):
        lin = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        flops = {n: 2 * m.in_features * m.out_features * tokens for n, m in lin.items()}
        qkv = sum(v for n, v in flops.items() if n.endswith(("q_proj", "k_proj", "v_proj")))
        attn = 2 * samples * seq * seq * layer.self_attn.config.hidden_size  # causal: half of 4 S^2 d
        o = sum(v for n, v in flops.items() if n.endswith("o_proj"))
        gate_up = sum(v for n, v in flops.items() if n.endswith(("gate_proj", "up_proj")))
        down = sum(v for n, v in flops.items() if n.endswith("down_proj"))
        forward = (qkv + attn + o + gate_up + down) / (ceilings["matmul_bf16_tflops"] * tf)
        out["importance"] += 3 * forward
        stats = (4 * qkv + 3 * (attn + o) + 2 * gate_up + down) / (ceilings["matmul_bf16_tflops"] * tf)
        for n, m in lin.items():
            kept, shared = record["modules"][n]["tokens"], record["modules"][n].get("shared") or 1
            stats += 2 * m.in_features**2 * kept / (ceilings["matmul_tf32_tflops"] * tf) / shared
            out["solve"] += ceilings[f"factor_s_{m.in_features}"] / shared
            out["solve"] += 2 * m.out_features * m.in_features**2 / 2 / (ceilings["matmul_fp32_tflops"] * tf)
        out["accumulate"] += stats
        out["propagate"] += forward
        nbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        out["transfers"] += nbytes * (3 / ceilings["h2d_pinned_gbps"] + 1 / ceilings["d2h_pinned_gbps"]) / 1e9
    out["total"] = sum(v for k, v in out.items() if k != "transfers")
    return out


EXPERIMENTAL = {
    "lower-hessian": "Hessians of >= 8192 inputs accumulated by lower block rows (core.hessian._LOWER_MIN_WIDTH)",
    "tf32x3-cholesky": "the factor's Cholesky in tf32x3 products too (core.factor.CHOLESKY_IN_TF32X3)",
}


def _switch_experimental(names: list[str]) -> None:
    from lightning_tlq.core import factor, hessian

    if "lower-hessian" in names:
        hessian._LOWER_MIN_WIDTH = 8192
    if "tf32x3-cholesky" in names:
        factor.CHOLESKY_IN_TF32X3 = True


def main(fabric, args) -> dict | None:
    from lightning_tlq import CalibrationLoop, CalibrationSettings, QuantArgs, TLQModule
    from lightning_tlq.config import ImportanceArgs, MemoryArgs
    from lightning_tlq.core import gptq_graph
    from lightning_tlq.distributed import shard_range

    cuda = fabric.device.type == "cuda"
    _switch_experimental(args.experimental)
    if args.max_gpu_memory_gib and cuda:
        total = torch.cuda.get_device_properties(fabric.device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.max_gpu_memory_gib * 2**30 / total, fabric.device)
    t0 = time.perf_counter()
    model = build_model(args.shape, args.layers)
    build_s = time.perf_counter() - t0
    if args.progress:
        PROBE.progress = True
        print(f"model built in {build_s:.1f} s, host {rss_bytes() / 2**30:.1f} GiB", file=sys.stderr, flush=True)
    module = TLQModule().attach(model, processor=None)
    shard = shard_range(args.samples, fabric.world_size, fabric.global_rank)
    batches = build_batches(args.samples, args.image_tokens, args.text_tokens, args.batch_size, shard)
    quant = QuantArgs(
        method=args.method, bits=4, group_size=128, kernel=args.kernel, factor_precision=args.factor_precision
    )
    memory = MemoryArgs(layerwise=True, offload_activations=args.offload_activations, pin_layers=args.pin_layers,
                        profile=args.memory_profile)  # fmt: skip
    importance = ImportanceArgs(granularity=args.importance_granularity)
    settings = CalibrationSettings(quant, importance, memory=memory, metrics=args.metrics)
    loop = CalibrationLoop(fabric, module, settings)
    if cuda:
        torch.cuda.reset_peak_memory_stats(fabric.device)
    fabric.barrier()
    host_after_build = rss_bytes() / 2**30
    host = HostPeak().start()
    t1 = time.perf_counter()
    if args.trace and fabric.is_global_zero:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            records = loop.run(batches)
        trace_start = time.perf_counter()
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace} in {time.perf_counter() - trace_start:.1f} s", flush=True)
        t1 += time.perf_counter() - trace_start
    else:
        records = loop.run(batches)
    if cuda:
        torch.cuda.synchronize(fabric.device)
    wall = time.perf_counter() - t1
    host_peak = host.stop()
    by_phase = PROBE.finish()
    peak = torch.tensor([by_phase["peak"] if cuda else 0.0], dtype=torch.float64)
    peaks = loop.collective.gather_cat(peak).tolist()
    walls = loop.collective.gather_cat(torch.tensor([wall], dtype=torch.float64)).tolist()
    digest_start = time.perf_counter()
    digest = codes_digest(loop.results, fabric.device)
    digest_s = time.perf_counter() - digest_start
    result = {
        "digest_s": digest_s,
        "shape": args.shape, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"], "method": args.method,
        "devices": fabric.world_size, "gpu": torch.cuda.get_device_name(fabric.device) if cuda else "cpu",
        "samples": args.samples, "tokens_per_sample": args.image_tokens + args.text_tokens + 2,
        "metrics": args.metrics, "offload_activations": args.offload_activations,
        "max_gpu_memory_gib": args.max_gpu_memory_gib, "wall_s": max(walls), "build_model_s": build_s,
        "phases_s_rank0": loop.phase_seconds, "peak_gib_per_rank": [round(p, 2) for p in peaks],
        "mean_weighted_rel_error": sum(r["modules"][m]["weighted_rel_error"] or 0 for r in records
                                       for m in r["modules"]) / sum(len(r["modules"]) for r in records),
        "kernel": args.kernel, "factor_precision": args.factor_precision, "experimental": args.experimental,
        "pin_layers": args.pin_layers,
        "importance_granularity": args.importance_granularity,
        "torch": torch.__version__, "placement_s_rank0": loop.placement.seconds,
        "registered_gib_rank0": loop.placement.registered_bytes / 2**30,
        "solve_s_by_module": _by_module(records, "seconds"), "codes_digest": digest,
        "memory_profile": args.memory_profile, "gpu_peak_gib_by_phase": by_phase,
        "image_tokens": args.image_tokens, "text_tokens": args.text_tokens,
        "host_rss_after_build_gib": round(host_after_build, 2), "host_peak_rss_calibration_gib": round(host_peak, 2),
        "host_max_rss_gib": round(max_rss_bytes() / 2**30, 2), "activation_pinning_s": loop.replay.host_seconds,
        "gptq_graphs": {k: getattr(gptq_graph.cache, k) for k in ("captures", "replays", "eager", "evictions")},
    }  # fmt: skip
    result["predicted_gib"] = {k: round(v, 2) for k, v in predict(
        args.shape, args.memory_profile, args.samples, args.image_tokens, args.text_tokens, args.batch_size,
        args.method, layers=result["layers"]).items()}  # fmt: skip
    result["per_layer_s"] = {k: round(v, 3) for k, v in per_layer(result).items()}
    if args.shape != "tiny":
        result["estimate_72b"] = estimate(result, "72b")
    if args.floor and cuda and fabric.is_global_zero:
        widths = [m.in_features for m in model.model.language_model.layers[0].modules()
                  if isinstance(m, torch.nn.Linear)]  # fmt: skip
        del loop, batches
        result["ceilings"] = measure_ceilings(fabric.device, widths)
        result["floor_s"] = floor_seconds(model, records, args.samples * result["tokens_per_sample"], args.samples,
                                          result["tokens_per_sample"], result["ceilings"])  # fmt: skip
    if fabric.is_global_zero:
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return result


def codes_digest(results: dict, device: str | torch.device | None = None) -> str:
    """A position-sensitive checksum of every module's integer codes and scales: equal runs print equal digests
    (how the speed switches are checked against each other on the GPU).

    The codes part is exact integer arithmetic (no overflow: codes < 2**8, weights < 10**6, < 2**31 elements), so
    it is the same on any ``device`` (default: the GPU when present; at 32B the CPU needs minutes for it); the
    scales are summed on the CPU, in one order."""
    from lightning_tlq.core.codepack import PackedCodes

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    total, scales = 0, 0.0
    for name in sorted(results):
        stored = results[name].stored_codes  # packed codes are unpacked on the device
        codes = (stored.to(device).unpack() if isinstance(stored, PackedCodes) else stored.to(device)).flatten()
        codes = codes.to(torch.int64)
        weights = (torch.arange(codes.numel(), dtype=torch.int64, device=device) * 2654435761) % 1000003
        total = (total + int((codes * weights).sum())) % (2**61 - 1)
        scales += float(results[name].scale.double().sum())
    return f"{total:x}/{scales:.12e}"


def _by_module(records: list[dict], key: str) -> dict:
    """Sum of one record field per module kind (``self_attn.q_proj``, ...) over layers."""
    out: dict = {}
    for r in records:
        for name, rec in r["modules"].items():
            out[name] = out.get(name, 0.0) + float(rec.get(key) or 0.0)
    return out


def parse(argv=None):
    from lightning_tlq.core.factor import FACTOR_PRECISIONS
    from lightning_tlq.core.gptq_checks import KERNELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    p.add_argument("--layers", type=int, default=None, help="override the number of decoder layers (smoke tests)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", choices=["rtn", "gptq", "tlq"], default="tlq")
    p.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--max-gpu-memory-gib", type=float, default=None)
    p.add_argument(
        "--kernel", choices=list(KERNELS), default="auto", help="quant.kernel (GPTQ loop; auto = graph on CUDA)"
    )
    p.add_argument(
        "--factor-precision", choices=list(FACTOR_PRECISIONS), default="auto",
        help="quant.factor_precision (the GPTQ factor's products; auto = tf32x3 on CUDA)",
    )  # fmt: skip
    p.add_argument("--pin-layers", action=argparse.BooleanOptionalAction, default=True, help="memory.pin_layers")
    p.add_argument("--memory-profile", choices=["fast", "low"], default="fast", help="memory.profile")
    p.add_argument(
        "--experimental", nargs="*", default=[], choices=list(EXPERIMENTAL),
        help="switch on speed paths that are off until measured (A/B runs): " + "; ".join(
            f"{k}: {v}" for k, v in EXPERIMENTAL.items()),
    )  # fmt: skip
    p.add_argument(
        "--importance-granularity", choices=["module", "input"], default="module", help="importance.granularity"
    )
    p.add_argument("--floor", action="store_true", help="also measure the GPU's ceilings and the floor for the work")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--progress", action="store_true", help="a stderr line per phase and layer (time, peaks)")
    p.add_argument("--trace", default=None, help="profile rank 0's calibration into this Chrome trace (.json.gz ok)")
    return p.parse_args(argv)


def report(path: str) -> None:
    """One markdown row per JSON line written with ``--json`` (TLQ runs and benchmark_llmcompressor.py's)."""
    head = ("tool | method | shape | profile | GPUs | wall (s) | peak GiB | host peak GiB | importance | accumulate | "
            "solve | propagate | digest")  # fmt: skip
    print(f"| {head} |")
    print("|---" * 13 + "|")
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            ph = r.get("phases_s_rank0", {})
            cols = [ph.get(k) for k in ("importance", "layers.accumulate", "layers.solve", "layers.propagate")]
            peak = r.get("peak_gib_per_rank", [r.get("peak_gib", 0.0)])
            layers = f"{r['shape']}" + (f" ({r['layers']} layers)" if r.get("layers") not in (None, 28, 64) else "")
            host = r.get("host_peak_rss_calibration_gib")
            print(f"| {r.get('tool', 'lightning-tlq')} | {r.get('method', 'gptq')} | {layers} | "
                  f"{r.get('memory_profile', 'fast')} | {r.get('devices', 1)} | {r['wall_s']:.1f} | {max(peak):.2f} | "
                  f"{'-' if host is None else f'{host:.1f}'} | "
                  + " | ".join("-" if c is None else f"{c:.1f}" for c in cols)
                  + f" | {r.get('codes_digest', '-')} {_non_default(r)} |")  # fmt: skip
            if "estimate_72b" in r:
                e = r["estimate_72b"]
                print(f"| {e['label']} | | 72b | | 1 | ~{e['wall_s']:.0f} | ~{e['gpu_peak_gib_model']:.0f} (model) | "
                      f"~{e['host_gib_model']:.0f} (model) | | | | | |")  # fmt: skip


def _non_default(r: dict) -> str:
    """Speed settings that differ from the defaults (older runs recorded the environment switches of the time)."""
    if "env" in r:
        return r["env"]
    out = [f"quant.kernel={r['kernel']}"] if r.get("kernel", "auto") != "auto" else []
    if r.get("factor_precision", "auto") != "auto":
        out.append(f"quant.factor_precision={r['factor_precision']}")
    out += [f"experimental:{name}" for name in r.get("experimental", [])]
    if r.get("importance_granularity", "module") != "module":
        out.append(f"importance.granularity={r['importance_granularity']}")
    return " ".join(out + (["memory.pin_layers=false"] if r.get("pin_layers") is False else []))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(sys.argv[2])
        sys.exit(0)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from lightning.fabric import Fabric

    args = parse()
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    fabric = Fabric(accelerator=accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    callbacks=[PROBE])  # fmt: skip
    fabric.launch(main, args)
