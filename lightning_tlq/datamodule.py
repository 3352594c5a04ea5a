"""Image-question-answer data as a ``LightningDataModule``: calibration, evaluation and (in examples) fine-tuning.

:class:`CalibrationDataModule` takes the same settings as :class:`~lightning_tlq.config.DataArgs` (so a YAML
``data:`` block reads the same for every subcommand) and serves collated batches in the format of
:mod:`lightning_tlq.data`. Encoding needs the model's processor; the datamodule takes it from
:meth:`CalibrationDataModule.prepare`, or, inside a Trainer, from ``trainer.lightning_module`` (its ``processor`` and
``model`` attributes) the first time a dataloader is requested.

Its :meth:`~CalibrationDataModule.calibration_dataloader` is the contract that
:class:`~lightning_tlq.callbacks.TLQCallback` relies on: any datamodule with such a method works.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tlq.chat import ChatSample, one_turn, read_template
from lightning_tlq.config import DataArgs
from lightning_tlq.data import Sample, collate, encode_sample, load_jsonl, shorten, synthetic_samples


def load_samples(data: DataArgs, task: str | None = None, default_split: str = "calibration") -> list[Any]:
    """The first ``data.num_samples`` samples of ``data.path`` / ``data.dataset``, or that many of the built-in task's.

    Chat records load as :class:`~lightning_tlq.chat.ChatSample`; with ``data.chat_template`` every sample is a chat
    rendered by that template.

    Args:
        data: The data settings.
        task: The built-in task when ``data.path`` is None: ``"scenes"`` (what the embedded model was trained on;
            its ``data.split``) or None for the tiny models' shapes set.
        default_split: The split used when ``data.split`` is None.

    Raises:
        FileNotFoundError: If the JSONL or one of its images is missing.
        ValueError: On a corrupt image, bad JSON, an empty answer or an empty file (the message names the line).
    """
    template = read_template(data.chat_template) if data.chat_template is not None else None
    if data.dataset is not None:
        from lightning_tlq.datasets_source import dataset_samples

        samples = dataset_samples(data)
    elif data.path is None:
        from lightning_tlq.tasks.scenes_hard import VARIANTS

        if task == "scenes" or task in VARIANTS:
            samples = scenes_samples(data.split or default_split, data.num_samples, seed=data.seed, task=task)
        else:
            samples = synthetic_samples(data.num_samples, seed=data.seed)
    else:
        samples = load_jsonl(data.path, image_root=data.image_root)
        if data.shuffle:
            random.Random(data.seed).shuffle(samples)
        samples = samples[: data.num_samples]
    return samples if template is None else [with_template(s, template) for s in samples]


def scenes_samples(split: str, n: int, seed: int = 0, task: str = "scenes") -> list[Sample]:
    """``n`` samples of the scenes task's ``split`` (``calibration`` is its training split); ``task`` may also
    name a hard-scenes variant (``scenes_hard``, ``scenes_fine``, ``scenes_finer``)."""
    from lightning_tlq.tasks import scenes, scenes_hard

    name = "train" if split == "calibration" else split
    if task == "scenes":
        examples = scenes.take(name, n, seed=seed)
    else:
        examples = scenes_hard.take(name, n, seed=seed, kinds=scenes_hard.variant_kinds(task))
    return [Sample(e.pil(), e.question, e.answer, e.kind) for e in examples]


def with_template(sample: Sample | ChatSample, template: str) -> ChatSample:
    """The sample as a chat rendered by ``template`` (an ``{image, question, answer}`` sample: one turn)."""
    if isinstance(sample, Sample):
        sample = one_turn(sample.image, sample.question, sample.answer, sample.kind)
    return replace(sample, chat_template=template)


def encode_samples(
    processor: Any, samples: Sequence[Sample | ChatSample], max_length: int | None
) -> list[dict[str, torch.Tensor]]:
    """Encode every sample (prompt + answer, answer supervised), naming the sample in any error."""
    if not samples:
        raise ValueError("The dataset is empty: there is nothing to calibrate or evaluate on.")
    return [
        encode_sample(processor, s, max_length=max_length, name=f"sample {i} ({shorten(s.question)})")
        for i, s in enumerate(samples)
    ]


class _Encoded(Dataset):
    def __init__(self, items: Sequence[dict[str, torch.Tensor]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class CalibrationDataModule(pl.LightningDataModule):
    """Calibration (and evaluation / fine-tuning) samples: a JSONL of image-question-answer or chat records, a Hugging
    Face dataset, or the built-in synthetic set.

    Args:
        path: JSONL of ``{"image", "question", "answer"}`` or chat records; None uses the built-in synthetic set.
        image_root: Folder that relative image paths start from (default: the JSONL's folder).
        num_samples: Samples to use (the first N of the file; synthetic: N generated).
        batch_size: Samples per batch.
        max_length: Reject samples longer than this many tokens (default: the model's limit). Never truncates.
        seed: Seed of the synthetic data (and of the training shuffle).
        split: Split of the built-in task when ``path`` is None, or of ``dataset`` (see
            :class:`~lightning_tlq.config.DataArgs`, which also documents the arguments below).
        dataset: Hugging Face ``datasets`` source (hub name, ``save_to_disk`` directory, data file).
        shuffle: Shuffle the records with ``seed`` before taking the first ``num_samples``.
        image_column: Dataset column of the image(s).
        messages_column: Dataset column of chat turns.
        question_column: Dataset column of the question.
        answer_column: Dataset column of the answer.
        chat_template: Jinja file rendering the samples instead of the processor's chat template.
    """

    def __init__(
        self,
        path: str | None = None,
        image_root: str | None = None,
        num_samples: int = 64,
        batch_size: int = 4,
        max_length: int | None = None,
        seed: int = 0,
        split: str | None = None,
        dataset: str | None = None,
        shuffle: bool = False,
        image_column: str | None = None,
        messages_column: str | None = None,
        question_column: str | None = None,
        answer_column: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        self.args = DataArgs(
            path=path,
            image_root=image_root,
            num_samples=num_samples,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            split=split,
            dataset=dataset,
            shuffle=shuffle,
            image_column=image_column,
            messages_column=messages_column,
            question_column=question_column,
            answer_column=answer_column,
            chat_template=chat_template,
        )
        self.samples: list[Sample | ChatSample] | None = None
        self.encoded: list[dict[str, torch.Tensor]] | None = None
        self.pad_token_id: int | None = None

    def prepare(
        self, processor: Any, pad_token_id: int | None, model_max_length: int | None = None, task: str | None = None
    ) -> CalibrationDataModule:
        """Load and encode the samples with ``processor``; every error names the offending sample.

        Args:
            processor: The model's multimodal processor.
            pad_token_id: Token id that pads ``input_ids`` (the model's).
            model_max_length: The model's position limit; ``max_length`` may not exceed it.
            task: The built-in task used when ``path`` is None (``"scenes"``; None: the shapes set).
        """
        from lightning_tlq.preflight import resolve_max_length

        limit = resolve_max_length(self.args.max_length, model_max_length)
        self.samples = load_samples(self.args, task)
        self.encoded = encode_samples(processor, self.samples, limit)
        self.pad_token_id = pad_token_id if pad_token_id is not None else processor.tokenizer.pad_token_id
        return self

    def _ensure_prepared(self) -> None:
        if self.encoded is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        processor, model = getattr(module, "processor", None), getattr(module, "model", None)
        if processor is None or model is None:
            raise RuntimeError(
                "CalibrationDataModule needs the model's processor to encode samples: call "
                "datamodule.prepare(processor, pad_token_id) first, or give the LightningModule `model` and "
                "`processor` attributes."
            )
        from lightning_tlq.adapters import get_adapter
        from lightning_tlq.models.scenes import model_task
        from lightning_tlq.preflight import model_max_length

        self.prepare(processor, get_adapter(model).pad_token_id, model_max_length(model), model_task(model.config))

    def _loader(self, shuffle: bool) -> DataLoader:
        self._ensure_prepared()
        generator = torch.Generator().manual_seed(self.args.seed) if shuffle else None
        return DataLoader(
            _Encoded(self.encoded or []),
            batch_size=self.args.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
        )

    def calibration_dataloader(self) -> DataLoader:
        """Collated batches in file order (what :class:`~lightning_tlq.callbacks.TLQCallback` calibrates on)."""
        return self._loader(shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Shuffled collated batches (for fine-tuning before quantization)."""
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Collated batches in file order."""
        return self._loader(shuffle=False)
