"""Request -> ModelId: which version of a model serves a request, and its shadow.

An explicit version wins; a name where a version goes is an alias; an unversioned
request follows the model's weights (sticky by routing key when one is given), else
goes to the latest servable version. Versions named by routing stay servable outside
the version policy while they are on disk (so traffic can be rolled back). The routing
itself (`server/routing.py`) changes only through the admin core.
"""

from __future__ import annotations

from collections.abc import Mapping

from fleetserve.server.errors import NotFound, Unavailable
from fleetserve.server.repository import Repository
from fleetserve.server.routing import NO_ROUTING, Routing, pick, shadowed
from fleetserve.server.types import ModelId
from fleetserve.server.versions import parse_version


class Router:
    def __init__(self, repository: Repository, routes: Mapping[str, Routing] | None = None):
        self._repository = repository
        self._routes: dict[str, Routing] = dict(routes or {})

    def resolve(self, name: str, version: str | None, key: str | None = None) -> ModelId:
        """The version that serves (name, version); NotFound names what exists."""
        entry = self._repository.entry(name)
        if entry.config is None:
            raise Unavailable(f"model {name!r} is unavailable: {entry.error}")
        routing = self._routes.get(name, NO_ROUTING)
        if not version:
            if routing.weights:
                live = {v: w for v, w in routing.weights.items() if w and v in entry.versions}
                if live:
                    return ModelId(name, pick(live, key))
            if not entry.servable:
                raise NotFound(f"model {name!r} has no servable version")
            return ModelId(name, entry.servable[-1])
        number = parse_version(version)
        if number is None:
            number = routing.aliases.get(version)
        if number is None or not (
            number in entry.servable or (number in routing.versions and number in entry.versions)
        ):
            available = ", ".join(map(str, self.servable(name))) or "none"
            aliases = ", ".join(sorted(routing.aliases))
            raise NotFound(
                f"model {name!r} has no version {version[:40]!r} (available: {available}"
                + (f"; aliases: {aliases})" if aliases else ")")
            )
        return ModelId(name, number)

    def shadow(self, model_id: ModelId) -> ModelId | None:
        """Where a copy of a request served by `model_id` goes, if it is sampled."""
        routing = self._routes.get(model_id.name)
        if routing is None or routing.shadow_version is None:
            return None
        target = shadowed(routing, model_id.version)
        return None if target is None else ModelId(model_id.name, target)

    def servable(self, name: str) -> list[int]:
        """Versions a request may name: within the policy, or routed and on disk."""
        entry = self._repository.entry(name)
        routed = self._routes.get(name, NO_ROUTING).versions & set(entry.versions)
        return sorted(set(entry.servable) | routed)

    def routing(self, name: str) -> Routing:
        return self._routes.get(name, NO_ROUTING)

    def routes(self) -> dict[str, Routing]:
        return dict(self._routes)

    def set_routing(self, name: str, routing: Routing) -> None:
        """Takes effect for the next request (one dict assignment on the loop)."""
        if routing.empty:
            self._routes.pop(name, None)
        else:
            self._routes[name] = routing
