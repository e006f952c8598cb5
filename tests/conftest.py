"""Shared fixtures: a model repository built in the test run and a real server on it.

The server runs in a background thread with its own uvloop event loop, on ephemeral
ports, and the tests talk to it over real sockets with real clients.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from fleetserve.loaders import testing
from fleetserve.server.app import App
from fleetserve.server.settings import Settings

DATATYPES = list(testing.V2_DATATYPES)

SIMPLE_CONFIG = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def build_repository(root: Path) -> Path:
    """Every kind of model the tests need, written in Triton's layout."""
    testing.write_model(root, "mlp", testing.mlp(seed=1), version=1)
    testing.write_model(root, "mlp", testing.mlp(seed=2), version=2)
    testing.write_model(root, "simple", testing.add_sub("INT32"), config=SIMPLE_CONFIG)
    for datatype in DATATYPES:
        testing.write_model(root, f"identity_{datatype.lower()}", testing.identity(datatype))
    testing.write_model(root, "fixed", testing.fixed_shape((3, 4)))
    testing.write_model(root, "fails_at_run", testing.runtime_failure())
    testing.write_model(root, "slow", testing.slow(dim=1024, depth=8))
    # three versions, all servable
    for v in (1, 2, 3):
        testing.write_model(
            root, "versioned", testing.fixed_shape((2,), factor=float(v)), version=v,
            config='version_policy: { all: {} }',
        )  # fmt: skip
    # broken models: a corrupt file, and a config with a field Triton's schema lacks
    corrupt = root / "corrupt" / "1"
    corrupt.mkdir(parents=True)
    (corrupt / "model.onnx").write_bytes(b"this is not an onnx model")
    testing.write_model(root, "bad_config", testing.mlp(), config="max_batch_size: 4\nfoo: 1\n")
    return root


@dataclass
class RunningServer:
    app: App
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.app.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.app.metrics_port}/metrics"

    def call(self, coro: object, timeout: float = 30) -> object:
        """Run a coroutine on the server's loop (to drive the core directly)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


def start_server(settings: Settings) -> RunningServer:
    started = threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        app = App(settings)
        box["app"], box["loop"] = app, loop
        try:
            loop.run_until_complete(app.start())
        except BaseException as exc:  # surface startup failures to the test
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(app.stop())
        loop.close()

    thread = threading.Thread(target=run, name="fleetserve-test", daemon=True)
    thread.start()
    if not started.wait(60):
        raise TimeoutError("server did not start within 60 s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return RunningServer(box["app"], box["loop"], thread)  # type: ignore[arg-type]


def stop_server(server: RunningServer) -> None:
    server.loop.call_soon_threadsafe(server.loop.stop)
    server.thread.join(60)
    assert not server.thread.is_alive(), "server thread did not stop"


def test_settings(repo: Path, **overrides: object) -> Settings:
    base = dict(
        model_repository=repo,
        host="127.0.0.1",
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        max_request_size=1024 * 1024,
        shutdown_timeout=10,
        preload=True,
    )
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(repo: Path) -> Iterator[RunningServer]:
    running = start_server(test_settings(repo))
    yield running
    stop_server(running)
