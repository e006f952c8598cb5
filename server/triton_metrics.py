"""Triton's metric families, with Triton's names, types, units, help text and labels.

Per model version (labels `model`, `version`; the failure counter also `reason`), for
every loaded version only: a version's series appear when it loads and go away when it
unloads, as in Triton, so the loaded set (bounded by the model cache's budget) bounds
them. Then the host's CPU and memory (`nv_cpu_*`, no labels).

Every per-version value is read when scraped from the counters the statistics extension
already keeps (`ModelStats`), so the request path pays nothing for these families. Only
why a request failed is not in the statistics: it is counted on the failure path.

Written out here rather than through prometheus_client, whose text format renames every
counter `<name>_total`: Triton's counters carry no suffix, and its dashboards and
alerts query the bare names.

Sources (Triton server and core repositories): docs/user_guide/metrics.md; core
src/metrics.cc (help text, CPU utilization and used memory), src/metric_model_reporter.cc
(labels, failure reasons), src/infer_stats.cc (which requests each counter adds).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fleetserve.server.errors import ErrorKind, ServerError

if TYPE_CHECKING:
    from fleetserve.server.cache import Servable

# Triton's failure reasons, in the order its exposition lists them
REASONS = ("OTHER", "BACKEND", "CANCELED", "REJECTED")
# scheduling refusals: queue full, queue timeout, deadline passed before the run, unloading
_REJECTED = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED})

# (name, type, help) of the per-version families, in the order of `_values`
FAMILIES = (
    ("nv_inference_request_success", "counter",
     "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "counter",
     "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "counter",
     "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", "counter",
     "Number of model executions performed (does not include cached requests)"),
    ("nv_inference_request_duration_us", "counter",
     "Cumulative inference request duration in microseconds (includes cached requests)"),
    ("nv_inference_queue_duration_us", "counter",
     "Cumulative inference queuing duration in microseconds (includes cached requests)"),
    ("nv_inference_compute_input_duration_us", "counter",
     "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_infer_duration_us", "counter",
     "Cumulative compute inference duration in microseconds (does not include cached "
     "requests)"),
    ("nv_inference_compute_output_duration_us", "counter",
     "Cumulative inference compute output duration in microseconds (does not include "
     "cached requests)"),
    ("nv_inference_pending_request_count", "gauge",
     "Instantaneous number of pending requests awaiting execution per-model."),
    ("nv_model_load_duration_secs", "gauge", "Model load time in seconds"),
)  # fmt: skip
_FAILURE = 1  # the family with a `reason` label


class TritonMetrics:
    """Triton's families for the versions `watch` names, rendered when scraped."""

    def __init__(self) -> None:
        self._versions: Callable[[], Iterable[Servable]] = tuple  # none until `watch`
        # per loaded version: [rejected, backend]; the rest of its statistics' failures are
        # OTHER. Keyed weakly by the version's Servable, so the counts live exactly as
        # long as its statistics (a reload starts both from zero).
        self._failures: weakref.WeakKeyDictionary[Servable, list[int]] = weakref.WeakKeyDictionary()
        self._host = Host()

    def watch(self, versions: Callable[[], Iterable[Servable]]) -> None:
        """Report the versions `versions()` returns (the loaded ones) at each scrape."""
        self._versions = versions

    def failed(self, version: Servable, error: ServerError) -> None:
        """Record the reason of a failure the version's statistics have just counted."""
        if error.kind in _REJECTED:
            index = 0
        elif error.kind is ErrorKind.INTERNAL:  # the model's run raised
            index = 1
        else:
            return  # OTHER: what the statistics count beyond the two above
        counts = self._failures.get(version)
        if counts is None:
            counts = self._failures[version] = [0, 0]
        counts[index] += 1

    def render(self) -> bytes:
        rows = [(_labels(s), self._values(s)) for s in self._versions()]
        out: list[str] = []
        for i, (name, kind, doc) in enumerate(FAMILIES):
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
            if i == _FAILURE:
                for (model, version), values in rows:
                    out.extend(
                        f'{name}{{{model},reason="{reason}",{version}}} {count}\n'
                        for reason, count in zip(REASONS, values[i], strict=True)
                    )
            else:
                out.extend(f"{name}{{{m},{v}}} {values[i]}\n" for (m, v), values in rows)
        out += self._host.render()
        return "".join(out).encode()

    def _values(self, s: Servable) -> tuple:
        """One version's values, in the order of FAMILIES (durations in whole us)."""
        st = s.stats
        rejected, backend = self._failures.get(s, (0, 0))
        other = max(0, st.fail_count - rejected - backend)
        pending = s.batcher.depth if s.batcher is not None else s.pending
        return (
            st.success_count,
            (other, backend, 0, rejected),
            st.inference_count,
            st.execution_count,
            st.success_ns // 1000,
            st.queue_ns // 1000,
            st.compute_input_ns // 1000,
            st.compute_infer_ns // 1000,
            st.compute_output_ns // 1000,
            pending,
            repr(s.load_seconds),
        )


class Host:
    """Triton's CPU metrics: the whole host's CPU utilization since the previous scrape,
    and its memory (used = total - available), read from /proc (Linux only, as Triton)."""

    def __init__(self) -> None:
        try:
            self._last = _cpu_times()
        except OSError:
            self._last = (0, 0)
        self._utilization = 0.0

    def render(self) -> list[str]:
        try:
            now = _cpu_times()
            memory = _meminfo()
            total, available = memory["MemTotal"], memory["MemAvailable"]
        except (OSError, KeyError):
            return []  # no /proc: no CPU metrics
        busy, idle = (max(0, a - b) for a, b in zip(now, self._last, strict=True))
        if busy + idle:  # else no tick since the last scrape: keep the last value
            self._utilization = busy / (busy + idle)
        self._last = now
        return [
            "# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]\n",
            "# TYPE nv_cpu_utilization gauge\n",
            f"nv_cpu_utilization {self._utilization!r}\n",
            "# HELP nv_cpu_memory_total_bytes CPU total memory (RAM), in bytes\n",
            "# TYPE nv_cpu_memory_total_bytes gauge\n",
            f"nv_cpu_memory_total_bytes {total}\n",
            "# HELP nv_cpu_memory_used_bytes CPU used memory (RAM), in bytes\n",
            "# TYPE nv_cpu_memory_used_bytes gauge\n",
            f"nv_cpu_memory_used_bytes {total - available}\n",
        ]


def _cpu_times() -> tuple[int, int]:
    """(busy, idle) clock ticks of all CPUs, as Triton sums them from /proc/stat."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, first[1:9])
    return user + nice + system + irq + softirq + steal, idle + iowait


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info


def _labels(s: Servable) -> tuple[str, str]:
    return f'model="{_escape(s.id.name)}"', f'version="{s.version}"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
