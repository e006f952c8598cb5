"""Run-time routing of a model's unversioned traffic: aliases, weights, shadow, pins.

`Routing` is one model's state, validated from JSON and immutable; the choices it
makes (`pick`, `shadow_of`) are pure functions of it, a routing key and a random draw,
tested with tables. `RoutingStore` keeps every model's routing in one JSON file in the
data directory, replaced atomically (temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old state or the new one.

Precedence for a request: an explicit version > an alias named where a version goes >
weights (sticky by routing key when one is given) > the latest servable version.
Versions named by routing stay servable even outside the version policy, so traffic
can be moved back to an old version (rollback) while a newer one is the latest.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetserve.server.errors import InvalidArgument
from fleetserve.server.files import write_atomically

ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
MAX_ALIASES = 64
MAX_WEIGHTS = 64
STORE_FILENAME = "routing.json"


@dataclass(frozen=True, slots=True)
class Routing:
    aliases: Mapping[str, int] = field(default_factory=dict)  # name -> version
    weights: Mapping[int, int] = field(default_factory=dict)  # version -> weight
    shadow_version: int | None = None
    shadow_fraction: float = 0.0
    pinned: frozenset[int] = frozenset()  # versions kept loaded (never evicted)

    @property
    def versions(self) -> frozenset[int]:
        """Every version this routing names (they stay servable)."""
        named = {*self.aliases.values(), *self.weights, *self.pinned}
        if self.shadow_version is not None:
            named.add(self.shadow_version)
        return frozenset(named)

    def to_json(self) -> dict[str, Any]:
        return {
            "aliases": dict(self.aliases),
            "weights": {str(v): w for v, w in sorted(self.weights.items())},
            "shadow": None
            if self.shadow_version is None
            else {"version": self.shadow_version, "fraction": self.shadow_fraction},
        }

    @property
    def etag(self) -> str:
        """The admin API's ETag of `to_json()` (pins are not part of it): a client that
        reads, changes and writes the routing sends it back as If-Match, so a change made
        by someone else meanwhile is refused (412) rather than silently overwritten."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return '"' + hashlib.blake2b(text.encode(), digest_size=8).hexdigest() + '"'

    def with_pins(self, pinned: frozenset[int]) -> Routing:
        return Routing(
            self.aliases, self.weights, self.shadow_version, self.shadow_fraction, pinned
        )

    @property
    def empty(self) -> bool:
        return not (self.aliases or self.weights or self.pinned or self.shadow_version)


NO_ROUTING = Routing()


def if_match(header: str, etag: str) -> bool:
    """RFC 9110 If-Match: `*` or a list of strong entity tags, one of them `etag`."""
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or etag in tags


def parse_routing(doc: Any, pinned: frozenset[int] = frozenset()) -> Routing:
    """Routing from its JSON form (what the admin API takes); InvalidArgument naming
    the problem. Versions are not checked against the disk here (the caller does)."""
    if not isinstance(doc, dict):
        raise InvalidArgument("routing must be a JSON object")
    unknown = set(doc) - {"aliases", "weights", "shadow"}
    if unknown:
        raise InvalidArgument(f"unknown routing field(s): {', '.join(sorted(unknown))[:200]}")
    aliases = _object(doc.get("aliases"), "aliases", MAX_ALIASES)
    for name, version in aliases.items():
        if not ALIAS.fullmatch(name):
            raise InvalidArgument(
                f"alias {name[:80]!r} must start with a letter or '_' and hold only letters, "
                "digits, '_', '.', '-' (a number would read as a version)"
            )
        _version(version, f"alias {name!r}")
    weights: dict[int, int] = {}
    for key, weight in _object(doc.get("weights"), "weights", MAX_WEIGHTS).items():
        version = _version(_int_text(key), f"weights key {key[:20]!r}")
        if type(weight) is not int or weight < 0 or weight > 1_000_000:
            raise InvalidArgument(f"weight of version {key} must be an integer 0..1000000")
        weights[version] = weight
    if weights and not any(weights.values()):
        raise InvalidArgument("weights must not all be 0")
    shadow = doc.get("shadow")
    shadow_version, fraction = None, 0.0
    if shadow is not None:
        if not isinstance(shadow, dict) or set(shadow) - {"version", "fraction"}:
            raise InvalidArgument('shadow must be {"version": V, "fraction": F}')
        shadow_version = _version(shadow.get("version"), "shadow version")
        fraction = shadow.get("fraction", 1.0)
        if type(fraction) not in (int, float) or not 0 < fraction <= 1:
            raise InvalidArgument("shadow fraction must be a number in (0, 1]")
    return Routing(aliases, weights, shadow_version, float(fraction), pinned)


def _object(value: Any, what: str, limit: int) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    if len(value) > limit:
        raise InvalidArgument(f"at most {limit} {what}")
    return value


def _int_text(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _version(value: Any, what: str) -> int:
    if type(value) is not int or value < 1 or value >= 10**18:
        raise InvalidArgument(f"{what} must name a version (a positive integer)")
    return value


# -- choices ----------------------------------------------------------------------------


def pick(weights: Mapping[int, int], key: str | None, draw: float | None = None) -> int:
    """A version by weight: the same routing key always lands on the same version while
    the weights are unchanged (a hash of the key is the draw), else a random draw."""
    total = sum(weights.values())
    if key is not None:
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") % total
    else:
        point = int((random.random() if draw is None else draw) * total)
    for version, weight in sorted(weights.items()):
        if point < weight:
            return version
        point -= weight
    return max(v for v, w in weights.items() if w)  # float edge: draw == 1.0


def shadowed(routing: Routing, served: int, draw: float | None = None) -> int | None:
    """The version a copy of this request goes to, or None (not sampled, or the same)."""
    target = routing.shadow_version
    if target is None or target == served:
        return None
    return target if (random.random() if draw is None else draw) < routing.shadow_fraction else None


# -- persistence -----------------------------------------------------------------------


class RoutingStore:
    """Every model's routing in one JSON file, replaced atomically on each change."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STORE_FILENAME

    def load(self) -> dict[str, Routing]:
        """What the file holds ({} if there is none); InvalidArgument if it is corrupt."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read routing state {self.path}: {exc}") from None
        out = {}
        try:
            for name, item in doc.get("models", {}).items():
                pins = item.pop("pinned", [])
                pinned = frozenset(_version(v, "pinned version") for v in pins)
                out[name] = parse_routing(item, pinned)
        except (AttributeError, TypeError) as exc:  # valid JSON, wrong shape
            raise InvalidArgument(f"routing state {self.path} is malformed: {exc}") from None
        except InvalidArgument as exc:
            raise InvalidArgument(f"routing state {self.path}: {exc.message}") from None
        return out

    def save(self, routes: Mapping[str, Routing]) -> None:
        """Write the whole state (off the event loop: it fsyncs)."""
        doc = {
            "models": {
                name: {**r.to_json(), "pinned": sorted(r.pinned)}
                for name, r in sorted(routes.items())
                if not r.empty
            }
        }
        write_atomically(self.path, json.dumps(doc, indent=1).encode())
