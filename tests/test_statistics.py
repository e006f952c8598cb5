"""Triton's statistics extension as Triton's own tools read it, over tritonclient.

perf_analyzer (without `-x VERSION`) measures the version whose `queue` count grew
during its window, so every successful request must count once in `queue`, batching or
not; a request that did not wait counts with 0 ns, as in Triton. Triton reports the
success count as the count of `queue` and of each `compute_*` (each request carries its
whole batch's compute times), while `execution_count` and `batch_stats` count model runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.utils import InferenceServerException

from fleetserve.loaders import testing
from fleetserve.server.types import ModelId
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, Gate

UNBATCHED = "max_batch_size: 8\n"  # batches a client sends, never merges requests
BATCHED = "max_batch_size: 8\ndynamic_batching { }\n"
PER_REQUEST = ("queue", "compute_input", "compute_infer", "compute_output")
HOLD_S = 0.1  # how long a gated run keeps the run threads busy


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("statistics")
    for name, config in (("unbatched", UNBATCHED), ("batched", BATCHED)):
        testing.write_model(root, name, testing.mlp(), config=config)
        testing.write_model(root, f"fails_{name}", testing.runtime_failure(), config=config)
        testing.write_model(root, f"gated_{name}", testing.mlp(), config=config)
    return root


@pytest.fixture(scope="module")
def pool_server(repo: Path) -> Iterator[RunningServer]:
    """Every run goes through the run pool (and so may wait for a thread)."""
    running = start_server(test_settings(repo, inline_run_us=0.0, run_threads=2))
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def inline_server(repo: Path) -> Iterator[RunningServer]:
    """Every run happens on the event loop at once: no request ever waits."""
    running = start_server(test_settings(repo, inline_run_us=1e9))
    yield running
    stop_server(running)


@pytest.fixture(params=["inline", "pool"])
def runs(request: pytest.FixtureRequest) -> tuple[str, RunningServer]:
    return request.param, request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(params=["http", "grpc"])
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


class Client:
    """A tritonclient of either protocol, reading statistics into one flat shape."""

    def __init__(self, server: RunningServer, protocol: str) -> None:
        self.protocol = protocol
        self.mod: Any = httpclient if protocol == "http" else grpcclient
        self.client = self.mod.InferenceServerClient(
            server.http if protocol == "http" else server.grpc
        )

    def infer(self, model: str, rows: int = 1, cols: int = 16) -> None:
        x = self.mod.InferInput("INPUT0", [rows, cols], "FP32")
        x.set_data_from_numpy(np.ones((rows, cols), np.float32))
        self.client.infer(model, [x])

    def stats(self, model: str) -> dict[str, Any]:
        """{"success": (count, ns), ..., "inference_count": n, "batches": {size: runs}}"""
        reply = self.client.get_inference_statistics(model)
        if self.protocol == "grpc":  # the same shape as the JSON (uint64 as int)
            (m,) = reply.model_stats
            i = m.inference_stats
            return {
                **{k: (getattr(i, k).count, getattr(i, k).ns) for k in ("success", "fail")},
                **{k: (getattr(i, k).count, getattr(i, k).ns) for k in PER_REQUEST},
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "batches": {b.batch_size: b.compute_infer.count for b in m.batch_stats},
                "batch_infer_ns": {b.batch_size: b.compute_infer.ns for b in m.batch_stats},
            }
        (m,) = reply["model_stats"]
        i = m["inference_stats"]
        return {
            **{k: (i[k]["count"], i[k]["ns"]) for k in ("success", "fail", *PER_REQUEST)},
            "inference_count": m["inference_count"],
            "execution_count": m["execution_count"],
            "batches": {b["batch_size"]: b["compute_infer"]["count"] for b in m["batch_stats"]},
            "batch_infer_ns": {b["batch_size"]: b["compute_infer"]["ns"] for b in m["batch_stats"]},
        }

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def client(runs: tuple[str, RunningServer], protocol: str) -> Iterator[Client]:
    c = Client(runs[1], protocol)
    yield c
    c.close()


def grew(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return after[key][0] - before[key][0]


@pytest.mark.parametrize("model", ["unbatched", "batched"])
def test_every_successful_request_counts_once_in_queue_and_compute(
    client: Client, model: str
) -> None:
    """What perf_analyzer's version pick needs: queue.count grows with each request."""
    for rows in (1, 3, 1):
        before = client.stats(model)
        client.infer(model, rows)
        after = client.stats(model)
        assert grew(before, after, "success") == 1
        for key in PER_REQUEST:
            assert grew(before, after, key) == 1, key
        assert after["inference_count"] - before["inference_count"] == rows
        assert after["execution_count"] - before["execution_count"] == 1


