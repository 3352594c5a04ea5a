"""``lightning-tlq evaluate``: NLL, perplexity, exact match per type and KL to a reference, against independent code."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import leftovers
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_tlq.cli import main
from lightning_tlq.config import DataArgs
from lightning_tlq.data import encode_sample, prompt_inputs, synthetic_samples
from lightning_tlq.evaluate import METRICS_NAME, evaluate, normalize_answer
from lightning_tlq.harness import evaluate_model, load_module
from lightning_tlq.models import build_tiny_vlm

TINY = ["--model.model_name_or_path", "tiny-llava"]
EVAL = ["--data.num_samples", "5", "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--quiet", "true"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "out"
    main(["calibrate", *TINY, "--data.num_samples", "8", "--quant.method", "rtn", "--quant.bits", "4",
          "--quant.group_size",
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
    assert metrics["nll"] == pytest.approx(loss_sum / tokens, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss_sum / tokens), rel=1e-4)
    assert metrics["exact_match"] == correct / 5
    assert [e["question"] for e in metrics["examples"]] == [s.question for s in samples]
    assert metrics["reference_model"] is None
    assert "kl_to_reference" not in metrics
    assert {k: metrics["overall"][k] for k in ("samples", "answer_tokens", "nll")} == {
        k: metrics[k] for k in ("samples", "answer_tokens", "nll")
    }
    assert sorted(metrics["per_type"]) == sorted({s.kind for s in samples})  # the synthetic kinds


def test_kl_to_the_reference_model_matches_an_independent_computation(quantized, tmp_path):
    """KL(P_ref || P_model) per answer token, unbatched, with full logits and torch's kl_div."""
    metrics = _evaluate_cli(quantized, tmp_path / "eval", "--data.seed", "1", "--reference_model", "tiny-llava")
    model = AutoModelForImageTextToText.from_pretrained(quantized, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(quantized, local_files_only=True)
    reference, _ = build_tiny_vlm("llava")  # what tiny-llava is (and what was quantized)
    per_type: dict[str, list[float]] = {}
    with torch.no_grad():
        for sample in synthetic_samples(5, seed=1):
            enc = encode_sample(processor, sample)
            inputs = {k: v for k, v in enc.items() if k != "labels"}
            mask = enc["labels"][0, 1:] != -100
            logits = [m(**inputs).logits[0, :-1][mask].double() for m in (model, reference)]
            log_q, log_p = (torch.log_softmax(x, dim=-1) for x in logits)
            kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
            per_type.setdefault(sample.kind, []).extend(kl.tolist())
    every = [v for values in per_type.values() for v in values]
    assert metrics["reference_model"] == "tiny-llava"
    assert metrics["kl_to_reference"] == pytest.approx(sum(every) / len(every), rel=1e-5)
    assert metrics["kl_to_reference"] > 0
    for kind, values in per_type.items():
        assert metrics["per_type"][kind]["kl_to_reference"] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert metrics["overall"]["kl_to_reference"] == metrics["kl_to_reference"]


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


def test_per_type_exact_match_from_the_jsonl_kinds(quantized, tmp_path):
    """Records with a ``kind`` are counted per type, records without one under ``""``."""
    model = AutoModelForImageTextToText.from_pretrained(quantized, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(quantized, local_files_only=True)
    records = []
    for i, sample in enumerate(synthetic_samples(6, seed=3)):
        correct = i % 2 == 0
        answer = _greedy(model, processor, encode_sample(processor, sample)) if correct else "definitely not"
        sample.image.save(tmp_path / f"{i}.png")
        record = {"image": f"{i}.png", "question": sample.question, "answer": answer or "empty"}
        records.append({**record, "kind": "odd" if i % 3 else "third"} if i < 5 else record)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = _evaluate_cli(quantized, tmp_path / "eval", "--data.path", str(data), "--data.num_samples", "6")
    expected = {}
    for i, record in enumerate(records):
        counts = expected.setdefault(record.get("kind", ""), [0, 0])
        counts[0] += 1
        counts[1] += i % 2 == 0 and normalize_answer(record["answer"]) != "empty"
    assert {k: [v["samples"], v["correct"]] for k, v in metrics["per_type"].items()} == expected
    assert metrics["per_type"]["odd"]["exact_match"] == expected["odd"][1] / expected["odd"][0]
    assert metrics["overall"]["correct"] == sum(c for _, c in expected.values())


@pytest.mark.slow
def test_two_processes_give_the_same_metrics(quantized, tmp_path):
    """Samples are sharded without repetition (7 = 4 + 3) and the states reduced with torchmetrics; every type,
    also one that a process never sees, and the examples are those of the whole set."""
    data = DataArgs(num_samples=7, batch_size=2, seed=1)
    kwargs = {"reference_model": "tiny-llava", "accelerator": "cpu", "quiet": True}
    one = evaluate(str(quantized), data, output_dir=str(tmp_path / "one"), **kwargs)
    two = evaluate(str(quantized), data, output_dir=str(tmp_path / "two"), devices=2, strategy="ddp_spawn", **kwargs)
    saved = json.loads((tmp_path / "two" / METRICS_NAME).read_text())
    assert saved["settings"]["world_size"] == 2
    assert saved["per_type"].keys() == one["per_type"].keys()
    pairs = [(saved["overall"], one["overall"]), *((saved["per_type"][k], one["per_type"][k]) for k in one["per_type"])]
    for mine, theirs in pairs:
        for key in ("samples", "correct", "answer_tokens", "exact_match"):
            assert mine[key] == theirs[key]
        for key in ("nll", "perplexity", "kl_to_reference"):  # other batches: float32 forward noise only
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6)
    assert two["nll"] == pytest.approx(one["nll"], rel=1e-6)
    for mine, theirs in zip(saved["examples"], one["examples"], strict=True):
        assert mine == {**theirs, "nll": pytest.approx(theirs["nll"], rel=1e-6), "kl_to_reference": pytest.approx(
            theirs["kl_to_reference"], rel=1e-5)}  # fmt: skip
    assert [e["index"] for e in saved["examples"]] == list(range(7))


def test_in_process_api_gives_the_metrics_of_the_command(quantized, tmp_path):
    metrics = _evaluate_cli(quantized, tmp_path / "eval", "--data.seed", "1", "--reference_model", "tiny-llava")
    samples = synthetic_samples(5, seed=1)
    api = evaluate_model(load_module(str(quantized)), samples, reference=load_module("tiny-llava"), batch_size=2)
    for key in ("samples", "answer_tokens", "exact_match", "nll", "kl_to_reference", "overall", "per_type", "examples"):
        assert api[key] == metrics[key], key  # same model, same batches: the same numbers


def test_evaluate_fails_fast(tmp_path, quantized):
    out = tmp_path / "eval"
    with pytest.raises(FileExistsError, match="--overwrite"):
        _evaluate_cli(quantized, quantized)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        _evaluate_cli(quantized, out, "--max_new_tokens", "0")
    with pytest.raises(ValueError, match="exact_match='beam' is not supported; choose one of greedy, teacher_forced"):
        _evaluate_cli(quantized, out, "--exact_match", "beam")
    with pytest.raises(FileNotFoundError, match="reference_model='/no/such/model'"):
        _evaluate_cli(quantized, out, "--reference_model", "/no/such/model")
    with pytest.raises(ValueError, match="reference_model 'tiny-qwen2_vl' has 49 logits per position"):
        _evaluate_cli(quantized, out, "--reference_model", "tiny-qwen2_vl")
    assert leftovers(out) == []


def test_a_reference_with_another_tokenizer_is_refused(quantized, tmp_path):
    """Same vocabulary size, different token ids: caught on the tokenizers before any weights load."""
    other = tmp_path / "other"
    model, processor = build_tiny_vlm("llava")
    vocab = processor.tokenizer.get_vocab()
    a, b = sorted(t for t in vocab if t.isalpha())[:2]
    processor.tokenizer.backend_tokenizer.model = type(processor.tokenizer.backend_tokenizer.model)(
        vocab={**vocab, a: vocab[b], b: vocab[a]}, unk_token="<unk>"
    )
    model.save_pretrained(other)
    processor.save_pretrained(other)
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match="different tokenizer"):
        _evaluate_cli(quantized, out, "--reference_model", str(other))
    assert leftovers(out) == []


