"""Dynamic batching: one bounded queue per loaded model version that batches.

Requests queue here and run merged along the first dimension. Everything on the
event loop is bookkeeping (queue, timers, futures); merging inputs, running the
model and splitting outputs happen in the run pool, or inline when the batch is
measured faster than a thread hop.

When a batch starts: an instance is free and either no batch of this version is
running (an idle model never makes a lone request wait), or `target_rows` rows are
queued, or the oldest request has waited `max_delay_s`. A batch takes the oldest
request and, in order, every later one with the same non-batch dimensions and
requested outputs (datatypes are fixed by the signature) while the rows fit
`max_batch_size`. Ragged requests keep their place and head a later batch: the
oldest request is always in the next batch, so nothing starves.

Overload: a full queue refuses at once (UNAVAILABLE, retry hint); a request whose
queue timeout passes is rejected without running (DEADLINE_EXCEEDED), or with
timeout_action DELAY waits behind every request still in time; a request whose
client went away (cancelled task) leaves the queue; one past its client deadline
is dropped when its batch forms.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import numpy as np

from fleetserve.loaders.base import InputError, LoadedModel, RunError
from fleetserve.server.config import BatchPolicy
from fleetserve.server.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ServerError,
    Unavailable,
)
from fleetserve.server.metrics import Metrics
from fleetserve.server.stats import ModelStats

Outputs = dict[str, np.ndarray]
# how far past the head a batch looks for compatible requests (bounds the work per batch)
SCAN_LIMIT = 1024
# an inline model whose loop passes hold one request each stops waiting for pass ends,
# and checks again every this many requests
PROBE_EVERY = 64


def run_error(model: str, exc: BaseException) -> ServerError:
    """The client-facing error for a failed model run."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, InputError):
        return InvalidArgument(str(exc))
    if isinstance(exc, RunError):
        return Internal(f"model {model} failed to run: {exc}")
    return Internal(f"model {model} failed to run: {type(exc).__name__}: {exc}")


class _Request:
    __slots__ = (
        "deadline", "future", "inputs", "key", "names", "queued_at", "rows", "timer", "waited_ns",
    )  # fmt: skip

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        names: list[str] | None,
        rows: int,
        future: asyncio.Future[Outputs],
        deadline: float | None,
    ) -> None:
        self.inputs, self.names, self.rows, self.future = inputs, names, rows, future
        # requests merge only when every non-batch dimension and the outputs agree (by
        # name: clients may send the inputs in any order)
        shapes = inputs.items() if len(inputs) == 1 else sorted(inputs.items())
        self.key = (tuple((n, a.shape[1:]) for n, a in shapes), names and tuple(names))
        self.deadline = deadline  # monotonic; the client stops waiting then
        self.queued_at = time.monotonic()
        self.waited_ns = 0  # from queued_at to the start of its batch
        self.timer: asyncio.TimerHandle | None = None


