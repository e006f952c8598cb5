"""Version policy as pure functions of what is on disk (tested with tables)."""

from __future__ import annotations

from collections.abc import Iterable

from fleetserve.server.config import VersionPolicy


def servable_versions(policy: VersionPolicy, on_disk: Iterable[int]) -> list[int]:
    """The versions the policy makes servable, ascending."""
    versions = sorted(set(on_disk))
    if policy.kind == "all":
        return versions
    if policy.kind == "specific":
        wanted = set(policy.versions)
        return [v for v in versions if v in wanted]
    return versions[-policy.num_versions :] if versions else []


def parse_version(text: str) -> int | None:
    """A version string as the protocol sends it ("" = unversioned); None if not a version."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)
