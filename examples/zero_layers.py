"""Do the decoder layers of a hard-benchmark model carry its answers? Zero the residual writes (``o_proj``,
``down_proj``) of all layers, of every attention or every MLP, and measure teacher-forced exact match and answer
NLL on the first test items (CPU is enough):

    PYTHONPATH=$PWD python examples/zero_layers.py ckpt/hard-llava --test-n 200
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lightning_tlq.data import Sample
from lightning_tlq.harness import evaluate_model, load_module
from lightning_tlq.models.scenes_hard import HardEncoder
from lightning_tlq.tasks import scenes_hard


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a hard-benchmark checkpoint (examples/train_hard_vlm.py)")
    p.add_argument("--test-n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    module = load_module(args.model, device="cpu")
    examples = scenes_hard.take("test", args.test_n)
    samples = [Sample(e.pil(), e.question, e.answer, e.kind) for e in examples]
    encoded = HardEncoder(module.processor, module.model.config.model_type).items(examples)
    layers = module.adapter.decoder_layers()
    writes = [(layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight) for layer in layers]
    originals = [(a.detach().clone(), m.detach().clone()) for a, m in writes]
    everything = range(len(layers))
    variants = {"fp": ((), ()), "no decoder layers": (everything, everything),
                "no attention outputs": (everything, ()), "no MLP outputs": ((), everything)}  # fmt: skip
    out = []
    for label, (no_attn, no_mlp) in variants.items():
        for i, ((attn, mlp), (attn0, mlp0)) in enumerate(zip(writes, originals)):
            attn.data.copy_(attn0 * (i not in no_attn))
            mlp.data.copy_(mlp0 * (i not in no_mlp))
        metrics = evaluate_model(
            module, samples, encoded=encoded, batch_size=args.batch_size, exact_match="teacher_forced", num_examples=0
        )
        row = {"variant": label, "exact_match": metrics["exact_match"], "nll": metrics["nll"],
               "per_type": {k: round(v["exact_match"], 3) for k, v in metrics["per_type"].items()}}  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)
    main()
