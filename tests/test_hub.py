"""Models by Hugging Face hub id, offline: a hub cache built in a temporary ``HF_HOME`` (``models--org--name/blobs``,
``snapshots/<commit>/`` symlinks, ``refs/<branch or tag>``, as ``huggingface_hub`` lays it out) serves tiny models
by id, and every entry point (calibrate, evaluate with a reference, export, ``load_packed``, the callback on a
``TLQModule``) gives exactly what the same run gives by local path. Bad input fails in one line, writing nothing.
"""

import hashlib
import json
import os

import pytest
import torch
from conftest import SMALL, leftovers
from huggingface_hub import constants
from safetensors.torch import load_file

from lightning_tlq import CalibrationDataModule, QuantArgs, TLQCallback, TLQModule
from lightning_tlq.adapters import UnsupportedModelError
from lightning_tlq.cli import main
from lightning_tlq.evaluate import METRICS_NAME
from lightning_tlq.export import ExportError
from lightning_tlq.hub import ModelNotFoundError, hub_cache_dir, model_dir
from lightning_tlq.models import resolve_model, save_tiny_vlm
from lightning_tlq.nn.loader import load_packed
from lightning_tlq.preflight import model_on_meta

R1, R2 = "1" * 40, "2" * 40  # two commits of org/tiny: R1 is the model saved below, R2 (main) another seed
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
FLAGS = [f for f in SMALL if f not in ("--model.model_name_or_path", "tiny-llava")]


def publish(cache, repo, src, commit, refs=("main",), skip=(), symlinks=True):
    """Put directory ``src`` into hub cache ``cache`` as ``repo`` at ``commit``, named by ``refs``."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for file in sorted(p for p in src.rglob("*") if p.is_file() and p.name not in skip):
        target = root / "snapshots" / commit / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not symlinks:
            target.write_bytes(file.read_bytes())
            continue
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(file.read_bytes())
        target.symlink_to(os.path.relpath(blob, target.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return root / "snapshots" / commit


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Exact comparisons of two runs: the same thread count for both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny LLaVAs (different seeds) saved as Hugging Face directories."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_vlm(root / "r1", "llava", seed=0), save_tiny_vlm(root / "r2", "llava", seed=1)


@pytest.fixture(scope="module")
def by_path(saved, tmp_path_factory):
    """The reference: ``calibrate`` on the local directory of R1."""
    out = tmp_path_factory.mktemp("by_path") / "out"
    main(["calibrate", *FLAGS, "--model.model_name_or_path", str(saved[0]), "--output_dir", str(out)])
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch, saved):
    """An offline hub cache in a fresh ``HF_HOME`` holding ``org/tiny``: R1 (tag ``v1``) and R2 (``main``)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    assert hub_cache_dir() == cache != constants.HF_HUB_CACHE  # read now, not at import
    publish(cache, "org/tiny", saved[0], R1, refs=("v1",))
    publish(cache, "org/tiny", saved[1], R2)
    return cache


