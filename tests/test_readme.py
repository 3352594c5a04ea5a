"""The README's command lines, run in order in a fresh directory: no line fails and no line replaces another's output.

The main job (the last command of the first code block) and then every line of the Usage block run in process
(``main(argv)``), with tiny settings so that the whole file takes well under a minute: ``scenes-llava`` becomes the
random ``tiny-llava`` (in flags, paths and recipe models alike, so names stay consistent) and every calibrate or
evaluate gets ``--data.num_samples 4``. Lines that need hardware or files a clone does not have are skipped by
:data:`SKIPPED`, each with its reason; a README line that is neither run nor skipped fails the test.
"""

import json
import re
import shlex
from pathlib import Path

from lightning_tlq.cli import main
from lightning_tlq.report import METRICS_NAME, REPORT_NAME

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

SKIPPED = {
    "--model.model_name_or_path /path/to/hf/llava": "a placeholder for the user's own model and JSONL",
    "--model.model_name_or_path Qwen/Qwen2-VL-2B-Instruct": "a hub download (tests/test_hub.py loads hub ids from a "
    "local cache)",
    "--trainer.devices 4 --trainer.strategy ddp": "4 processes (GPUs or a 4-core box); DDP is covered by "
    "tests/test_distributed.py",
}
TINY = ["--data.num_samples", "4", "--data.batch_size", "4", "--trainer.accelerator", "cpu", "--quiet", "true"]


def _code_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def readme_lines() -> list[str]:
    """The main job, then the Usage block's lines (comments stripped)."""
    first = _code_blocks(README)[0]
    main_job = next(line for line in first if "lightning-tlq calibrate" in line)
    main_job = "lightning-tlq" + main_job.rsplit("&& lightning-tlq", 1)[1].split("#")[0]
    usage = README[README.index("## Usage") :]
    lines = [line.split("  #")[0].strip() for line in _code_blocks(usage)[0]]
    return [main_job.strip(), *[line for line in lines if line]]


def _argv(line: str) -> tuple[dict[str, str], list[str], str | None]:
    """Environment assignments, the arguments after ``lightning-tlq``, and a ``> file`` redirect."""
    redirect = None
    if " > " in line:
        line, redirect = (part.strip() for part in line.split(" > "))
    words = shlex.split(line.replace("scenes-llava", "tiny-llava"))
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words.pop(0) == "lightning-tlq", line
    if words[0] in ("calibrate", "evaluate") and "--print_config" not in words:
        if "--model.model_name_or_path" not in words:
            words += ["--model.model_name_or_path", "tiny-llava"]
        words += TINY
    return env, words, redirect


def _run(argv: list[str]) -> int | str | None:
    """``main(argv)``; its exit code (``--print_config`` exits 0)."""
    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code
    return None


def test_the_readme_names_every_skipped_line():
    lines = readme_lines()
    for fragment in SKIPPED:
        assert any(fragment in line for line in lines), fragment


def test_readme_lines_run_in_order_without_replacing_each_others_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    seen: dict[str, str] = {}  # output directory -> the line that wrote it
    for line in readme_lines():
        if any(fragment in line for fragment in SKIPPED):
            continue
        env, argv, redirect = _argv(line)
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            before = {p.name for p in (tmp_path / "tlq_out").glob("*")} if (tmp_path / "tlq_out").exists() else set()
            code = _run(argv)
            assert code in (0, None), f"{line!r} exited with {code}"
        out = capsys.readouterr().out
        if redirect:
            (tmp_path / redirect).write_text(out)
            assert "quant:" in out
            continue
        new = {p.name for p in (tmp_path / "tlq_out").glob("*")} - before
        assert len(new) == 1, f"{line!r} wrote {sorted(new)} (expected one new directory under tlq_out/)"
        name = new.pop()
        assert name not in seen, f"{line!r} wrote {name}, already written by {seen[name]!r}"
        seen[name] = line
        marker = METRICS_NAME if argv[0] == "evaluate" else REPORT_NAME
        assert (tmp_path / "tlq_out" / name / marker).is_file()
    # the outputs are named by what each line did
    assert {
        "tiny-llava-tlq-w4a16-g128",  # the main job
        "tiny-llava-tlq-w3a16-g128",  # recipe
        "tiny-llava-awq-w2a16-g64",  # recipe + --quant.method awq
        "tiny-llava-gptq-w2a16-g64",  # recipe + --quant.bits 2 --quant.method gptq
        "tiny-llava-rtn-w4a16-g128",
        "tiny-llava-gptq-w3a16-g128",
        "tiny-llava-tlq-w4a16-g128-eval-test",
        "tiny-llava-tlq-w4a16-g128-eval-test-vs-tiny-llava",
        "tiny-llava-eval-test-tf",
        "tiny-llava-gptq-w4a16-g128",  # from the environment
    } == set(seen)
    report = json.loads((tmp_path / "tlq_out" / "tiny-llava-awq-w2a16-g64" / REPORT_NAME).read_text())
    assert (report["settings"]["quant"]["method"], report["settings"]["quant"]["bits"]) == ("awq", 2)
    assert (tmp_path / "logs").is_dir()  # the CSVLogger line