def test_progress_bar_and_summary_unless_quiet(quantized, tmp_path, capsys, monkeypatch):
    flags = [f for f in EVAL if f not in ("--quiet", "true")]
    with monkeypatch.context() as patch:
        patch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # bars only on a terminal
        main(["evaluate", "--model.model_name_or_path", str(quantized), *flags, "--output_dir", str(tmp_path / "a")])
    captured = capsys.readouterr()
    assert "evaluate: 100%" in captured.err
    assert "5/5" in captured.err
    assert "exact match" in captured.out
    _evaluate_cli(quantized, tmp_path / "b")
    captured = capsys.readouterr()
    assert "evaluate:" not in captured.err
    assert "lightning-tlq evaluate" not in captured.out
    main(["evaluate", "--model.model_name_or_path", str(quantized), *flags, "--output_dir", str(tmp_path / "c")])
    captured = capsys.readouterr()  # stderr is not a terminal: no bar (a log file gets no carriage returns)
    assert "\r" not in captured.err
    assert "exact match" in captured.out


def test_default_output_is_beside_the_model_and_overwrite_replaces_only_it(quantized, tmp_path, capsys):
    model = tmp_path / "w4"
    model.symlink_to(quantized, target_is_directory=True)
    main(["evaluate", "--model.model_name_or_path", str(model), *EVAL])
    out = tmp_path / "w4-eval-test"
    assert json.loads((out / METRICS_NAME).read_text())["model"] == str(model)
    with pytest.raises(FileExistsError, match="--overwrite true"):
        main(["evaluate", "--model.model_name_or_path", str(model), *EVAL])
    main(["evaluate", "--model.model_name_or_path", str(model), *EVAL, "--overwrite", "true"])
    with pytest.raises(FileExistsError, match="not the output of one lightning-tlq run"):
        main(["evaluate", "--model.model_name_or_path", str(model), *EVAL, "--output_dir", str(tmp_path),
              "--overwrite", "true"])  # fmt: skip
    assert (model / "config.json").is_file()  # nothing of the model was touched


