"""Where the admin API stages uploads and retires deleted versions, and the sweep of
what a crash leaves there.

Uploads are written under hidden names (the repository ignores dot names) and published
by one rename; a delete renames a version to a hidden name before removing its files;
a config is replaced through a hidden temporary file. A crash can leave any of them
behind: `sweep` removes them at start, matching these exact names only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from fleetserve.server.config import CONFIG_FILENAME
from fleetserve.server.files import fsync_directory, publish, retire, write_atomically

log = logging.getLogger(__name__)
# a leftover this recent may be an upload in progress of another server that shares the
# repository: swept at a later start
SWEEP_MIN_AGE_S = 600.0

_TAG = r"[0-9a-f]{8}"
NEW_MODEL = re.compile(rf"\.upload-.+-\d+-{_TAG}")  # at the root: a new model, staged whole
IN_MODEL = re.compile(
    rf"\.upload-\d+-{_TAG}"  # a version of an existing model
    rf"|\.deleted-\d+-{_TAG}"  # a version being deleted
    rf"|\.{re.escape(CONFIG_FILENAME)}\.[a-z0-9_]{{8}}\.tmp"  # write_atomically's temporary
)


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def upload_dir(model_dir: Path, number: int, new_model: bool) -> Path:
    """The hidden directory an upload is written to: for a new model, the whole model
    directory (beside where it will be), else the version directory (in the model's)."""
    if new_model:
        return model_dir.parent / f".upload-{model_dir.name}-{number}-{_tag()}"
    return model_dir / f".upload-{number}-{_tag()}"


def deleted_dir(model_dir: Path, number: int) -> Path:
    """The hidden name a version is renamed to before its files are removed."""
    return model_dir / f".deleted-{number}-{_tag()}"


def install(staging: Path, target: Path, version_dir: Path, config: str | None) -> None:
    """Publish a staged upload (file I/O: off the loop). A new model's directory is
    staged whole, its config inside, and appears with one rename; for an existing model
    the version is renamed into place, then its config replaced (a failed replacement
    takes the version away again, leaving the model as it was)."""
    new_model = version_dir != staging
    if new_model:
        if config is not None:
            write_atomically(staging / CONFIG_FILENAME, config.encode())
        fsync_directory(version_dir)
        publish(staging, target)
        return
    publish(staging, target)
    if config is not None:
        try:
            write_atomically(target.parent / CONFIG_FILENAME, config.encode())
        except BaseException:
            retire(target, staging)
            raise


def sweep(root: Path, min_age_s: float = SWEEP_MIN_AGE_S) -> list[Path]:
    """Remove the staging leftovers of the repository at `root` that are older than
    `min_age_s` (their newest file); returns what was removed, each logged."""
    found = []
    for entry in _entries(root):
        if entry.name.startswith("."):
            if NEW_MODEL.fullmatch(entry.name):
                found.append(Path(entry.path))
        elif entry.is_dir(follow_symlinks=False):
            inner = _entries(Path(entry.path))
            found += [Path(e.path) for e in inner if IN_MODEL.fullmatch(e.name)]
    removed = []
    for path in found:
        try:
            age = time.time() - _newest_mtime(path)
            if age < min_age_s:
                log.info("kept staging leftover %s: written %.0fs ago", path, age)
                continue
            if _is_dir(path):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("cannot remove staging leftover %s: %s", path, exc)
            continue
        log.info("removed staging leftover %s", path)
        removed.append(path)
    return removed


def _is_dir(path: Path) -> bool:
    """A directory, not a symbolic link to one (never followed out of the repository)."""
    return not path.is_symlink() and path.is_dir()


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and everything under it (not following
    symbolic links)."""
    newest = path.lstat().st_mtime
    if _is_dir(path):
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest
