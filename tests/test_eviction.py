"""The eviction policies of server/eviction.py, as the pure functions they are.

A policy gets a snapshot of candidates (idle, unpinned, loaded versions), the bytes and
the number of models to free, and returns victims in eviction order: as few as needed,
or every candidate when even all of them cannot free enough (the cache then refuses).
"""

from __future__ import annotations

import pytest

from fleetserve.server.eviction import POLICIES, Candidate, cost_aware, lru
from fleetserve.server.types import ModelId

KB, MB, GB = 1000, 1000**2, 1000**3


def cand(name: str, size: int, last_used: int, load_s: float = 0.01) -> Candidate:
    return Candidate(ModelId(name, 1), size, last_used, load_s)


def names(victims: list[ModelId]) -> list[str]:
    return [v.name for v in victims]


# four equal-cost models, used in the order d, b, a, c (c most recent)
EQUAL = [
    cand("a", 10 * MB, last_used=3),
    cand("b", 20 * MB, last_used=2),
    cand("c", 30 * MB, last_used=4),
    cand("d", 40 * MB, last_used=1),
]


@pytest.mark.parametrize(
    ("need_bytes", "need_models", "expected"),
    [
        # nothing to free: no victims
        (0, 0, []),
        (-5 * MB, -2, []),
        # by count: least recently used first, stop as soon as enough
        (0, 1, ["d"]),
        (0, 2, ["d", "b"]),
        (0, 4, ["d", "b", "a", "c"]),
        # by bytes: LRU order, however small the oldest is, until the bytes are freed
        (1, 0, ["d"]),
        (40 * MB, 0, ["d"]),
        (40 * MB + 1, 0, ["d", "b"]),
        (60 * MB, 0, ["d", "b"]),
        (65 * MB, 0, ["d", "b", "a"]),
        # both at once: enough of each
        (10 * MB, 2, ["d", "b"]),
        (70 * MB, 1, ["d", "b", "a"]),
        # a negative need (room to spare) on one axis does not cancel the other
        (-100 * MB, 1, ["d"]),
        (50 * MB, -3, ["d", "b"]),
        # cannot free enough: every candidate, in order (fewer than needed)
        (101 * MB, 0, ["d", "b", "a", "c"]),
        (0, 5, ["d", "b", "a", "c"]),
    ],
)
def test_lru(need_bytes: int, need_models: int, expected: list[str]) -> None:
    assert names(lru(EQUAL, need_bytes, need_models)) == expected


def test_lru_does_not_mutate_or_depend_on_input_order() -> None:
    shuffled = [EQUAL[2], EQUAL[0], EQUAL[3], EQUAL[1]]
    before = list(shuffled)
    assert names(lru(shuffled, 0, 4)) == ["d", "b", "a", "c"]
    assert shuffled == before


@pytest.mark.parametrize("policy", [lru, cost_aware])
def test_no_candidates(policy: object) -> None:
    assert policy([], 10 * MB, 1) == []  # type: ignore[operator]
    assert policy([], 0, 0) == []  # type: ignore[operator]


@pytest.mark.parametrize("policy", [lru, cost_aware])
@pytest.mark.parametrize(
    ("need_bytes", "need_models", "count"),
    [(0, 1, 1), (0, 3, 3), (1, 0, 1), (10 * MB, 1, 1), (10 * MB + 1, 0, 2)],
)
def test_policies_stop_when_enough_is_freed(
    policy: object, need_bytes: int, need_models: int, count: int
) -> None:
    # equal sizes and costs, so both policies free the same amount per victim
    pool = [cand(n, 10 * MB, last_used=i, load_s=0.5) for i, n in enumerate("pqrs")]
    victims = policy(pool, need_bytes, need_models)  # type: ignore[operator]
    assert len(victims) == count
    assert len(set(victims)) == count


@pytest.mark.parametrize(
    ("candidates", "need_bytes", "need_models", "expected"),
    [
        # equal size and cost: the policy degrades to LRU
        (
            [cand("a", MB, 3, 1.0), cand("b", MB, 1, 1.0), cand("c", MB, 2, 1.0)],
            0, 2, ["b", "c"],
        ),
        # equal size and recency: the cheapest to reload goes first
        (
            [cand("slow", MB, 5, 20.0), cand("fast", MB, 5, 0.001), cand("mid", MB, 5, 1.0)],
            0, 2, ["fast", "mid"],
        ),
        # equal cost and recency: the largest goes first (it frees the most per reload)
        (
            [cand("small", MB, 5, 1.0), cand("big", 100 * MB, 5, 1.0)],
            1, 0, ["big"],
        ),
        # the docstring's example, at a size where it holds: a 20 s load of 10 MB outlives
        # a 2 KB model that reloads in a millisecond, even when the expensive one is older
        (
            [cand("expensive", 10 * MB, 1, 20.0), cand("tiny", 2 * KB, 2, 0.001)],
            0, 1, ["tiny"],
        ),
        # freeing bytes, much older: age discounts the expensive model until it goes first
        (
            [cand("expensive", 10 * MB, 1, 20.0), cand("tiny", 2 * KB, 100, 0.001)],
            1, 0, ["expensive"],
        ),
        # cannot free enough bytes: every candidate, cheapest-per-byte first
        (
            [cand("a", MB, 1, 5.0), cand("b", MB, 1, 0.1)],
            3 * MB, 0, ["b", "a"],
        ),
    ],
)  # fmt: skip
def test_cost_aware(
    candidates: list[Candidate], need_bytes: int, need_models: int, expected: list[str]
) -> None:
    assert names(cost_aware(candidates, need_bytes, need_models)) == expected


def test_cost_aware_keeps_an_expensive_model_that_lru_would_evict() -> None:
    # the expensive model was used least recently: LRU drops it, cost_aware keeps it
    pool = [cand("expensive", 5 * MB, 1, 30.0), cand("cheap", 5 * MB, 2, 0.002)]
    assert names(lru(pool, 0, 1)) == ["expensive"]
    assert names(cost_aware(pool, 0, 1)) == ["cheap"]


def test_cost_aware_count_limit_keeps_the_expensive_large_model() -> None:
    pool = [cand("expensive", 2 * GB, 5, 20.0), cand("tiny", 2 * KB, 5, 0.001)]
    assert names(cost_aware(pool, 0, 1)) == ["tiny"]


def test_policies_are_registered_by_cli_name() -> None:
    assert {"lru": lru, "cost": cost_aware} == POLICIES
