"""The recipes for real hub checkpoints (``configs/*_tlq_w*.yaml`` other than tiny/scenes) fit those checkpoints.

Each recipe is checked against a directory holding only the checkpoint's real ``config.json``
(``tests/fixtures/configs/<name>``, dimensions in its README), its weights on the ``meta`` device: the settings parse
and validate, preflight passes (supported family, the group size divides every target ``in_features``), the
quantized modules are exactly the decoder layers' Linear modules, and the export's plan for them (module and
checkpoint names, the tensors and shapes it writes, the ignore list) is computed by the export's own code.

The ``data`` section names a Hugging Face dataset (``data.dataset``, ``data.split``, column keys). Keys that
:class:`~lightning_tlq.config.DataArgs` does not have yet are checked here for form only (a hub name, the columns
of a chat or a question/answer dataset); every key ``DataArgs`` has is validated by the CLI as the run would.
Without ``DataArgs.dataset``, ``data.split`` still means the built-in task's split, so it is checked for form only.
"""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings

from lightning_tlq.cli import main
from lightning_tlq.config import DataArgs, ImportanceArgs, MemoryArgs, QuantArgs, TokenSetArgs
from lightning_tlq.export import ExportError, export_format, export_plan, packed_layout, quantization_config
from lightning_tlq.keys import ModuleKey
from lightning_tlq.preflight import check_quantizable, model_on_meta

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "configs"
# recipe: (hub id, fixture directory, decoder layers, quantized Linear modules per layer, text hidden size)
REAL = {
    "qwen2_vl_7b_instruct_tlq_w4a16_g128": ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl-7b-instruct", 28, 7, 3584),
    "qwen2_vl_7b_instruct_tlq_w3a16_g128": ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl-7b-instruct", 28, 7, 3584),
    "qwen2_5_vl_7b_instruct_tlq_w4a16_g128": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b-instruct", 28, 7, 3584),
    "qwen2_5_vl_7b_instruct_tlq_w4a8_g128": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b-instruct", 28, 7, 3584),
    "llava_onevision_qwen2_7b_ov_tlq_w4a16_g128": (
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "llava-onevision-qwen2-7b-ov-hf",
        28,
        7,
        3584,
    ),
    "internvl3_8b_tlq_w4a16_g128": ("OpenGVLab/InternVL3-8B-hf", "internvl3-8b-hf", 28, 7, 3584),
    "gemma_3_12b_it_tlq_w4a16_g128": ("google/gemma-3-12b-it", "gemma-3-12b-it", 48, 7, 3840),
}
_NAME = re.compile(r"(?P<model>.+)_tlq_w(?P<bits>\d)a(?P<act>\d+)_g(?P<group>\d+)")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _recipe(stem):
    return yaml.safe_load((ROOT / "configs" / f"{stem}.yaml").read_text())


def _data_keys_of_dataargs():
    known = {f.name for f in dataclasses.fields(DataArgs)}
    return known if "dataset" in known else known - {"split"}


def test_every_recipe_is_validated():
    stems = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert set(REAL) <= stems
    assert stems - set(REAL) == {s for s in stems if s.startswith(("tiny_", "scenes_"))}  # tests/test_cli.py
    models = {_NAME.fullmatch(s)["model"] for s in REAL}
    assert len(models) == 5
    schemes = {(m["bits"], m["act"]) for m in map(_NAME.fullmatch, REAL)}
    assert schemes == {("4", "16"), ("4", "8"), ("3", "16")}


@pytest.mark.parametrize("stem", sorted(REAL))
def test_recipe_names_its_model_data_and_settings(stem):
    raw = _recipe(stem)
    hub, *_ = REAL[stem]
    name = _NAME.fullmatch(stem)
    assert raw["model"]["model_name_or_path"] == hub
    assert raw["model"]["dtype"] == "bfloat16"
    assert (raw["quant"]["method"], raw["quant"]["bits"], raw["quant"]["group_size"]) == (
        "tlq",
        int(name["bits"]),
        int(name["group"]),
    )
    assert raw["quant"]["act_bits"] == (None if name["act"] == "16" else int(name["act"]))
    expected_dir = "tlq_out/" + stem.replace("_", "-").replace("qwen2-5", "qwen2.5")
    assert raw["output_dir"] == expected_dir  # named by its settings
    assert raw["overwrite"] is False
    data = raw["data"]
    assert _HUB_NAME.fullmatch(data["dataset"]), data["dataset"]
    assert "path" not in data  # a hub dataset, not a JSONL
    assert data["split"]
    assert data["image_column"]
    chat = "messages_column" in data
    assert chat != ("question_column" in data or "answer_column" in data)  # one format per recipe
    if not chat:
        assert data["question_column"]
        assert data["answer_column"]
    assert data["num_samples"] >= 128


@pytest.mark.parametrize("stem", sorted(REAL))
def test_recipe_parses_and_its_values_are_valid(stem, tmp_path, capsys):
    raw = _recipe(stem)
    known = _data_keys_of_dataargs()
    checked = {**raw, "data": {k: v for k, v in raw["data"].items() if k in known}}
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(checked, sort_keys=False))
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    for section, values in checked.items():  # every key in the file arrived unchanged
        if isinstance(values, dict):
            for key, value in values.items():
                assert cfg[section][key] == value, f"{section}.{key}"
        else:
            assert cfg[section] == values, section
    QuantArgs(**cfg["quant"])
    ImportanceArgs(**cfg["importance"])
    TokenSetArgs(**cfg["token_set"])
    MemoryArgs(**cfg["memory"])
    DataArgs(**cfg["data"])


