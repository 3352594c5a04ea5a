"""``lightning-tlq evaluate``: answer-token loss / perplexity and exact match, checked against independent code."""

import json
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_tlq.cli import main
from lightning_tlq.config import DataArgs
from lightning_tlq.data import encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.evaluate import METRICS_NAME, evaluate, normalize_answer

EVAL = ["--data.num_samples", "5", "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--quiet", "true"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "out"
    main(["calibrate", "--data.num_samples", "8", "--quant.method", "rtn", "--quant.bits", "4", "--quant.group_size",
          "64", "--trainer.accelerator", "cpu", "--output_dir", str(out), "--quiet", "true"])  # fmt: skip
    return out


def _evaluate_cli(model, out, *extra):
    main(["evaluate", "--model.model_name_or_path", str(model), *EVAL, "--output_dir", str(out), *extra])
    return json.loads((out / METRICS_NAME).read_text())


def _greedy(model, processor, encoded, max_new_tokens=8):
    inputs = prompt_inputs(encoded)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_metrics_match_an_independent_computation(quantized, tmp_path):
    metrics = _evaluate_cli(quantized, tmp_path / "eval", "--data.seed", "1")
    model = AutoModelForImageTextToText.from_pretrained(quantized, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(quantized, local_files_only=True)
    loss_sum, tokens, correct = 0.0, 0, 0
    samples = synthetic_samples(5, seed=1)
    with torch.no_grad():
        for sample in samples:
            enc = encode_sample(processor, sample)
            n = int((enc["labels"][:, 1:] != -100).sum())
            out = model(**{k: v for k, v in enc.items() if k != "labels"}, labels=enc["labels"])  # HF: mean over n
            loss_sum, tokens = loss_sum + out.loss.item() * n, tokens + n
            correct += normalize_answer(_greedy(model, processor, enc)) == normalize_answer(sample.answer)
    assert metrics["samples"] == 5
    assert metrics["answer_tokens"] == tokens
    assert metrics["sft_loss"] == pytest.approx(loss_sum / tokens, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss_sum / tokens), rel=1e-4)
    assert metrics["exact_match"] == correct / 5
    assert [e["question"] for e in metrics["examples"]] == [s.question for s in samples]


def test_exact_match_scores_correct_answers(quantized, tmp_path):
    """A JSONL whose answers are the model's own greedy outputs scores 1 per sample; a wrong answer scores 0."""
    model = AutoModelForImageTextToText.from_pretrained(quantized, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(quantized, local_files_only=True)
    records = []
    for i, sample in enumerate(synthetic_samples(12, seed=3)):
        prediction = _greedy(model, processor, encode_sample(processor, sample))
        if normalize_answer(prediction):
            sample.image.save(tmp_path / f"{i}.png")
            records.append({"image": f"{i}.png", "question": sample.question, "answer": prediction})
    assert len(records) >= 3, "the tiny model should produce some non-empty answers"
    records = records[:3] + [{**records[0], "answer": "definitely not this"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = _evaluate_cli(quantized, tmp_path / "eval", "--data.path", str(data))
    assert metrics["samples"] == 4
    assert metrics["exact_match"] == pytest.approx(3 / 4)
    assert [e["correct"] for e in metrics["examples"]] == [True, True, True, False]


def test_two_processes_give_the_same_metrics(quantized, tmp_path):
    """Samples are sharded without repetition (5 = 3 + 2) and the sums reduced with torchmetrics."""
    data = DataArgs(num_samples=5, batch_size=2, seed=1)
    one = evaluate(str(quantized), data, output_dir=str(tmp_path / "one"), accelerator="cpu", quiet=True)
    two = evaluate(
        str(quantized), data, output_dir=str(tmp_path / "two"), accelerator="cpu", devices=2, strategy="ddp_spawn",
        quiet=True,
    )  # fmt: skip
    saved = json.loads((tmp_path / "two" / METRICS_NAME).read_text())
    assert saved["settings"]["world_size"] == 2
    for key in ("samples", "answer_tokens", "exact_match"):
        assert saved[key] == one[key]
    assert saved["sft_loss"] == pytest.approx(one["sft_loss"], rel=1e-5)
    assert two["sft_loss"] == pytest.approx(one["sft_loss"], rel=1e-5)


def test_evaluate_fails_fast(tmp_path, quantized):
    with pytest.raises(FileExistsError, match="--overwrite"):
        _evaluate_cli(quantized, quantized)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        _evaluate_cli(quantized, tmp_path / "eval", "--max_new_tokens", "0")
    assert not (tmp_path / "eval").exists()


def test_a_w4a8_checkpoint_is_evaluated_with_its_activation_quantization(tmp_path):
    from lightning_tlq.actquant import apply_saved_activation_quant

    out = tmp_path / "w4a8"
    main(["calibrate", "--data.num_samples", "8", "--quant.method", "rtn", "--quant.bits", "4", "--quant.group_size",
          "64", "--quant.act_bits", "8", "--trainer.accelerator", "cpu", "--output_dir", str(out),
          "--quiet", "true"])  # fmt: skip
    metrics = _evaluate_cli(out, tmp_path / "eval", "--data.seed", "1")
    assert metrics["activation_bits"] == 8
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)

    def loss_per_token():
        total, count = 0.0, 0
        with torch.no_grad():
            for sample in synthetic_samples(5, seed=1):
                enc = encode_sample(processor, sample)
                n = int((enc["labels"][:, 1:] != -100).sum())
                total += model(**{k: v for k, v in enc.items() if k != "labels"}, labels=enc["labels"]).loss.item() * n
                count += n
        return total / count

    weight_only = loss_per_token()
    handle = apply_saved_activation_quant(model)
    assert metrics["sft_loss"] == pytest.approx(loss_per_token(), rel=1e-4)
    assert metrics["sft_loss"] != pytest.approx(weight_only, rel=1e-6), "the int8 activations must matter"
    handle.remove()
