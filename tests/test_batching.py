"""Dynamic batching through a real server, with tritonclient over REST and gRPC.

Each test gates its own model (tests.helpers.Gate, swapped in on the server's loop
before the model's first request): the first request holds the model's only instance,
the next ones queue, and the test opens the gate once the server reports them queued.
So which requests merge, time out or leave the queue is decided by the test, not by
timing. Results are compared with onnxruntime run directly on the model file.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from fleetserve.loaders import testing
from fleetserve.server.types import ModelId
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, Gate, mlp_input, ort_run

BATCHED = "max_batch_size: 16\ndynamic_batching { }\n"
QUEUE_OF_TWO = (
    "max_batch_size: 8\ndynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching")
    for seed, name in enumerate(["merge", "timeouts", "disconnect"], start=10):
        testing.write_model(root, name, testing.mlp(seed=seed), config=BATCHED)
    testing.write_model(root, "full", testing.mlp(seed=20), config=QUEUE_OF_TWO)
    testing.write_model(root, "auto", testing.mlp(seed=21))  # no config.pbtxt
    testing.write_model(
        root, "gpu", testing.mlp(seed=22),
        config=BATCHED + "instance_group [ { count: 1 kind: KIND_GPU } ]\n",
    )  # fmt: skip
    testing.write_model(
        root, "unbatched", testing.fixed_shape((3, 4)),
        config="max_batch_size: 0\ndynamic_batching { }\n",
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    # nothing runs inline, so a gated run never blocks the server's loop
    running = start_server(test_settings(repo, inline_run_us=0.0, dynamic_batching=True))
    yield running
    stop_server(running)


# -- helpers -------------------------------------------------------------------------


def install_gate(server: RunningServer, name: str) -> Gate:
    async def swap() -> Gate:
        s = server.app.cache.servable(ModelId(name, 1))  # type: ignore[union-attr]
        assert s is not None and s.batcher is None, "gate a model before its first request"
        s.model = Gate(s.model)
        return s.model

    return server.call(swap())  # type: ignore[return-value]


def batcher_of(server: RunningServer, name: str) -> Any:
    async def get() -> Any:
        return server.app.cache.servable(ModelId(name, 1)).batcher  # type: ignore[union-attr]

    return server.call(get())


async def until(what: str, check: Any) -> None:
    """Poll `check` (run in a thread: it may call into the server) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not await asyncio.to_thread(check):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def started(gate: Gate, runs: int = 1) -> None:
    for _ in range(runs):
        assert await asyncio.to_thread(gate.started.acquire, True, WAIT_S), "no run started"


def queued(server: RunningServer, name: str, depth: int) -> Awaitable[None]:
    return until(f"{depth} queued on {name}", lambda: batcher_of(server, name).depth == depth)


def rest_input(x: np.ndarray) -> httpclient.InferInput:
    i = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    return i


def grpc_input(x: np.ndarray) -> grpcclient.InferInput:
    i = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=WAIT_S) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def get_json(server: RunningServer, path: str) -> Any:
    import json

    with urllib.request.urlopen(server.http_url + path, timeout=WAIT_S) as reply:
        return json.loads(reply.read())


# -- tests ---------------------------------------------------------------------------


