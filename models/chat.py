"""Chat templates: a model's Jinja template turns messages into the prompt text it was tuned on.

The template comes from `tokenizer_config.json` (`chat_template`; for a GGUF file, its
`tokenizer.chat_template` metadata) and is rendered the way transformers renders it: in a
sandboxed, immutable Jinja environment with `trim_blocks` / `lstrip_blocks`, the special
tokens as variables and `raise_exception` for templates that reject a conversation.
Templates are code from the checkpoint, so the sandbox matters.

The rendered text already holds the special tokens the template writes (BOS included, for
templates that write it): tokenize it without adding special tokens again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from tokenizers import Tokenizer as HFTokenizer

from twolane.models.errors import CheckpointError

# A message is (role, content) or a mapping with at least "role" and "content".
Message = tuple[str, str] | Mapping[str, Any]
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Stands in for an assistant reply, to find what the template writes after one.
PROBE_TEXT = "twolane-probe-reply"


class ChatTemplateError(CheckpointError):
    """The template is not valid Jinja, or it rejects the conversation it was given."""


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to."""

    source: str
    special_tokens: Mapping[str, str]
    stop_token_ids: tuple[int, ...]  # end of an assistant turn: stop generating on any of them

    @classmethod
    def from_dir(cls, model_dir: Path) -> ChatTemplate | None:
        """The template of a checkpoint directory, or None when it has none.

        Raises:
            ChatTemplateError: tokenizer_config.json is not JSON, or the template is not Jinja.
        """
        path = model_dir / "tokenizer_config.json"
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None
        source = _template_source(config.get("chat_template"))
        if source is None:
            return None
        specials = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k)))}
        tokenizer_path = model_dir / "tokenizer.json"
        tokenizer = HFTokenizer.from_file(str(tokenizer_path)) if tokenizer_path.is_file() else None
        return cls.build(source, specials, tokenizer)

    @classmethod
    def build(
        cls, source: str, special_tokens: Mapping[str, str], tokenizer: HFTokenizer | None
    ) -> ChatTemplate:
        """Compile `source` and find its end-of-turn tokens with `tokenizer` (if given)."""
        _compile(source)  # fail now on a syntax error, not on the first request
        template = cls(source, dict(special_tokens), ())
        stops = _stop_token_ids(template, tokenizer) if tokenizer is not None else ()
        return cls(source, dict(special_tokens), stops)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending with the assistant's header when asked.

        Raises:
            ChatTemplateError: the template rejects the conversation (`raise_exception`)
                or fails while rendering it.
        """
        chat = [_as_dict(m) for m in messages]
        try:
            return _compile(self.source).render(
                messages=chat, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template is not valid Jinja (line {e.lineno}): {e}"
        ) from None


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _SafeNamespace
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


class _SafeNamespace(Namespace):
    """`namespace()` that refuses underscore names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _stop_token_ids(template: ChatTemplate, tokenizer: HFTokenizer) -> tuple[int, ...]:
    """EOS, and the special token the template writes right after an assistant reply."""
    stops: list[int] = []
    eos = template.special_tokens.get("eos_token")
    if eos is not None and (eos_id := tokenizer.token_to_id(eos)) is not None:
        stops.append(eos_id)
    try:
        text = template.render([("user", "hi"), ("assistant", PROBE_TEXT)], False)
    except ChatTemplateError:
        return tuple(stops)  # a template that wants other conversations: EOS alone
    _, found, after = text.partition(PROBE_TEXT)
    special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    ids = tokenizer.encode(after, add_special_tokens=False).ids if found else []
    if ids and ids[0] in special_ids and ids[0] not in stops:
        stops.append(ids[0])
    return tuple(stops)


def _template_source(value: Any) -> str | None:
    # Some configs hold a list of named templates; the one named "default" is the chat one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


def _token_text(value: Any) -> str | None:
    # Special tokens are written as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_dict(message: Message) -> dict[str, Any]:
    if isinstance(message, tuple):
        role, content = message
        return {"role": role, "content": content}
    return dict(message)
