"""Eviction policies: which idle models to unload to make room, as pure functions.

A policy sees only a snapshot of the candidates (loaded, idle, unpinned versions) and
how much room is needed; the cache does the unloading. Swap policies by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fleetserve.server.types import ModelId


@dataclass(frozen=True, slots=True)
class Candidate:
    """A loaded version that could be evicted now."""

    id: ModelId
    size_bytes: int
    last_used: int  # the cache's use counter at its last lease (higher = more recent)
    load_seconds: float  # what it cost to load: what evicting it may cost again


# (candidates, bytes to free, models to free) -> victims in eviction order; fewer than
# needed when the candidates cannot free enough (the caller then refuses the load)
Policy = Callable[[Sequence[Candidate], int, int], list[ModelId]]


def _take(ordered: Sequence[Candidate], need_bytes: int, need_models: int) -> list[ModelId]:
    victims: list[ModelId] = []
    for c in ordered:
        if need_bytes <= 0 and need_models <= 0:
            break
        victims.append(c.id)
        need_bytes -= c.size_bytes
        need_models -= 1
    return victims


def lru(candidates: Sequence[Candidate], need_bytes: int, need_models: int) -> list[ModelId]:
    """Least recently used first."""
    return _take(sorted(candidates, key=lambda c: c.last_used), need_bytes, need_models)


def cost_aware(candidates: Sequence[Candidate], need_bytes: int, need_models: int) -> list[ModelId]:
    """GreedyDual-Size flavour: cheap-to-reload, large, long-unused models go first.

    Each candidate's value is its reload cost per byte, discounted by how long ago it
    was used (in uses of the cache since); the lowest value is evicted first, so a model
    that took 20 s to load outlives a 2 KB one that reloads in a millisecond.
    """
    newest = max((c.last_used for c in candidates), default=0)
    per_byte = need_bytes > 0  # freeing only model slots: size does not matter

    def value(c: Candidate) -> float:
        age = newest - c.last_used + 1
        cost = c.load_seconds / max(c.size_bytes, 1) if per_byte else c.load_seconds
        return cost / age

    return _take(sorted(candidates, key=value), need_bytes, need_models)


POLICIES: dict[str, Policy] = {"lru": lru, "cost": cost_aware}
