"""The LightningCLI: subcommands, --print_config, environment and flag overrides, and every shipped recipe."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_tlq.cli import SUBCOMMANDS, main
from lightning_tlq.config import ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.datamodule import CalibrationDataModule
from lightning_tlq.lightning_cli import TLQTrainer
from lightning_tlq.models import TINY_MODELS
from lightning_tlq.preflight import check_quantizable, model_on_meta
from lightning_tlq.report import REPORT_NAME

CONFIGS = sorted(  # the recipes of real hub checkpoints are validated by tests/test_recipes.py
    p
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
    if p.stem.startswith(("tiny_", "scenes_"))
)
EXPECTED = {
    f"{family}_w{bits}a16_g{group}"
    for family in ("tiny_llava", "tiny_qwen2_vl")
    for bits, group in ((4, 128), (3, 64), (3, 128), (2, 64))
} | {"tiny_qwen2_vl_tlq_w4a8_vision"}
EXPECTED |= {f"scenes_llava_{s}" for s in ("w4a16_g128", "w3a16_g128", "w2a16_g64", "w4a8_g128")}
_NAME = re.compile(r"(tiny_llava|tiny_qwen2_vl|scenes_llava)(?:_tlq)?_w(\d)a(\d+)(?:_g(\d+))?(_vision)?")


def _printed(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_help_lists_the_subcommands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name, text in SUBCOMMANDS.items():
        assert f"{name}   " in out
        assert text in out.replace("\n", " ")


def test_top_level_help_matches_the_trainer_methods():
    """The fast top-level help (no Lightning import) states what each subcommand's own help says."""
    for name, text in SUBCOMMANDS.items():
        assert getattr(TLQTrainer, name).__doc__.split("\n")[0] == text


def test_top_level_help_imports_neither_torch_nor_lightning():
    code = "import sys; from lightning_tlq.cli import main; main(['--help']); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = out.strip().splitlines()[-1]
    for heavy in ("'torch'", "'lightning'", "'transformers'", "'jsonargparse'"):
        assert heavy not in loaded


@pytest.mark.parametrize("subcommand", ["calibrate", "evaluate", "export"])
def test_subcommand_help_describes_every_option_and_hides_training_options(subcommand, capsys):
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[\w.]+)", out, flags=re.M)
    assert options
    for flag in ("--trainer.max_epochs", "--trainer.gradient_clip_val", "--trainer.precision", "ENV:"):
        assert flag not in out
    blocks = re.split(r"\n  (?=--)", out)
    for block in blocks[1:]:  # every option has a description besides its default
        described = re.sub(r"\(default: .*?\)", "", block.split(None, 1)[1] if " " in block.strip() else "")
        assert re.search(r"[A-Za-z]{3}", described.split("\n\n")[0]), block
    if subcommand == "calibrate":
        assert out.index("--quant.bits") < out.index("--trainer.devices") < out.index("--importance.score")
        assert "Weight bit width, 2..8." in out
        for method in ("rtn", "gptq", "tlq", "awq", "smoothquant", "mbq"):
            assert method in out.split("\n\n")[1]  # the subcommand's description names every method
        assert out[: out.index("expert:")].count("\n") < 120
    if subcommand == "export":
        assert "--model." not in out
        assert "--data." not in out


def test_a_named_subcommand_builds_only_its_own_parser(capsys, monkeypatch, tmp_path):
    """``lightning-tlq evaluate ...`` builds the evaluate parser alone; a top-level option first (``--config``)
    builds all three, and the result is the same."""
    from lightning_tlq.lightning_cli import TLQCLI

    built = []
    add = TLQCLI._add_subcommands

    def recording(self, parser, **kwargs):
        add(self, parser, **kwargs)
        built.append(sorted(self._subcommand_parsers))
        assert self.subcommands() == TLQCLI.subcommands()  # every subcommand again once the parser is built

    monkeypatch.setattr(TLQCLI, "_add_subcommands", recording)
    config = tmp_path / "top.yaml"
    config.write_text("evaluate:\n  max_new_tokens: 3\ncalibrate:\n  quant:\n    bits: 3\n")
    alone = _printed(capsys, "evaluate", "--max_new_tokens", "3")
    after_top_level_option = _printed(capsys, "--config", str(config), "evaluate")
    assert built == [["evaluate"], ["calibrate", "evaluate", "export"]]
    assert alone == after_top_level_option
    assert alone["max_new_tokens"] == 3


def test_errors_name_flags_and_point_to_a_traceback_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLQ_LOG_DIR", str(tmp_path / "logs"))
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--model.model_name_or_path", "tiny-llava", "--quant.bits", "9"], report_errors=True)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "error: --quant.bits must be an integer in 2..8, got 9." in err
    assert "QuantSpec" not in err
    assert "Traceback" not in err
    log = Path(re.search(r"traceback: (\S+)", err).group(1))
    assert log.parent == tmp_path / "logs"
    assert "Traceback" in log.read_text()
    with pytest.raises(SystemExit):
        main(
            ["--verbose", "calibrate", "--model.model_name_or_path", "tiny-llava", "--quant.bits", "9"],
            report_errors=True,
        )
    assert "Traceback" in capsys.readouterr().err


