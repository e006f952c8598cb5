"""Every Prometheus metric, declared once, on one explicit registry per server.

Per-request metrics are plain counters kept by `Histograms` and `Counts` and turned into
Prometheus families only when scraped: counting a request is a dict lookup, a bisect
and three additions, with no lock (everything runs on the event loop).

Model names are a label with bounded cardinality: the first `max_models` names seen
get their own series, later ones are summed into "other", so thousands of models
cannot blow up the scrape. Triton's own families (`nv_*`, server/triton_metrics.py)
follow Triton instead: real names, for the loaded versions only. The process's CPU,
memory, open files, garbage collector and Python version are prometheus_client's
standard `process_*` and `python_*` families.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fleetserve.server.triton_metrics import TritonMetrics

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
)  # fmt: skip
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)
OTHER = "other"
REQUEST_LABELS = ("model", "version", "protocol", "outcome")
MODEL_LABELS = ("model", "version")

Key = tuple[str, ...]  # label values; the first two are model and version


def bounded(keys: Iterator[Key], max_models: int) -> Callable[[Key], Key]:
    """Label bounding: the first `max_models` model names keep their labels, the others'
    series are summed under model and version "other"."""
    named: set[str] = set()
    for key in keys:
        if len(named) >= max_models:
            break
        if key[0] != OTHER:
            named.add(key[0])
    return lambda key: key if key[0] in named else (OTHER, OTHER, *key[2:])


class Histograms(Collector):
    """Histograms by label values, kept as plain lists and exported when scraped.

    Observing is a dict lookup, a bisect and two additions, with no lock: everything
    that observes runs on the event loop. `counter` also exports the counts as a counter.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        buckets: tuple[float, ...],
        max_models: int,
        counter: tuple[str, str] | None = None,  # (name, documentation)
    ) -> None:
        self._name, self._documentation, self._labels = name, documentation, labels
        self._bounds = list(buckets)
        self._max_models = max_models
        self._counter = counter
        self._series: dict[Key, list] = {}  # key -> [sum, [count per bucket]]

    def observe(self, key: Key, value: float) -> None:
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0, [0] * (len(self._bounds) + 1)]
        series[0] += value
        series[1][bisect_left(self._bounds, value)] += 1

    def _merged(self) -> dict[Key, list]:
        label = bounded(iter(self._series), self._max_models)
        merged: dict[Key, list] = {}
        for key, (total, counts) in self._series.items():
            into = merged.setdefault(label(key), [0.0, [0] * len(counts)])
            into[0] += total
            into[1] = [a + b for a, b in zip(into[1], counts, strict=True)]
        return merged

    def collect(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        counter = None
        if self._counter is not None:
            counter = CounterMetricFamily(*self._counter, labels=self._labels)
        bounds = [*map(str, self._bounds), "+Inf"]
        for key, (total, counts) in self._merged().items():
            cumulative = list(accumulate(counts))
            histogram.add_metric(key, list(zip(bounds, cumulative, strict=True)), total)
            if counter is not None:
                counter.add_metric(key, cumulative[-1])
        if counter is not None:
            yield counter
        yield histogram


class Counts(Collector):
    """A labelled counter kept as plain ints (bounded model labels, as `Histograms`)."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], max_models: int
    ) -> None:
        self._name, self._documentation, self._labels = name, documentation, labels
        self._max_models = max_models
        self.counts: dict[Key, int] = {}

    def inc(self, key: Key) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        label = bounded(iter(self.counts), self._max_models)
        merged: dict[Key, int] = {}
        for key, count in self.counts.items():
            merged[label(key)] = merged.get(label(key), 0) + count
        for key, count in merged.items():
            family.add_metric(key, count)
        yield family


class Depths(Collector):
    """A gauge by model and version, read from the live queues when scraped."""

    def __init__(self, read: Callable[[], dict[Key, int]], max_models: int) -> None:
        self._read, self._max_models = read, max_models

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fleetserve_queue_depth",
            "Requests waiting in a batching model version's queue",
            labels=MODEL_LABELS,
        )
        depths = self._read()
        label = bounded(iter(depths), self._max_models)
        merged: dict[Key, int] = {}
        for key, depth in depths.items():
            merged[label(key)] = merged.get(label(key), 0) + depth
        for key, depth in merged.items():
            family.add_metric(key, depth)
        yield family


class CallbackCounter(Collector):
    """A counter whose value lives elsewhere as a plain int (read at scrape time)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class Metrics:
    def __init__(self, max_models: int = 100) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self._max_models = max_models
        self.triton = TritonMetrics()  # Triton's nv_* families, rendered beside these
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Histograms(
            "fleetserve_request_duration_seconds",
            "Inference request latency inside the server, from receipt to response",
            REQUEST_LABELS,
            LATENCY_BUCKETS,
            max_models,
            counter=("fleetserve_requests", "Inference requests by outcome"),
        )
        # dynamic batching, by model and version
        self.batch_size = Histograms(
            "fleetserve_batch_size", "Rows per model run of a batching version",
            MODEL_LABELS, BATCH_BUCKETS, max_models,
        )  # fmt: skip
        self.queue_seconds = Histograms(
            "fleetserve_queue_duration_seconds",
            "Time requests waited in a batching version's queue before their batch ran",
            MODEL_LABELS, LATENCY_BUCKETS, max_models,
        )  # fmt: skip
        self.compute_seconds = Histograms(
            "fleetserve_compute_duration_seconds",
            "Time of one batch: merge inputs, run the model, split outputs",
            MODEL_LABELS, LATENCY_BUCKETS, max_models,
        )  # fmt: skip
        self.rejections = Counts(
            "fleetserve_rejected_requests",
            "Requests a batching version's queue refused or dropped, by reason "
            "(queue_full, timeout, deadline, cancelled)",
            (*MODEL_LABELS, "reason"),
            max_models,
        )
        self.feedback_seconds = Histogram(
            "fleetserve_feedback_write_duration_seconds",
            "Time the feedback sink took to write and commit one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadows = Counts(
            "fleetserve_shadow_requests",
            "Shadow copies of requests by outcome (match, differ, error, dropped)",
            (*MODEL_LABELS, "outcome"),
            max_models,
        )
        for collector in (
            self.requests, self.batch_size, self.queue_seconds, self.compute_seconds,
            self.rejections, self.shadows,
        ):  # fmt: skip
            r.register(collector)
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

    def build_info(self, version: str, event_loop: str, event_loop_version: str) -> None:
        """fleetserve_build_info: which release and event loop serve, so benchmark
        results and dashboards can be traced to them."""
        Info("fleetserve_build", "fleetserve release and the event loop serving",
             registry=self.registry).info({"version": version, "event_loop": event_loop,
                                           "event_loop_version": event_loop_version})  # fmt: skip

    def feedback_depth(self, read: Callable[[], float]) -> None:
        """Export the feedback buffer's depth (read at scrape time)."""
        gauge = Gauge(
            "fleetserve_feedback_buffer_depth",
            "Records waiting for the feedback sink",
            registry=self.registry,
        )
        gauge.set_function(read)

    def queue_depths(self, read: Callable[[], dict[Key, int]]) -> None:
        """Export the queue depth of every batching version (read at scrape time)."""
        self.registry.register(Depths(read, self._max_models))

    def count_from(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a counter kept as a plain int on the hot path (no lock, no label lookup)."""
        self.registry.register(CallbackCounter(name, documentation, read))

    def render(self) -> bytes:
        return generate_latest(self.registry) + self.triton.render()
