"""A model of the accelerator memory of a calibration run, per phase, for a model shape and ``memory.profile``.

Predicts ``torch.cuda.max_memory_allocated`` of ``examples/benchmark_speed.py`` runs (Qwen2-VL-shaped decoder, its
32 x 1280 vision tower, bf16 weights, layer-wise, ``metrics=False``), so the H200 measurements (per-phase peaks in
the benchmark's ``gpu_peak_gib_by_phase``) can be checked against it. Every term is a count of bytes of tensors
the code keeps alive at the phase's worst moment; what it leaves out (allocator rounding, cuBLAS / cuSOLVER
workspaces, the CUDA context, which ``max_memory_allocated`` does not count) is why a measurement may exceed it.

    python examples/memory_model.py --shape 7b --profile low
    python examples/memory_model.py --shape 72b --profile fast --samples 128
"""

from __future__ import annotations

import argparse
import json

GIB = 2**30
DIMS = {  # hidden, MLP, layers, attention heads, KV heads, vocabulary (Qwen2-VL 2B / 7B, Qwen2.5-VL 32B / 72B)
    "tiny": (256, 512, 2, 2, 1, 151936),
    "2b": (1536, 8960, 28, 12, 2, 151936),
    "7b": (3584, 18944, 28, 28, 4, 152064),
    "32b": (5120, 27648, 64, 40, 8, 152064),
    "72b": (8192, 29568, 80, 64, 8, 152064),
}
VISION_PARAMS = 32 * (4 * 1280 * 1280 + 2 * 1280 * 5120) + 1280 * 3 * 2 * 14 * 14  # blocks + patch embedding


def shape_bytes(shape: str, layers: int | None = None) -> dict[str, float]:
    """Bytes of the model's parts (bf16); ``layers`` overrides the shape's decoder layer count."""
    d, m, n_layers, heads, kv, vocab = DIMS[shape]
    layers = layers or n_layers
    kvd = d // heads * kv
    layer = 2 * (2 * d * d + 2 * d * kvd + 3 * d * m + d + 2 * kvd + 2 * d)
    merger = 2 * (4 * 1280 * 4 * 1280 + 4 * 1280 * d)
    return {"layer": layer, "head": 2 * vocab * d, "embed": 2 * vocab * d, "vision": 2 * VISION_PARAMS + merger,
            "layers": layer * layers}  # fmt: skip


