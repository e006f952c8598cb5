"""The on-disk catalogue of models and versions, in Triton's repository layout.

    DIR/<model>/config.pbtxt          optional
    DIR/<model>/<version>/model.onnx  version = a positive integer directory

Scanning lists directories only; a model's config is read when first asked for and
kept until the next scan, so registering thousands of models costs a listing.

Rescans while serving (`rescan` off the event loop, then `install` on it) build the new
catalogue aside and swap it in at once. They keep the entries they have already read
when the model's directory and config.pbtxt are unchanged (same mtimes and size), so a
periodic rescan costs a listing and two `stat`s per model.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from fleetserve.loaders.base import Loader
from fleetserve.loaders.registry import loader_class
from fleetserve.server.config import CONFIG_FILENAME, ModelConfig, load_model_config
from fleetserve.server.errors import InvalidArgument, NotFound, ServerError
from fleetserve.server.settings import Settings
from fleetserve.server.types import ModelId
from fleetserve.server.versions import servable_versions

# model names: what Triton accepts in practice, minus anything that could walk paths
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")


def check_model_name(name: str) -> str:
    """`name` if it is a safe model name; InvalidArgument otherwise."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(f"invalid model name {name[:140]!r}")
    return name


@dataclass(slots=True)
class ModelEntry:
    """One model directory: its config (or why it has none) and its versions on disk."""

    name: str
    path: Path
    config: ModelConfig | None = None
    error: str = ""
    versions: tuple[int, ...] = ()  # on disk
    servable: tuple[int, ...] = ()  # on disk and within the version policy
    stamp: tuple[int, int, int] = (0, 0, 0)  # what `_stamp` gave just before it was read


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A rescan's result, not yet current: the model names and the entries read."""

    names: list[str]
    entries: dict[str, ModelEntry]


class Repository:
    """Finds models and builds their loaders; never loads anything itself."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.model_repository
        self._names: list[str] = []  # on disk, plus removed models still loaded
        self._on_disk: frozenset[str] = frozenset()  # as the last listing found them
        self._entries: dict[str, ModelEntry] = {}

    def scan(self) -> list[str]:
        """Re-list the model directories; returns the model names, sorted."""
        names = self._list()
        self._names, self._on_disk = names, frozenset(names)
        self._entries = {}  # configs and versions are read again on next use
        return names

    def _list(self) -> list[str]:
        if not self.root.is_dir():
            raise NotFound(f"model repository {str(self.root)!r} is not a directory")
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.fullmatch(p.name)
        )

    def rescan(self, *, read_all: bool = False, fresh: Collection[str] = ()) -> Snapshot:
        """List and read the repository again without changing what is current.

        File I/O: call it off the event loop, then `install` the result on the loop.
        Entries already read are kept if their model's directory and config.pbtxt are
        unchanged, else read again; `read_all` also reads the models not read yet (the
        others stay lazy); the models named in `fresh` are read again in any case.
        Safe to run while the loop reads entries: it works on a copy.
        """
        names = self._list()
        current = self._entries.copy()
        entries: dict[str, ModelEntry] = {}
        for name in names:
            old = current.get(name)
            if name in fresh or (old is None and read_all):
                entries[name] = self._read(name)
            elif old is not None:
                stale = old.stamp != _stamp(self.root / name)
                entries[name] = self._read(name) if stale else old
        return Snapshot(names, entries)

    def install(self, snapshot: Snapshot, keep: Collection[str] = ()) -> None:
        """Make a rescan current (cheap: call it on the event loop).

        `keep` names models whose entries must survive although their directory is
        gone (they are still loaded and serving). Entries the loop read while the rescan
        ran, and the rescan did not, are kept too.
        """
        entries = dict(snapshot.entries)
        names = list(snapshot.names)
        on_disk = frozenset(names)
        for name, entry in self._entries.items():
            if name in entries:
                continue
            if name in on_disk:
                entries[name] = entry
            elif name in keep:
                entries[name] = entry
                names.append(name)
        self._names, self._on_disk = sorted(names), on_disk
        self._entries = entries

    def forget(self, name: str) -> None:
        """Drop a model the last listing did not find (kept while it was loaded)."""
        if name not in self._on_disk:
            self._entries.pop(name, None)
            if name in self._names:
                self._names = [n for n in self._names if n != name]

    @property
    def names(self) -> list[str]:
        return self._names

    def entry(self, name: str) -> ModelEntry:
        """The model's entry, reading its config and versions on first use."""
        entry = self._entries.get(name)
        if entry is None:
            if name not in self._names:
                raise NotFound(f"unknown model {name[:140]!r}")
            entry = self._read(name)
            self._entries[name] = entry
        return entry

    def _read(self, name: str) -> ModelEntry:
        path = self.root / name
        entry = ModelEntry(name, path, stamp=_stamp(path))
        try:
            entry.config = load_model_config(path)
        except ServerError as exc:
            entry.error = exc.message
        try:
            entry.versions = tuple(
                sorted(
                    int(p.name)
                    for p in path.iterdir()
                    if p.is_dir() and VERSION_DIR.fullmatch(p.name)
                )
            )
        except OSError as exc:  # the directory went away, or cannot be read
            entry.config = None
            entry.error = f"model {name!r}: cannot list its directory: {exc.strerror}"
        if entry.config is not None:
            entry.servable = tuple(servable_versions(entry.config.version_policy, entry.versions))
        return entry

    def loader(self, model_id: ModelId, config: ModelConfig, settings: Settings) -> Loader:
        """A loader for one version; the file is only opened by `load()`."""
        path = self.root / model_id.name / str(model_id.version) / config.default_model_filename
        return loader_class(config.platform)(path, config.load_options(settings))


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a model's versions or config change: the directory's mtime
    (versions added or removed, files renamed into place) and config.pbtxt's mtime and
    size (edited in place). -1 where a file is missing."""
    try:
        directory = path.stat().st_mtime_ns
    except OSError:
        directory = -1
    try:
        config = (path / CONFIG_FILENAME).stat()
    except OSError:
        return directory, -1, -1
    return directory, config.st_mtime_ns, config.st_size
