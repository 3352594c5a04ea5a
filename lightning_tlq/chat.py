"""Chat-format samples: OpenAI-style ``messages`` and LLaVA/ShareGPT ``conversations``, rendered by the model's chat
template, with the SFT loss on every assistant turn.

A :class:`ChatSample` holds normalised turns (roles ``system`` / ``user`` / ``assistant``, content a list of
``{"type": "image"}`` and ``{"type": "text", "text": ...}`` parts) and its images in order of appearance.
:func:`encode_chat` renders it with ``processor.apply_chat_template`` and supervises exactly the tokens the template
renders for each assistant turn (see :func:`assistant_spans`); nothing is guessed from strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROLES: tuple[str, ...] = ("system", "user", "assistant")
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IMAGE_MARKER = "<image>"
_INLINE_IMAGE_KEYS = ("image", "path", "url")

Part = dict[str, str]
Message = dict[str, Any]


@dataclass
class ChatSample:
    """One conversation with its images.

    Attributes:
        messages: Turns ``{"role": "system" | "user" | "assistant", "content": [parts]}``, each part
            ``{"type": "image"}`` or ``{"type": "text", "text": str}``.
        images: RGB images, one per image part, in order of appearance.
        kind: Optional sample type (reported per type by ``evaluate``).
        chat_template: Jinja template used instead of the processor's (``data.chat_template``).
    """

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    kind: str = ""
    chat_template: str | None = None

    @property
    def question(self) -> str:
        """The text of the first user turn (for messages and per-sample reports)."""
        return _first_text(self.messages, "user")

    @property
    def answer(self) -> str:
        """The text of the first assistant turn (the reference answer of ``evaluate``)."""
        return _first_text(self.messages, "assistant")


def _first_text(messages: Sequence[Message], role: str) -> str:
    for message in messages:
        if message["role"] == role:
            return " ".join(p["text"] for p in message["content"] if p["type"] == "text")
    return ""


# --------------------------------------------------------------------------------------------- parsing


def _text_parts(text: str, markers: bool) -> list[Part]:
    """A text as parts; with ``markers``, every ``<image>`` becomes an image part (whitespace around it dropped)."""
    if not markers:
        return [{"type": "text", "text": text}] if text else []
    parts: list[Part] = []
    pieces = text.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            piece = piece.lstrip()
        if i < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


def _content_parts(content: Any, where: str, load: Callable[[Any], Image.Image], inline: list) -> list[Part]:
    """OpenAI-style content (a string or a list of parts) as normalised parts; inline images go to ``inline``."""
    if isinstance(content, str):
        return _text_parts(content, markers=False)
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}.")
    parts: list[Part] = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise ValueError(f"{where}: a text part needs a string 'text', got {item!r}.")
            parts.append({"type": "text", "text": item["text"]})
        elif kind == "image":
            source = next((item[k] for k in _INLINE_IMAGE_KEYS if item.get(k) is not None), None)
            inline.append(None if source is None else load(source))
            parts.append({"type": "image"})
        else:
            raise ValueError(
                f"{where}: unsupported content part {item!r}; use {{'type': 'image'}} or "
                "{'type': 'text', 'text': ...}."
            )
    return parts


def _attach_images(inline: list, images: list[Image.Image], where: str, what: str) -> list:
    """Images in order of their parts: inline ones where given, the sample's list for the others (counts checked)."""
    wanted = sum(image is None for image in inline)
    if wanted != len(images):
        more = "more" if wanted > len(images) else "fewer"
        raise ValueError(
            f"{where}: {wanted} {what} but {len(images)} image(s) given ({more} {what} than images); every "
            "image needs exactly one place in the conversation."
        )
    given = iter(images)
    return [image if image is not None else next(given) for image in inline]


def _check_turns(messages: list[Message], where: str) -> None:
    if not messages:
        raise ValueError(f"{where}: the conversation has no turns.")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise ValueError(f"{where}: the conversation has no assistant turn; there is nothing to supervise.")
    for m in assistants:
        if not any(p["type"] == "text" and p["text"].strip() for p in m["content"]):
            raise ValueError(f"{where}: an assistant turn is empty; every assistant turn needs text to supervise.")


