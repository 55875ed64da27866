"""Tokenizers (a `tokenizer.json` through the `tokenizers` package) and incremental detokenizing."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

# What a decoder yields for an incomplete UTF-8 sequence; text ending in it is held back.
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer` loaded from `tokenizer.json`."""

    def __init__(self, inner: HFTokenizer) -> None:
        self._inner = inner

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        return cls(HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._inner.decode(token_ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of output tokens into text deltas.

    A delta never ends inside a multi-byte character: text ending in U+FFFD is held
    back until the next token completes it (or `flush` gives up at the end). A few
    prompt tokens are decoded as context so that tokenizers that drop a leading space
    on the first token of a string still produce the right spacing.
    """

    NUM_CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-self.NUM_CONTEXT_TOKENS :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Add one token; return the text it makes final (possibly empty)."""
        self._ids.append(token_id)
        return self._take(final=False)

    def flush(self) -> str:
        """Return whatever is still held back, replacement characters included."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]