def _tensors(directory):
    return {f"{f.name}:{k}": v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_resolution_order_revisions_and_cache_layouts(cache, saved, tmp_path, monkeypatch):
    assert model_dir("org/tiny") == cache / "models--org--tiny" / "snapshots" / R2  # main
    assert model_dir("org/tiny", "v1").name == model_dir("org/tiny", R1).name == R1  # a tag, a commit
    assert model_dir(str(saved[0])) == saved[0]  # a local directory is used as is
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # ... and wins over the hub id it spells, as in from_pretrained
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        with pytest.raises(ValueError, match="no config.json"):
            model_dir("org/tiny")
    assert model_dir("scenes-llava").name == "scenes-llava"  # built-in names first
    publish(cache, "org/plain", saved[0], R1, symlinks=False)  # plain files in the snapshot work as well
    assert model_on_meta("org/plain").config.model_type == "llava"
    for name, revision in (("tiny-llava", "v1"), (str(saved[0]), "v1")):
        with pytest.raises(ValueError, match="applies to hub ids only"):
            model_dir(name, revision)


def test_sharded_weights_by_hub_id_equal_the_embedded_model(cache, tmp_path):
    embedded = model_dir("scenes-llava")
    snapshot = publish(cache, "org/scenes", embedded, R1)
    (snapshot / "model-00002-of-00002.safetensors").unlink()  # the index names both shards: both are needed
    with pytest.raises(ModelNotFoundError, match="without its weight file model-00002-of-00002.safetensors"):
        model_dir("org/scenes")
    publish(cache, "org/scenes", embedded, R2)
    hub, local = resolve_model("org/scenes")[0].state_dict(), resolve_model("scenes-llava")[0].state_dict()
    assert hub.keys() == local.keys()
    assert all(torch.equal(hub[k], local[k]) for k in hub)


def test_preflight_fetches_no_weights(cache, saved, tmp_path, calibrate_cli):
    publish(cache, "org/config-only", saved[0], R1, skip=WEIGHTS)
    assert model_on_meta("org/config-only").config.model_type == "llava"  # meta device: config.json suffices
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nowhere.png", "question": "what color ?", "answer": "red"}) + "\n")
    flags = ("--model.model_name_or_path", "org/config-only")
    with pytest.raises(FileNotFoundError, match="nowhere.png does not exist"):  # the data check, not the weights
        calibrate_cli(tmp_path / "out", *flags, "--data.path", str(bad))
    with pytest.raises(ModelNotFoundError, match=rf"in the Hugging Face cache {cache} without its weight file "
                       r"model.safetensors and HF_HUB_OFFLINE=1 forbids downloading it"):  # fmt: skip
        calibrate_cli(tmp_path / "out", *flags)
    assert leftovers(tmp_path / "out") == []


def test_calibrate_by_hub_id_equals_the_run_by_path(cache, by_path, tmp_path, calibrate_cli):
    report = calibrate_cli(tmp_path / "out", "--model.model_name_or_path", "org/tiny", "--model.revision", "v1")
    assert report["model"] == "org/tiny"
    assert (report["settings"]["revision"], report["settings"]["trust_remote_code"]) == ("v1", False)
    _assert_same_tensors(by_path, tmp_path / "out")  # same weights and codes
    other = calibrate_cli(tmp_path / "main", "--model.model_name_or_path", "org/tiny")  # main is R2, another model
    assert other["settings"]["revision"] is None
    with pytest.raises(AssertionError):
        _assert_same_tensors(by_path, tmp_path / "main")


def test_evaluate_by_hub_id_with_a_hub_reference(cache, by_path, saved, tmp_path):
    publish(cache, "org/tiny-tlq", by_path, R1)
    flags = ["--data.num_samples", "5", "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--quiet", "true"]

    def run(model, reference, out, *extra):
        main(["evaluate", "--model.model_name_or_path", model, "--reference_model", reference, *flags,
              "--output_dir", str(out), *extra])  # fmt: skip
        return json.loads((out / METRICS_NAME).read_text())

    local = run(str(by_path), str(saved[0]), tmp_path / "local")
    hub = run("org/tiny-tlq", "org/tiny", tmp_path / "hub", "--reference_revision", R1)
    assert hub["settings"]["reference_revision"] == R1
    for key in ("samples", "answer_tokens", "exact_match", "nll", "perplexity", "kl_to_reference", "per_type"):
        assert hub[key] == local[key], key
    assert local["kl_to_reference"] > 0
    with pytest.raises(ModelNotFoundError, match="reference_model='org/tiny'.*at revision 'v9' is not in"):
        run("org/tiny-tlq", "org/tiny", tmp_path / "bad", "--reference_revision", "v9")
    assert leftovers(tmp_path / "bad") == []


def test_export_and_load_packed_by_hub_id(cache, by_path, tmp_path):
    publish(cache, "org/tiny-tlq", by_path, R1)
    main(["export", "--checkpoint", str(by_path), "--output_dir", str(tmp_path / "local"), "--quiet", "true"])
    main(["export", "--checkpoint", "org/tiny-tlq", "--output_dir", str(tmp_path / "hub"), "--quiet", "true"])
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("local", "hub")]
    assert names[0] == names[1]
    _assert_same_tensors(tmp_path / "local", tmp_path / "hub")
    with pytest.raises(ExportError, match="is a hub id: pass output_dir"):
        main(["export", "--checkpoint", "org/tiny-tlq", "--quiet", "true"])
    publish(cache, "org/tiny-packed", tmp_path / "local", R2)
    local, hub = load_packed(tmp_path / "local").state_dict(), load_packed("org/tiny-packed").state_dict()
    assert local.keys() == hub.keys()
    assert all(torch.equal(local[k], hub[k]) for k in local)


