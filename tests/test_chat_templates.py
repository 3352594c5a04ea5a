"""The answer mask of chat samples comes from each family's chat template: for a template of every supported family
(simplified from the real checkpoints' templates, same turn markers and end-of-turn tokens) and a word-level
tokenizer, the supervised spans are exactly each assistant turn's content plus its end-of-turn token."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_tlq.chat import assistant_spans

_PARTS = (
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}"
)
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _PARTS + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN = (  # Qwen2-VL: a default system prompt when the conversation has none
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + _CHATML
)
_LLAVA = (  # llava-hf 1.5: "USER: <image>\n... ASSISTANT: ...</s>"
    "{% for message in messages %}{% if message['role'] == 'system' %}" + _PARTS + " "
    "{% elif message['role'] == 'user' %}USER: " + _PARTS + " {% else %}ASSISTANT: " + _PARTS + "</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_GEMMA3 = (  # system folded into the first user turn; the assistant is "model"
    "<bos>{% set first = messages[0]['content'][0]['text'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{% if loop.first %}{{ first }}{% endif %}"
    + _PARTS
    + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_IDEFICS3 = (  # also SmolVLM
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}" + _PARTS + "<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
# family: (template, image placeholder, end-of-turn token, special tokens)
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")
FAMILY_TEMPLATES = {
    "llava": (_LLAVA, "<image>\n", "</s>", ("</s>", "<image>")),
    "llava_onevision": (_QWEN, "<image>\n", "<|im_end|>", (*_CHATML_SPECIALS, "<image>")),
    "qwen2_vl": (_QWEN, _QWEN_IMAGE, "<|im_end|>", (*_CHATML_SPECIALS, "<|vision_start|>", "<|image_pad|>",
                                                    "<|vision_end|>")),
    "qwen2_5_vl": (_QWEN, _QWEN_IMAGE, "<|im_end|>", (*_CHATML_SPECIALS, "<|vision_start|>", "<|image_pad|>",
                                                      "<|vision_end|>")),
    "qwen3_vl": (_CHATML, _QWEN_IMAGE, "<|im_end|>", (*_CHATML_SPECIALS, "<|vision_start|>", "<|image_pad|>",
                                                      "<|vision_end|>")),
    "internvl": (_CHATML, "<img><IMG_CONTEXT></img>\n", "<|im_end|>", (*_CHATML_SPECIALS, "<img>", "<IMG_CONTEXT>",
                                                                         "</img>")),
    "gemma3": (_GEMMA3, "<start_of_image>", "<end_of_turn>", ("<bos>", "<start_of_turn>", "<end_of_turn>",
                                                              "<start_of_image>")),
    "idefics3": (_IDEFICS3, "<image>", "<end_of_utterance>", ("<|im_start|>", "<end_of_utterance>", "<image>")),
    "smolvlm": (_IDEFICS3, "<image>", "<end_of_utterance>", ("<|im_start|>", "<end_of_utterance>", "<image>")),
}  # fmt: skip
ANSWERS = ("a red square", "two", "it is on the left")


def _conversation(system: bool) -> list[dict]:
    def text(t: str) -> dict:
        return {"type": "text", "text": t}

    turns = [{"role": "system", "content": [text("answer briefly")]}] if system else []
    return [
        *turns,
        {"role": "user", "content": [{"type": "image"}, text("what is in the image ?")]},
        {"role": "assistant", "content": [text(ANSWERS[0])]},
        {"role": "user", "content": [text("how many ?"), {"type": "image"}]},
        {"role": "assistant", "content": [text(ANSWERS[1])]},
        {"role": "user", "content": [text("where ?")]},
        {"role": "assistant", "content": [text(ANSWERS[2])]},
    ]


def _tokenizer(texts: list[str], specials: tuple[str, ...]) -> PreTrainedTokenizerFast:
    splitter = pre_tokenizers.Whitespace()
    words = set()
    for text in texts:
        for special in specials:
            text = text.replace(special, " ")
        words |= {w for w, _ in splitter.pre_tokenize_str(text)}
    vocab = {t: i for i, t in enumerate(["<unk>", *specials, *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("family", sorted(FAMILY_TEMPLATES))
def test_mask_is_exactly_each_assistant_turn_and_its_end_token(family, system):
    template, image, end, specials = FAMILY_TEMPLATES[family]
    template = template.replace("IMAGE", image)
    messages = _conversation(system)

    def render(turns, generation):
        if not turns and not generation:
            return ""
        return tokenizer.apply_chat_template(
            turns, chat_template=template, add_generation_prompt=generation, tokenize=False
        )

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    full = render(messages, False)
    tokenizer = _tokenizer([full], specials)
    seen = []

    def tokenize(text, n_images):
        assert text.count(image.strip()) == n_images, "the images passed are those whose placeholders the text holds"
        seen.append(text)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, spans = assistant_spans(render, tokenize, messages, family)
    assert ids == tokenize(full, 2)
    assert "<unk>" not in tokenizer.convert_ids_to_tokens(ids)
    end_id = tokenizer.convert_tokens_to_ids(end)
    expected = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end_id] for a in ANSWERS]
    assert [ids[a:b] for a, b in spans] == expected
    # The token before each span ends the generation prompt (the template's, not the answer's).
    prompt_end = tokenizer(render(messages[: 1 + system], True), add_special_tokens=False)["input_ids"][-1]
    assert all(ids[a - 1] == prompt_end for a, _ in spans)


def test_template_that_is_not_incremental_is_refused():
    # Like Qwen3's thinking templates: earlier assistant turns render differently from the last one.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and not loop.last %}...{% else %}"
        "{{ m['content'][0]['text'] }}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    messages = _conversation(False)
    tokenizer = _tokenizer(["user assistant ... " + " ".join(ANSWERS) + " what is in the image ? how many where"], ())

    def render(turns, generation):
        return tokenizer.apply_chat_template(
            turns, chat_template=template, add_generation_prompt=generation, tokenize=False
        )

    def tokenize(text, n):
        return tokenizer(text)["input_ids"]

    with pytest.raises(ValueError, match="renders assistant turn 1 differently .* not incremental"):
        assistant_spans(render, tokenize, messages, "sample 0")


def test_template_that_renders_no_assistant_tokens_is_refused():
    template = "{% for m in messages if m['role'] != 'assistant' %}{{ m['role'] }}: x {% endfor %}"
    tokenizer = _tokenizer(["user x"], ())

    def render(turns, generation):
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False) if turns else ""

    with pytest.raises(ValueError, match="sample 3: the chat template renders no tokens for assistant turn 1"):
        assistant_spans(render, lambda text, n: tokenizer(text)["input_ids"], _conversation(False), "sample 3")
