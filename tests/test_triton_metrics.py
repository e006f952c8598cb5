"""Triton's metric families on the metrics port: a Triton Grafana dashboard's queries
return data, and the counters mean what Triton's do.

A real server, real requests (tritonclient over REST), real scrapes. Samples are read
as Prometheus stores them (a counter's name as exposed, no `_total` added), by a
parser written here rather than prometheus_client's, which renames counters.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http.aio as httpclient
from tritonclient.utils import InferenceServerException

from fleetserve.loaders import testing
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, mlp_input
from tests.test_batching import install_gate, queued, rest_input, started

BATCHED = "max_batch_size: 16\ndynamic_batching { }\n"
QUEUE_OF_ONE = (
    "max_batch_size: 8\ndynamic_batching { default_queue_policy { max_queue_size: 1 } }\n"
)

# Triton's families: type and help text, from Triton core's src/metrics.cc (written here
# independently of server/triton_metrics.py, as the oracle)
TRITON = {
    "nv_inference_request_success": (
        "counter", "Number of successful inference requests, all batch sizes"),
    "nv_inference_request_failure": (
        "counter", "Number of failed inference requests, all batch sizes"),
    "nv_inference_count": (
        "counter", "Number of inferences performed (does not include cached requests)"),
    "nv_inference_exec_count": (
        "counter", "Number of model executions performed (does not include cached requests)"),
    "nv_inference_request_duration_us": (
        "counter", "Cumulative inference request duration in microseconds "
        "(includes cached requests)"),
    "nv_inference_queue_duration_us": (
        "counter", "Cumulative inference queuing duration in microseconds "
        "(includes cached requests)"),
    "nv_inference_compute_input_duration_us": (
        "counter", "Cumulative compute input duration in microseconds "
        "(does not include cached requests)"),
    "nv_inference_compute_infer_duration_us": (
        "counter", "Cumulative compute inference duration in microseconds "
        "(does not include cached requests)"),
    "nv_inference_compute_output_duration_us": (
        "counter", "Cumulative inference compute output duration in microseconds "
        "(does not include cached requests)"),
    "nv_inference_pending_request_count": (
        "gauge", "Instantaneous number of pending requests awaiting execution per-model."),
    "nv_model_load_duration_secs": ("gauge", "Model load time in seconds"),
    "nv_cpu_utilization": ("gauge", "CPU utilization rate [0.0 - 1.0]"),
    "nv_cpu_memory_total_bytes": ("gauge", "CPU total memory (RAM), in bytes"),
    "nv_cpu_memory_used_bytes": ("gauge", "CPU used memory (RAM), in bytes"),
}  # fmt: skip
HOST = {"nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes"}

# The PromQL of Triton's sample Grafana dashboard: triton-inference-server/server,
# deploy/k8s-onprem/dashboard.json (commit 347557a8604fd114e984f785e91ce299c6b4d144),
# every target's "expr", by panel title. (deploy/gcp and deploy/fleetcommand still
# query nv_inference_load_ratio_bucket and nv_inference_compute_duration_us, which
# Triton itself no longer exposes.)
DASHBOARD = {
    "Active Triton Instances": ["count(count(nv_inference_count) by (instance))"],
    "Proportion of Requests by Pod": [
        "sum by (pod) (rate(nv_inference_count[1m])) / ignoring(pod) group_left sum "
        "(rate(nv_inference_count[1m]))"
    ],
    "Cumulative Inference Requests by Pod": [
        "sum(nv_inference_request_success) by (pod)",
        "sum(nv_inference_request_failure) by (pod)",
    ],
    "Compute Time by Model (milliseconds)": [
        "sum(rate(nv_inference_compute_infer_duration_us[30s])) by (model) / 1000"
    ],
    "Average Queue Time by Pod (microseconds)": [
        "avg(rate(nv_inference_queue_duration_us[30s])/(1+rate(nv_inference_request_success"
        "[30s]))) by (pod)"
    ],
}
# labels Prometheus attaches to every series of a scrape target (not the server's)
TARGET_LABELS = {"instance", "job", "pod", "namespace"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton_metrics")
    testing.write_model(root, "plain", testing.mlp(seed=1))  # no config: does not batch
    for seed, name in enumerate(["phase1", "phase2", "merged"], start=2):
        testing.write_model(root, name, testing.mlp(seed=seed), config=BATCHED)
    testing.write_model(root, "small_queue", testing.mlp(seed=8), config=QUEUE_OF_ONE)
    testing.write_model(root, "broken", testing.runtime_failure())
    for v in (1, 2):
        testing.write_model(
            root, "versioned", testing.mlp(seed=10 + v), version=v,
            config="version_policy: { all: {} }",
        )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    # nothing runs inline, so a gated run never blocks the server's loop
    running = start_server(test_settings(repo, inline_run_us=0.0))
    yield running
    stop_server(running)


# -- reading the exposition ----------------------------------------------------------

SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Scrape:
    samples: list[tuple[str, dict[str, str], float]]
    families: dict[str, tuple[str, str]]  # name -> (type, help)

    def get(self, name: str, **labels: str) -> float:
        """The one sample of `name` with exactly these labels."""
        found = [v for n, ls, v in self.samples if n == name and ls == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def triton_of(self, model: str) -> list[tuple[str, dict[str, str], float]]:
        """The model's samples of Triton's families."""
        return [s for s in self.samples if s[0].startswith("nv_") and s[1].get("model") == model]


def scrape(server: RunningServer) -> Scrape:
    with urllib.request.urlopen(server.metrics_url, timeout=WAIT_S) as reply:
        text = reply.read().decode()
    samples, types, helps = [], {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ", 1)
            types[name] = kind
        elif line.startswith("# HELP "):
            name, doc = line[7:].split(" ", 1)
            helps[name] = doc
        elif line and not line.startswith("#"):
            match = SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            labels = dict(LABEL.findall(match[2] or ""))
            samples.append((match[1], labels, float(match[3])))
    return Scrape(samples, {n: (types[n], helps.get(n, "")) for n in types})


# -- a small evaluator for the vector selectors of PromQL expressions ----------------

TOKEN = re.compile(
    r"\s*(?:(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<matchers>\{[^}]*\})"
    r"|(?P<range>\[[^\]]*\])|(?P<number>[0-9.]+)|(?P<other>\S))"
)
AGGREGATIONS = {"sum", "avg", "count", "min", "max", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values", "group"}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]
    ranged: bool  # a range selector (inside rate(), increase() ...)

    def matches(self, name: str, labels: dict[str, str]) -> bool:
        if name != self.metric:
            return False
        for label, op, want in self.matchers:
            have = labels.get(label, "")
            ok = {
                "=": have == want,
                "!=": have != want,
                "=~": re.fullmatch(want, have) is not None,
                "!~": re.fullmatch(want, have) is None,
            }[op]
            if not ok:
                return False
        return True


def selectors(expr: str) -> tuple[list[Selector], set[str]]:
    """The vector selectors of an expression, and the labels it groups or matches on."""
    tokens = [(m.lastgroup, m[m.lastgroup]) for m in TOKEN.finditer(expr) if m.lastgroup]
    found: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and text in GROUPING:
            if following == "(":
                end = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
                grouping |= {t for k, t in tokens[i + 2 : end] if k == "name"}
                i = end
        elif kind == "name" and text not in AGGREGATIONS and following != "(":
            matchers: list[tuple[str, str, str]] = []
            if tokens[i + 1 : i + 2] and tokens[i + 1][0] == "matchers":
                i += 1
                matchers = [m.groups() for m in MATCHER.finditer(tokens[i][1][1:-1])]
            ranged = bool(tokens[i + 1 : i + 2]) and tokens[i + 1][0] == "range"
            i += ranged
            found.append(Selector(text, matchers, ranged))
        i += 1
    return found, grouping


def test_the_selector_evaluator_reads_selectors_matchers_ranges_and_grouping() -> None:
    found, grouping = selectors(
        'sum by (pod) (rate(nv_a{model="m",version!~"1|2"}[1m])) / ignoring(pod) '
        "group_left sum(nv_b) by (model)"
    )
    assert found == [
        Selector("nv_a", [("model", "=", "m"), ("version", "!~", "1|2")], True),
        Selector("nv_b", [], False),
    ]
    assert grouping == {"pod", "model"}
    assert found[0].matches("nv_a", {"model": "m", "version": "3"})
    assert not found[0].matches("nv_a", {"model": "m", "version": "2"})
    assert not found[0].matches("nv_b", {"model": "m", "version": "3"})


# -- traffic ---------------------------------------------------------------------------


def traffic(server: RunningServer, gated: str, queue: int = 2) -> None:
    """Successes on a model that does not batch, a batch of `queue` requests that waited
    in a queue (on the batching model `gated`), and a request whose model run fails."""
    gate = install_gate(server, gated)

    async def main() -> None:
        rest = httpclient.InferenceServerClient(server.http)
        try:
            for seed in range(3):
                await rest.infer("plain", [rest_input(mlp_input(2, seed))])
            first = asyncio.ensure_future(rest.infer(gated, [rest_input(mlp_input(1, 0))]))
            await started(gate)
            waiting = [
                asyncio.ensure_future(rest.infer(gated, [rest_input(mlp_input(1, s))]))
                for s in range(1, queue + 1)
            ]
            await queued(server, gated, queue)
            gate.open()
            await asyncio.gather(first, *waiting)
            with pytest.raises(InferenceServerException, match="failed to run"):
                await rest.infer("broken", [broken_input()])
        finally:
            gate.open()
            await rest.close()

    asyncio.run(main())


def broken_input() -> httpclient.InferInput:
    """A batch of two: the `broken` model reshapes to [1, 4], so its run fails."""
    i = httpclient.InferInput("INPUT0", [2, 4], "FP32")
    i.set_data_from_numpy(np.ones((2, 4), np.float32))
    return i


def stats(server: RunningServer, model: str) -> dict[str, Any]:
    url = f"{server.http_url}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=WAIT_S) as reply:
        return json.loads(reply.read())["model_stats"][0]


# -- tests -------------------------------------------------------------------------------


def test_the_triton_dashboard_queries_return_data(server: RunningServer) -> None:
    """Each selector of each query matches series; a counter under rate() grew between
    two scrapes with requests between them (so the rate is > 0), any other selector has
    a series > 0; labels the query groups by are on the series (or added by Prometheus)."""
    traffic(server, "phase1")
    before = scrape(server)
    traffic(server, "phase2")
    after = scrape(server)
    for panel, queries in DASHBOARD.items():
        for query in queries:
            found, grouping = selectors(query)
            assert found, f"{panel}: no selector read from {query!r}"
            for selector in found:
                now = [(ls, v) for n, ls, v in after.samples if selector.matches(n, ls)]
                assert now, f"{panel}: {selector} matches no series"
                for labels, _ in now:
                    missing = grouping - TARGET_LABELS - labels.keys()
                    assert not missing, f"{panel}: series {labels} lack {missing}"
                if selector.ranged:
                    then = [v for n, ls, v in before.samples if selector.matches(n, ls)]
                    assert sum(v for _, v in now) > sum(then), f"{panel}: {selector} flat"
                else:
                    assert max(v for _, v in now) > 0, f"{panel}: {selector} all zero"


def test_families_have_triton_types_help_and_labels(server: RunningServer) -> None:
    m = scrape(server)
    for name, (kind, doc) in TRITON.items():
        assert m.families.get(name) == (kind, doc), name
    for name, labels, _ in m.samples:
        if name in HOST:
            assert labels == {}, name
        elif name == "nv_inference_request_failure":
            assert labels.keys() == {"model", "version", "reason"}
        elif name.startswith("nv_"):
            assert labels.keys() == {"model", "version"}, name
    reasons = {ls["reason"] for n, ls, _ in m.samples if n == "nv_inference_request_failure"}
    assert reasons == {"REJECTED", "CANCELED", "BACKEND", "OTHER"}


def test_counts_grow_with_requests_and_equal_the_statistics_extension(
    server: RunningServer,
) -> None:
    before = scrape(server)
    v = dict(model="plain", version="1")

    async def main() -> None:
        rest = httpclient.InferenceServerClient(server.http)
        try:
            for seed in range(4):
                await rest.infer("plain", [rest_input(mlp_input(3, seed))])
            wrong = httpclient.InferInput("INPUT0", [1, 3], "FP32")  # plain takes 16
            wrong.set_data_from_numpy(np.ones((1, 3), np.float32))
            with pytest.raises(InferenceServerException, match="shape"):
                await rest.infer("plain", [wrong])
            with pytest.raises(InferenceServerException, match="failed to run"):
                await rest.infer("broken", [broken_input()])
        finally:
            await rest.close()

    asyncio.run(main())
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    assert grew("nv_inference_request_success", **v) == 4
    assert grew("nv_inference_count", **v) == 12  # a batch of 3 counts 3
    assert grew("nv_inference_exec_count", **v) == 4
    assert grew("nv_inference_request_duration_us", **v) > 0
    assert grew("nv_inference_compute_infer_duration_us", **v) > 0
    assert grew("nv_inference_request_failure", reason="OTHER", **v) == 1  # bad input
    assert grew("nv_inference_request_failure", reason="BACKEND", **v) == 0
    broken = dict(model="broken", version="1")
    assert grew("nv_inference_request_failure", reason="BACKEND", **broken) == 1
    assert grew("nv_inference_request_success", **broken) == 0

    # the same numbers as Triton's statistics extension reports (us where it has ns)
    s = stats(server, "plain")
    inference = s["inference_stats"]
    assert after.get("nv_inference_request_success", **v) == inference["success"]["count"]
    assert after.get("nv_inference_request_duration_us", **v) == inference["success"]["ns"] // 1000
    assert after.get("nv_inference_count", **v) == s["inference_count"]
    assert after.get("nv_inference_exec_count", **v) == s["execution_count"]
    failures = sum(after.get("nv_inference_request_failure", reason=r, **v)
                   for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER"))  # fmt: skip
    assert failures == inference["fail"]["count"]
    for stage in ("compute_input", "compute_infer", "compute_output"):
        assert after.get(f"nv_inference_{stage}_duration_us", **v) == inference[stage]["ns"] // 1000
    assert after.get("nv_inference_queue_duration_us", **v) == inference["queue"]["ns"] // 1000


def test_queue_and_compute_durations_of_a_merged_batch(server: RunningServer) -> None:
    traffic(server, "merged", queue=8)  # one alone, then eight that waited run as one
    m = scrape(server)
    v = dict(model="merged", version="1")
    assert m.get("nv_inference_request_success", **v) == 9
    assert m.get("nv_inference_count", **v) == 9
    assert m.get("nv_inference_exec_count", **v) == 2
    assert m.get("nv_inference_queue_duration_us", **v) > 0
    assert m.get("nv_inference_compute_input_duration_us", **v) > 0
    assert m.get("nv_inference_compute_infer_duration_us", **v) > 0
    assert m.get("nv_inference_compute_output_duration_us", **v) > 0  # split in eight
    assert m.get("nv_inference_request_duration_us", **v) >= m.get(
        "nv_inference_queue_duration_us", **v
    )
    assert m.get("nv_inference_pending_request_count", **v) == 0


def test_a_full_queue_is_a_rejected_failure_and_queued_requests_are_pending(
    server: RunningServer,
) -> None:
    gate = install_gate(server, "small_queue")
    v = dict(model="small_queue", version="1")

    async def main() -> Scrape:
        rest = httpclient.InferenceServerClient(server.http)
        try:
            first = asyncio.ensure_future(rest.infer("small_queue", [rest_input(mlp_input(1, 0))]))
            await started(gate)
            second = asyncio.ensure_future(rest.infer("small_queue", [rest_input(mlp_input(1, 1))]))
            await queued(server, "small_queue", 1)
            waiting = await asyncio.to_thread(scrape, server)
            with pytest.raises(InferenceServerException, match="queue full"):
                await rest.infer("small_queue", [rest_input(mlp_input(1, 2))])
            gate.open()
            await asyncio.gather(first, second)
            return waiting
        finally:
            gate.open()
            await rest.close()

    waiting = asyncio.run(main())
    assert waiting.get("nv_inference_pending_request_count", **v) == 1
    m = scrape(server)
    assert m.get("nv_inference_request_failure", reason="REJECTED", **v) == 1
    assert m.get("nv_inference_request_success", **v) == 2
    assert m.get("nv_inference_pending_request_count", **v) == 0


def test_series_of_an_unloaded_version_go_away_and_start_from_zero_when_loaded(
    server: RunningServer,
) -> None:
    async def infer(version: str) -> None:
        rest = httpclient.InferenceServerClient(server.http)
        try:
            await rest.infer("versioned", [rest_input(mlp_input(1, 0))], model_version=version)
        finally:
            await rest.close()

    asyncio.run(infer("1"))
    m = scrape(server)
    for version in ("1", "2"):
        assert m.get("nv_model_load_duration_secs", model="versioned", version=version) > 0
    assert m.get("nv_inference_request_success", model="versioned", version="1") == 1

    def post(action: str) -> None:
        url = f"{server.http_url}/v2/repository/models/versioned/{action}"
        request = urllib.request.Request(url, b"", method="POST")
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            assert reply.status == 200

    post("unload")
    m = scrape(server)
    assert m.triton_of("versioned") == []
    assert m.triton_of("plain")  # the other models' series stay

    post("load")
    asyncio.run(infer("2"))
    m = scrape(server)
    assert m.get("nv_inference_request_success", model="versioned", version="1") == 0
    assert m.get("nv_inference_request_success", model="versioned", version="2") == 1


def test_process_and_host_metrics(server: RunningServer) -> None:
    m = scrape(server)
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):  # fmt: skip
        assert m.get(name) > 0, name
    assert m.families["process_cpu_seconds_total"][0] == "counter"
    assert any(n == "python_info" for n, _, _ in m.samples)
    assert any(n == "python_gc_collections_total" for n, _, _ in m.samples)
    total, used = m.get("nv_cpu_memory_total_bytes"), m.get("nv_cpu_memory_used_bytes")
    assert 0 < used < total
    assert 0.0 <= m.get("nv_cpu_utilization") <= 1.0
