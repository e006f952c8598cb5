"""The on-disk catalogue of models and versions, in Triton's repository layout.

    DIR/<model>/config.pbtxt          optional
    DIR/<model>/<version>/model.onnx  version = a positive integer directory

Scanning lists directories only; a model's config is read when first asked for and
kept until the next scan, so registering thousands of models costs a listing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loaders.base import Loader
from loaders.registry import loader_class
from server.config import ModelConfig, Settings, load_model_config
from server.errors import InvalidArgument, NotFound, ServerError
from server.types import ModelId
from server.versions import servable_versions

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


class Repository:
    """Finds models and builds their loaders; never loads anything itself."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.model_repository
        self._names: list[str] = []
        self._entries: dict[str, ModelEntry] = {}

    def scan(self) -> list[str]:
        """Re-list the model directories; returns the model names, sorted."""
        if not self.root.is_dir():
            raise NotFound(f"model repository {str(self.root)!r} is not a directory")
        names = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.fullmatch(p.name)
        )
        self._names = names
        self._entries = {}  # configs and versions are read again on next use
        return names

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
        entry = ModelEntry(name, path)
        try:
            entry.config = load_model_config(path)
        except ServerError as exc:
            entry.error = exc.message
        entry.versions = tuple(
            sorted(
                int(p.name) for p in path.iterdir() if p.is_dir() and VERSION_DIR.fullmatch(p.name)
            )
        )
        if entry.config is not None:
            entry.servable = tuple(servable_versions(entry.config.version_policy, entry.versions))
        return entry

    def loader(self, model_id: ModelId, config: ModelConfig, settings: Settings) -> Loader:
        """A loader for one version; the file is only opened by `load()`."""
        path = self.root / model_id.name / str(model_id.version) / config.default_model_filename
        return loader_class(config.platform)(path, config.load_options(settings))