class _ValidatingTLQModule(TLQModule):
    def validation_step(self, batch, batch_idx):  # a TLQModule has no validation step of its own
        return None


def test_callback_on_a_tlq_module_by_hub_id(cache, saved, tmp_path):
    import lightning.pytorch as pl

    def quantize(module):
        tlq = TLQCallback(quant=QuantArgs(bits=3, group_size=64), trigger="validate", progress_bar=False)
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, inference_mode=False, callbacks=[tlq],
                   ).validate(module, datamodule=CalibrationDataModule(num_samples=8, batch_size=4))  # fmt: skip
        return module.model.state_dict()

    local = quantize(_ValidatingTLQModule(str(saved[0])))
    hub = quantize(_ValidatingTLQModule("org/tiny", revision=R1))
    assert local.keys() == hub.keys()
    assert all(torch.equal(local[k], hub[k]) for k in local)
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(local[key], resolve_model(saved[0])[0].state_dict()[key])  # it was quantized


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (("--model.model_name_or_path", "org/absent"),
         r"Hub model 'org/absent' is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids downloading "
         r"it: run once with network access, or `hf download org/absent` .*or pass a local model directory "
         r"\(none is at 'org/absent'\)\.$"),
        (("--model.model_name_or_path", "org/tiny", "--model.revision", "v9"),
         r"Hub model 'org/tiny' at revision 'v9' is not in the Hugging Face cache {cache} \(cached revisions of it: "
         r"main -> 222222222222, v1 -> 111111111111\) and HF_HUB_OFFLINE=1"),
        (("--model.model_name_or_path", "org/tiny", "--model.revision", "3" * 40), "at revision '3333333333"),
        (("--model.model_name_or_path", "nowhere/at/all"),
         r"'nowhere/at/all' is neither a built-in model .*, an existing local directory nor a Hugging Face hub id"),
    ],
)  # fmt: skip
def test_bad_model_names_fail_in_one_line_writing_nothing(cache, tmp_path, calibrate_cli, flags, match):
    with pytest.raises(ModelNotFoundError, match=match.format(cache=cache)) as err:
        calibrate_cli(tmp_path / "out", *flags)
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path / "out") == []


def test_the_package_never_forces_offline_mode(monkeypatch, cache, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(SystemExit):
        main(["calibrate", "--model.model_name_or_path", "org/tiny", "--print_config"])
    assert "HF_HUB_OFFLINE" not in os.environ
    assert "revision: null\n  trust_remote_code: false" in capsys.readouterr().out


def test_online_with_the_hub_unreachable_falls_back_to_the_cache(monkeypatch, cache):
    """As transformers: online mode, no connection -> the cached snapshot; not cached -> says the hub is unreachable.
    The endpoint is a closed local port, so nothing leaves the machine."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    assert model_dir("org/tiny", "v1").name == R1
    with pytest.raises(ModelNotFoundError, match="is not in the Hugging Face cache .* the hub could not be reached"):
        model_dir("org/absent")


REMOTE_CONFIG = """from transformers import LlavaConfig


class RemoteLlavaConfig(LlavaConfig):
    model_type = "remote_llava"
"""


def test_trust_remote_code(cache, saved, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the user's cache clean
    remote = tmp_path / "remote"
    remote.mkdir()
    config = json.loads((saved[0] / "config.json").read_text())
    config.update(model_type="remote_llava", auto_map={"AutoConfig": "configuration_remote.RemoteLlavaConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_remote.py").write_text(REMOTE_CONFIG)
    publish(cache, "org/remote", remote, R1)
    with pytest.raises(UnsupportedModelError, match="trust_remote_code.*Pass --model.trust_remote_code true"):
        model_on_meta("org/remote")
    with pytest.raises(UnsupportedModelError, match="model_type 'remote_llava', which lightning_tlq cannot quantize"):
        model_on_meta("org/remote", trust_remote_code=True)  # the repository's code ran: its config class exists
