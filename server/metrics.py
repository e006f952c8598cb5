"""Every Prometheus metric, declared once, on one explicit registry per server.

Model names are a label with bounded cardinality: the first `max_models` names seen
get their own series, later ones share "other", so thousands of models cannot blow
up the scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
)  # fmt: skip
OTHER = "other"


class Metrics:
    def __init__(self, max_models: int = 100) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._max_models = max_models
        self._models: set[str] = set()
        self._children: dict[tuple[str, str, str, str], tuple] = {}
        labels = ("model", "version", "protocol", "outcome")
        r = self.registry
        self.requests = Counter(
            "fleetserve_requests", "Inference requests by outcome", labels, registry=r
        )
        self.request_seconds = Histogram(
            "fleetserve_request_duration_seconds",
            "Inference request latency inside the server, decode to encode",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
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

    def model_label(self, name: str) -> str:
        if name in self._models:
            return name
        if len(self._models) < self._max_models:
            self._models.add(name)
            return name
        return OTHER

    def observe_request(
        self, model: str, version: str, protocol: str, outcome: str, seconds: float
    ) -> None:
        """Count one request; label children are cached, so this is two cheap calls."""
        key = (model, version, protocol, outcome)
        children = self._children.get(key)
        if children is None:
            label = self.model_label(model)
            labels = (label, version if label != OTHER else OTHER, protocol, outcome)
            children = (self.requests.labels(*labels), self.request_seconds.labels(*labels))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