def test_rest_and_grpc_requests_queued_together_run_as_one_batch(
    server: RunningServer, repo: Path
) -> None:
    gate = install_gate(server, "merge")
    xs = [mlp_input(rows, seed) for seed, rows in enumerate([1, 2, 1, 3, 1, 4])]

    async def main() -> list[np.ndarray]:
        rest = httpclient.InferenceServerClient(server.http)
        grpc = grpcclient.InferenceServerClient(server.grpc)
        try:
            first = asyncio.ensure_future(rest.infer("merge", [rest_input(xs[0])]))
            await started(gate)
            tasks = [
                rest.infer("merge", [rest_input(x)])
                if i % 2
                else grpc.infer("merge", [grpc_input(x)])
                for i, x in enumerate(xs[1:])
            ]
            futures = [asyncio.ensure_future(t) for t in tasks]
            await queued(server, "merge", len(xs) - 1)
            gate.open()
            replies = await asyncio.gather(first, *futures)
            return [r.as_numpy("OUTPUT0") for r in replies]
        finally:
            gate.open()
            await rest.close()
            await grpc.close()

    outputs = asyncio.run(main())
    for x, got in zip(xs, outputs, strict=True):
        want = ort_run(repo, "merge", 1, {"INPUT0": x})["OUTPUT0"]
        assert got.shape == want.shape and np.array_equal(got, want)  # bit-identical
    assert [r["INPUT0"][0] for r in gate.runs] == [1, 11]

    stats = get_json(server, "/v2/models/merge/stats")["model_stats"][0]
    assert stats["inference_count"] == 12 and stats["execution_count"] == 2
    assert stats["inference_stats"]["success"]["count"] == 6
    assert stats["inference_stats"]["queue"]["count"] == 6
    assert [b["batch_size"] for b in stats["batch_stats"]] == [1, 11]

    m = scrape(server)
    assert sample(m, "fleetserve_batch_size_count", model="merge", version="1") == 2
    assert sample(m, "fleetserve_batch_size_sum", model="merge", version="1") == 12
    assert sample(m, "fleetserve_batch_size_bucket", model="merge", version="1", le="8.0") == 1
    assert sample(m, "fleetserve_queue_duration_seconds_count", model="merge", version="1") == 6
    assert sample(m, "fleetserve_compute_duration_seconds_count", model="merge", version="1") == 2
    assert sample(m, "fleetserve_queue_depth", model="merge", version="1") == 0


def test_a_full_queue_answers_503_and_unavailable_while_health_and_metrics_answer(
    server: RunningServer, repo: Path
) -> None:
    gate = install_gate(server, "full")

    async def main() -> None:
        grpc = grpcclient.InferenceServerClient(server.grpc)
        rest = httpclient.InferenceServerClient(server.http)
        body = {
            "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                        "data": mlp_input(1, 0).ravel().tolist()}],
        }  # fmt: skip
        try:
            first = asyncio.ensure_future(rest.infer("full", [rest_input(mlp_input(1, 1))]))
            await started(gate)
            waiting = [
                asyncio.ensure_future(rest.infer("full", [rest_input(mlp_input(1, s))]))
                for s in (2, 3)
            ]
            await queued(server, "full", 2)
            async with aiohttp.ClientSession() as http:
                url = f"{server.http_url}/v2/models/full/infer"
                async with http.post(url, json=body) as reply:
                    assert reply.status == 503
                    assert int(reply.headers["Retry-After"]) >= 1
                    assert "queue full" in (await reply.json())["error"]
                async with http.get(f"{server.http_url}/v2/health/ready") as reply:
                    assert reply.status == 200
                async with http.get(server.metrics_url) as reply:
                    assert 'fleetserve_queue_depth{model="full",version="1"} 2.0' in (
                        await reply.text()
                    )
            with pytest.raises(InferenceServerException, match="queue full") as refused:
                await grpc.infer("full", [grpc_input(mlp_input(1, 4))])
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            gate.open()
            for reply in await asyncio.gather(first, *waiting):
                assert reply.as_numpy("OUTPUT0").shape == (1, 4)
        finally:
            gate.open()
            await rest.close()
            await grpc.close()

    asyncio.run(main())
    m = scrape(server)
    assert sample(m, "fleetserve_rejected_requests_total", model="full", version="1",
                  reason="queue_full") == 2  # fmt: skip


