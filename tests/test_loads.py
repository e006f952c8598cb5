"""Loads and what they leave on disk, through real servers: staging leftovers swept at
start.

Each test builds its own repository of real ONNX models (loaders.testing) and starts its
own server (conftest's start_server, lazy loading), talking to it over real sockets.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetserve.loaders import testing
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, mlp_input

SMALL = [16, 512, 512, 4]  # 1.1 MB file, ~2.2 MiB loaded


# -- clients -----------------------------------------------------------------------------


def call(
    server: RunningServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or None) of one request."""
    request = urllib.request.Request(server.http_url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S * 2) as reply:
            status, headers, raw = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        with err:
            status, headers, raw = err.code, dict(err.headers), err.read()
    return status, headers, json.loads(raw) if raw else None


def infer_body(x: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": list(x.shape),
                       "data": x.ravel().tolist()}]}  # fmt: skip
    return json.dumps(doc).encode()


def infer(server: RunningServer, model: str, x: np.ndarray) -> tuple[int, dict[str, str], Any]:
    return call(server, "POST", f"/v2/models/{model}/infer", infer_body(x))


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start lazily loading servers on a repository; stop them after the test."""
    started: list[RunningServer] = []

    def start(repo: Path, **overrides: Any) -> RunningServer:
        overrides.setdefault("preload", False)
        running = start_server(test_settings(repo, **overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        stop_server(running)


def mlps(root: Path, names: list[str], layers: list[int]) -> dict[str, Path]:
    return {
        name: testing.write_model(root, name, testing.mlp(layers=layers, seed=i + 1))
        for i, name in enumerate(names)
    }


# -- staging leftovers --------------------------------------------------------------------------


def test_staging_leftovers_are_swept_at_start(
    tmp_path: Path, serve: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    mlps(repo, ["m"], SMALL)
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    model = repo / "m" / "1" / "model.onnx"
    leftovers = [  # what uploads, deletes and config writes leave after a crash
        repo / ".upload-new-1-0123abcd" / "1" / "model.onnx",
        repo / ".upload-new-1-0123abcd" / "config.pbtxt",
        repo / "m" / ".upload-2-89abcdef" / "model.onnx",
        repo / "m" / ".deleted-3-deadbeef" / "model.onnx",
        repo / "m" / ".config.pbtxt.k2_9xq1z.tmp",
    ]
    others = [  # hidden, but not ours: kept
        repo / ".upload-notes",
        repo / "m" / ".upload-2-XYZ" / "model.onnx",
        repo / "m" / ".hidden-by-the-user",
        repo / ".fleetserve" / "routing.json",
        repo / "m" / "1" / ".upload-1-0123abcd",  # inside a version: not a staging place
    ]
    for path in [*leftovers, *others]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.read_bytes() if path.name == "model.onnx" else b"{}")
    (outside / "keep" / "file").write_bytes(b"not the server's")
    link = repo / "m" / ".upload-5-0badc0de"  # our name, but a link out of the repository
    link.symlink_to(outside / "keep")
    hour_ago = time.time() - 3600
    for path in repo.rglob("*"):
        os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    recent = repo / "m" / ".upload-4-feedf00d" / "model.onnx"  # maybe another server's
    recent.parent.mkdir()
    recent.write_bytes(model.read_bytes())

    with caplog.at_level(logging.INFO, logger="fleetserve.server.staging"):
        srv = serve(repo)
    for path in leftovers:
        assert not path.exists(), path
    assert not (repo / ".upload-new-1-0123abcd").exists()
    assert not link.is_symlink() and (outside / "keep" / "file").read_bytes() == b"not the server's"
    for path in [*others, recent]:
        assert path.exists(), path
    messages = [r.getMessage() for r in caplog.records]
    removed = {m for m in messages if "removed staging leftover" in m}
    assert len(removed) == 5, removed  # four leftovers and the link
    assert any("kept staging leftover" in m and ".upload-4-feedf00d" in m for m in messages)
    assert infer(srv, "m", mlp_input(rows=1))[0] == 200
