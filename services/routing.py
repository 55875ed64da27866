"""Which worker gets an interactive call: cached prefix against load.

For each candidate worker the gateway knows (services/cache_events.py) which chained
block hashes (scheduler/prefix_hash.py) its prefix cache holds, approximately, and how
many interactive requests it runs or queues. A request's prompt is hashed the same way,
and each worker gets the score

    score = cached_tokens / prompt_tokens - load_weight * active / max_num_seqs

where `cached_tokens` is the longest run of the prompt's leading blocks in the
worker's cache and `active` its interactive requests, running or waiting: the larger
of what its last heartbeat said and what this gateway has in flight there (the first
is up to a heartbeat old, the second blind to other gateways). Best score first; equal
scores (a cold start, a prompt nobody holds) go round robin. With `--route-load-weight
4`, a fully cached prompt stays with its worker until that worker has a quarter of
max_num_seqs more requests than another one, and a worker that is full loses to any.
Batch work does not count: it yields to interactive work on every worker.

`round-robin` ignores all of that and takes the workers in turn.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twolane.scheduler.prefix_hash import prompt_block_hashes
from twolane.services.config import RoutingConfig


class PrefixIndex:
    """The block hashes one worker's prefix cache holds, as far as its events said.

    Bounded by `capacity` (the worker's KV blocks): if an eviction was missed, the
    hashes stored longest ago go first, as the engine would evict them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._hashes

    def store(self, hashes: Iterable[int]) -> None:
        for block_hash in hashes:
            self._hashes[block_hash] = None
            self._hashes.move_to_end(block_hash)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def evict(self, hashes: Iterable[int]) -> None:
        for block_hash in hashes:
            self._hashes.pop(block_hash, None)

    def replace(self, hashes: Iterable[int]) -> None:
        self._hashes.clear()
        self.store(hashes)

    def num_leading_blocks(self, chain: Sequence[int]) -> int:
        """How many of `chain`'s first hashes are all held (a prefix hit stops at the
        first block that is not)."""
        for i, block_hash in enumerate(chain):
            if block_hash not in self._hashes:
                return i
        return len(chain)


@dataclass(frozen=True)
class Candidate:
    """What routing knows of one worker.

    `block_size` 0 and `index` None: nothing is known of its cache (a static --worker).
    """

    key: str
    num_active: int
    max_num_seqs: int
    block_size: int = 0
    tokenizer: str = ""
    index: PrefixIndex | None = None


def score(
    num_cached_tokens: int,
    num_prompt_tokens: int,
    num_active: int,
    max_num_seqs: int,
    load_weight: float,
) -> float:
    """Cached share of the prompt, less the weighted load (see the module docstring)."""
    cached_share = num_cached_tokens / num_prompt_tokens if num_prompt_tokens else 0.0
    return cached_share - load_weight * num_active / max(1, max_num_seqs)


@dataclass(frozen=True)
class Route:
    """The workers to try, best first, and what the first one is expected to hold."""

    order: list[Candidate]
    num_prompt_tokens: int = 0
    num_predicted_cached_tokens: int = 0


# A request's token ids by tokenizer digest (None when that tokenizer is not at hand or
# the request cannot be tokenized: the worker will say why).
PromptTokens = Callable[[str], list[int] | None]


class Router:
    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self._turn = itertools.count()

    def route(self, candidates: Sequence[Candidate], prompt: PromptTokens | None) -> Route:
        """The order in which to try `candidates` for a request whose token ids `prompt`
        gives (None: not known, as for round robin)."""
        num = len(candidates)
        start = next(self._turn) % num if num else 0
        turn = {c.key: (i - start) % num for i, c in enumerate(candidates)}
        if self.config.policy == "round-robin" or prompt is None:
            return Route(sorted(candidates, key=lambda c: turn[c.key]))
        tokens_of = _prompt_and_cached_tokens(candidates, prompt)

        def rank(c: Candidate) -> tuple[float, int]:
            num_prompt, num_cached = tokens_of[c.key]
            value = score(
                num_cached, num_prompt, c.num_active, c.max_num_seqs, self.config.load_weight
            )
            return (-value, turn[c.key])

        order = sorted(candidates, key=rank)
        if not order:
            return Route(order)
        num_prompt, num_cached = tokens_of[order[0].key]
        return Route(order, num_prompt, num_cached)


def _prompt_and_cached_tokens(
    candidates: Sequence[Candidate], prompt: PromptTokens
) -> dict[str, tuple[int, int]]:
    """Per worker: (prompt tokens, how many of them its cache holds), each worker with its
    own tokenizer and block size; (0, 0) where nothing is known. Each tokenizer runs
    once, each chain of hashes is computed once."""
    found: dict[str, tuple[int, int]] = {}
    tokens_by_tokenizer: dict[str, list[int] | None] = {}
    chains: dict[tuple[str, int], list[int]] = {}
    for c in candidates:
        if c.index is None or not c.block_size:
            found[c.key] = (0, 0)
            continue
        if c.tokenizer not in tokens_by_tokenizer:
            tokens_by_tokenizer[c.tokenizer] = prompt(c.tokenizer)
        tokens = tokens_by_tokenizer[c.tokenizer]
        if tokens is None:
            found[c.key] = (0, 0)
            continue
        chain = chains.get((c.tokenizer, c.block_size))
        if chain is None:
            chain = chains[(c.tokenizer, c.block_size)] = prompt_block_hashes(tokens, c.block_size)
        found[c.key] = (len(tokens), c.index.num_leading_blocks(chain) * c.block_size)
    return found