def test_a_request_timing_out_in_the_queue_gets_504_or_deadline_exceeded_and_never_runs(
    server: RunningServer, repo: Path
) -> None:
    gate = install_gate(server, "timeouts")

    async def main() -> None:
        rest = httpclient.InferenceServerClient(server.http)
        grpc = grpcclient.InferenceServerClient(server.grpc)
        try:
            first = asyncio.ensure_future(rest.infer("timeouts", [rest_input(mlp_input(1, 0))]))
            await started(gate)
            # the V2 "timeout" parameter (microseconds), as tritonclient sends it
            with pytest.raises(InferenceServerException, match="timed out") as late:
                await rest.infer("timeouts", [rest_input(mlp_input(2, 1))], timeout=2000)
            assert late.value.status() == "504"
            with pytest.raises(InferenceServerException, match="timed out") as late:
                await grpc.infer("timeouts", [grpc_input(mlp_input(2, 2))], timeout=2000)
            assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            # the gRPC deadline: the client gives up, and the server drops its request
            with pytest.raises(InferenceServerException) as gone:
                await grpc.infer("timeouts", [grpc_input(mlp_input(3, 3))], client_timeout=0.2)
            assert gone.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            await queued(server, "timeouts", 0)
            kept = asyncio.ensure_future(grpc.infer("timeouts", [grpc_input(mlp_input(1, 4))]))
            await queued(server, "timeouts", 1)
            gate.open()
            await first
            assert (await kept).as_numpy("OUTPUT0").shape == (1, 4)
        finally:
            gate.open()
            await rest.close()
            await grpc.close()

    asyncio.run(main())
    assert [r["INPUT0"][0] for r in gate.runs] == [1, 1]  # the 2- and 3-row ones never ran
    m = scrape(server)
    labels = dict(model="timeouts", version="1")
    assert sample(m, "fleetserve_rejected_requests_total", reason="timeout", **labels) == 2
    assert sample(m, "fleetserve_rejected_requests_total", reason="cancelled", **labels) == 1
    assert sample(m, "fleetserve_requests_total", protocol="rest", outcome="deadline_exceeded",
                  **labels) == 1  # fmt: skip


def test_a_client_that_disconnects_while_queued_is_dropped_from_the_queue(
    server: RunningServer,
) -> None:
    gate = install_gate(server, "disconnect")

    async def main() -> None:
        body = {"inputs": [{"name": "INPUT0", "shape": [2, 16], "datatype": "FP32",
                            "data": mlp_input(2, 1).ravel().tolist()}]}  # fmt: skip
        url = f"{server.http_url}/v2/models/disconnect/infer"
        async with aiohttp.ClientSession() as http:
            first = asyncio.ensure_future(
                http.post(url, json={**body, "inputs": [{**body["inputs"][0], "shape": [1, 16],
                                                         "data": [0.0] * 16}]})
            )  # fmt: skip
            await started(gate)
            leaving = asyncio.ensure_future(http.post(url, json=body))
            await queued(server, "disconnect", 1)
            leaving.cancel()  # closes its connection
            await asyncio.gather(leaving, return_exceptions=True)
            await queued(server, "disconnect", 0)
            gate.open()
            async with await first as reply:
                assert reply.status == 200

    try:
        asyncio.run(main())
    finally:
        gate.open()
    assert [r["INPUT0"][0] for r in gate.runs] == [1]
    m = scrape(server)
    assert sample(m, "fleetserve_rejected_requests_total", model="disconnect", version="1",
                  reason="cancelled") == 1  # fmt: skip


def test_a_model_without_config_batches_when_the_server_default_says_so(
    server: RunningServer, repo: Path
) -> None:
    config = get_json(server, "/v2/models/auto/config")
    assert config["dynamic_batching"] == {} and config["max_batch_size"] == 64
    x = mlp_input(3, 7)

    async def main() -> np.ndarray:
        client = grpcclient.InferenceServerClient(server.grpc)
        try:
            return (await client.infer("auto", [grpc_input(x)])).as_numpy("OUTPUT0")
        finally:
            await client.close()

    got = asyncio.run(main())
    assert np.array_equal(got, ort_run(repo, "auto", 1, {"INPUT0": x})["OUTPUT0"])
    assert batcher_of(server, "auto") is not None