class Batcher:
    """The queue and batch runs of one loaded model version.

    Created on the event loop and used only from it. `hold` / `release` keep the
    version leased while a batch runs (its requests' callers may be gone by then).
    """

    def __init__(
        self,
        name: str,
        version: str,
        model: LoadedModel,
        policy: BatchPolicy,
        pool: Executor,
        inline: Callable[[int], bool],  # rows -> run on the loop (faster than a hop)
        stats: ModelStats,
        metrics: Metrics,
        hold: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        self._id = f"{name}:{version}"
        self._labels = (name, version)
        self._model = model
        self._policy = policy
        self._pool = pool
        self._inline = inline
        self._stats = stats
        self._metrics = metrics
        self._hold, self._release = hold, release
        self._queue: deque[_Request] = deque()
        self._delayed: deque[_Request] = deque()  # timed out under timeout_action DELAY
        self._timer: asyncio.TimerHandle | None = None  # wakes a batch waiting for rows
        self._tick_pending = False  # a `_tick` is scheduled for the end of this loop pass
        self._merging = True  # inline models: gather each pass's requests (see `_tick`)
        self._empty_ticks = 0
        self._submits = 0
        self.running = 0  # batches running now

    @property
    def depth(self) -> int:
        """Requests waiting."""
        return len(self._queue) + len(self._delayed)

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        names: list[str] | None,
        rows: int,
        deadline: float | None = None,
        timeout_s: float | None = None,
    ) -> Outputs:
        """Queue one checked request and wait for its rows of the batch's outputs.

        `deadline` (monotonic) is when the client stops waiting; `timeout_s` is the
        request's own queue timeout, used when the policy allows it to shorten its own.
        """
        policy = self._policy
        if self.depth >= policy.max_queue_size:
            self._metrics.rejections.inc((*self._labels, "queue_full"))
            raise Unavailable(
                f"model {self._id}: queue full ({policy.max_queue_size} requests waiting)",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        if (
            not self._tick_pending
            and not self._queue
            and not self._delayed
            and self.running < policy.instances
            and self._inline(rows)
        ):
            return self._run_now(loop, inputs, names, rows)
        req = _Request(inputs, names, rows, loop.create_future(), deadline)
        timeout = policy.timeout_s
        if timeout_s and policy.allow_timeout_override:
            timeout = min(timeout, timeout_s) if timeout else timeout_s
        if timeout:
            req.timer = loop.call_at(loop.time() + timeout, self._timed_out, req, timeout)
        self._queue.append(req)
        if not self._tick_pending:
            self._schedule()  # starts at once if an instance is free
        try:
            return await req.future
        except asyncio.CancelledError:
            if self._forget(req):  # still queued: its client went away
                self._metrics.rejections.inc((*self._labels, "cancelled"))
            raise

    def _run_now(
        self,
        loop: asyncio.AbstractEventLoop,
        inputs: dict[str, np.ndarray],
        names: list[str] | None,
        rows: int,
    ) -> Outputs:
        """The first request of a loop pass to an idle inline model: run it right here."""
        self._submits += 1
        if self._merging or self._submits % PROBE_EVERY == 0:
            # an inline run ends before the next request is read, so nothing could queue
            # behind it: the rest of this loop pass's requests (read from several sockets
            # at once) wait for the pass to end and run together
            self._tick_pending = True
            loop.call_soon(self._tick)
        t0 = time.perf_counter_ns()
        try:
            out = self._model.run(inputs, names)
        except Exception as exc:
            raise run_error(self._id, exc) from None
        ns = time.perf_counter_ns() - t0
        self._stats.record_request(0, 0, ns, 0)
        self._stats.record_execution(rows, 0, ns, 0)
        metrics, labels = self._metrics, self._labels
        metrics.queue_seconds.observe(labels, 0.0)
        metrics.batch_size.observe(labels, rows)
        metrics.compute_seconds.observe(labels, ns / 1e9)
        return out

    def close(self, reason: str) -> None:
        """Fail every waiting request (its model is going away under it)."""
        for queue in (self._queue, self._delayed):
            while queue:
                req = queue.popleft()
                if req.timer is not None:
                    req.timer.cancel()
                if not req.future.done():
                    req.future.set_exception(Unavailable(f"model {self._id} {reason}"))

    # -- the queue -------------------------------------------------------------------

    def _forget(self, req: _Request) -> bool:
        """Take a request out of the queue; False if it was not queued (taken or done)."""
        if req.timer is not None:
            req.timer.cancel()
        for queue in (self._queue, self._delayed):
            try:
                queue.remove(req)
            except ValueError:
                continue
            return True
        return False

    def _timed_out(self, req: _Request, timeout: float) -> None:
        req.timer = None
        if req.future.done():  # cancelled in this loop pass: its caller forgets it
            return
        if self._policy.delay_on_timeout:
            try:
                self._queue.remove(req)
            except ValueError:
                return
            self._delayed.append(req)
            return
        if self._forget(req):
            self._metrics.rejections.inc((*self._labels, "timeout"))
            req.future.set_exception(
                DeadlineExceeded(
                    f"model {self._id}: request timed out after {timeout * 1e6:.0f} us in the "
                    "queue (it did not run)"
                )
            )

    def _schedule(self) -> None:
        """Start every batch that may start now; arm a timer for one that must wait."""
        policy = self._policy
        while self.running < policy.instances and (self._queue or self._delayed):
            if self.running and policy.max_delay_s and self._queue:
                wait = self._queue[0].queued_at + policy.max_delay_s - time.monotonic()
                if wait > 0 and sum(r.rows for r in self._queue) < policy.target_rows:
                    if self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(wait, self._wake)
                    return
            batch = self._take(self._queue or self._delayed)
            if batch:
                self._launch(batch)

    def _tick(self) -> None:
        """The end of a loop pass: run what queued in it; stop merging passes that
        never hold more than one request (probing again every PROBE_EVERY requests)."""
        self._tick_pending = False
        if self._queue:
            self._merging, self._empty_ticks = True, 0
        else:
            self._empty_ticks += 1
            self._merging = self._empty_ticks < 8
        self._schedule()

    def _wake(self) -> None:
        self._timer = None
        self._schedule()

    def _take(self, queue: deque[_Request]) -> list[_Request]:
        """The next batch: the oldest request and the compatible ones after it that fit."""
        limit = self._policy.max_batch_size
        now = time.monotonic()
        batch: list[_Request] = []
        passed: list[_Request] = []
        rows = 0
        key = None
        for _ in range(min(len(queue), SCAN_LIMIT)):
            req = queue.popleft()
            if req.future.done():  # cancelled: its caller is about to forget it
                continue
            if req.deadline is not None and req.deadline <= now:
                self._drop_late(req)
                continue
            if key is None or (req.key == key and rows + req.rows <= limit):
                key = req.key
                batch.append(req)
                rows += req.rows
                if rows >= limit:
                    break
            else:
                passed.append(req)
                if req.key == key:  # compatible but too big: it heads the next batch
                    break
        queue.extendleft(reversed(passed))
        return batch

    def _drop_late(self, req: _Request) -> None:
        if req.timer is not None:
            req.timer.cancel()
        self._metrics.rejections.inc((*self._labels, "deadline"))
        if not req.future.done():
            req.future.set_exception(
                DeadlineExceeded(f"model {self._id}: the request's deadline passed in the queue")
            )

    # -- running a batch -------------------------------------------------------------

    def _launch(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        rows = 0
        for req in batch:
            if req.timer is not None:
                req.timer.cancel()
            waited = now - req.queued_at
            req.waited_ns = int(waited * 1e9)  # counted in the statistics if it succeeds
            self._metrics.queue_seconds.observe(self._labels, waited)
            rows += req.rows
        self.running += 1
        self._hold()
        # inline or refused: finished here, and the caller's `_schedule` loop goes on
        if self._inline(rows):
            try:
                done = self._execute(batch, rows)
            except Exception as exc:  # never leave a batch unfinished (running, leases)
                done = ([exc for _ in batch], 0, 0, 0)
            self._finish(batch, rows, done, reschedule=False)
            return
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(self._execute, batch, rows)
        except RuntimeError:  # the pool is shut down: the server is stopping
            stopping = [Unavailable("the server is stopping") for _ in batch]
            self._finish(batch, rows, (stopping, 0, 0, 0), reschedule=False)
            return
        future.add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._finish_future, batch, rows, f)
        )

    def _execute(
        self, batch: list[_Request], rows: int
    ) -> tuple[list[Outputs | BaseException], int, int, int]:
        """Merge, run, split (in the run pool): per-request results and the three times."""
        t0 = t1 = time.perf_counter_ns()
        first = batch[0]
        try:
            if len(batch) == 1:
                feed = first.inputs
            else:
                feed = {n: np.concatenate([r.inputs[n] for r in batch]) for n in first.inputs}
            t1 = time.perf_counter_ns()
            out = self._model.run(feed, first.names)
        except Exception as exc:
            if len(batch) == 1:
                return [exc], t1 - t0, 0, 0
            out = None
        t2 = time.perf_counter_ns()
        if len(batch) == 1:
            return [out], t1 - t0, t2 - t1, 0
        if out is None or any(a.ndim == 0 or a.shape[0] != rows for a in out.values()):
            # one request's data can fail a whole batch: run each alone, so only its
            # sender gets the error (a model whose outputs do not follow the batch too)
            return [_run_alone(self._model, r) for r in batch], t1 - t0, 0, 0
        results: list[Outputs | BaseException] = []
        start = 0
        for req in batch:
            stop = start + req.rows
            results.append({n: a[start:stop] for n, a in out.items()})
            start = stop
        return results, t1 - t0, t2 - t1, time.perf_counter_ns() - t2

    def _finish_future(self, batch: list[_Request], rows: int, future: Future[Any]) -> None:
        try:
            done = future.result()
        except BaseException as exc:  # cancelled at pool shutdown
            done = ([exc for _ in batch], 0, 0, 0)
        self._finish(batch, rows, done)

    def _finish(
        self,
        batch: list[_Request],
        rows: int,
        done: tuple[list[Outputs | BaseException], int, int, int],
        reschedule: bool = True,
    ) -> None:
        results, input_ns, infer_ns, output_ns = done
        self.running -= 1
        self._release()
        if infer_ns:  # the batch ran as one
            self._stats.record_execution(rows, input_ns, infer_ns, output_ns)
            self._metrics.batch_size.observe(self._labels, rows)
            self._metrics.compute_seconds.observe(
                self._labels, (input_ns + infer_ns + output_ns) / 1e9
            )
        for req, result in zip(batch, results, strict=True):
            if req.future.done():  # its client went away
                continue
            if isinstance(result, BaseException):
                req.future.set_exception(run_error(self._id, result))
            else:
                self._stats.record_request(req.waited_ns, input_ns, infer_ns, output_ns)
                req.future.set_result(result)
        if reschedule:
            self._schedule()


def _run_alone(model: LoadedModel, req: _Request) -> Outputs | BaseException:
    try:
        return model.run(req.inputs, req.names)
    except Exception as exc:
        return exc
