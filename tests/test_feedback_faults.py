"""Feedback sink faults through a real server: the sink's disk full, and a slow sink.

Serving never waits for the sink: requests keep their latency while the records that
cannot be written are dropped, counted (fleetserve_feedback_dropped_total) and warned
about (once, not once a batch), and logging resumes by itself when the sink works again.

"Disk full" is real where the test may mount a filesystem (as root): the data directory
sits on a 2 MiB tmpfs that the test fills with a file, and frees by deleting it. On any
machine it is also emulated with SQLite's own cap on the database's size (PRAGMA
max_page_count, on the real SQLite sink): SQLite then fails a growing write with
SQLITE_FULL, "database or disk is full", the error a full disk gives, through the same
code. (Not RLIMIT_FSIZE: it limits every file the test process writes, pytest's own
capture files too, and SQLite reports its EFBIG as an I/O error, not as full.) The slow
sink is a real one too: another connection holds the database's write lock, as a
maintenance job would, and the sink's writer waits on SQLite's busy timeout.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fleetserve.loaders import testing
from fleetserve.server.sinks import DB_FILENAME, SINKS, SqliteSink
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, mlp_input
from tests.test_feedback import LOGGED, infer, metric, rows, wait_rows

# far above a request's usual milliseconds, far below the seconds the sink is held up
LATENCY_BOUND_S = 1.0
FEEDBACK_LOGGER = "fleetserve.server.feedback"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    testing.write_model(root, "logged", testing.mlp(seed=1), config=LOGGED)
    return root


# -- full disks -----------------------------------------------------------------------


@functools.cache
def can_mount() -> bool:
    """Whether this process may mount a filesystem (root, and not refused by a sandbox)."""
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as probe:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", probe],
                                 capture_output=True).returncode == 0  # fmt: skip
        return mounted and subprocess.run(["umount", probe]).returncode == 0


class Tmpfs:
    """A real small filesystem for the data directory; `fill` takes every free byte."""

    sink = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root, self.data_dir, self.filler = root, root / "data", root / "filler"
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], check=True)

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def close(self) -> None:
        gc.collect()  # the test's own read-only connections (tests.test_feedback.rows)
        subprocess.run(["umount", "--lazy", str(self.root)], check=True)


class CappedSink(SqliteSink):
    """The SQLite sink, its database capped at its present size while `full` is set."""

    full = threading.Event()

    def write(self, records: Sequence[Any]) -> None:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        self._db.execute(f"PRAGMA max_page_count = {pages if self.full.is_set() else 2**31}")
        super().write(records)


class PageCap:
    """A full disk as SQLite's max_page_count: on any machine, no root needed."""

    sink = "capped"

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "data"
        SINKS[self.sink] = CappedSink
        CappedSink.full.clear()

    def fill(self) -> None:
        CappedSink.full.set()

    def free(self) -> None:
        CappedSink.full.clear()

    def close(self) -> None:
        del SINKS[self.sink]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    if not can_mount():
        pytest.skip("mounting a tmpfs needs root (the page_cap cases run everywhere)")
    made = Tmpfs(tmp_path / "disk")
    yield made
    made.close()


@pytest.fixture(params=["tmpfs", "page_cap"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tmpfs | PageCap]:
    if request.param == "tmpfs":
        yield request.getfixturevalue("tmpfs")
        return
    made = PageCap(tmp_path)
    yield made
    made.close()


def serve(repo: Path, data_dir: Path, sink: str = "sqlite", **options: Any) -> RunningServer:
    return start_server(
        test_settings(repo, data_dir=data_dir, feedback_sink=sink, feedback_flush_secs=0.05,
                      **options)
    )  # fmt: skip


def timed_infer(base: str, request_id: str) -> float:
    started = time.perf_counter()
    status, _, reply = infer(base, "logged", mlp_input(1, 0), id=request_id)
    assert status == 200, reply
    return time.perf_counter() - started


def send_until_dropped(running: RunningServer, prefix: str) -> list[float]:
    """Requests until the sink has lost some records, then as many again: latencies."""
    latencies: list[float] = []
    deadline = time.monotonic() + WAIT_S
    while metric(running, "fleetserve_feedback_dropped_total") == 0:
        assert time.monotonic() < deadline, "the full sink never dropped a record"
        latencies.append(timed_infer(running.http_url, f"{prefix}{len(latencies)}"))
    for i in range(len(latencies)):
        latencies.append(timed_infer(running.http_url, f"{prefix}{len(latencies) + i}"))
    return latencies


def counts(running: RunningServer) -> tuple[float, float, float]:
    """The feedback log's (enqueued, written, dropped) counters."""
    return tuple(metric(running, f"fleetserve_feedback_{name}_total")  # type: ignore[return-value]
                 for name in ("enqueued", "written", "dropped"))  # fmt: skip


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def feedback_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == FEEDBACK_LOGGER]


