"""Durable file operations: what is visible after a crash is either the old state or
the new one, never a half-written file or model (temporary name, fsync, rename, fsync of
the directory)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fleetserve.server.errors import AlreadyExists, Unavailable


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_file(f: Any) -> None:
    """Make what was written to an open file durable."""
    f.flush()
    os.fsync(f.fileno())


def publish(staging: Path, final: Path) -> None:
    """Rename the staged version into place (atomic), then make the rename durable: the
    staged directory's entries first, the rename, and the model directory's own entry
    (it may be new)."""
    fsync_directory(staging)
    try:
        os.rename(staging, final)
    except OSError as exc:
        if final.exists():
            raise AlreadyExists(f"version directory {final.name} appeared meanwhile") from None
        raise Unavailable(f"cannot publish the upload: {exc.strerror}") from None
    fsync_directory(final.parent)
    fsync_directory(final.parent.parent)


def retire(path: Path, gone: Path) -> None:
    """Make a version disappear at once (rename), then delete its files."""
    os.rename(path, gone)
    fsync_directory(path.parent)
    shutil.rmtree(gone, ignore_errors=True)
