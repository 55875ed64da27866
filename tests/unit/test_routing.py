"""Routing: the worker with the best score of cached prompt share against load."""

from __future__ import annotations

import pytest

from twolane.scheduler.prefix_hash import prompt_block_hashes
from twolane.services.config import RoutingConfig
from twolane.services.routing import Candidate, PrefixIndex, Router, score

BLOCK = 16
PROMPT = list(range(1, 161))  # 160 tokens: 9 cacheable blocks
CHAIN = prompt_block_hashes(PROMPT, BLOCK)


def holding(num_blocks: int, capacity: int = 1000) -> PrefixIndex:
    index = PrefixIndex(capacity)
    index.store(CHAIN[:num_blocks])
    return index


def candidate(key: str, index: PrefixIndex | None, num_active: int = 0) -> Candidate:
    return Candidate(key, num_active, 64, BLOCK if index is not None else 0, "tok", index)


def tokens(_: str) -> list[int]:
    return PROMPT


def test_a_prefix_hit_stops_at_the_first_block_not_held() -> None:
    index = PrefixIndex(100)
    index.store([CHAIN[0], CHAIN[1], CHAIN[3]])
    assert index.num_leading_blocks(CHAIN) == 2
    index.evict([CHAIN[1]])
    assert index.num_leading_blocks(CHAIN) == 1


def test_an_index_over_capacity_forgets_the_hashes_stored_longest_ago() -> None:
    index = PrefixIndex(3)
    index.store(CHAIN[:3])
    index.store([CHAIN[0]])  # touched again: now the newest
    index.store([CHAIN[3]])
    assert len(index) == 3
    assert CHAIN[1] not in index
    assert CHAIN[0] in index and CHAIN[3] in index


def test_the_score_is_cached_share_less_weighted_load() -> None:
    assert score(128, 160, 0, 64, 4.0) == pytest.approx(0.8)
    assert score(128, 160, 16, 64, 4.0) == pytest.approx(-0.2)
    assert score(0, 0, 0, 64, 4.0) == 0.0


def test_the_worker_holding_the_prefix_wins() -> None:
    router = Router(RoutingConfig())
    for _ in range(4):  # whoever's turn it is
        route = router.route(
            [candidate("a", holding(0)), candidate("b", holding(8)), candidate("c", None)], tokens
        )
        assert route.order[0].key == "b"
        assert route.num_prompt_tokens == 160
        assert route.num_predicted_cached_tokens == 8 * BLOCK


def test_a_longer_cached_prefix_beats_a_shorter_one() -> None:
    route = Router(RoutingConfig()).route(
        [candidate("a", holding(3)), candidate("b", holding(7))], tokens
    )
    assert [c.key for c in route.order] == ["b", "a"]


def test_load_outweighs_the_cache_past_the_weight() -> None:
    router = Router(RoutingConfig(load_weight=4.0))
    # 9 of 10 blocks' worth cached (0.9) against 16 more requests of 64 slots (1.0).
    busy_with_cache = candidate("a", holding(9), num_active=16)
    idle = candidate("b", holding(0), num_active=0)
    assert router.route([busy_with_cache, idle], tokens).order[0].key == "b"
    fewer = candidate("a", holding(9), num_active=8)
    assert router.route([fewer, idle], tokens).order[0].key == "a"


def test_a_zero_load_weight_routes_by_cache_alone() -> None:
    router = Router(RoutingConfig(load_weight=0.0))
    busy = candidate("a", holding(1), num_active=64)
    assert router.route([busy, candidate("b", holding(0))], tokens).order[0].key == "a"


def test_equal_scores_take_turns() -> None:
    router = Router(RoutingConfig())
    workers = [candidate("a", holding(0)), candidate("b", holding(0))]
    firsts = [router.route(workers, tokens).order[0].key for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]


def test_round_robin_ignores_the_cache() -> None:
    router = Router(RoutingConfig(policy="round-robin"))
    workers = [candidate("a", holding(9)), candidate("b", holding(0))]
    firsts = [router.route(workers, tokens).order[0].key for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]


def test_without_token_ids_routing_goes_by_load_and_turns() -> None:
    router = Router(RoutingConfig())
    workers = [candidate("a", holding(9), num_active=3), candidate("b", holding(0))]
    assert router.route(workers, lambda _: None).order[0].key == "b"
    assert [router.route(workers, None).order[0].key for _ in range(2)] == ["b", "a"]


def test_each_worker_is_hashed_with_its_own_block_size() -> None:
    big = prompt_block_hashes(PROMPT, 32)
    index = PrefixIndex(100)
    index.store(big[:4])
    wide = Candidate("wide", 0, 64, 32, "tok", index)
    route = Router(RoutingConfig()).route([candidate("a", holding(2)), wide], tokens)
    assert route.order[0].key == "wide"
    assert route.num_predicted_cached_tokens == 4 * 32


def test_each_worker_is_tokenized_with_its_own_tokenizer_once() -> None:
    """Two models side by side: the same text is other token ids under each tokenizer,
    and a worker is judged by its own (an empty index still counts as known)."""
    other = [t + 1000 for t in PROMPT]
    index = PrefixIndex(100)
    index.store(prompt_block_hashes(other, BLOCK)[:5])
    asked: list[str] = []

    def prompt(digest: str) -> list[int]:
        asked.append(digest)
        return other if digest == "other" else PROMPT

    workers = [
        candidate("a", holding(2)),
        candidate("a2", PrefixIndex(100)),
        Candidate("b", 0, 64, BLOCK, "other", index),
    ]
    route = Router(RoutingConfig()).route(workers, prompt)
    assert route.order[0].key == "b"
    assert route.num_predicted_cached_tokens == 5 * BLOCK
    assert sorted(asked) == ["other", "tok"]


def test_routing_config_refuses_unknown_policies_and_negative_weights() -> None:
    with pytest.raises(ValueError, match="policy"):
        RoutingConfig(policy="random")
    with pytest.raises(ValueError, match="weight"):
        RoutingConfig(load_weight=-1.0)