@pytest.mark.parametrize("model", ["unbatched", "batched"])
def test_a_request_run_at_once_on_the_loop_waited_zero_ns(
    inline_server: RunningServer, model: str
) -> None:
    client = Client(inline_server, "http")
    try:
        before = client.stats(model)
        client.infer(model)
        after = client.stats(model)
    finally:
        client.close()
    assert grew(before, after, "queue") == 1
    assert after["queue"][1] == before["queue"][1]


@pytest.mark.parametrize("model", ["fails_unbatched", "fails_batched"])
def test_a_failed_request_counts_as_fail_only(client: Client, model: str) -> None:
    before = client.stats(model)
    try:  # the model reshapes to [1, 4]: a batch of 2 fails at run time
        client.infer(model, rows=2, cols=4)
        pytest.fail("a batch of 2 ran")
    except InferenceServerException as exc:
        # dropped here: a traceback cycle through tritonclient.http's client would be
        # collected on another thread, where its gevent-based __del__ fails
        exc.with_traceback(None)
    after = client.stats(model)
    assert grew(before, after, "fail") == 1
    assert after["fail"][1] > before["fail"][1]
    for key in ("success", *PER_REQUEST):
        assert after[key] == before[key], key
    assert after["execution_count"] == before["execution_count"]


# -- gated runs (pool server): who waits, and for how long, is decided by the test --------


def install_gate(server: RunningServer, name: str) -> tuple[Gate, Any]:
    async def swap() -> tuple[Gate, Any]:
        s = server.app.cache.servable(ModelId(name, 1))  # type: ignore[union-attr]
        assert s is not None and s.batcher is None, "gate a model before its first request"
        s.model = Gate(s.model)
        return s.model, s

    return server.call(swap())  # type: ignore[return-value]


async def until(what: str, check: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def burst(server: RunningServer, model: str, gate: Gate, wait_for: Any) -> None:
    """Three concurrent requests; the gate opens HOLD_S after `wait_for()` holds."""

    async def main() -> None:
        client = httpclient_aio.InferenceServerClient(server.http)
        try:
            x = httpclient_aio.InferInput("INPUT0", [1, 16], "FP32")
            x.set_data_from_numpy(np.ones((1, 16), np.float32))
            tasks = [asyncio.ensure_future(client.infer(model, [x])) for _ in range(3)]
            await until("the requests to wait", wait_for)
            await asyncio.sleep(HOLD_S)
            gate.open()
            await asyncio.gather(*tasks)
        finally:
            gate.open()
            await client.close()

    asyncio.run(main())


def test_waiting_for_a_run_thread_counts_as_queue_time(pool_server: RunningServer) -> None:
    """A model that does not batch queues for a run thread: that wait is its queue time."""
    gate, servable = install_gate(pool_server, "gated_unbatched")
    client = Client(pool_server, "grpc")
    try:
        before = client.stats("gated_unbatched")
        # two requests hold both run threads, the third waits for one
        burst(pool_server, "gated_unbatched", gate,
              lambda: len(gate.runs) == 2 and servable.pending == 3)  # fmt: skip
        after = client.stats("gated_unbatched")
    finally:
        client.close()
    assert grew(before, after, "queue") == 3
    assert after["queue"][1] - before["queue"][1] >= HOLD_S * 1e9
    assert after["execution_count"] - before["execution_count"] == 3


def test_each_request_of_a_batch_carries_the_batch_compute_time(
    pool_server: RunningServer,
) -> None:
    gate, servable = install_gate(pool_server, "gated_batched")
    client = Client(pool_server, "http")
    try:
        before = client.stats("gated_batched")
        # the first request holds the only instance; the other two queue and then merge
        burst(pool_server, "gated_batched", gate,
              lambda: servable.batcher is not None and servable.batcher.depth == 2)  # fmt: skip
        after = client.stats("gated_batched")
    finally:
        client.close()
    assert gate.runs == [{"INPUT0": (1, 16)}, {"INPUT0": (2, 16)}]
    assert after["execution_count"] - before["execution_count"] == 2
    assert after["batches"] == {1: 1, 2: 1}
    for key in PER_REQUEST:
        assert grew(before, after, key) == 3, key
    # Triton: each request of the batch of 2 carries that batch's whole compute time
    per_run = after["batch_infer_ns"]
    assert after["compute_infer"][1] == per_run[1] + 2 * per_run[2]
    assert after["queue"][1] >= 2 * HOLD_S * 1e9  # the two merged requests waited