def predict(
    shape: str,
    profile: str = "fast",
    samples: int = 128,
    image_tokens: int = 256,
    text_tokens: int = 256,
    batch: int = 8,
    method: str = "tlq",
    layers: int | None = None,
) -> dict[str, float]:
    """Predicted peak GiB per phase (``capture``, ``importance``, ``accumulate``, ``solve``) and ``peak``; the
    host's activations (low profile) and weights. ``layers`` overrides the shape's decoder layer count."""
    d, m, n_layers, heads, kv, vocab = DIMS[shape]
    layers = layers or n_layers
    part = shape_bytes(shape, layers)
    seq = image_tokens + text_tokens + 2
    tokens, batch_tokens = samples * seq, batch * seq
    act, act_b = 2 * tokens * d, 2 * batch_tokens * d  # all stored activations, one batch's
    pixels = 2 * samples * 4 * image_tokens * 3 * 2 * 14 * 14  # the batches stay on the device
    kwargs = 2 * 2 * tokens * (d // heads)  # rotary cos / sin per batch
    fixed = pixels + kwargs
    low = profile == "low"
    # capture: embeddings, tower, head on the device, every batch's decoder input (low: moved to the host after)
    capture = part["embed"] + part["vision"] + part["head"] + fixed + act
    # importance (layer-wise): every layer's input stored (fast), the last layer's outputs turning into the
    # gradients (one copy), the head for the head step (parked after it), then the backward of the last layer:
    # recomputed with grad on one batch, the MLP keeps 4 [tokens, m] tensors and makes ~3, attention ~8 [tokens, d]
    backward = 2 * batch_tokens * (7 * m + 8 * d)
    head_step = part["head"] + 3 * 4 * batch * 32 * vocab  # logits, softmax, gradient on answer positions
    stored = 0 if low else layers * act
    importance = fixed + 2 * part["layer"] + act + stored + max(head_step, backward)
    # accumulate of down_proj: float64 H, its float32 partial, one batch's rows (bf16 taken and kept, fp32, weighted)
    hessian = 8 * m * m
    rows = batch_tokens * m * (2 + 2 + 2 + 4 + (4 if method == "tlq" else 0))
    # fast: the down_proj pass replays mlp on the inputs the gate/up pass kept (one [tokens, d] bf16 tensor)
    kept = 0 if low else act
    accumulate = hessian + 4 * m * m + rows + kept
    # solve of down_proj beside its float64 H and the float32 weight (and its permuted copy): fast holds float32 H,
    # its permuted copy, I, H + dI, L, L^-1, U (7 n^2 floats, core/gptq.py); lean (core/gptq_lean.py, reuse_h: L
    # and L^-1 in the float64 H's storage) the permuted A and the blocked inverse's temporaries (1/2 n^2); then
    # U and the column loop's 3 [out, in] float32 tensors
    factor = 4 * 7 * m * m if not low else 4 * (1 + 0.5) * m * m
    loop = 4 * m * m * (3 if not low else 0) + 3 * 4 * d * m
    solve = hessian + 2 * 4 * d * m + max(factor, loop)
    if low:
        layer_fixed = fixed + part["layer"] + 2 * act_b
    else:
        layer_fixed = fixed + 2 * part["layer"] + 2 * act  # inputs + the captured copy (+ outputs in propagate)
    out = {"capture": capture, "importance": importance, "accumulate": accumulate + layer_fixed,
           "solve": solve + layer_fixed}  # fmt: skip
    out = {k: v / GIB for k, v in out.items()}
    out["peak"] = max(out.values())
    out["host_activations"] = ((layers + 1) * act if low else 0) / GIB
    out["host_weights"] = (part["layers"] + part["head"] + part["embed"] + part["vision"]) / GIB
    return out


def check_solve(n: int, out: int = 512, repeats: int = 2) -> None:
    """Measure the solve terms on the CPU: the resident set above the float64 ``H`` while ``gptq_quantize`` and
    ``gptq_quantize_lean`` run (sampled every 0.5 ms), in ``n^2`` bytes. The model counts 28 (fast) and 6 (lean,
    blocked CUDA inverse) plus the ``[out, in]`` float32 tensors; the CPU inverse adds an identity and a fresh
    result (8 bytes per n^2)."""
    import gc
    from functools import partial

    import torch
    from bench_probes import HostPeak, rss_bytes

    from lightning_tlq.core import gptq_lean
    from lightning_tlq.core.gptq import gptq_quantize
    from lightning_tlq.core.quantizer import QuantSpec

    gptq_lean.CHUNK_BYTES = max(1 << 20, (64 << 20) * n // 18944)  # chunks in the 7B down_proj's proportion
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, n, generator=g)
    H, W = (x.T @ x).double(), torch.randn(out, n, generator=g).bfloat16()
    del x
    lean = partial(gptq_lean.gptq_quantize_lean, reuse_h=True)
    for name, fn in [("gptq_quantize", gptq_quantize), ("gptq_quantize_lean(reuse_h=True)", lean)] * repeats:
        h = H.clone()
        gc.collect()
        probe = HostPeak(interval_s=0.0005).start()
        base = probe.peak = rss_bytes()
        fn(W, h, QuantSpec(bits=4, group_size=128))
        extra = probe.stop() * GIB - base
        print(f"{name}: {extra / n**2:.1f} n^2 bytes above H (n={n}, out={out})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(DIMS), default="7b")
    p.add_argument("--profile", choices=["fast", "low"], default=None, help="default: both")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", choices=["tlq", "gptq"], default="tlq")
    p.add_argument("--check-solve", type=int, default=None, metavar="N", help="measure the solve terms on the CPU")
    a = p.parse_args(argv)
    if a.check_solve:
        check_solve(a.check_solve)
        return
    for profile in [a.profile] if a.profile else ["fast", "low"]:
        gib = predict(a.shape, profile, a.samples, a.image_tokens, a.text_tokens, a.batch_size, a.method)
        print(json.dumps({"shape": a.shape, "profile": profile, **{k: round(v, 2) for k, v in gib.items()}}))


if __name__ == "__main__":
    main()
