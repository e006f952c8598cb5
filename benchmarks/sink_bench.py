"""Feedback sink candidates, measured: SQLite (WAL) vs segmented append-only files.

Writes the same prediction records (a batch-1 request to the 16 -> 64 -> 4 MLP: 64 bytes
in, 16 out) through each in batches of `--batch`, committing (SQLite: one transaction;
files: flush + fsync when --fsync, else flush) after each batch, as the feedback
writer does, and reports records per second and the writer's CPU per record. The file
candidate is what we would have to write ourselves: length-prefixed frames in 64 MiB
segments, with no index (an export would scan every segment and join in memory).

    python benchmarks/sink_bench.py --records 200000 --batch 512
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetserve.server.sinks import SqliteSink  # noqa: E402
from fleetserve.server.tensors import pack_tensors  # noqa: E402
from fleetserve.server.types import PredictionRecord  # noqa: E402

SEGMENT_BYTES = 64 * 1024**2


class SegmentFiles:
    """Append-only frames (u32 length + request id, model, version, ts, two tensor blobs)."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self._dir, self._fsync, self._n = directory, fsync, 0
        self._f = self._next()

    def _next(self):  # type: ignore[no-untyped-def]
        self._n += 1
        return open(self._dir / f"segment-{self._n:06d}.bin", "ab")

    def write(self, records: list[PredictionRecord]) -> None:
        for r in records:
            head = f"{r.request_id}\t{r.model}\t{r.version}\t{r.timestamp}".encode()
            a, b = r.inputs, r.outputs
            self._f.write(struct.pack("<III", len(head), len(a), len(b)) + head + a + b)
        if self._f.tell() > SEGMENT_BYTES:
            self._f.close()
            self._f = self._next()

    def flush(self) -> None:
        self._f.flush()
        if self._fsync:
            import os

            os.fsync(self._f.fileno())

    def close(self) -> None:
        self.flush()
        self._f.close()


def measure(sink, records: list[PredictionRecord], batch: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(records), batch):
        sink.write(records[i : i + batch])
        sink.flush()
    sink.close()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--fsync", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16)).astype(np.float32)
    y = rng.standard_normal((1, 4)).astype(np.float32)
    now = time.time()
    inputs, outputs = pack_tensors({"INPUT0": x}), pack_tensors({"OUTPUT0": y})
    records = [
        PredictionRecord(f"{i:032x}", "mlp", 1, now + i * 1e-4, inputs, outputs)
        for i in range(a.records)
    ]
    for name, make in (
        ("sqlite", lambda d: SqliteSink(d, fsync=a.fsync)),
        ("segment files", lambda d: SegmentFiles(d, a.fsync)),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            wall, cpu = measure(make(Path(tmp)), records, a.batch)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        print(f"{name:14s} {a.records / wall:9.0f} records/s  {cpu / a.records * 1e6:6.1f} us CPU "
              f"per record  {size / a.records:6.0f} bytes per record")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
