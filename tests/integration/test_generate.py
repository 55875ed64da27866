"""Generate and GenerateStream give the tokens transformers gives, alone or 32 at a time."""

from __future__ import annotations

import asyncio

import pytest
import tokenizers
import torch

from twolane.models.builtin import builtin_model_dir
from twolane.v1 import generate_pb2, inference_pb2_grpc

PROMPTS = ["Hello, my name is", "The capital of France", "a", "1 2 3 4 5 6 7 8 9 10"]
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(builtin_model_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def transformers_greedy(tokenizer: tokenizers.Tokenizer) -> dict[str, list[int]]:
    """Greedy continuations of PROMPTS by transformers on the built-in weights."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
    model.eval()
    # EOS does not stop either side (ignore_eos on the server), so sequences have equal length.
    config = GenerationConfig(
        max_new_tokens=NUM_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    continuations = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            prompt_ids = tokenizer.encode(prompt).ids
            out = model.generate(torch.tensor([prompt_ids]), generation_config=config)
            continuations[prompt] = out[0, len(prompt_ids) :].tolist()
    return continuations


def greedy(max_tokens: int = NUM_NEW_TOKENS) -> generate_pb2.SamplingParams:
    return generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def stream_all(
    stub: inference_pb2_grpc.InferenceServiceStub, request: generate_pb2.GenerateStreamRequest
) -> list[generate_pb2.GenerateStreamResponse]:
    return [chunk async for chunk in stub.GenerateStream(request)]


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_generate_matches_transformers_greedy(
    stub: inference_pb2_grpc.InferenceServiceStub,
    transformers_greedy: dict[str, list[int]],
    tokenizer: tokenizers.Tokenizer,
    prompt: str,
) -> None:
    response = await stub.Generate(generate_pb2.GenerateRequest(prompt=prompt, params=greedy()))
    assert list(response.token_ids) == transformers_greedy[prompt]
    assert response.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt).ids)
    assert response.usage.completion_tokens == NUM_NEW_TOKENS


async def test_prompt_token_ids_give_the_same_tokens_as_the_text(
    stub: inference_pb2_grpc.InferenceServiceStub,
    transformers_greedy: dict[str, list[int]],
    tokenizer: tokenizers.Tokenizer,
) -> None:
    prompt_ids = tokenizer.encode(PROMPTS[0]).ids
    request = generate_pb2.GenerateRequest(prompt_token_ids=prompt_ids, params=greedy())
    response = await stub.Generate(request)
    assert list(response.token_ids) == transformers_greedy[PROMPTS[0]]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
async def test_stream_matches_transformers_and_the_unary_text(
    stub: inference_pb2_grpc.InferenceServiceStub,
    transformers_greedy: dict[str, list[int]],
    prompt: str,
) -> None:
    unary = await stub.Generate(generate_pb2.GenerateRequest(prompt=prompt, params=greedy()))
    chunks = await stream_all(
        stub, generate_pb2.GenerateStreamRequest(prompt=prompt, params=greedy())
    )
    assert [t for c in chunks for t in c.token_ids] == transformers_greedy[prompt]
    assert "".join(c.text for c in chunks) == unary.text


async def test_only_the_last_stream_message_finishes_with_usage(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    chunks = await stream_all(
        stub, generate_pb2.GenerateStreamRequest(prompt=PROMPTS[0], params=greedy())
    )
    assert len(chunks) > 1
    *rest, last = chunks
    assert all(c.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for c in rest)
    assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == NUM_NEW_TOKENS
    assert last.usage.prompt_tokens > 0
    assert last.timing.ttft_s > 0
    assert len({c.request_id for c in chunks}) == 1


async def test_stream_never_splits_a_multibyte_character(
    stub: inference_pb2_grpc.InferenceServiceStub, tokenizer: tokenizers.Tokenizer
) -> None:
    # Hot seeded sampling over the byte-level vocabulary yields valid multi-byte UTF-8 characters.
    params = generate_pb2.SamplingParams(max_tokens=256, temperature=50.0, seed=7, ignore_eos=True)
    unary = await stub.Generate(generate_pb2.GenerateRequest(prompt="é", params=params))
    chunks = await stream_all(stub, generate_pb2.GenerateStreamRequest(prompt="é", params=params))
    full_text = tokenizer.decode(list(unary.token_ids))
    assert any(ord(ch) > 0x7F and ch != "\ufffd" for ch in full_text), "no multi-byte output"
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    # Some character's bytes came from separate steps, so the stream had to hold text back.
    assert any(c.token_ids and not c.text for c in chunks)
    # A split character would show up as replacement characters in the joined chunks.
    assert "".join(c.text for c in chunks) == unary.text == full_text


async def test_32_concurrent_streams_all_finish_with_their_greedy_tokens(
    stub: inference_pb2_grpc.InferenceServiceStub, transformers_greedy: dict[str, list[int]]
) -> None:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    requests = [generate_pb2.GenerateStreamRequest(prompt=p, params=greedy()) for p in prompts]
    results = await asyncio.gather(*(stream_all(stub, r) for r in requests))
    for prompt, chunks in zip(prompts, results, strict=True):
        assert chunks[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert [t for c in chunks for t in c.token_ids] == transformers_greedy[prompt]
