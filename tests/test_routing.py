"""Routing as pure functions (tables), and its atomic store on a real directory."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from fleetserve.server.errors import InvalidArgument
from fleetserve.server.routing import Routing, RoutingStore, parse_routing, pick, shadowed


def test_parse_routing_reads_aliases_weights_and_shadow() -> None:
    routing = parse_routing(
        {"aliases": {"stable": 3, "canary": 4}, "weights": {"3": 90, "4": 10},
         "shadow": {"version": 5, "fraction": 0.25}}
    )  # fmt: skip
    assert routing.aliases == {"stable": 3, "canary": 4}
    assert routing.weights == {3: 90, 4: 10}
    assert (routing.shadow_version, routing.shadow_fraction) == (5, 0.25)
    assert routing.versions == {3, 4, 5}
    assert parse_routing(routing.to_json()) == routing  # JSON round trip


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ([], "JSON object"),
        ({"weight": {}}, "unknown routing field"),
        ({"aliases": {"7": 3}}, "must start with a letter"),
        ({"aliases": {"../x": 3}}, "must start with a letter"),
        ({"aliases": {"ok": "3"}}, "positive integer"),
        ({"aliases": {"ok": 0}}, "positive integer"),
        ({"aliases": {"ok": True}}, "positive integer"),
        ({"weights": {"three": 1}}, "positive integer"),
        ({"weights": {"3": -1}}, "integer 0..1000000"),
        ({"weights": {"3": 0.5}}, "integer 0..1000000"),
        ({"weights": {"3": 0, "4": 0}}, "not all be 0"),
        ({"shadow": {"version": 4, "fraction": 0}}, "(0, 1]"),
        ({"shadow": {"version": 4, "fraction": 1.5}}, "(0, 1]"),
        ({"shadow": {"version": 4, "share": 0.5}}, "shadow must be"),
        ({"aliases": {f"a{i}": 1 for i in range(65)}}, "at most 64"),
    ],
)
def test_bad_routing_is_invalid_argument_naming_the_problem(doc: object, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_routing(doc)


def test_weighted_choice_converges_to_the_weights() -> None:
    rng = random.Random(7)
    n = 20_000
    counts = Counter(pick({3: 90, 4: 10}, None, rng.random()) for _ in range(n))
    # binomial sd = sqrt(n * 0.1 * 0.9) = 42; allow 5 sd
    assert abs(counts[4] - 0.1 * n) < 5 * 42


def test_a_routing_key_always_lands_on_the_same_version_and_keys_spread() -> None:
    weights = {1: 50, 2: 50}
    for key in (f"user-{i}" for i in range(200)):
        assert len({pick(weights, key) for _ in range(5)}) == 1
    spread = Counter(pick(weights, f"user-{i}") for i in range(2000))
    assert abs(spread[1] - 1000) < 5 * 23  # sd = sqrt(2000 * 0.25)


def test_zero_weight_versions_are_never_picked() -> None:
    assert {pick({1: 0, 2: 5}, None, d / 100) for d in range(100)} == {2}
    assert pick({1: 3}, None, 0.999999999) == 1


@pytest.mark.parametrize(
    ("served", "draw", "expected"),
    [(3, 0.05, 4), (3, 0.5, None), (4, 0.0, None)],
    ids=["sampled", "not-sampled", "already-the-shadow"],
)
def test_shadow_copies_a_fraction_and_never_to_the_serving_version(
    served: int, draw: float, expected: int | None
) -> None:
    routing = Routing(shadow_version=4, shadow_fraction=0.1)
    assert shadowed(routing, served, draw) == expected


def test_store_round_trips_every_model_and_pins(tmp_path: Path) -> None:
    store = RoutingStore(tmp_path / "state")
    routes = {
        "a": parse_routing({"aliases": {"stable": 2}}, frozenset({1})),
        "b": parse_routing({"weights": {"1": 1, "2": 3}, "shadow": {"version": 2}}),
        "empty": Routing(),
    }
    store.save(routes)
    assert store.load() == {"a": routes["a"], "b": routes["b"]}
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["routing.json"]  # no tmp left


def test_store_without_a_file_is_empty_and_a_corrupt_one_is_an_error(tmp_path: Path) -> None:
    store = RoutingStore(tmp_path)
    assert store.load() == {}
    store.path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="cannot read routing state"):
        store.load()
    store.path.write_text(json.dumps({"models": {"a": {"aliases": {"1x": 2}}}}))
    with pytest.raises(InvalidArgument, match="must start with a letter"):
        store.load()


@pytest.mark.parametrize(
    "doc", [[], {"models": []}, {"models": {"m": []}}, {"models": {"m": {"pinned": 3}}}]
)
def test_a_store_of_the_wrong_shape_is_an_error_naming_the_file(
    tmp_path: Path, doc: object
) -> None:
    store = RoutingStore(tmp_path)
    store.path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match=r"routing\.json"):
        store.load()
