"""How a model turns the prompt a client gave (text, or chat messages) into token ids.

The validator asks a `PromptEncoder`; frontends and the job runner hold `ModelPrompts`
(the model's tokenizer and chat template), a gateway without a model `ShapeOnly`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from twolane.models.chat import ChatTemplate
from twolane.models.tokenizer import Tokenizer

Message = tuple[str, str]  # (role, content)


class ChatUnavailableError(ValueError):
    """The model has no chat template, so `messages` cannot be rendered."""


class PromptEncoder(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The token ids of the rendered conversation, ready for the assistant's reply.

        Raises:
            ChatUnavailableError: the model has no chat template.
            ChatTemplateError: the template refuses the conversation.
        """
        ...

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        """The tokens that end an assistant turn: a chat reply stops at any of them."""
        ...


class ModelPrompts:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None) -> None:
        self.tokenizer = tokenizer
        self.template = template

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelPrompts:
        return cls(Tokenizer.from_dir(model_dir), ChatTemplate.from_dir(model_dir))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        if self.template is None:
            raise ChatUnavailableError("this model has no chat template; send a prompt instead")
        text = self.template.render(messages, add_generation_prompt=True)
        # The template writes the special tokens itself (BOS, turn markers).
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return self.template.stop_token_ids if self.template is not None else ()


class ShapeOnly:
    """Checks a request's shape without a model (a gateway); the worker checks the rest."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        return [len(content) for _, content in messages]

    @property
    def chat_stop_token_ids(self) -> tuple[int, ...]:
        return ()