def test_max_batch_size_0_turns_batching_off_even_with_dynamic_batching(
    server: RunningServer, repo: Path
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    async def main() -> np.ndarray:
        client = httpclient.InferenceServerClient(server.http)
        try:
            i = httpclient.InferInput("INPUT0", [3, 4], "FP32")
            i.set_data_from_numpy(x)
            return (await client.infer("unbatched", [i])).as_numpy("OUTPUT0")
        finally:
            await client.close()

    got = asyncio.run(main())
    assert np.array_equal(got, ort_run(repo, "unbatched", 1, {"INPUT0": x})["OUTPUT0"])
    assert batcher_of(server, "unbatched") is None


def test_a_bad_timeout_parameter_is_400_naming_it(server: RunningServer) -> None:
    body = {
        "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
        "parameters": {"timeout": -5},
    }

    async def main() -> tuple[int, dict]:
        url = f"{server.http_url}/v2/models/auto/infer"
        async with aiohttp.ClientSession() as http, http.post(url, json=body) as reply:
            return reply.status, await reply.json()

    status, doc = asyncio.run(main())
    assert status == 400 and '"timeout"' in doc["error"]


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="needs a CPU-only build"
)
def test_a_model_asking_for_cuda_on_a_cpu_machine_is_a_clear_error_not_a_crash(
    server: RunningServer,
) -> None:
    body = {
        "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]
    }

    async def main() -> list[tuple[int, dict]]:
        out = []
        async with aiohttp.ClientSession() as http:
            for model in ("gpu", "auto"):
                url = f"{server.http_url}/v2/models/{model}/infer"
                async with http.post(url, json=body) as reply:
                    out.append((reply.status, await reply.json()))
        return out

    (status, doc), (ok_status, _) = asyncio.run(main())
    assert status == 503
    assert "CUDAExecutionProvider" in doc["error"] and "not available" in doc["error"]
    assert ok_status == 200  # the server goes on serving the others


def test_a_model_with_queued_requests_is_in_use_and_never_evicted(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for seed, name in enumerate(["busy", "newcomer"]):
        testing.write_model(root, name, testing.mlp(seed=seed), config=BATCHED)
    running = start_server(
        test_settings(root, inline_run_us=0.0, max_loaded_models=1, preload=False)
    )
    try:

        async def main() -> None:
            client = httpclient.InferenceServerClient(running.http)
            try:
                await client.load_model("busy")
                gate = install_gate(running, "busy")
                try:
                    first = asyncio.ensure_future(
                        client.infer("busy", [rest_input(mlp_input(1, 1))])
                    )
                    await started(gate)
                    waiting = asyncio.ensure_future(
                        client.infer("busy", [rest_input(mlp_input(2, 2))])
                    )
                    await queued(running, "busy", 1)
                    # the only slot is held by a model with a running and a queued request
                    with pytest.raises(InferenceServerException) as refused:
                        await client.infer("newcomer", [rest_input(mlp_input(1, 3))])
                    assert refused.value.status() == "503"
                    gate.open()
                    assert (await waiting).as_numpy("OUTPUT0").shape == (2, 4)
                    await first
                finally:
                    gate.open()
                # idle now: the newcomer evicts it
                reply = await client.infer("newcomer", [rest_input(mlp_input(1, 3))])
                assert reply.as_numpy("OUTPUT0").shape == (1, 4)
            finally:
                await client.close()

        asyncio.run(main())
    finally:
        stop_server(running)


def test_a_model_that_does_not_batch_refuses_past_its_bound_instead_of_queueing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    testing.write_model(root, "plain", testing.mlp(seed=5), config="max_batch_size: 8\n")
    running = start_server(test_settings(root, inline_run_us=0.0, max_queue_size=2, run_threads=2))
    gate = Gate(running.app.cache.servable(ModelId("plain", 1)).model)  # type: ignore[union-attr]
    running.app.cache.servable(ModelId("plain", 1)).model = gate  # type: ignore[union-attr]
    try:

        async def main() -> None:
            client = httpclient.InferenceServerClient(running.http)
            try:
                held = [
                    asyncio.ensure_future(client.infer("plain", [rest_input(mlp_input(1, s))]))
                    for s in (1, 2)
                ]
                await started(gate, 2)  # both run threads are held by the gate
                with pytest.raises(InferenceServerException, match="waiting for a run thread") as e:
                    await client.infer("plain", [rest_input(mlp_input(1, 3))])
                assert e.value.status() == "503"
                gate.open()
                for reply in await asyncio.gather(*held):
                    assert reply.as_numpy("OUTPUT0").shape == (1, 4)
            finally:
                gate.open()
                await client.close()

        asyncio.run(main())
    finally:
        gate.open()
        stop_server(running)