@pytest.fixture(scope="module")
def metas():
    cache = {}

    def get(directory):
        if directory not in cache:
            cache[directory] = model_on_meta(str(FIXTURES / directory))
        return cache[directory]

    return get


@pytest.mark.parametrize("stem", sorted(REAL))
def test_recipe_fits_the_real_checkpoint_and_its_export_plan(stem, metas):
    raw = _recipe(stem)
    _, directory, n_layers, per_layer, hidden = REAL[stem]
    model = metas(directory)
    assert all(p.device.type == "meta" for p in model.parameters())
    quant = QuantArgs(**raw["quant"])
    adapter = check_quantizable(model, quant)  # preflight: family supported, the group size divides every target
    layers = adapter.decoder_layers()
    assert len(layers) == n_layers
    keys = [ModuleKey(i, n) for i in range(n_layers) for group in adapter.module_groups(i) for n in group]
    plan = export_plan(model, adapter, keys)  # the names save_qparams records and the export writes
    assert len(plan.quantized) == n_layers * per_layer
    prefixes = tuple(f"{adapter.layer_name(i)}." for i in range(n_layers))
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(plan.quantized) == {n for n in linear if n.startswith(prefixes)}  # every decoder Linear, no other
    assert set(plan.unquantized) == set(linear) - set(plan.quantized)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    assert head in plan.unquantized
    assert not any(adapter.is_ignored(n) for n in plan.quantized)
    for name in plan.quantized:
        assert linear[name].in_features % quant.group_size == 0, name
    q_proj = linear[f"{adapter.layer_name(0)}.self_attn.q_proj"]
    assert q_proj.in_features == hidden
    renamings = [c for c in get_model_conversion_mapping(model, add_legacy=True) if isinstance(c, WeightRenaming)]
    for name, prefix in {**plan.quantized, **plan.unquantized}.items():  # the written names load into the modules
        assert apply_renamings(f"{prefix}.weight", renamings) == f"{name}.weight"
    assert set(plan.ignore) >= set(plan.unquantized) | set(plan.unquantized.values())
    assert not set(plan.ignore) & set(plan.quantized)

    if not raw["export"]:
        with pytest.raises(ExportError, match="pack-quantized"):  # why the W3 recipe does not export
            export_format(quant.spec, quant.act_bits)
        return
    fmt = export_format(quant.spec, quant.act_bits)
    written = {
        f"{plan.quantized[name]}.{suffix}": layout
        for name in plan.quantized
        for suffix, layout in packed_layout(tuple(linear[name].weight.shape), quant.spec, fmt, torch.bfloat16).items()
    }
    main_suffix = "weight" if quant.act_bits == 8 else "weight_packed"
    assert len(written) == len(plan.quantized) * (2 if quant.act_bits == 8 else 3)
    q_prefix = plan.quantized[f"{adapter.layer_name(0)}.self_attn.q_proj"]
    got = written[f"{q_prefix}.{main_suffix}"]
    groups = hidden // quant.group_size
    if quant.act_bits == 8:
        assert got == (torch.int8, (q_proj.out_features, hidden))
    else:
        assert got == (torch.int32, (q_proj.out_features, hidden * quant.bits // 32))
    assert written[f"{q_prefix}.weight_scale"] == (
        torch.bfloat16,
        (q_proj.out_features, groups),
    )
    config = quantization_config(quant.spec, act_bits=quant.act_bits, act_order=quant.act_order, ignore=plan.ignore)
    assert config["format"] == fmt
    assert config["config_groups"]["group_0"]["weights"]["actorder"] == "static"
    json.dumps(config)  # what config.json receives
    if importlib.util.find_spec("compressed_tensors") is not None:  # the test extra: the reader validates it
        from compressed_tensors.quantization import QuantizationConfig

        parsed = QuantizationConfig.model_validate(config)
        assert parsed.config_groups["group_0"].weights.group_size == quant.group_size


# the published dimensions (tests/fixtures/configs/README.md): text model, then vision tower
PUBLISHED = {
    "qwen2-vl-7b-instruct": (
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064},
        {"embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 3584},
    ),
    "qwen2.5-vl-7b-instruct": (
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064},
        {"hidden_size": 1280, "intermediate_size": 3420, "depth": 32, "num_heads": 16, "out_hidden_size": 3584},
    ),
    "llava-onevision-qwen2-7b-ov-hf": (
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152128},
        {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16},
    ),
    "internvl3-8b-hf": (
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 151674},
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    ),
    "gemma-3-12b-it": (
        {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208},
        {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16},
    ),
}  # fmt: skip


def test_the_fixtures_are_the_five_checkpoints():
    assert {p.name for p in FIXTURES.iterdir() if p.is_dir()} == set(PUBLISHED) == {v[1] for v in REAL.values()}


@pytest.mark.parametrize("directory", sorted(PUBLISHED))
def test_fixture_configs_hold_the_published_dimensions(directory, metas):
    """The real config.json, read by this transformers (defaults filled in), has the published dimensions."""
    config = metas(directory).config
    text, vision = PUBLISHED[directory]
    assert {k: getattr(config.get_text_config(), k) for k in text} == text
    assert {k: getattr(config.vision_config, k) for k in vision} == vision
