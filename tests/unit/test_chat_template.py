"""Chat templates render as transformers' `apply_chat_template` does, in a sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from smollm2 import hf_smollm2_tokenizer, smollm2_dir

from twolane.models.builtin import builtin_model_dir
from twolane.models.chat import ChatTemplate, ChatTemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?\nTell me more."},
    ],
    [
        {"role": "user", "content": "Write code"},
        {"role": "assistant", "content": "def f():\n    return 1"},
        {"role": "user", "content": "  spaces  and\ttabs, 日本語 😀 "},
    ],
]


@pytest.fixture(scope="module")
def smollm2_template() -> ChatTemplate:
    template = ChatTemplate.from_dir(smollm2_dir())
    assert template is not None
    return template


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_renders_as_transformers(
    smollm2_template: ChatTemplate, add_generation_prompt: bool
) -> None:
    reference = hf_smollm2_tokenizer()
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert smollm2_template.render(messages, add_generation_prompt) == expected


def test_messages_may_be_role_content_pairs(smollm2_template: ChatTemplate) -> None:
    pairs = [(m["role"], m["content"]) for m in CONVERSATIONS[2]]
    assert smollm2_template.render(pairs) == smollm2_template.render(CONVERSATIONS[2])
    assert smollm2_template.render(pairs).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_stops_on_im_end(smollm2_template: ChatTemplate) -> None:
    # <|im_end|> (id 2) closes every turn and is also the file's EOS.
    assert smollm2_template.stop_token_ids == (2,)


def test_end_of_turn_token_other_than_eos_is_found(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(smollm2_dir(), model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = "<|endoftext|>"
    config_path.write_text(json.dumps(config))
    template = ChatTemplate.from_dir(model_dir)
    assert template is not None and template.stop_token_ids == (0, 2)


def test_model_without_template_has_none() -> None:
    assert ChatTemplate.from_dir(builtin_model_dir()) is None


def test_raise_exception_in_a_template_is_a_clear_error() -> None:
    source = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    template = ChatTemplate.build(source, {}, None)
    assert template.render([("user", "ok")]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        template.render([("assistant", "no")])


def test_special_tokens_and_trimmed_blocks_reach_the_template() -> None:
    # Indentation before a block tag and the newline after it are not output.
    source = (
        "{{ bos_token }}\n  {% for m in messages %}\n{{ m['content'] }}{{ eos_token }}\n"
        "  {% endfor %}\n"
    )
    template = ChatTemplate.build(source, {"bos_token": "<s>", "eos_token": "</s>"}, None)
    assert template.render([("user", "a"), ("assistant", "b")]) == "<s>\na</s>\nb</s>\n"


def test_the_sandbox_refuses_python_internals() -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate.build(escape, {}, None).render([("user", "x")])
    namespace = "{% set ns = namespace(__init__=1) %}{{ ns }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate.build(namespace, {}, None).render([("user", "x")])


def test_invalid_template_fails_when_loaded() -> None:
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate.build("{% for m in messages %}unclosed", {}, None)
