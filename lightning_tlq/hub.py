"""Where a model name points: a built-in model, a local directory or a Hugging Face hub id, as ``from_pretrained``
resolves it.

Order: the built-in names (``scenes-llava``, ``tiny-llava``, ``tiny-qwen2_vl``) first, then an existing local
directory, then a hub id (``org/name``), whose files come through the Hugging Face cache: downloaded when online,
read from the cache when offline (``HF_HUB_OFFLINE=1``; a failed connection also falls back to the cache). The
package never sets ``HF_HUB_OFFLINE``. ``HF_HOME`` / ``HF_HUB_CACHE`` and the offline switch are read from the
environment at each call (``huggingface_hub`` reads them once, at import), so a change made after import counts.

A hub model comes in two steps, so that the fail-fast checks fetch little: ``weights=False`` gets the config,
processor, tokenizer, chat template and remote-code files (what the checks on the ``meta`` device and the data need),
``weights=True`` adds the weight files ``from_pretrained`` reads (``model.safetensors`` or its index and shards; the
``pytorch_model.bin`` equivalents when a repository has no safetensors). Everything is then loaded from the local
snapshot directory, so every entry point (calibrate, evaluate, export, ``--reference_model``, ``TLQModule``) sees
the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_tlq import environment

__all__ = ["ModelNotFoundError", "check_model_dir", "hub_cache_dir", "hub_offline", "is_hub_id", "model_dir"]

_CONFIG_PATTERNS = ("*.json", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.vocab", "*.spm")
"""Config, generation config, processor, tokenizer, chat template and remote code: everything but the weights."""
_WEIGHTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no built-in model, no local directory and no hub id found (in the cache or online)."""


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by ``huggingface_hub``'s rules: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``), read from the environment now."""
    get = environment.get
    cache = get("HF_HUB_CACHE") or get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = get("HF_HOME") or os.path.join(get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """Offline mode: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) in the environment now, or as
    ``huggingface_hub`` read it at import."""
    from huggingface_hub import constants

    value = environment.get("HF_HUB_OFFLINE") or environment.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def is_hub_id(name: str) -> bool:
    """``name`` is a valid hub repository id (``name`` or ``org/name``; letters, digits, ``-``, ``_``, ``.``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_dir(path: Path) -> None:
    """Raise unless ``path`` is a directory holding a ``config.json``."""
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a Hugging Face model directory (no config.json). Save one with "
            "`model.save_pretrained(dir)` and `processor.save_pretrained(dir)`."
        )


def model_dir(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    *,
    weights: bool = True,
    extra_patterns: Sequence[str] = (),
) -> Path:
    """The local directory of a model: the embedded ``scenes-llava``'s, a local directory, or a hub id's cached
    snapshot (fetched if online and missing).

    Args:
        name_or_path: ``scenes-llava``, a local directory or a hub id (the built-in tiny models have no directory;
            callers build them first).
        revision: a branch, tag or commit of a hub id (default: ``main``); only for hub ids.
        weights: also fetch the weight files (else config, processor and code files only).
        extra_patterns: more files of a hub snapshot to fetch (e.g. ``tlq_*`` for a calibrated checkpoint).

    Raises:
        ModelNotFoundError: the name is neither a directory nor a hub id; the hub id, its revision or its weights
            are neither in the cache nor (offline, or unreachable) downloadable. The message says how to fix it.
        ValueError: a directory without ``config.json``; a revision for a local directory or built-in model.
    """
    from lightning_tlq.models.embedded import SCENES_MODEL, TINY_MODELS, embedded_path

    name = str(name_or_path)
    builtin = sorted([SCENES_MODEL, *TINY_MODELS])
    if name in builtin or Path(name).expanduser().exists():
        if revision is not None:
            kind = "a built-in model" if name in builtin else "a local directory"
            raise ValueError(f"revision={revision!r} applies to hub ids only; {name!r} is {kind}: drop the revision.")
        if name in TINY_MODELS:
            raise ValueError(f"{name!r} is a built-in model built from its config; it has no directory.")
        path = Path(embedded_path(name)).expanduser()
        check_model_dir(path)
        return path
    if not is_hub_id(name):
        raise ModelNotFoundError(
            f"Model {name!r} is neither a built-in model ({', '.join(builtin)}), an existing local directory nor a "
            "Hugging Face hub id (`org/name`): check the path."
        )
    snapshot = _snapshot(name, revision, [*_CONFIG_PATTERNS, *extra_patterns])
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(f"Hub model {name!r} (commit {snapshot.name}) has no config.json; is it a model?")
    if weights:
        _fetch_weights(name, snapshot)
    return snapshot


def _snapshot(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    try:
        path = snapshot_download(
            repo, revision=revision, cache_dir=cache, allow_patterns=patterns, local_files_only=offline
        )
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(f"Revision {revision!r} of hub model {repo!r} does not exist on the hub.") from err
    except RepositoryNotFoundError as err:  # also gated and private repositories without a valid token
        raise ModelNotFoundError(
            f"Hub model {repo!r} does not exist or needs access (gated or private: accept its terms and log in with "
            "`hf auth login` or set HF_TOKEN); if you meant a local directory, no such directory exists."
        ) from err
    except LocalEntryNotFoundError as err:
        raise ModelNotFoundError(_not_cached(repo, revision, cache, offline, err)) from err
    except HfHubHTTPError as err:
        raise ModelNotFoundError(f"Could not download hub model {repo!r}: {_first_line(err)}") from err
    return Path(path)


def _not_cached(repo: str, revision: str | None, cache: Path, offline: bool, err: Exception) -> str:
    """The one-line message for a hub model (or revision) that is neither cached nor downloadable."""
    what = f"Hub model {repo!r}" + (f" at revision {revision!r}" if revision else "")
    cached = _cached_revisions(cache, repo)
    where = f"the Hugging Face cache {cache}" + (f" (cached revisions of it: {cached})" if cached else "")
    fix = f"run once with network access, or `hf download {repo}" + (f" --revision {revision}`" if revision else "`")
    fix += " (`huggingface-cli download` in older huggingface_hub), or pass a local model directory"
    fix += f" (none is at {repo!r})"
    if type(err).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 2.x checks against its tree cache
        return f"{what}: the cached snapshot in {cache} is incomplete ({_first_line(err)}); {fix}."
    if offline:
        return f"{what} is not in {where} and HF_HUB_OFFLINE=1 forbids downloading it: {fix}."
    return f"{what} is not in {where} and the hub could not be reached ({_first_line(err.__cause__ or err)}): {fix}."


def _cached_revisions(cache: Path, repo: str) -> str:
    folder = cache / ("models--" + repo.replace("/", "--"))
    refs = sorted(p for p in (folder / "refs").rglob("*") if p.is_file()) if (folder / "refs").is_dir() else []
    names = [f"{p.relative_to(folder / 'refs')} -> {p.read_text().strip()[:12]}" for p in refs]
    snapshots = sorted(p.name[:12] for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
    return ", ".join(names + [f"commit {s}" for s in snapshots if not any(n.endswith(s) for n in names)])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _fetch_weights(repo: str, snapshot: Path) -> None:
    """Fetch what ``from_pretrained`` reads: an index and its shards, else the single file; safetensors first."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for index, single in _WEIGHTS:
        if (snapshot / index).is_file():  # an index is a .json, fetched with the config
            for shard in sorted(set(json.loads((snapshot / index).read_text())["weight_map"].values())):
                _download(repo, snapshot, shard)
            return
        if (snapshot / single).is_file():
            return
    for _, single in _WEIGHTS:
        try:
            _download(repo, snapshot, single)
            return
        except ModelNotFoundError as err:  # go on to the next format only if the hub says the file does not exist
            if not isinstance(err.__cause__, EntryNotFoundError) or isinstance(err.__cause__, LocalEntryNotFoundError):
                raise
    raise ModelNotFoundError(f"Hub model {repo!r} (commit {snapshot.name}) has no model.safetensors (nor index).")


def _download(repo: str, snapshot: Path, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if (snapshot / filename).is_file():
        return snapshot / filename
    cache, offline = hub_cache_dir(), hub_offline()
    try:
        return Path(hf_hub_download(repo, filename, revision=snapshot.name, cache_dir=cache, local_files_only=offline))
    except LocalEntryNotFoundError as err:
        reason = _first_line(err.__cause__ or err)
        mode = "HF_HUB_OFFLINE=1 forbids downloading it" if offline else f"the hub could not be reached ({reason})"
        raise ModelNotFoundError(
            f"Hub model {repo!r} (commit {snapshot.name[:12]}) is in the Hugging Face cache {cache} without its "
            f"weight file {filename} and {mode}: run once with network access, or `hf download {repo}`, or pass a "
            "local model directory."
        ) from err
    except EntryNotFoundError as err:  # online: the repository has no such file
        raise ModelNotFoundError(f"Hub model {repo!r} has no file {filename}.") from err
    except HfHubHTTPError as err:
        raise ModelNotFoundError(f"Could not download {filename} of hub model {repo!r}: {_first_line(err)}") from err
