"""Triton's perf_analyzer against a real server, as its users run it: no `-x` (it finds the
version from the statistics), HTTP and gRPC, a model that batches and one that does not.

Runs only where the binary is: `bash benchmarks/setup.sh` puts it in
benchmarks/out/perf_analyzer/ (or one on PATH). Skipped otherwise (CI); the statistics it
needs are tested on their own in test_statistics.py.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetserve.loaders import testing
from tests.conftest import RunningServer, start_server, stop_server, test_settings

BUILT = Path(__file__).resolve().parent.parent / "benchmarks" / "out" / "perf_analyzer"
PERF_ANALYZER = shutil.which("perf_analyzer", path=str(BUILT)) or shutil.which("perf_analyzer")
pytestmark = pytest.mark.skipif(
    PERF_ANALYZER is None, reason="perf_analyzer not found (bash benchmarks/setup.sh)"
)
MODELS = {
    "unbatched": "max_batch_size: 8\n",
    # no batch dimension: perf_analyzer sends the full shape, so it must be fixed
    "no_batch_dim": 'max_batch_size: 0 input { name: "INPUT0" data_type: TYPE_FP32 dims: [1, 16] }',
    "batched": "max_batch_size: 8\ndynamic_batching { }\n",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("perf_analyzer")
    for name, config in MODELS.items():
        testing.write_model(root, name, testing.mlp(), config=config)
    running = start_server(test_settings(root))
    yield running
    stop_server(running)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    ("model", "batch"), [("unbatched", 1), ("no_batch_dim", 1), ("batched", 4)]
)
def test_perf_analyzer_measures_without_a_version(
    server: RunningServer, tmp_path: Path, protocol: str, model: str, batch: int
) -> None:
    report = tmp_path / "report.csv"
    url = server.http if protocol == "http" else server.grpc
    # short windows of a counted number of requests, and a loose stability bound: this
    # checks that perf_analyzer completes and reads the server's statistics, not speed
    command = [
        PERF_ANALYZER, "-m", model, "-i", protocol, "-u", url, "-b", str(batch),
        "--concurrency-range", "2:4:2", "--measurement-mode", "count_windows",
        "--measurement-request-count", "50", "--stability-percentage", "1000",
        "-f", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Server:" in done.stdout  # the server-side section: statistics of the version
    rows = list(csv.DictReader(report.open()))
    assert sorted(row["Concurrency"] for row in rows) == ["2", "4"]  # ordered by throughput
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)
