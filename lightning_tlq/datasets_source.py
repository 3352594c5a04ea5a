"""Calibration samples from Hugging Face ``datasets`` (``data.dataset``): a hub name, a ``save_to_disk`` directory,
a folder of data files, or one ``.parquet`` / ``.arrow`` / ``.json(l)`` / ``.csv`` file.

Rows with a chat column (``messages`` / ``conversations``) become :class:`~lightning_tlq.chat.ChatSample`; rows with a
question and an answer become :class:`~lightning_tlq.data.Sample`, encoded exactly like the JSONL records. Images
may be PIL images, bytes, ``{"bytes", "path"}`` dicts (how ``datasets`` stores an ``Image`` column) or paths.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lightning_tlq.config import DataArgs

IMAGE_COLUMNS = ("images", "image")
MESSAGES_COLUMNS = ("messages", "conversations")
QUESTION_COLUMNS = ("question", "query", "prompt")
ANSWER_COLUMNS = ("answer", "response", "caption")
CAPTION_QUESTION = "Describe the image."
"""The question asked of caption datasets (an answer column whose name has ``caption``, no question column)."""
_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_INSTALL = "pip install 'lightning-tlq[datasets]' (or pip install datasets)"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"data.dataset needs the Hugging Face `datasets` package: {_INSTALL}.") from err
    return datasets


def _load(name: str, split: str) -> tuple[Any, Path | None]:
    """The split as a ``datasets.Dataset`` and the folder relative image paths start from (None for the hub)."""
    datasets = _datasets()
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _split_of_saved(datasets.load_from_disk(str(path)), split, name), path
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"data.dataset={name!r}: unknown file type; use one of {', '.join(_BUILDERS)}.")
            return datasets.load_dataset(builder, data_files=str(path), split=split), path.parent
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split), path
        return datasets.load_dataset(name, split=split), None
    except ValueError as err:
        if "split" in str(err).lower() and "unknown" in str(err).lower():
            raise ValueError(f"data.split={split!r} of data.dataset={name!r}: {err}") from err
        raise
    except (FileNotFoundError, ConnectionError, OSError) as err:
        if path.exists():
            raise
        raise FileNotFoundError(
            f"data.dataset={name!r} is no local file or directory and could not be loaded from the hub ({err}); "
            "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), only datasets in the cache load by name."
        ) from err


def _split_of_saved(saved: Any, split: str, name: str) -> Any:
    """``split`` (a name with an optional slice, e.g. ``test[:200]``; ``a+b`` joins) of a ``load_from_disk`` result;
    a single saved ``Dataset`` is its own split, whatever its name."""
    datasets = _datasets()
    if isinstance(saved, datasets.DatasetDict):
        parts = dict(saved)
    else:
        parts = {split.split("[")[0].strip(): saved}
    try:
        ranges = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in parts.items()})
    except (ValueError, AssertionError) as err:
        raise ValueError(f"data.split={split!r}: {name} has the splits {sorted(parts)} ({err}).") from err
    pieces = [parts[r.splitname].select(range(r.from_, r.to)) for r in ranges]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def _column(columns: list[str], given: str | None, defaults: tuple[str, ...], flag: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{flag}={given!r} is not a column of the dataset; its columns are {columns}.")
        return given
    return next((c for c in defaults if c in columns), None)


def _image(value: Any, where: str, root: Path | None) -> Image.Image:
    """One image cell as RGB: a PIL image, bytes, a ``{"bytes", "path"}`` dict, or a path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as image:
                return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where}: cannot decode the image bytes ({err}).") from err
    if isinstance(value, str) and value.strip():
        from lightning_tlq.data import _load_image

        path = Path(value).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
        return _load_image(path, where)
    raise ValueError(
        f"{where}: an image must be a PIL image, bytes, a {{'bytes', 'path'}} dict or a path, not {value!r}."
    )


def _images(value: Any, where: str, root: Path | None) -> list[Image.Image]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [_image(v, where, root) for v in values]


def _text(value: Any, where: str, column: str) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # e.g. several reference captions: the first one
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: column {column!r} must hold a non-empty string, got {value!r}.")
    return value


def dataset_samples(data: DataArgs) -> list[Any]:
    """The first ``data.num_samples`` rows (after a ``data.seed`` shuffle if ``data.shuffle``) of ``data.dataset``.

    Raises:
        ImportError: If ``datasets`` is not installed (says what to install).
        ValueError: If a named column does not exist, no usable columns are found (the message lists the columns),
            or a row is malformed (the message names the row).
    """
    assert data.dataset is not None
    table, folder = _load(data.dataset, data.split or "train")
    root = Path(data.image_root).expanduser() if data.image_root is not None else folder
    columns = list(table.column_names)
    images = _column(columns, data.image_column, IMAGE_COLUMNS, "data.image_column")
    chat = _column(columns, data.messages_column, MESSAGES_COLUMNS, "data.messages_column")
    question = _column(columns, data.question_column, QUESTION_COLUMNS, "data.question_column")
    answer = _column(columns, data.answer_column, ANSWER_COLUMNS, "data.answer_column")
    if chat is None and (answer is None or (question is None and "caption" not in answer)):
        raise ValueError(
            f"data.dataset={data.dataset!r} has the columns {columns}: no chat column ({', '.join(MESSAGES_COLUMNS)}) "
            "and no question + answer columns; name them with data.messages_column or data.question_column and "
            "data.answer_column."
        )
    if chat is None and images is None:
        raise ValueError(
            f"data.dataset={data.dataset!r} has the columns {columns} but no image column; name it with "
            "data.image_column."
        )
    order = list(range(len(table)))
    if data.shuffle:
        random.Random(data.seed).shuffle(order)
    order = order[: data.num_samples]
    if not order:
        raise ValueError(f"data.dataset={data.dataset!r} (split {data.split or 'train'!r}) has no rows.")
    return [_sample(table[i], f"{data.dataset} row {i}", root, images, chat, question, answer) for i in order]


def _sample(row: dict, where: str, root: Path | None, *columns: str | None) -> Any:
    images, chat, question, answer = columns
    from lightning_tlq.chat import parse_chat
    from lightning_tlq.data import Sample

    pictures = _images(row.get(images) if images else None, where, root)
    kind = str(row.get("kind") or "")
    if chat is not None:
        return parse_chat(row[chat], pictures, where, lambda source: _image(source, where, root), kind)
    if len(pictures) != 1:
        raise ValueError(f"{where}: a question-answer row needs exactly one image in {images!r}, got {len(pictures)}.")
    asked = _text(row[question], where, question) if question is not None else CAPTION_QUESTION
    return Sample(pictures[0], asked, _text(row[answer], where, answer), kind)