def test_a_w4a8_checkpoint_is_evaluated_with_its_activation_quantization(tmp_path):
    from lightning_tlq.actquant import apply_saved_activation_quant

    out = tmp_path / "w4a8"
    main(["calibrate", *TINY, "--data.num_samples", "8", "--quant.method", "rtn", "--quant.bits", "4",
          "--quant.group_size",
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
    assert metrics["nll"] == pytest.approx(loss_per_token(), rel=1e-4)
    assert metrics["nll"] != pytest.approx(weight_only, rel=1e-6), "the int8 activations must matter"
    handle.remove()


def test_teacher_forced_exact_match_from_the_command_line(tmp_path):
    """On the scenes model (one tokenization per answer) both modes give the same verdicts; the mode is recorded."""
    args = ["--data.num_samples", "16", "--data.batch_size", "8", "--trainer.accelerator", "cpu", "--quiet", "true"]
    runs = {}
    for mode in ("greedy", "teacher_forced"):
        main(["evaluate", *args, "--exact_match", mode, "--output_dir", str(tmp_path / mode)])
        runs[mode] = json.loads((tmp_path / mode / METRICS_NAME).read_text())
        assert runs[mode]["settings"]["exact_match"] == mode
        assert runs[mode]["model"] == "scenes-llava"
        assert runs[mode]["samples"] == 16
    greedy, forced = runs["greedy"], runs["teacher_forced"]
    assert forced["exact_match"] == greedy["exact_match"]
    assert forced["per_type"] == greedy["per_type"]
    assert [e["correct"] for e in forced["examples"]] == [e["correct"] for e in greedy["examples"]]