def test_print_config_has_the_lightning_groups_and_the_method_arguments(capsys):
    cfg = _printed(capsys, "calibrate")
    assert cfg["model"] == {
        "model_name_or_path": "scenes-llava",
        "dtype": "auto",
        "revision": None,
        "trust_remote_code": False,
        "allow_pickle": False,
    }
    assert cfg["data"]["num_samples"] == 64
    assert cfg["trainer"]["logger"] is False
    assert cfg["seed_everything"] == 0
    assert {
        "quant",
        "importance",
        "token_set",
        "memory",
        "output_dir",
        "overwrite",
        "resume",
        "checkpoint",
    } <= cfg.keys()
    cfg = _printed(capsys, "evaluate")
    assert {"output_dir", "max_new_tokens", "reference_model"} <= cfg.keys()
    assert cfg["reference_model"] is None
    assert "quant" not in cfg


def test_environment_variables_override_defaults_and_flags_override_them(capsys, monkeypatch):
    monkeypatch.setenv("TLQ_CALIBRATE__QUANT__BITS", "2")
    monkeypatch.setenv("TLQ_CALIBRATE__MODEL__MODEL_NAME_OR_PATH", "tiny-qwen2_vl")
    cfg = _printed(capsys, "calibrate", "--quant.group_size", "64")
    assert (cfg["quant"]["bits"], cfg["quant"]["group_size"]) == (2, 64)
    assert cfg["model"]["model_name_or_path"] == "tiny-qwen2_vl"
    assert _printed(capsys, "calibrate", "--quant.bits", "5")["quant"]["bits"] == 5


def test_environment_variables_reach_the_run(tmp_path, monkeypatch, calibrate_cli):
    monkeypatch.setenv("TLQ_CALIBRATE__QUANT__METHOD", "rtn")
    monkeypatch.setenv("TLQ_CALIBRATE__QUANT__BITS", "3")
    report = calibrate_cli(tmp_path / "out")
    assert (report["settings"]["quant"]["method"], report["settings"]["quant"]["bits"]) == ("rtn", 3)


def test_readme_first_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["calibrate", "--overwrite", "true"])  # README: lightning-tlq calibrate --overwrite true
    report = json.loads((tmp_path / "tlq_out" / "scenes-llava-tlq-w4a16-g128" / REPORT_NAME).read_text())
    assert report["model"] == "scenes-llava"
    assert report["data"]["samples"] == 64
    assert len(report["layers"]) == 8
    assert "mean relative output error" in capsys.readouterr().out


def test_the_recipes_cover_every_family_and_setting():
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_parses_and_its_values_are_valid(path, capsys):
    cfg = _printed(capsys, "calibrate", "--config", str(path))
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():  # every key in the file arrived unchanged (no comment glued to a value)
        if isinstance(values, dict):
            for key, value in values.items():
                assert cfg[section][key] == value, f"{section}.{key}"
        else:
            assert cfg[section] == values, section
    family, bits, act_bits, group, vision = _NAME.fullmatch(path.stem).groups()  # the name states the setting
    model = cfg["model"]["model_name_or_path"]
    assert model == family.replace("_", "-", 1)
    assert model in (*TINY_MODELS, "scenes-llava")
    assert cfg["quant"]["bits"] == int(bits)
    assert cfg["quant"]["act_bits"] == (None if act_bits == "16" else int(act_bits))
    assert cfg["quant"]["vision"] is bool(vision)
    if group is not None:
        assert cfg["quant"]["group_size"] == int(group)
    assert cfg["output_dir"] is None  # named by its settings: tlq_out/<model>-<method>-w<b>a<a>-g<g>
    assert cfg["overwrite"] is False
    quant = QuantArgs(**cfg["quant"])
    ImportanceArgs(**cfg["importance"])
    TokenSetArgs(**cfg["token_set"])
    MemoryArgs(**cfg["memory"])
    CalibrationDataModule(**cfg["data"])
    check_quantizable(model_on_meta(model), quant)  # the group size fits every module (vision too if on)


@pytest.mark.parametrize("stem", ["tiny_llava_w2a16_g64", "tiny_qwen2_vl_w3a16_g128"])
def test_recipe_runs(stem, tmp_path):
    path = next(p for p in CONFIGS if p.stem == stem)
    out = tmp_path / "out"
    main(["calibrate", "--config", str(path), "--data.num_samples", "4", "--trainer.accelerator", "cpu",
          "--output_dir", str(out), "--quiet", "true"])  # fmt: skip
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["settings"]["quant"]["bits"] == int(stem.split("_w")[1][0])
    assert len(report["layers"]) == 2
