"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts and a prefix cache.

A full block whose KV is computed is registered under a chained hash of
(parent block's hash, its token ids). A later sequence with the same prefix takes
those blocks instead of recomputing them; tokens are compared on every hit, so a
hash collision can never hand out wrong KV. Freed blocks keep their hash until
reused ("lazy eviction"), and the free list is kept in eviction order: blocks
without a hash first, then cached blocks least recently used first.

With `record_events`, every hash that enters or leaves the prefix cache is noted
(`CacheEventLog`), so that the engine core can tell a gateway which prefixes it holds.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twolane.scheduler.prefix_hash import chain_hash, num_cacheable_blocks
from twolane.scheduler.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefixMatch:
    """Cached blocks covering the first `num_tokens` tokens of a sequence."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


@dataclass(frozen=True)
class Allocation:
    """The blocks a successful allocation added to a sequence's block table."""

    new_block_ids: tuple[int, ...]
    num_cached_tokens: int = 0


class CacheEventLog:
    """Block hashes that entered or left the prefix cache since the last `drain`.

    Only the last change of a hash counts: whoever mirrors the cache as a set of hashes
    ends up right whatever happened in between (stored, evicted, stored again)."""

    def __init__(self) -> None:
        self._changes: dict[int, bool] = {}  # hash -> in the cache now

    def stored(self, block_hash: int) -> None:
        self._changes[block_hash] = True

    def evicted(self, block_hash: int) -> None:
        self._changes[block_hash] = False

    def drain(self) -> tuple[list[int], list[int]]:
        """The (stored, evicted) hashes since the last drain, and a fresh start."""
        changes, self._changes = self._changes, {}
        stored = [h for h, present in changes.items() if present]
        evicted = [h for h, present in changes.items() if not present]
        return stored, evicted


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        # Keys in eviction order; OrderedDict gives O(1) pop-front and O(1) removal by id.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.events = CacheEventLog() if record_events and enable_prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.num_prefix_query_tokens == 0:
            return 0.0
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Find cached blocks for the start of a sequence that holds no blocks yet.

        At least one token is always left to compute, since the model must run on
        the last token to produce the next one.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return PrefixMatch()
        block_ids: list[int] = []
        parent: int | None = None
        for i in range(num_cacheable_blocks(seq.num_tokens, self.block_size)):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = self.cached_blocks.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block_ids.append(block_id)
        return PrefixMatch(tuple(block_ids), len(block_ids) * self.block_size)

    def allocate(
        self,
        seq: Sequence,
        num_new_tokens: int,
        prefix: PrefixMatch | None = None,
        num_reserved_blocks: int = 0,
    ) -> Allocation | None:
        """Give `seq` room for `num_new_tokens` more tokens past its computed ones.

        On a sequence's first allocation, `prefix` (from `match_prefix`) hands it
        cached blocks and marks their tokens computed. Returns None, changing
        nothing, when there are not enough free blocks, keeping
        `num_reserved_blocks` of them untouched.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
        prefix = prefix or PrefixMatch()
        if prefix.block_ids and seq.block_table:
            raise ValueError("a prefix match applies only to a sequence without blocks")
        num_computed = max(seq.num_computed_tokens, prefix.num_tokens)
        num_needed = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = num_needed - len(seq.block_table) - len(prefix.block_ids)
        # Cached blocks sitting in the free list stop being free once taken.
        num_hits_free = sum(1 for b in prefix.block_ids if self.blocks[b].ref_count == 0)
        if max(num_new_blocks, 0) + num_hits_free + num_reserved_blocks > self.num_free_blocks:
            return None
        if not seq.block_table and seq.num_computed_tokens == 0:
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += prefix.num_tokens
        for block_id in prefix.block_ids:
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(self.blocks[block_id].block_hash)  # type: ignore[arg-type]
        if prefix.block_ids:
            seq.num_computed_tokens = prefix.num_tokens
            seq.num_cached_tokens = max(seq.num_cached_tokens, prefix.num_tokens)
        new_ids = tuple(self._pop_free() for _ in range(max(num_new_blocks, 0)))
        seq.block_table.extend(new_ids)
        return Allocation(new_block_ids=new_ids, num_cached_tokens=prefix.num_tokens)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register every newly computed full block of `seq` in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = chain_hash(parent, tokens)
            seq.block_hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue  # already registered (shared through the prefix cache)
            block.block_hash = block_hash
            block.token_ids = tokens
            # First writer wins: an equal block computed earlier stays the cached one.
            registered = self.cached_blocks.setdefault(block_hash, block.block_id)
            if registered == block.block_id and self.events is not None:
                self.events.stored(block_hash)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references to its blocks; blocks nobody references become free."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise AssertionError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.block_hash is None:
                    # Holds nothing reusable: hand it out before any cached block.
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests)."""
        for block in self.blocks:
            in_free = block.block_id in self.free_blocks
            assert block.ref_count >= 0, f"negative ref count on {block}"
            assert in_free == (block.ref_count == 0), f"free list disagrees with {block}"
        for block_hash, block_id in self.cached_blocks.items():
            assert self.blocks[block_id].block_hash == block_hash, "stale prefix-cache entry"

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict: the block is about to hold other tokens.
            if self.cached_blocks.get(block.block_hash) == block_id:
                del self.cached_blocks[block.block_hash]
                if self.events is not None:
                    self.events.evicted(block.block_hash)
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id