def parse_messages(
    turns: Any, images: Sequence[Image.Image], where: str, load: Callable[[Any], Image.Image], kind: str = ""
) -> ChatSample:
    """OpenAI-style ``messages`` (``role`` system/user/assistant; content a string or parts) as a sample.

    Image parts without an inline ``"image"`` / ``"path"`` take the sample's ``images`` in order.

    Raises:
        ValueError: On an unknown role, a malformed part, image parts and images that do not match in number, or no
            (non-empty) assistant turn; the message starts with ``where``.
    """
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'messages' must be a list of turns, got {type(turns).__name__}.")
    messages, inline = [], []
    for i, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has role {role!r}; roles must be one of {', '.join(ROLES)}.")
        messages.append({"role": role, "content": _content_parts(turn.get("content"), where, load, inline)})
    all_images = _attach_images(inline, list(images), where, "image part(s)")
    _check_turns(messages, where)
    return ChatSample(messages, all_images, kind)


def parse_conversations(turns: Any, images: Sequence[Image.Image], where: str, kind: str = "") -> ChatSample:
    """LLaVA/ShareGPT ``conversations`` (``from`` human/gpt/system, ``value`` text with ``<image>`` markers).

    Raises:
        ValueError: On an unknown ``from``, a non-string ``value``, more or fewer ``<image>`` markers than images,
            or no (non-empty) assistant turn; the message starts with ``where``.
    """
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'conversations' must be a list of turns, got {type(turns).__name__}.")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"{where}: conversation turn {i} has from={speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}."
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"{where}: conversation turn {i} needs a string 'value', got {value!r}.")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _text_parts(value, markers=True)})
    markers = sum(p["type"] == "image" for m in messages for p in m["content"])
    all_images = _attach_images([None] * markers, list(images), where, f"{IMAGE_MARKER} marker(s)")
    _check_turns(messages, where)
    return ChatSample(messages, all_images, kind)


def parse_chat(
    turns: Any, images: Sequence[Image.Image], where: str, load: Callable[[Any], Image.Image], kind: str = ""
) -> ChatSample:
    """``messages`` or ``conversations`` turns, told apart by their keys (``role`` or ``from``)."""
    first = turns[0] if isinstance(turns, list) and turns else None
    if isinstance(first, dict) and "from" in first:
        return parse_conversations(turns, images, where, kind)
    return parse_messages(turns, images, where, load, kind)


def one_turn(image: Image.Image, question: str, answer: str, kind: str = "") -> ChatSample:
    """An ``{image, question, answer}`` sample as the equivalent one-turn chat."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    return ChatSample([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], [image], kind)


def read_template(path: str) -> str:
    """The text of a ``data.chat_template`` file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.chat_template={path!r}: no such file; pass a Jinja chat template file.")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data.chat_template={path!r} is empty; pass a Jinja chat template.")
    return text


# --------------------------------------------------------------------------------------------- rendering + masks


