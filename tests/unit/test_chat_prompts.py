"""`messages` as the third way to give a prompt: rendered with the model's chat template,
validated like every other field, and stopped at the template's end-of-turn token."""

from __future__ import annotations

import pytest
from smollm2 import hf_smollm2_tokenizer, smollm2_dir

from twolane.models.builtin import builtin_model_dir
from twolane.services.errors import InvalidArgumentError
from twolane.services.prompts import ModelPrompts
from twolane.services.validation import ModelLimits, validate_generate
from twolane.v1 import generate_pb2

LIMITS = ModelLimits(vocab_size=49152, max_model_len=2048)
CONVERSATION = [("system", "You answer in one word."), ("user", "What is the capital of France?")]


@pytest.fixture(scope="module")
def smollm2() -> ModelPrompts:
    return ModelPrompts.from_dir(smollm2_dir())


def chat_request(messages: list[tuple[str, str]], **fields: object) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(**fields)
    for role, content in messages:
        request.messages.add(role=role, content=content)
    return request


def violations(request: generate_pb2.GenerateRequest, prompts: ModelPrompts) -> list[str]:
    with pytest.raises(InvalidArgumentError) as info:
        validate_generate(request, LIMITS, prompts)
    return [v.field for v in info.value.violations]


def test_messages_become_the_templates_tokens_as_transformers_renders_them(
    smollm2: ModelPrompts,
) -> None:
    valid = validate_generate(chat_request(CONVERSATION), LIMITS, smollm2)
    expected = hf_smollm2_tokenizer().apply_chat_template(
        [{"role": r, "content": c} for r, c in CONVERSATION],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert valid.prompt_token_ids == list(expected)


def test_a_chat_reply_stops_at_the_end_of_turn_token(smollm2: ModelPrompts) -> None:
    end_of_turn = smollm2.tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert smollm2.chat_stop_token_ids == tuple(end_of_turn)
    valid = validate_generate(chat_request(CONVERSATION), LIMITS, smollm2)
    assert set(end_of_turn) <= set(valid.params.stop_token_ids)
    # A plain prompt keeps the stop tokens it asked for, and no others.
    plain = validate_generate(generate_pb2.GenerateRequest(prompt="Hi"), LIMITS, smollm2)
    assert plain.params.stop_token_ids == ()


def test_messages_and_another_prompt_together_name_the_field(smollm2: ModelPrompts) -> None:
    assert violations(chat_request(CONVERSATION, prompt="also this"), smollm2) == ["messages"]
    both = chat_request(CONVERSATION, prompt_token_ids=[1, 2])
    assert violations(both, smollm2) == ["messages"]


def test_a_message_without_a_role_names_its_index(smollm2: ModelPrompts) -> None:
    assert violations(chat_request([("user", "hi"), ("", "x")]), smollm2) == ["messages[1].role"]


def test_a_model_without_a_chat_template_refuses_messages() -> None:
    builtin = ModelPrompts.from_dir(builtin_model_dir())
    assert builtin.template is None
    assert violations(chat_request(CONVERSATION), builtin) == ["messages"]
