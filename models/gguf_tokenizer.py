"""A `tokenizers` tokenizer (and its tokenizer_config.json) from GGUF tokenizer metadata.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are built: tokens and
merges as stored, text split before BPE by the regex llama.cpp uses for the file's
`tokenizer.ggml.pre`, and control / user-defined tokens matched whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from twolane.models.errors import GGUFError

# llama.cpp's token types (llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer splits by `tokenizer.ggml.pre`, written as llama.cpp's vocab loader does.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
REGEX_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
# These use GPT-2's own split (ByteLevel's built-in regex); SmolLM also cuts every digit off.
GPT2_STYLE = ("default", "gpt2", "smollm")
SUPPORTED_PRE = (*GPT2_STYLE, *REGEX_SPLITS)


def build_tokenizer(metadata: Mapping[str, Any], path: Path) -> HFTokenizer:
    """The tokenizer the metadata describes.

    Raises:
        GGUFError: no tokenizer in the file, or one of a kind not supported here.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer {kind!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [_split_merge(m, path) for m in metadata.get("tokenizer.ggml.merges", [])]
    tok = HFTokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), path)
    tok.decoder = decoders.ByteLevel()
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [])
    if types and len(types) != len(tokens):
        raise GGUFError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    _add_special_tokens(tok, tokens, types)
    tok.post_processor = _post_processor(metadata, tokens)
    return tok


def tokenizer_config(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: chat template, special tokens and whether BOS/EOS are added."""
    tokens: Sequence[str] = metadata.get("tokenizer.ggml.tokens", [])

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }
    if (template := metadata.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


def _pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in GPT2_STYLE)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    if pre in REGEX_SPLITS:
        split = pre_tokenizers.Split(Regex(REGEX_SPLITS[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    raise GGUFError(
        f"{path}: tokenizer pre-tokenizer {pre!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_PRE)}"
    )


def _add_special_tokens(tok: HFTokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    # Matched whole in the text, as llama.cpp does, instead of being cut into byte pieces.
    # (`types` is empty or as long as `tokens`.)
    # Control tokens are special (dropped when decoding with skip_special_tokens);
    # user-defined ones are ordinary text.
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == TOKEN_TYPE_CONTROL]
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == TOKEN_TYPE_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _post_processor(
    metadata: Mapping[str, Any], tokens: Sequence[str]
) -> processors.PostProcessor | None:
    # The ids of the tokens to add (None: not added).
    bos_id: int | None = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id: int | None = metadata.get("tokenizer.ggml.eos_token_id")
    if not metadata.get("tokenizer.ggml.add_bos_token", False):
        bos_id = None
    if not metadata.get("tokenizer.ggml.add_eos_token", False):
        eos_id = None
    if bos_id is None and eos_id is None:
        return None
    specials: list[tuple[str, int]] = []
    single = "$A"
    if bos_id is not None:
        specials.append((tokens[bos_id], bos_id))
        single = f"{tokens[bos_id]} {single}"
    if eos_id is not None:
        specials.append((tokens[eos_id], eos_id))
        single = f"{single} {tokens[eos_id]}"
    return processors.TemplateProcessing(single=single, special_tokens=specials)


def _split_merge(merge: str, path: Path) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise GGUFError(f"{path}: malformed tokenizer merge {merge!r}")
    return left, right
