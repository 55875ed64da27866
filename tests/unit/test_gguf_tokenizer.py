"""Tokenizers built from GGUF metadata encode and decode as transformers' GGUF tokenizer does.

One known difference, by design: SmolLM2's file says `tokenizer.ggml.pre = "smollm"`,
for which llama.cpp (and SmolLM2's own tokenizer.json) cut every digit off on its own
before the GPT-2 split. transformers' GGUF loader has no entry for "smollm" and uses the
plain GPT-2 split, so around digits (`"  12"`, `" ½"`) its tokens differ. Text without
digits must match it exactly; text with digits must match it once its pre-tokenizer is
given the digit split.
"""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from gguf_files import write_tiny_gguf
from smollm2 import hf_smollm2_tokenizer, smollm2_dir
from tokenizers import pre_tokenizers

from twolane.models.gguf import convert_gguf
from twolane.models.tokenizer import Tokenizer

FRAGMENTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "   three spaces",
    "tabs\tand\t\ttabs",
    "new\nline",
    "\n\n\nblank lines\n",
    "\r\nwindows line\r\n",
    "mixed \t \n whitespace",
    "naïve café résumé",
    "Ünïcödé ÀÉÎÕÜ",
    "日本語のテキスト",
    "中文字符和标点，。！",
    "한국어 문장입니다",
    "Привет, мир",
    "مرحبا بالعالم",
    "עברית",
    "ελληνικά",
    "😀 😃 😄 😁",
    "👍🏽👨‍👩‍👧‍👦🇫🇷",
    "emoji😀inside",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM users WHERE id = 42;",
    '{"key": "value", "list": [1, 2, 3]}',
    "<div class='x'>&amp;</div>",
    "path/to/file.py:12:5",
    "https://example.com/a?b=c&d=e#f",
    "it's they're we've I'm you'll he'd",
    "IT'S THEY'RE",
    "3.14159 2.71828",
    "1234567890",
    "phone: +1 (555) 010-9999",
    "  12  ",
    "x² + y² = z²",
    "½ cup, ¼ tsp, ⅓ more",
    "① ② ③ Ⅳ Ⅻ",
    "١٢٣ ४५६",
    "$100.00 €50 £20 ¥1000",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start|><|im_start|>",
    "<repo_name>a<file_sep>b",
    "<|im_start",
    "<think>reasoning</think>",
    "a" * 40,
    "ab" * 25,
    "!!!???...---",
    "\u200b zero width \u200b",
    "\u00a0non-breaking\u00a0spaces",
    "combining e\u0301 vs é",
    "",
    " ",
    "\t",
    "\n",
]


def corpus(size: int = 320, seed: int = 0) -> list[str]:
    """The fragments, then random mixes of them (joined by nothing, spaces or newlines)."""
    rng = random.Random(seed)
    texts = list(FRAGMENTS)
    while len(texts) < size:
        parts = rng.sample(FRAGMENTS, rng.randint(2, 4))
        texts.append(rng.choice(["", " ", "\n", "  ", "\t"]).join(parts))
    return texts


def has_digit(text: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in text)


def assert_same(ours: Tokenizer, theirs: Any, texts: list[str]) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], repr(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), repr(text)


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir())


def test_smollm2_matches_transformers_on_text_without_digits(ours: Tokenizer) -> None:
    texts = [t for t in corpus() if not has_digit(t)]
    assert len(texts) > 150
    assert_same(ours, hf_smollm2_tokenizer(), texts)


def test_smollm2_matches_transformers_with_the_digit_split_on_every_text(
    ours: Tokenizer,
) -> None:
    import copy

    theirs = copy.deepcopy(hf_smollm2_tokenizer())
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    texts = corpus()
    assert sum(has_digit(t) for t in texts) > 50
    assert_same(ours, theirs, texts)


def test_smollm2_cuts_every_digit_off_as_llama_cpp_does(ours: Tokenizer) -> None:
    digit_ids = [ours.encode(d) for d in "0123456789"]
    assert all(len(ids) == 1 for ids in digit_ids)
    assert ours.encode("  12  ") == [ours.encode("  ")[0], *digit_ids[1], *digit_ids[2], 256]
    assert ours.encode("2024") == [*digit_ids[2], *digit_ids[0], *digit_ids[2], *digit_ids[4]]


def test_smollm2_special_tokens_stay_whole_and_no_bos_is_added(ours: Tokenizer) -> None:
    assert ours.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert ours.encode("hi")[0] != 1  # add_bos_token is false in the file
    assert ours.decode([1, 4093, 2]) == "user"  # control tokens are dropped from text


@pytest.mark.parametrize(("arch", "pre"), [("qwen2", "qwen2"), ("llama", "llama-bpe")])
def test_regex_split_vocabularies_match_transformers(tmp_path: Path, arch: str, pre: str) -> None:
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, pre=pre)
    ours = Tokenizer.from_dir(convert_gguf(path, cache_dir=tmp_path / "cache"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert_same(ours, theirs, corpus(size=200, seed=1))
    # The user-defined token is matched whole and, unlike control tokens, kept in text.
    think = ours.encode("<think>")
    assert len(think) == 1 and ours.decode(think) == "<think>"
