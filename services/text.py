"""Turning one request's token ids into text: incremental detokenizing and stop strings.

The engine core emits token ids only; each frontend (and the job runner) keeps one
`TextAssembler` per request. A stop string may straddle two deltas, so text that could
still be the start of one is held back until the next token decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from twolane.models.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class TextDelta:
    text: str  # new text, never split inside a character
    num_tokens: int  # how many of the tokens given were used (all, unless a stop hit)
    stopped: bool  # a stop string appeared; the text ends before it


class TextAssembler:
    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stop = stop
        self._text = ""
        self._num_emitted_chars = 0
        self._holdback_chars = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def add(self, token_ids: list[int]) -> TextDelta:
        """Add new tokens; the text they make final, up to a stop string if one appears."""
        for index, token_id in enumerate(token_ids):
            self._text += self._detokenizer.add(token_id)
            if self._stop and self._truncate_at_stop():
                self.stopped = True
                return TextDelta(self._take(final=True), index + 1, stopped=True)
        return TextDelta(self._take(final=False), len(token_ids), stopped=False)

    def finish(self) -> str:
        """The text still held back, at the end of the request."""
        if not self.stopped:
            self._text += self._detokenizer.flush()
        return self._take(final=True)

    def _truncate_at_stop(self) -> bool:
        """Cut the text before the first stop string, if one has appeared."""
        search_from = max(0, self._num_emitted_chars - self._holdback_chars)
        hits = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
        if not hits:
            return False
        self._text = self._text[: min(hits)]
        return True

    def _take(self, final: bool) -> str:
        end = (
            len(self._text)
            if final
            else max(self._num_emitted_chars, len(self._text) - self._holdback_chars)
        )
        new_text = self._text[self._num_emitted_chars : end]
        self._num_emitted_chars = end
        return new_text
