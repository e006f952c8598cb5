"""The model cache through real servers: lazy loads, single flight, count and memory
budgets with eviction, in-flight and pinned protection, oversize refusal, retry of a
failed load, and the cache metrics.

Each test builds its own repository of real ONNX models (loaders.testing) and starts its
own server on it (conftest's start_server, preload off), then talks to it over real
sockets: urllib for one request at a time, aiohttp for concurrent ones. Answers are
compared with onnxruntime run directly on the same model file; every model has its own
weights, so an answer from the wrong model is caught. What the cache holds is read from
outside: /v2/models/stats (which lists the loaded versions with their counted bytes)
and the Prometheus metrics. Waits are polls with deadlines.

The one peek inside is `leases()`, which asks the server's cache (on the server's own
loop) whether a request is running on a model right now: the statistics only count
finished requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.loaders import testing
from fleetserve.loaders.onnx import OnnxLoader
from fleetserve.server import settings
from fleetserve.server.cli import build_parser
from fleetserve.server.types import ModelId
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import mlp_input, ort_run

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2
PINNED_CONFIG = 'parameters { key: "pinned" value: { string_value: "true" } }\n'
SLOW_DIM = 1024


# -- clients ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        doc = self.json()
        assert set(doc) == {"error"}, doc
        return doc["error"]

    def output(self) -> np.ndarray:
        """OUTPUT0 of a JSON inference response, as FP32."""
        assert self.status == 200, self.body[:300]
        (out,) = self.json()["outputs"]
        assert out["name"] == "OUTPUT0" and out["datatype"] == "FP32"
        return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(
        url, data=body, method="POST" if body is not None else "GET", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())


def infer_doc(x: np.ndarray) -> bytes:
    doc = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }
    return json.dumps(doc).encode()


def infer(server: RunningServer, model: str, x: np.ndarray) -> Reply:
    return http(
        f"{server.http_url}/v2/models/{model}/infer",
        infer_doc(x),
        {"Content-Type": "application/json"},
    )


def binary_infer(server: RunningServer, model: str, x: np.ndarray) -> tuple[int, Any]:
    """POST x with Triton's binary tensor extension both ways (big batches stay small)."""
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    reply = http(
        f"{server.http_url}/v2/models/{model}/infer",
        header + raw,
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    if reply.status != 200:
        return reply.status, reply.body.decode(errors="replace")
    split = int(reply.headers["Inference-Header-Content-Length"])
    out = json.loads(reply.body[:split])["outputs"][0]
    return 200, np.frombuffer(reply.body[split:], dtype=np.float32).reshape(out["shape"])


def metrics(server: RunningServer) -> dict[str, float]:
    """Every unlabelled fleetserve_* sample, plus histogram buckets as name{le}."""
    text = http(server.metrics_url).body.decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("fleetserve_model") and not sample.name.startswith(
                "fleetserve_loaded"
            ):
                continue
            key = sample.name
            if "le" in sample.labels:
                key += "{" + sample.labels["le"] + "}"
            out[key] = sample.value
    return out


def metric_types(server: RunningServer) -> dict[str, str]:
    text = http(server.metrics_url).body.decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def loaded(server: RunningServer) -> dict[str, int]:
    """The loaded versions (model name -> bytes counted against the budget)."""
    reply = http(f"{server.http_url}/v2/models/stats")
    assert reply.status == 200, reply.body
    return {s["name"]: s["memory_usage"][0]["byte_size"] for s in reply.json()["model_stats"]}


def index_states(server: RunningServer) -> dict[str, str] | None:
    """Model -> state from the repository index, if this server has the extension."""
    reply = http(f"{server.http_url}/v2/repository/index", b"{}")
    if reply.status != 200:
        return None
    return {row["name"]: row.get("state", "") for row in reply.json()}


def leases(server: RunningServer, model: str) -> int:
    """Requests running on the model's version 1 right now; -1 when it is not loaded."""
    cache = server.app.cache
    assert cache is not None

    async def read() -> int:
        servable = cache.servable(ModelId(model, 1))
        return -1 if servable is None else servable.leases

    return server.call(read())  # type: ignore[return-value]


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # poll interval


# -- concurrent traffic ------------------------------------------------------------------


def classify(reply_status: int, headers: Any, body: bytes, expected: np.ndarray) -> str:
    """ok | wrong | no_room | unavailable | internal | other:<status>."""
    if reply_status == 200:
        (out,) = json.loads(body)["outputs"]
        got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
        return "ok" if np.array_equal(got, expected) else "wrong"
    if reply_status == 503:
        assert headers.get("Retry-After") is not None, body
        return "no_room" if "no room" in json.loads(body)["error"] else "unavailable"
    if reply_status == 500:
        return "internal"
    return f"other:{reply_status}"


async def traffic(
    server: RunningServer,
    models: list[str],
    x: np.ndarray,
    expected: dict[str, np.ndarray],
    concurrency: int,
) -> list[tuple[str, str, str]]:
    """Send one request per entry of `models`, `concurrency` at a time (closed loop).

    Returns (model, outcome, error message) per request, in completion order.
    """
    body = infer_doc(x)
    todo = iter(models)
    results: list[tuple[str, str, str]] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for model in todo:
                async with session.post(
                    f"{server.http_url}/v2/models/{model}/infer",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    raw = await resp.read()
                    outcome = classify(resp.status, resp.headers, raw, expected[model])
                    message = "" if resp.status == 200 else raw.decode(errors="replace")
                    results.append((model, outcome, message))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# -- repositories ------------------------------------------------------------------------


def mlp_models(root: Path, names: list[str], **kwargs: Any) -> dict[str, Path]:
    """One mlp per name, each with its own weights; returns name -> model file."""
    return {
        name: testing.write_model(root, name, testing.mlp(seed=i + 1, **kwargs))
        for i, name in enumerate(names)
    }


def expected_outputs(root: Path, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    outputs = {name: ort_run(root, name, 1, {"INPUT0": x})["OUTPUT0"] for name in names}
    distinct = {o.tobytes() for o in outputs.values()}
    assert len(distinct) == len(outputs), "models must answer differently"
    return outputs


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start servers with lazy loading (preload off) on a repository; stop them after."""
    started: list[RunningServer] = []

    def start(repo: Path, **overrides: Any) -> RunningServer:
        overrides.setdefault("preload", False)
        running = start_server(test_settings(repo, **overrides))
        started.append(running)
        return running

    yield start
    for running in started:
        stop_server(running)


@pytest.fixture(scope="module")
def slow_rows_per_second() -> float:
    """Rows of `slow` (dim 1024, depth 8) one onnxruntime thread runs per CPU second.

    The server runs models with one intra-op thread, so this is measured the same way,
    in CPU time, which does not depend on how busy the machine is.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(
        testing.slow(dim=SLOW_DIM, depth=8), so, providers=["CPUExecutionProvider"]
    )
    x = np.ones((128, SLOW_DIM), dtype=np.float32)
    session.run(None, {"INPUT0": x[:8]})  # warm up
    t0 = time.thread_time()
    session.run(None, {"INPUT0": x})
    return len(x) / max(time.thread_time() - t0, 1e-6)


def slow_batch(rows_per_second: float, seconds: float) -> np.ndarray:
    rows = int(min(max(rows_per_second * seconds, 64), 8192))  # <= 32 MiB of input
    # distinct, exactly representable values; slow multiplies by the identity
    return (np.arange(rows * SLOW_DIM, dtype=np.float32) % 4093 - 2046).reshape(rows, SLOW_DIM)


def slow_and_mlp_repo(root: Path) -> Path:
    # without a config the server would cap the batch at --default-max-batch-size (64)
    testing.write_model(
        root, "slow", testing.slow(dim=SLOW_DIM, depth=8), config="max_batch_size: 16384\n"
    )
    testing.write_model(root, "mlp", testing.mlp(seed=1))
    return root


# -- lazy loading and single flight -----------------------------------------------------


def test_lazy_server_starts_empty_and_loads_only_what_is_used(tmp_path, serve):
    names = [f"m{i:02d}" for i in range(50)]
    mlp_models(tmp_path, names)
    srv = serve(tmp_path)

    assert http(f"{srv.http_url}/v2/health/ready").status == 200
    m = metrics(srv)
    assert m["fleetserve_loaded_models"] == 0
    assert m["fleetserve_loaded_bytes"] == 0
    assert m["fleetserve_model_loads_total"] == 0
    assert loaded(srv) == {}
    # an unloaded model is ready (it loads on first use) and asking does not load it
    assert http(f"{srv.http_url}/v2/models/m20/ready").status == 200
    assert metrics(srv)["fleetserve_model_loads_total"] == 0

    meta = http(f"{srv.http_url}/v2/models/m07")
    assert meta.status == 200, meta.body
    assert meta.json()["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    assert set(loaded(srv)) == {"m07"}
    m = metrics(srv)
    assert (m["fleetserve_loaded_models"], m["fleetserve_model_loads_total"]) == (1, 1)

    x = mlp_input(rows=3, seed=5)
    expected = expected_outputs(tmp_path, ["m07", "m33"], x)
    reply = infer(srv, "m33", x)
    assert reply.status == 200, reply.body
    np.testing.assert_array_equal(reply.output(), expected["m33"])
    assert set(loaded(srv)) == {"m07", "m33"}
    m = metrics(srv)
    assert (m["fleetserve_loaded_models"], m["fleetserve_model_loads_total"]) == (2, 2)
    assert m["fleetserve_model_evictions_total"] == 0
    states = index_states(srv)
    if states is not None:  # the repository extension, when present, agrees
        assert len(states) == 50
        assert {n for n, s in states.items() if s == "READY"} == {"m07", "m33"}


def test_concurrent_cold_requests_share_one_load(tmp_path, serve):
    # a few MB of weights, so the load takes long enough for the requests to pile up
    mlp_models(tmp_path, ["big"], layers=[16, 1024, 1024, 4])
    srv = serve(tmp_path)
    inputs = [mlp_input(rows=1, seed=i) for i in range(50)]
    expected = [ort_run(tmp_path, "big", 1, {"INPUT0": x})["OUTPUT0"] for x in inputs]

    async def burst() -> list[tuple[int, bytes]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(x: np.ndarray) -> tuple[int, bytes]:
                async with session.post(
                    f"{srv.http_url}/v2/models/big/infer",
                    data=infer_doc(x),
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    return resp.status, await resp.read()

            return await asyncio.gather(*(one(x) for x in inputs))

    replies = asyncio.run(burst())
    for (status, body), want in zip(replies, expected, strict=True):
        assert status == 200, body
        np.testing.assert_array_equal(Reply(status, {}, body).output(), want)
    m = metrics(srv)
    assert m["fleetserve_model_loads_total"] == 1
    assert m["fleetserve_model_load_failures_total"] == 0
    assert m["fleetserve_loaded_models"] == 1
    # the requests did overlap the load: several found the model not yet loaded
    assert srv.app.cache.misses >= 2, srv.app.cache.misses  # type: ignore[union-attr]


# -- budgets ------------------------------------------------------------------------------


def test_count_budget_evicts_the_least_recently_used(tmp_path, serve):
    names = ["a", "b", "c", "d", "e"]
    mlp_models(tmp_path, names)
    x = mlp_input(rows=2, seed=9)
    expected = expected_outputs(tmp_path, names, x)
    srv = serve(tmp_path, max_loaded_models=3)

    def use(name: str) -> None:
        reply = infer(srv, name, x)
        assert reply.status == 200, reply.body
        np.testing.assert_array_equal(reply.output(), expected[name])

    for name in "abc":
        use(name)
    assert set(loaded(srv)) == {"a", "b", "c"}
    assert metrics(srv)["fleetserve_model_evictions_total"] == 0

    use("a")  # a hit: recency is now b < c < a
    use("d")  # evicts b
    assert set(loaded(srv)) == {"a", "c", "d"}
    use("e")  # evicts c
    assert set(loaded(srv)) == {"a", "d", "e"}
    m = metrics(srv)
    assert m["fleetserve_model_evictions_total"] == 2
    assert m["fleetserve_model_loads_total"] == 5
    assert m["fleetserve_loaded_models"] == 3
    # an evicted version reports zeros, and comes back on its next use (evicting a)
    stats = http(f"{srv.http_url}/v2/models/b/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 0
    use("b")
    assert set(loaded(srv)) == {"d", "e", "b"}
    m = metrics(srv)
    assert (m["fleetserve_model_evictions_total"], m["fleetserve_model_loads_total"]) == (3, 6)
    states = index_states(srv)
    if states is not None:
        assert {n for n, s in states.items() if s == "READY"} == {"d", "e", "b"}


def test_memory_budget_evicts_by_bytes(tmp_path, serve):
    """Models of different sizes under a byte budget that holds only some of them.

    What the cache guarantees (cache.py `_load_copy`): a version counts its measured size
    (never less than its file), and the bytes counted never exceed the budget: room is
    made for its estimate before the load, and for what it measured beyond that after.
    """
    layers = {"small": [16, 512, 512, 4], "medium": [16, 768, 768, 4], "large": [16, 1024, 1024, 4]}
    files = {
        name: testing.write_model(tmp_path, name, testing.mlp(layers=widths, seed=i))
        for i, (name, widths) in enumerate(layers.items())
    }
    size = {name: path.stat().st_size for name, path in files.items()}
    assert size["small"] < size["medium"] < size["large"]
    budget = 12_000_000  # estimates 2.2, 4.9 and 8.6 MB: large never fits beside both others
    assert size["small"] + size["medium"] + 2 * size["large"] > budget
    assert 2 * size["large"] < budget
    x = mlp_input(rows=2, seed=3)
    expected = expected_outputs(tmp_path, list(layers), x)
    srv = serve(tmp_path, max_loaded_bytes=budget)

    recency: list[str] = []  # most recent last
    for name in ["small", "medium", "large", "small", "medium", "large", "medium", "small"]:
        reply = infer(srv, name, x)
        assert reply.status == 200, reply.body
        np.testing.assert_array_equal(reply.output(), expected[name])
        if name in recency:
            recency.remove(name)
        recency.append(name)

        held = loaded(srv)
        m = metrics(srv)
        gauge = m["fleetserve_loaded_bytes"]
        assert gauge == sum(held.values())
        assert m["fleetserve_loaded_models"] == len(held)
        assert all(held[n] >= size[n] for n in held), (held, size)
        # LRU by bytes: what is loaded is always the k most recently used
        assert set(held) == set(recency[-len(held) :]), (held, recency)
        assert gauge <= budget, (name, held, budget)
        assert m["fleetserve_model_loads_total"] - m["fleetserve_model_evictions_total"] == len(
            held
        )
    assert metrics(srv)["fleetserve_model_evictions_total"] >= 1  # large never fits beside both


# -- what must never be evicted ----------------------------------------------------------


def test_model_in_use_is_never_evicted(tmp_path, serve, slow_rows_per_second):
    """max_loaded_models=1: while a long request runs on `slow`, a request for another
    model gets 503 "no room" with Retry-After (cache.py `_make_room` refuses when every
    candidate is leased); the running request finishes correctly; afterwards the other
    model loads and evicts the now idle `slow`."""
    slow_and_mlp_repo(tmp_path)
    srv = serve(tmp_path, max_loaded_models=1, max_request_size=64 * MiB)
    x_mlp = mlp_input(rows=2, seed=1)
    want_mlp = ort_run(tmp_path, "mlp", 1, {"INPUT0": x_mlp})["OUTPUT0"]
    assert http(f"{srv.http_url}/v2/models/slow").status == 200  # load it
    batch = slow_batch(slow_rows_per_second, 1.0)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(binary_infer, srv, "slow", batch)
        poll(lambda: pending.done() or leases(srv, "slow") >= 1, 30, "the slow request to run")
        assert not pending.done(), pending.result()

        refused = infer(srv, "mlp", x_mlp)
        still_running = not pending.done()
        assert refused.status == 503, refused.body
        assert "no room" in refused.error()
        assert refused.headers["Retry-After"] == "1"
        assert set(loaded(srv)) == {"slow"}
        assert metrics(srv)["fleetserve_model_evictions_total"] == 0
        if still_running:
            assert leases(srv, "slow") == 1

        status, out = pending.result(120)
    assert status == 200, out
    np.testing.assert_array_equal(out, batch)

    # now idle: the next try (after the refusal's Retry-After second) evicts slow
    reply = poll(lambda: (r := infer(srv, "mlp", x_mlp)).status == 200 and r, 10, "mlp to load")
    np.testing.assert_array_equal(reply.output(), want_mlp)
    assert set(loaded(srv)) == {"mlp"}
    assert metrics(srv)["fleetserve_model_evictions_total"] == 1


def test_no_room_refusal_is_not_remembered_as_a_failed_load(tmp_path, serve, slow_rows_per_second):
    slow_and_mlp_repo(tmp_path)
    srv = serve(tmp_path, max_loaded_models=1, max_request_size=64 * MiB)
    x_mlp = mlp_input(rows=2, seed=1)
    assert http(f"{srv.http_url}/v2/models/slow").status == 200
    batch = slow_batch(slow_rows_per_second, 0.25)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(binary_infer, srv, "slow", batch)
        poll(lambda: pending.done() or leases(srv, "slow") >= 1, 30, "the slow request to run")
        if pending.done():
            pytest.skip("the slow request ended before it could block a load")
        refused = infer(srv, "mlp", x_mlp)
        refused_at = time.monotonic()
        assert refused.status == 503 and "no room" in refused.error(), refused.body
        assert pending.result(120)[0] == 200
    if time.monotonic() - refused_at > 0.8:
        pytest.skip("the slow request outlasted the 1 s backoff: nothing to show")
    # slow is idle now, so there is room: mlp is fine and can load at once
    assert leases(srv, "slow") == 0
    assert http(f"{srv.http_url}/v2/models/mlp/ready").status == 200
    reply = infer(srv, "mlp", x_mlp)
    assert reply.status == 200, reply.body


def test_pinned_model_stays_loaded_through_churn(tmp_path, serve):
    names = [f"m{i}" for i in range(6)]
    mlp_models(tmp_path, names)
    testing.write_model(tmp_path, "pinned", testing.mlp(seed=99), config=PINNED_CONFIG)
    x = mlp_input(rows=1, seed=2)
    expected = expected_outputs(tmp_path, [*names, "pinned"], x)
    srv = serve(tmp_path, max_loaded_models=3)

    assert infer(srv, "pinned", x).status == 200  # loaded first: the least recently used
    for _ in range(2):  # sequential churn: every request a load and an eviction
        for name in names:
            reply = infer(srv, name, x)
            assert reply.status == 200, reply.body
            assert "pinned" in loaded(srv)
    rng = random.Random(5)
    stream = [rng.choice([*names, *names, "pinned"]) for _ in range(300)]
    results = asyncio.run(traffic(srv, stream, x, expected, concurrency=4))
    outcomes = Counter(outcome for _, outcome, _ in results)
    assert set(outcomes) <= {"ok", "no_room", "unavailable"}, outcomes
    pinned_ok = sum(1 for m, o, _ in results if m == "pinned" and o == "ok")
    assert all(o == "ok" for m, o, _ in results if m == "pinned")

    assert "pinned" in loaded(srv)
    m = metrics(srv)
    assert m["fleetserve_model_evictions_total"] >= 10
    # never reloaded: a reload would have reset its statistics
    stats = http(f"{srv.http_url}/v2/models/pinned/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 1 + pinned_ok


# -- refusals and failures ------------------------------------------------------------------


def oversize_repo(root: Path) -> dict[str, Path]:
    files = mlp_models(root, ["s0", "s1"])
    files["huge"] = testing.write_model(
        root, "huge", testing.mlp(layers=[16, 1024, 1024, 4], seed=7)
    )
    return files


def test_model_larger_than_the_budget_is_507_and_evicts_nothing(tmp_path, serve):
    files = oversize_repo(tmp_path)
    budget = 4_000_000
    estimate = OnnxLoader(files["huge"]).estimate_bytes()
    assert estimate > budget
    srv = serve(tmp_path, max_loaded_bytes=budget)
    x = mlp_input(rows=1, seed=4)
    for name in ("s0", "s1"):
        assert infer(srv, name, x).status == 200
    before, held = metrics(srv), loaded(srv)

    reply = infer(srv, "huge", x)
    assert reply.status == 507, reply.body
    message = reply.error()
    assert "budget" in message and str(budget) in message and str(estimate) in message
    after = metrics(srv)
    assert after["fleetserve_model_evictions_total"] == before["fleetserve_model_evictions_total"]
    assert after["fleetserve_model_loads_total"] == before["fleetserve_model_loads_total"]
    assert after["fleetserve_loaded_bytes"] == before["fleetserve_loaded_bytes"]
    assert loaded(srv) == held
    for name in held:  # what was loaded still serves, without a reload
        assert infer(srv, name, x).status == 200
    assert metrics(srv)["fleetserve_model_loads_total"] == before["fleetserve_model_loads_total"]


def test_model_larger_than_the_budget_is_507_every_time(tmp_path, serve):
    oversize_repo(tmp_path)
    srv = serve(tmp_path, max_loaded_bytes=4_000_000)
    x = mlp_input(rows=1, seed=4)
    first, second = infer(srv, "huge", x), infer(srv, "huge", x)
    assert first.status == 507, first.body
    assert second.status == 507, (second.status, second.body)


def test_corrupt_model_is_retried_after_the_backoff_once_fixed(tmp_path, serve):
    path = tmp_path / "broken" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an onnx model")
    srv = serve(tmp_path)
    x = mlp_input(rows=2, seed=8)

    first = infer(srv, "broken", x)
    failed_at = time.monotonic()
    assert first.status == 503, first.body
    reason = first.error()
    assert "broken" in reason and "failed to load" in reason
    assert first.headers["Retry-After"] == "1"
    assert http(f"{srv.http_url}/v2/models/broken/ready").status == 400
    assert metrics(srv)["fleetserve_model_load_failures_total"] == 1

    # fix the file (atomically, as a deploy would)
    fixed = testing.mlp(seed=3)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(fixed)
    os.replace(tmp, path)
    want = ort_run(tmp_path, "broken", 1, {"INPUT0": x})["OUTPUT0"]

    # within the backoff: the remembered failure, at once, without a new attempt
    t0 = time.monotonic()
    cached = infer(srv, "broken", x)
    took = time.monotonic() - t0
    assert time.monotonic() - failed_at < 1.0, "too slow to ask within the backoff"
    assert cached.status == 503 and cached.error() == reason
    assert cached.headers["Retry-After"] == "1"
    assert took < 0.5
    assert metrics(srv)["fleetserve_model_load_failures_total"] == 1

    # after the backoff a request loads the fixed file
    reply = poll(lambda: (r := infer(srv, "broken", x)).status == 200 and r, 10, "the retry")
    assert time.monotonic() - failed_at >= 0.9  # not before the 1 s backoff
    np.testing.assert_array_equal(reply.output(), want)
    m = metrics(srv)
    assert m["fleetserve_model_load_failures_total"] == 1
    assert m["fleetserve_model_loads_total"] == 1
    assert http(f"{srv.http_url}/v2/models/broken/ready").status == 200


# -- races -------------------------------------------------------------------------------


def test_concurrent_requests_over_more_models_than_the_budget(tmp_path, serve):
    """8 models, room for 3, 400 requests in random order, 8 at a time.

    Every answer must be the right model's, nothing may fail with a 500; a request may
    be refused with 503 (+ Retry-After) when there is no room for its model right now.
    """
    names = [f"m{i}" for i in range(8)]
    mlp_models(tmp_path, names)
    x = mlp_input(rows=1, seed=6)
    expected = expected_outputs(tmp_path, names, x)
    srv = serve(tmp_path, max_loaded_models=3)
    rng = random.Random(1234)
    stream = [rng.choice(names) for _ in range(400)]

    results = asyncio.run(traffic(srv, stream, x, expected, concurrency=8))
    outcomes = Counter(outcome for _, outcome, _ in results)
    assert len(results) == 400
    assert outcomes["wrong"] == 0, outcomes
    assert outcomes["internal"] == 0, outcomes
    assert set(outcomes) <= {"ok", "no_room", "unavailable"}, outcomes
    assert outcomes["ok"] > 0, outcomes

    m = metrics(srv)
    held = loaded(srv)
    assert len(held) == m["fleetserve_loaded_models"] <= 3
    assert m["fleetserve_loaded_bytes"] == sum(held.values())
    assert m["fleetserve_model_loads_total"] - m["fleetserve_model_evictions_total"] == len(held)
    assert m["fleetserve_model_evictions_total"] >= 5, (m, outcomes)  # it did churn


def test_a_request_whose_model_loaded_is_not_failed_by_an_eviction(tmp_path, serve):
    names = [f"m{i}" for i in range(8)]
    mlp_models(tmp_path, names)
    x = mlp_input(rows=1, seed=6)
    expected = expected_outputs(tmp_path, names, x)
    srv = serve(tmp_path, max_loaded_models=3)
    rng = random.Random(99)
    # rounds of the same traffic until one shows it (usually the first; bounded in time)
    deadline = time.monotonic() + 8
    lost: list[tuple[str, str, str]] = []
    while not lost and time.monotonic() < deadline:
        stream = [rng.choice(names) for _ in range(400)]
        results = asyncio.run(traffic(srv, stream, x, expected, concurrency=8))
        assert not [r for r in results if r[1] not in ("ok", "no_room", "unavailable")]
        lost = [r for r in results if r[1] == "unavailable"]
    assert not lost, f"{len(lost)} requests lost their freshly loaded model: {lost[:3]}"


# -- metrics -------------------------------------------------------------------------------


def test_cache_metrics_are_present_and_consistent(tmp_path, serve):
    files = mlp_models(tmp_path, ["a", "b", "c"])
    broken = tmp_path / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"garbage")
    srv = serve(tmp_path, max_loaded_models=2)

    types = metric_types(srv)
    assert types["fleetserve_loaded_models"] == "gauge"
    assert types["fleetserve_loaded_bytes"] == "gauge"
    assert types["fleetserve_model_loads"] == "counter"
    assert types["fleetserve_model_load_failures"] == "counter"
    assert types["fleetserve_model_evictions"] == "counter"
    assert types["fleetserve_model_load_duration_seconds"] == "histogram"
    m = metrics(srv)
    for name in (
        "fleetserve_loaded_models", "fleetserve_loaded_bytes", "fleetserve_model_loads_total",
        "fleetserve_model_load_failures_total", "fleetserve_model_evictions_total",
        "fleetserve_model_load_duration_seconds_count",
    ):  # fmt: skip
        assert m[name] == 0, name

    x = mlp_input(rows=1, seed=1)
    assert infer(srv, "broken", x).status == 503  # a failed load evicts nothing
    for name in ("a", "b", "c"):  # c evicts a
        assert infer(srv, name, x).status == 200
    m = metrics(srv)
    held = loaded(srv)
    assert set(held) == {"b", "c"}
    assert m["fleetserve_loaded_models"] == 2
    assert m["fleetserve_loaded_bytes"] == sum(held.values())
    assert all(held[n] >= files[n].stat().st_size for n in held)
    assert m["fleetserve_model_loads_total"] == 3
    assert m["fleetserve_model_load_failures_total"] == 1
    assert m["fleetserve_model_evictions_total"] == 1
    # the histogram times the successful loads
    assert m["fleetserve_model_load_duration_seconds_count"] == 3
    assert m["fleetserve_model_load_duration_seconds_sum"] > 0
    buckets = sorted(
        (float(k[k.index("{") + 1 : -1]), v)
        for k, v in m.items()
        if k.startswith("fleetserve_model_load_duration_seconds_bucket{")
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1] == (float("inf"), 3)


# -- command line ------------------------------------------------------------------------------


def test_cli_parses_the_cache_flags():
    parser, cli = build_parser(["serve"])
    argv = [
        "serve", "--model-repository", "models", "--max-loaded-bytes", "4GiB",
        "--max-loaded-models", "12", "--eviction-policy", "cost", "--preload",
    ]  # fmt: skip
    options = settings.load(cli, parser.parse_args(argv))
    assert options.max_loaded_bytes == 4 * 1024**3
    assert options.max_loaded_models == 12
    assert options.eviction_policy == "cost"
    assert options.preload is True
    args = parser.parse_args(["serve", "--model-repository", "m"])
    defaults = settings.load(cli, args)
    assert (defaults.max_loaded_bytes, defaults.max_loaded_models) == (0, 0)
    assert (defaults.eviction_policy, defaults.preload) == ("lru", False)


# -- the budget, in a fresh server process -----------------------------------------------------


READY_LINE = re.compile(r"fleetserve ready: http [\w.:]+:(\d+) grpc \S+ metrics [\w.:]+:(-?\d+)")


def test_loaded_bytes_stay_within_the_budget(tmp_path):
    testing.write_model(tmp_path, "tiny", testing.mlp(seed=1))
    budget = 4 * MiB
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fleetserve", "serve", "--model-repository", str(tmp_path),
            "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "-1",
            "--metrics-port", "0", "--max-loaded-bytes", str(budget),
        ],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ports: list[tuple[int, int]] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = READY_LINE.search(line)
            if match and not ports:
                ports.append((int(match[1]), int(match[2])))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(60) and ports, "server did not become ready"
        http_port, metrics_port = ports[0]
        reply = http(
            f"http://127.0.0.1:{http_port}/v2/models/tiny/infer",
            infer_doc(mlp_input(rows=1)),
            {"Content-Type": "application/json"},
        )
        assert reply.status == 200, reply.body
        text = http(f"http://127.0.0.1:{metrics_port}/metrics").body.decode()
        gauge = next(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "fleetserve_loaded_bytes"
        )
        assert gauge <= budget, f"loaded_bytes {gauge:.0f} > budget {budget}"
    finally:
        proc.terminate()
        proc.wait(30)
