"""Every Prometheus metric, declared once, on one explicit registry per server.

Per-request metrics are plain counters kept by `RequestMetrics` and turned into
Prometheus families only when scraped: counting a request is a dict lookup, a bisect
and three additions, with no lock (everything runs on the event loop).

Model names are a label with bounded cardinality: the first `max_models` names seen
get their own series, later ones are summed into "other", so thousands of models
cannot blow up the scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
)  # fmt: skip
OTHER = "other"
REQUEST_LABELS = ("model", "version", "protocol", "outcome")

Key = tuple[str, str, str, str]  # model, version, protocol, outcome


class RequestMetrics(Collector):
    """Request counts and latency histograms by model, version, protocol and outcome."""

    def __init__(self, max_models: int, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._bounds = list(buckets)
        self._max_models = max_models
        self._series: dict[Key, list] = {}  # key -> [sum of seconds, [count per bucket]]

    def observe(self, key: Key, seconds: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0, [0] * (len(self._bounds) + 1)]
        series[0] += seconds
        series[1][bisect_left(self._bounds, seconds)] += 1

    def _labelled(self) -> dict[Key, list]:
        """Series merged under bounded labels: models past the first N become "other"."""
        named: set[str] = set()
        merged: dict[Key, list] = {}
        for (model, version, protocol, outcome), (total, counts) in self._series.items():
            if model not in named and len(named) < self._max_models and model != OTHER:
                named.add(model)
            key = (model, version, protocol, outcome)
            if model not in named:
                key = (OTHER, OTHER, protocol, outcome)
            into = merged.setdefault(key, [0.0, [0] * len(counts)])
            into[0] += total
            into[1] = [a + b for a, b in zip(into[1], counts, strict=True)]
        return merged

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fleetserve_requests", "Inference requests by outcome", labels=REQUEST_LABELS
        )
        latency = HistogramMetricFamily(
            "fleetserve_request_duration_seconds",
            "Inference request latency inside the server, from receipt to response",
            labels=REQUEST_LABELS,
        )
        bounds = [*map(str, self._bounds), "+Inf"]
        for key, (total, counts) in self._labelled().items():
            cumulative = list(accumulate(counts))
            requests.add_metric(key, cumulative[-1])
            latency.add_metric(key, list(zip(bounds, cumulative, strict=True)), total)
        yield requests
        yield latency


class CallbackCounter(Collector):
    """A counter whose value lives elsewhere as a plain int (read at scrape time)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class Metrics:
    def __init__(self, max_models: int = 100) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = RequestMetrics(max_models)
        r.register(self.requests)
        self.loads = Counter("fleetserve_model_loads", "Model version loads", registry=r)
        self.load_failures = Counter(
            "fleetserve_model_load_failures", "Model version loads that failed", registry=r
        )
        self.load_seconds = Histogram(
            "fleetserve_model_load_duration_seconds",
            "Time to load a model version",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.loaded_models = Gauge(
            "fleetserve_loaded_models", "Model versions loaded now", registry=r
        )
        self.loaded_bytes = Gauge(
            "fleetserve_loaded_bytes",
            "Memory counted against the budget by the loaded versions",
            registry=r,
        )
        self.evictions = Counter(
            "fleetserve_model_evictions", "Idle versions unloaded to make room", registry=r
        )

    def count_from(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a counter kept as a plain int on the hot path (no lock, no label lookup)."""
        self.registry.register(CallbackCounter(name, documentation, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
