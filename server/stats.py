"""Per-version inference statistics in the shape of Triton's statistics extension.

Flat integer counters, updated on the event loop only (no locks), a few calls per
request: this runs on the hot path. The nested Triton shape is built only when asked.

The meanings are Triton's, which its tools rely on: `success`, `queue` and the
`compute_*` durations count successful requests (perf_analyzer, without a version,
measures the version whose queue count grew), each request of a merged batch carrying
the batch's whole compute times; `execution_count` and `batch_stats` count model runs.
"""

from __future__ import annotations

import time
from typing import Any

# indexes into a batch-size row: [count, compute_input ns, compute_infer ns, compute_output ns]
_COUNT, _INPUT, _INFER, _OUTPUT = range(4)


class ModelStats:
    """Counters of one model version since it was loaded."""

    __slots__ = (
        "batches",
        "compute_infer_ns",
        "compute_input_ns",
        "compute_output_ns",
        "execution_count",
        "fail_count",
        "fail_ns",
        "inference_count",
        "last_inference_ns",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.inference_count = 0  # inferences, counting each row of a batch
        self.execution_count = 0  # model runs
        self.last_inference_ns = 0  # perf_counter_ns of the last inference (0 = none)
        self.success_count = self.success_ns = 0
        self.fail_count = self.fail_ns = 0
        # summed over successful requests (their count is success_count, as in Triton)
        self.queue_ns = 0
        self.compute_input_ns = self.compute_infer_ns = self.compute_output_ns = 0
        self.batches: dict[int, list[int]] = {}  # batch size -> row (see _COUNT...)

    def record_success(self, rows: int, now_ns: int, total_ns: int) -> None:
        """One request answered; `now_ns` is perf_counter_ns (converted to wall time on read)."""
        self.inference_count += rows
        self.last_inference_ns = now_ns
        self.success_count += 1
        self.success_ns += total_ns

    def record_request(self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One request's run succeeded: how long it waited for the run (0 when it ran at
        once) and the run's compute times. Followed by `record_success` for the request."""
        self.queue_ns += queue_ns
        self.compute_input_ns += input_ns
        self.compute_infer_ns += infer_ns
        self.compute_output_ns += output_ns

    def record_execution(
        self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One model run of `batch_size` rows (one or more requests)."""
        self.execution_count += 1
        row = self.batches.get(batch_size)
        if row is None:
            row = self.batches[batch_size] = [0, 0, 0, 0]
        row[_COUNT] += 1
        row[_INPUT] += input_ns
        row[_INFER] += infer_ns
        row[_OUTPUT] += output_ns

    def record_failure(self, total_ns: int) -> None:
        self.last_inference_ns = time.perf_counter_ns()
        self.fail_count += 1
        self.fail_ns += total_ns

    def _last_inference_ms(self) -> int:
        """Milliseconds since the epoch of the last inference, as Triton reports it."""
        if not self.last_inference_ns:
            return 0
        ago_ns = time.perf_counter_ns() - self.last_inference_ns
        return (time.time_ns() - ago_ns) // 1_000_000

    def to_dict(self, name: str, version: str, memory_bytes: int) -> dict[str, Any]:
        """Triton's ModelStatistics JSON (uint64 fields as numbers)."""

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        ok = self.success_count
        return {
            "name": name,
            "version": version,
            "last_inference": self._last_inference_ms(),
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": duration(self.success_count, self.success_ns),
                "fail": duration(self.fail_count, self.fail_ns),
                "queue": duration(ok, self.queue_ns),
                "compute_input": duration(ok, self.compute_input_ns),
                "compute_infer": duration(ok, self.compute_infer_ns),
                "compute_output": duration(ok, self.compute_output_ns),
                "cache_hit": duration(0, 0),
                "cache_miss": duration(0, 0),
            },
            "response_stats": {},
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": duration(r[_COUNT], r[_INPUT]),
                    "compute_infer": duration(r[_COUNT], r[_INFER]),
                    "compute_output": duration(r[_COUNT], r[_OUTPUT]),
                }
                for size, r in sorted(self.batches.items())
            ],
            "memory_usage": [{"type": "CPU", "id": 0, "byte_size": memory_bytes}],
        }
