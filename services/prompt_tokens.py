"""A request's prompt token ids on a gateway, with the workers' own tokenizers.

The tokenizer files come from the `twolane_models` object store (model_files.py), once
per digest a worker names, into a folder of this process's own. Until they are there,
and for a request the validator refuses (the worker will say why), there are no token
ids and routing goes by load alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

import structlog
from nats.js import JetStreamContext

from twolane.services.errors import InvalidArgumentError
from twolane.services.model_files import fetch_tokenizer
from twolane.services.prompts import ModelPrompts
from twolane.services.validation import GenerateMessage, ModelLimits, validate_generate

log = structlog.get_logger(__name__)

# The gateway has no model: the worker checks the vocabulary and the context length.
_NO_MODEL_LIMITS = ModelLimits(vocab_size=2**31 - 1, max_model_len=2**31 - 1)
RETRY_S = 5.0


class GatewayTokenizers:
    """The tokenizers of the workers' models, by digest, fetched when first named."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._dir = Path(tempfile.mkdtemp(prefix="twolane-gateway-tokenizers-"))
        self._prompts: dict[str, ModelPrompts] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}

    def close(self) -> None:
        for task in self._fetching.values():
            task.cancel()
        shutil.rmtree(self._dir, ignore_errors=True)

    def want(self, digest: str) -> None:
        """Fetch the tokenizer `digest` in the background, unless it is at hand."""
        if not digest or digest in self._prompts or digest in self._fetching:
            return
        self._fetching[digest] = asyncio.ensure_future(self._fetch(digest))

    async def _fetch(self, digest: str) -> None:
        try:
            while True:
                try:
                    folder = await fetch_tokenizer(self._js, digest, self._dir)
                    self._prompts[digest] = await asyncio.to_thread(ModelPrompts.from_dir, folder)
                    log.info("tokenizer ready", digest=digest)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("cannot fetch a tokenizer", digest=digest, error=repr(exc))
                    await asyncio.sleep(RETRY_S)
        finally:
            with contextlib.suppress(KeyError):
                del self._fetching[digest]

    def prompt_token_ids(self, request: GenerateMessage, digest: str) -> list[int] | None:
        """The token ids the worker will compute for `request`'s prompt, or None."""
        if request.prompt_token_ids and not request.prompt and not request.messages:
            return list(request.prompt_token_ids)
        prompts = self._prompts.get(digest)
        if prompts is None:
            return None
        try:
            return validate_generate(request, _NO_MODEL_LIMITS, prompts).prompt_token_ids
        except InvalidArgumentError:
            return None
