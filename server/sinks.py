"""Feedback sinks: where prediction and ground-truth records end up.

A sink is chosen by name (`--feedback-sink`); the request path never sees it: records
reach it in batches from the feedback log's one writer thread. The embedded default is
SQLite in the data directory (why SQLite rather than segmented files: the export joins
predictions with ground truth by request id and filters by model, version and time,
which SQLite's indexes do for us; measured in docs/architecture.md).

Contract: one thread calls `write`, `flush`, `retain` and `close`, in order. `write`
adds a batch; `flush` makes everything written so far survive a crash of the process;
`close` flushes and releases the sink.
"""

from __future__ import annotations

import abc
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from fleetserve.server.tensors import pack_tensors
from fleetserve.server.types import FeedbackRecord, PredictionRecord

log = logging.getLogger(__name__)
Record = PredictionRecord | FeedbackRecord
# records per INSERT statement, and per slice of GIL-holding work (~0.4 ms) in `write`
ROWS_PER_INSERT = 128
DB_FILENAME = "feedback.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    ts REAL NOT NULL,            -- seconds since the epoch
    inputs BLOB NOT NULL,        -- server.tensors.pack_tensors
    outputs BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_model_ts ON predictions (model, ts);
CREATE INDEX IF NOT EXISTS predictions_request ON predictions (model, request_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    ts REAL NOT NULL,
    label TEXT,                  -- JSON scalar, or NULL
    truth BLOB,                  -- pack_tensors, or NULL
    metadata TEXT                -- JSON object, or NULL
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (model, request_id);
CREATE INDEX IF NOT EXISTS feedback_ts ON feedback (ts);
"""


class Sink(abc.ABC):
    @abc.abstractmethod
    def write(self, records: Sequence[Record]) -> None:
        """Add a batch of records (not yet durable)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every record written so far survive a crash of the process."""

    def retain(self, max_age_s: float, max_bytes: int) -> int:
        """Drop records older than `max_age_s` or past `max_bytes` (0 = no limit),
        oldest first; returns how many went."""
        return 0

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release."""


class SqliteSink(Sink):
    """SQLite in WAL mode: each flush is one transaction. With synchronous=NORMAL a
    committed transaction survives the process being killed (the OS has it); `fsync`
    (synchronous=FULL) also survives the machine losing power, at a cost per flush."""

    def __init__(self, directory: Path, fsync: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_FILENAME
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes on a new file
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":  # e.g. a filesystem without shared memory
            log.warning(
                "feedback sink %s: journal mode %s, not WAL: exports block the writer",
                self.path,
                mode,
            )
        self._db.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(SCHEMA)
        limit = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._rows_per_insert = max(1, min(ROWS_PER_INSERT, limit // 6))

    def write(self, records: Sequence[Record]) -> None:
        try:
            self._write(records)
        except BaseException:
            self._rollback()  # a failed batch leaves nothing for the next commit
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _write(self, records: Sequence[Record]) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
        # in slices, letting go of the GIL between them: packing and binding hold it, and
        # the event loop must not wait for a whole batch (measured: p99 x40 at c=1)
        for start in range(0, len(records), self._rows_per_insert):
            chunk = records[start : start + self._rows_per_insert]
            predictions = [
                (r.request_id, r.model, r.version, r.timestamp, r.inputs, r.outputs)
                for r in chunk
                if isinstance(r, PredictionRecord)
            ]  # fmt: skip
            feedback = [
                (r.request_id, r.model, r.timestamp,
                 None if r.label is None else orjson.dumps(r.label).decode(),
                 None if r.truth is None else pack_tensors(r.truth),
                 None if r.metadata is None else orjson.dumps(r.metadata).decode())
                for r in chunk
                if isinstance(r, FeedbackRecord)
            ]  # fmt: skip
            self._insert("predictions (request_id, model, version, ts, inputs, outputs)",
                         predictions)  # fmt: skip
            self._insert("feedback (request_id, model, ts, label, truth, metadata)", feedback)
            time.sleep(0)

    def _insert(self, into: str, rows: list[tuple]) -> None:
        """One multi-row INSERT. Python's sqlite3 lets go of the GIL around every
        statement step, and `executemany` steps once per row: with the event loop busy,
        each of those hand-offs waits for the loop to let go of the GIL again."""
        if rows:
            values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(rows))
            self._db.execute(
                f"INSERT INTO {into} VALUES {values}", [v for row in rows for v in row]
            )

    def flush(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def retain(self, max_age_s: float, max_bytes: int) -> int:
        self.flush()
        gone = 0
        if max_age_s:
            cutoff = time.time() - max_age_s
            for table in ("predictions", "feedback"):
                gone += self._db.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,)).rowcount
        while max_bytes and self._size() > max_bytes:
            # the oldest tenth of the predictions, with their ground truth; when there
            # are (almost) no predictions, the oldest tenth of the ground truth
            row = self._db.execute(
                "SELECT id FROM predictions ORDER BY id LIMIT 1 OFFSET "
                "(SELECT count(*) / 10 FROM predictions)"
            ).fetchone()
            if row is not None:
                gone += self._db.execute(
                    "DELETE FROM feedback WHERE (model, request_id) IN "
                    "(SELECT model, request_id FROM predictions WHERE id <= ?)",
                    row,
                ).rowcount
                gone += self._db.execute("DELETE FROM predictions WHERE id <= ?", row).rowcount
            else:
                cut = self._db.execute(
                    "SELECT id FROM feedback ORDER BY id LIMIT 1 OFFSET "
                    "(SELECT count(*) / 10 FROM feedback)"
                ).fetchone()
                if cut is None:
                    break
                gone += self._db.execute("DELETE FROM feedback WHERE id <= ?", cut).rowcount
            self._db.execute("PRAGMA incremental_vacuum")
            # PASSIVE: an export reading the database must not stall the writer
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if gone:
            self._db.execute("PRAGMA incremental_vacuum")
        return gone

    def _size(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._db.execute("PRAGMA page_size").fetchone()[0]

    def close(self) -> None:
        try:
            self.flush()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # fails on a full disk
        finally:
            self._db.close()


# --feedback-sink name -> how to make it from the data directory and the fsync option
SINKS = {"sqlite": SqliteSink}
