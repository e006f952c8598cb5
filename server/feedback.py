"""The feedback log: prediction and ground-truth records -> bounded buffer -> sink.

The request path only appends a record (references to its arrays, no copies) to a
bounded buffer: a length check and a deque append. One background task wakes every
`flush_s` seconds, or as soon as a batch is full, and hands what is buffered to the
sink on a thread of its own (one writer, so the sink needs no locks). What a flush
commits survives a crash of the process, so an acknowledged prediction is lost only
if the process dies within `flush_s` of it; a graceful stop writes everything.

A full buffer (the sink is behind) applies the policy: `drop` counts the record as
dropped and warns (at most once a minute), `block` makes the request wait for room,
at most `flush_s` seconds, then drops. Either way memory stays bounded.

A sink that fails (its disk full, its database locked) loses the batch it was given,
counted as dropped; the writer goes on trying with the next batches, so logging
resumes by itself when the sink works again. The failure is logged once with its
traceback, then at most once a minute while it lasts, and its end once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fleetserve.server.metrics import Metrics
from fleetserve.server.sinks import Record, Sink

log = logging.getLogger(__name__)

BATCH = 2048  # records per sink write; a full batch wakes the writer early
RETAIN_EVERY_S = 60.0
WARN_EVERY_S = 60.0


class FeedbackLog:
    def __init__(
        self,
        make_sink: Callable[[], Sink],  # called on the writer thread
        metrics: Metrics,
        capacity: int,
        flush_s: float,
        block: bool = False,
        max_age_s: float = 0.0,
        max_bytes: int = 0,
    ) -> None:
        self._make_sink = make_sink
        self._metrics = metrics
        self._capacity = capacity
        self._flush_s = flush_s
        self._block = block
        self._max_age_s, self._max_bytes = max_age_s, max_bytes
        self._buffer: deque[Record] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="feedback")
        self._sink: Sink | None = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned = 0.0
        # while the sink fails: since when, records lost since then, the last warning
        self._failing_since: float | None = None
        self._lost = 0
        self._failure_warned = 0.0
        self._closing = False
        # wake the writer early once this many wait (a small buffer must not sit full)
        self._wake_at = min(BATCH, max(1, capacity // 2))
        if flush_s <= 0:
            raise ValueError("the feedback flush interval must be positive")
        self.enqueued = self.written = self.dropped = 0
        metrics.count_from("fleetserve_feedback_enqueued", "Records buffered for the sink",
                           lambda: self.enqueued)  # fmt: skip
        metrics.count_from("fleetserve_feedback_written", "Records the sink committed",
                           lambda: self.written)  # fmt: skip
        metrics.count_from("fleetserve_feedback_dropped",
                           "Records dropped: the buffer was full, or the sink failed",
                           lambda: self.dropped)  # fmt: skip
        metrics.feedback_depth(lambda: len(self._buffer))

    def start(self) -> None:
        """Start the writer; the sink opens with the first record (no file until then)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- the request path -------------------------------------------------------------

    def offer(self, record: Record) -> bool:
        """Buffer a record; False (nothing buffered) when the buffer is full."""
        buffer = self._buffer
        if len(buffer) >= self._capacity:
            return False
        buffer.append(record)
        self.enqueued += 1
        if len(buffer) >= self._wake_at:
            self._wake.set()
        return True

    async def record(self, record: Record) -> None:
        """A prediction from the request path: buffered, or the policy applies."""
        if self.offer(record):
            return
        if self._block:
            deadline = time.monotonic() + self._flush_s
            while (left := deadline - time.monotonic()) > 0:
                self._room.clear()
                self._wake.set()
                try:
                    await asyncio.wait_for(self._room.wait(), left)
                except TimeoutError:
                    break
                if self.offer(record):
                    return
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned > WARN_EVERY_S:
            self._warned = now
            log.warning(
                "feedback buffer full (%d records): the sink is behind; dropping records "
                "(counted in fleetserve_feedback_dropped_total)", self._capacity,
            )  # fmt: skip

    # -- the writer -------------------------------------------------------------------

    async def _run(self) -> None:
        retained = time.monotonic()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_s)
            self._wake.clear()
            # what is buffered now, then sleep again: draining until empty would chase
            # the requests with tiny batches, a commit and a thread hop for a handful each
            await self._write(len(self._buffer))
            due = time.monotonic() - retained > RETAIN_EVERY_S
            if (self._max_age_s or self._max_bytes) and due and not self._closing:
                retained = time.monotonic()
                await self._in_writer(self._retain)
        while self._buffer:  # closing: everything
            await self._write(len(self._buffer))

    async def _write(self, count: int) -> None:
        """The oldest `count` records, in batches; each committed before the next."""
        while count > 0 and self._buffer:
            n = min(len(self._buffer), BATCH, count)
            count -= n
            if n == len(self._buffer):  # the usual case: take it all at C speed
                batch = list(self._buffer)
                self._buffer.clear()
            else:
                batch = [self._buffer.popleft() for _ in range(n)]
            self._room.set()
            started = time.perf_counter()
            if await self._in_writer(self._commit, batch):
                self._metrics.feedback_seconds.observe(time.perf_counter() - started)
                self.written += n
            else:  # that batch is lost
                self.dropped += n
                self._lost += n

    def _commit(self, batch: list[Record]) -> None:
        if self._sink is None:
            self._sink = self._make_sink()
        self._sink.write(batch)
        self._sink.flush()

    def _retain(self) -> None:
        if self._sink is None:
            return
        gone = self._sink.retain(self._max_age_s, self._max_bytes)
        if gone:
            log.info("feedback retention removed %d records", gone)

    async def _in_writer(self, fn: Callable[..., object], *args: object) -> bool:
        """Run on the writer thread; a failing sink is reported, never fatal. Shielded: a
        job that started always finishes (its batch is already off the buffer)."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return False
        if self._failing_since is not None:
            log.warning(
                "feedback sink works again after %.0fs; it lost %d records meanwhile",
                time.monotonic() - self._failing_since, self._lost,
            )  # fmt: skip
            self._failing_since = None
        return True

    def _failed(self, exc: Exception) -> None:
        """Log a sink failure: a lasting one (a full disk) once, then once a minute, not
        once a batch (twice a second, crowding every other line out of the log)."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since, self._failure_warned, self._lost = now, now, 0
            log.warning(
                "feedback sink failed: %s; records are dropped (counted in "
                "fleetserve_feedback_dropped_total) until it works again", exc, exc_info=exc,
            )  # fmt: skip
        elif now - self._failure_warned > WARN_EVERY_S:
            self._failure_warned = now
            log.warning(
                "feedback sink still failing after %.0fs (%d records dropped): %s",
                now - self._failing_since, self._lost, exc,
            )  # fmt: skip

    def _close_sink(self) -> None:
        if self._sink is not None:
            self._sink.close()

    async def close(self, timeout_s: float) -> None:
        """Write everything buffered and close the sink, all within `timeout_s`; what is
        left then is counted as dropped and logged."""
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            if self._task is not None:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            await asyncio.wait_for(self._in_writer(self._close_sink), deadline - loop.time())
        except TimeoutError:
            self.dropped += len(self._buffer)
            log.warning(
                "feedback: the sink did not finish within %.0fs at shutdown; %d buffered "
                "records not written", timeout_s, len(self._buffer),
            )  # fmt: skip
            if self._task is not None:
                self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
