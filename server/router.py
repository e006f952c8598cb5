"""Request -> ModelId: which version of a model serves a request.

Now: an explicit version, else the latest servable one. Aliases, weighted splits,
sticky keys and shadows (the versions issue) plug in here, behind the same call.
"""

from __future__ import annotations

from server.errors import NotFound, Unavailable
from server.repository import Repository
from server.types import ModelId
from server.versions import parse_version


class Router:
    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    def resolve(self, name: str, version: str | None) -> ModelId:
        """The version that serves (name, version); NotFound names what exists."""
        entry = self._repository.entry(name)
        if entry.config is None:
            raise Unavailable(f"model {name!r} is unavailable: {entry.error}")
        if not version:
            if not entry.servable:
                raise NotFound(f"model {name!r} has no servable version")
            return ModelId(name, entry.servable[-1])
        number = parse_version(version)
        if number is None or number not in entry.servable:
            available = ", ".join(map(str, entry.servable)) or "none"
            raise NotFound(
                f"model {name!r} has no version {version[:40]!r} (available: {available})"
            )
        return ModelId(name, number)