def assistant_spans(
    render: Callable[[list[Message], bool], str],
    tokenize: Callable[[str, int], list[int]],
    messages: Sequence[Message],
    where: str,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole rendered conversation and the ``[start, end)`` span of every assistant turn.

    Each assistant turn ``k`` is found from the template itself: ``P`` renders the turns before it with the
    generation prompt, ``F`` the turns up to and including it; the turn's text is ``F[len(P):]`` without trailing
    whitespace, i.e. the assistant's content and the end-of-turn token the template closes it with (``</s>``,
    ``<|im_end|>``, ``<end_of_turn>``, ``<end_of_utterance>``: what the model must learn to emit to stop), but not
    the newline some templates put after it (never generated). The span is the tokens of ``P + turn`` after those
    of ``P``; this requires that the tokens of each prefix are a prefix of the tokens of the whole (checked).

    Args:
        render: ``render(messages, add_generation_prompt)`` -> text.
        tokenize: ``tokenize(text, n_images)`` -> ids (``n_images``: images whose placeholders the text holds).
        messages: Normalised turns (see :class:`ChatSample`).
        where: Names the sample in errors.

    Raises:
        ValueError: If the template renders a prefix differently from the whole conversation, the tokenization of a
            prefix is not a prefix of the whole's, or an assistant turn renders no tokens.
    """
    full_text = render(list(messages), False)
    ids = tokenize(full_text, _count_images(messages))
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(list(messages[:k]), True)
        turn = render(list(messages[: k + 1]), False)
        if not turn.startswith(prompt) or not full_text.startswith(turn):
            raise ValueError(
                f"{where}: the chat template renders assistant turn {k} differently inside the conversation than "
                "after its prefix (it is not incremental), so the answer tokens cannot be found; use "
                "data.chat_template with a template that renders every turn the same way."
            )
        text = turn[len(prompt) :].rstrip()
        start = tokenize(prompt, _count_images(messages[:k]))
        stop = tokenize(prompt + text, _count_images(messages[: k + 1]))
        if stop[: len(start)] != start or ids[: len(stop)] != stop:
            raise ValueError(
                f"{where}: tokenizing the rendered conversation does not give the tokens of its turns in sequence "
                f"(at assistant turn {k}), so the answer mask cannot be taken from the template."
            )
        if len(stop) == len(start):
            raise ValueError(
                f"{where}: the chat template renders no tokens for assistant turn {k}; the sample has nothing to "
                "supervise (does the template drop assistant turns? pass another with data.chat_template)."
            )
        spans.append((len(start), len(stop)))
    if not spans:
        raise ValueError(f"{where}: the chat template renders no assistant tokens; there is nothing to supervise.")
    return ids, spans


def _count_images(messages: Sequence[Message]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def encode_chat(
    processor: Any, sample: ChatSample, max_length: int | None = None, *, name: str | None = None
) -> dict[str, torch.Tensor]:
    """Encode a conversation rendered by the chat template, supervising every assistant turn.

    The labels (``input_ids`` outside the assistant spans of :func:`assistant_spans` set to -100) cover each
    assistant turn's content and its end-of-turn token.

    Args:
        processor: A multimodal HF processor with a chat template (or ``sample.chat_template``).
        sample: The conversation.
        max_length: Maximum sequence length; defaults to the tokenizer's ``model_max_length``.
        name: How to call the sample in error messages.

    Returns:
        The processor's tensors with batch dim 1 plus ``labels``, as :func:`lightning_tlq.data.encode_sample`.

    Raises:
        ValueError: If there is no chat template, the mask cannot be derived (see :func:`assistant_spans`), or the
            sequence is longer than the limit (never truncated).
    """
    from lightning_tlq.processing import IGNORE_INDEX, length_limit, run_processor

    label = name or f"sample {sample.question!r}"
    template = sample.chat_template or getattr(processor, "chat_template", None)
    if not template:
        raise ValueError(
            f"{label}: {type(processor).__name__} has no chat template, which chat-format samples are rendered "
            "with; pass one with --data.chat_template file.jinja."
        )

    def render(messages: list[Message], generation: bool) -> str:
        if not messages and not generation:
            return ""
        return processor.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=generation, tokenize=False
        )

    encoded: dict[str, dict[str, torch.Tensor]] = {}

    def tokenize(text: str, n_images: int) -> list[int]:
        try:
            encoded[text] = run_processor(processor, sample.images[:n_images], text)
        except ValueError as err:
            raise ValueError(
                f"{label}: the processor refused the text rendered by the chat template ({err}); does the template "
                "place every image part?"
            ) from err
        return encoded[text]["input_ids"][0].tolist()

    full_text = render(sample.messages, False)
    ids, spans = assistant_spans(render, tokenize, sample.messages, label)
    full = encoded[full_text]
    limit = length_limit(processor, max_length)
    if limit is not None and len(ids) > limit:
        raise ValueError(
            f"{label}: {len(ids)} tokens exceed the limit of {limit} by {len(ids) - limit}; shorten the conversation "
            "or raise max_length (samples are never truncated)."
        )
    labels = torch.full_like(full["input_ids"], IGNORE_INDEX)
    for start, stop in spans:
        labels[:, start:stop] = full["input_ids"][:, start:stop]
    return {**full, "labels": labels}