def test_a_full_disk_drops_records_and_logging_resumes_when_space_returns(
    repo: Path, disk: Tmpfs | PageCap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=FEEDBACK_LOGGER)
    running = serve(repo, disk.data_dir, disk.sink)
    try:
        for i in range(5):
            timed_infer(running.http_url, f"before{i}")
        wait_rows(disk.data_dir, 5)
        disk.fill()
        latencies = send_until_dropped(running, "full")
        time.sleep(0.5)  # ten flush intervals more, every batch failing
        assert max(latencies) < LATENCY_BOUND_S  # serving never waited for the sink
        # every record buffered is written or lost with its batch, counted as dropped
        eventually(lambda: (c := counts(running))[0] == c[1] + c[2], "records unaccounted")
        _, written, dropped = counts(running)
        assert dropped > 0
        # once, not once a batch (a batch that still fits a page may work in between)
        lines = feedback_lines(caplog)
        assert {level for level, _ in lines} == {"WARNING"}
        failed = [m for _, m in lines if m.startswith("feedback sink failed")]
        assert len(failed) == 1 + sum(m.startswith("feedback sink works again") for _, m in lines)
        assert "database or disk is full" in failed[0] and "dropped" in failed[0]

        disk.free()
        for i in range(5):
            timed_infer(running.http_url, f"after{i}")
        found = {r[1] for r in wait_rows(disk.data_dir, int(written) + 5)}
        assert {f"before{i}" for i in range(5)} | {f"after{i}" for i in range(5)} <= found
        eventually(lambda: (c := counts(running))[0] == c[1] + c[2], "records unaccounted")
        _, written, dropped = counts(running)
        assert len(rows(disk.data_dir)) == written
        level, message = feedback_lines(caplog)[-1]
        assert level == "WARNING" and "works again after" in message
    finally:
        stop_server(running)


def test_a_disk_full_from_the_start_gets_its_sink_once_space_returns(
    repo: Path, tmpfs: Tmpfs
) -> None:
    tmpfs.data_dir.mkdir()
    tmpfs.fill()  # not even the database file can be made
    running = serve(repo, tmpfs.data_dir)
    try:
        assert max(send_until_dropped(running, "full")) < LATENCY_BOUND_S
        tmpfs.free()
        timed_infer(running.http_url, "after")
        eventually(lambda: "after" in {r[1] for r in rows(tmpfs.data_dir)}, "no sink made")
    finally:
        stop_server(running)


def test_a_stop_with_the_disk_full_closes_the_sink(repo: Path, tmpfs: Tmpfs) -> None:
    running = serve(repo, tmpfs.data_dir)
    try:
        timed_infer(running.http_url, "before")
        wait_rows(tmpfs.data_dir, 1)
        tmpfs.fill()
        send_until_dropped(running, "full")
    finally:
        stop_server(running)  # the sink's last checkpoint fails: no room
    gc.collect()  # the test's own read-only connections, not the server's
    fds = Path("/proc/self/fd").iterdir()
    held = [link for fd in fds if str(tmpfs.root) in (link := _link(fd))]
    assert held == [], "the sink's files are still open after the stop"


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # closed since the listing
        return ""


# -- a slow sink ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop", "block"])
def test_a_locked_sink_holds_up_no_request(repo: Path, tmp_path: Path, policy: str) -> None:
    running = serve(repo, tmp_path, feedback_buffer=8, feedback_when_full=policy)
    try:
        for i in range(3):
            timed_infer(running.http_url, f"before{i}")
        wait_rows(tmp_path, 3)
        # a maintenance job's write transaction: the sink's writer waits for it
        lock = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None, timeout=WAIT_S)
        lock.execute("BEGIN IMMEDIATE")
        latencies, held_from = [], time.monotonic()
        try:
            while time.monotonic() - held_from < 2 * LATENCY_BOUND_S:
                latencies.append(timed_infer(running.http_url, f"held{len(latencies)}"))
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert max(latencies) < LATENCY_BOUND_S
        assert metric(running, "fleetserve_feedback_dropped_total") > 0  # the buffer was full
        # the sink was slow, never failing: everything buffered gets written
        eventually(lambda: (c := counts(running))[0] == c[1], "buffered records unwritten")
        for i in range(3):
            timed_infer(running.http_url, f"after{i}")
        after = {f"after{i}" for i in range(3)}
        eventually(lambda: after <= {r[1] for r in rows(tmp_path)}, "logging did not resume")
        assert len(rows(tmp_path)) == counts(running)[1]
    finally:
        stop_server(running)
