"""Chained hashes of full KV blocks, defined once for the engine and the gateway.

A full block of `block_size` tokens is named by a hash of its parent block's hash and
its own token ids, so one hash names a whole prefix. The engine's prefix cache keys
blocks by it (scheduler/block_manager.py), workers publish the hashes they store and
evict, and a gateway hashes a request's prompt the same way to find the worker that
holds most of it. The hash is BLAKE2b over fixed-width little-endian integers: the
same on every machine, Python version and process (the built-in `hash` is not).

No torch here: the gateway imports this module.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_BYTES = 8
_PARENT = struct.Struct("<Q")


def chain_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """The hash of a block holding `token_ids` after the block hashed `parent_hash`
    (None for the first block of a sequence); an unsigned 64-bit integer."""
    digest = hashlib.blake2b(digest_size=HASH_BYTES)
    if parent_hash is not None:
        digest.update(_PARENT.pack(parent_hash))
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(digest.digest(), "little")


def num_cacheable_blocks(num_tokens: int, block_size: int) -> int:
    """How many full blocks of a prompt the prefix cache can serve: the last token is
    always computed, since the model must run on it to produce the next one."""
    return max(0, (num_tokens - 1) // block_size)


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the prompt's blocks that a prefix cache can serve."""
    hashes: list[int] = []
    parent: int | None = None
    for i in range(num_cacheable_blocks(len(token_ids), block_size)):
        parent = chain_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
