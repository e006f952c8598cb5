"""InferenceService: the data-plane core that REST and gRPC both call.

The edges decode their wire format into `InferRequest` and encode `InferResponse`;
everything between (resolving the version, leasing the model, checking inputs
against its signature, running it, statistics and metrics) happens here, once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from fleetserve import __version__
from fleetserve.server.batcher import Batcher, run_error
from fleetserve.server.cache import ModelCache, Servable
from fleetserve.server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
    shown,
)
from fleetserve.server.feedback import FeedbackLog
from fleetserve.server.metrics import OTHER, Metrics
from fleetserve.server.repository import Repository
from fleetserve.server.router import Router
from fleetserve.server.stats import ModelStats
from fleetserve.server.tensors import pack_tensors
from fleetserve.server.types import (
    FeedbackRecord,
    InferRequest,
    InferResponse,
    ModelId,
    ModelState,
    PredictionRecord,
    RequestedOutput,
)

log = logging.getLogger(__name__)

SERVER_NAME = "fleetserve"
EXTENSIONS = (
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
)


class InferenceService:
    def __init__(
        self,
        repository: Repository,
        router: Router,
        cache: ModelCache,
        metrics: Metrics,
        run_pool: ThreadPoolExecutor,
        inline_run_us: float,
        max_shadows: int = 1,
        feedback: FeedbackLog | None = None,
        max_pending: int = 1024,
    ) -> None:
        self._repository = repository
        self._router = router
        self._cache = cache
        self._metrics = metrics
        self._observe = metrics.requests.observe
        self._run_pool = run_pool
        self._inline_run_us = inline_run_us
        self._shadows: set[asyncio.Task[None]] = set()
        self._max_shadows = max_shadows
        self._feedback = feedback
        self._max_pending = max_pending
        # generated request ids (feedback, access log, errors): unique per process (64
        # random bits) + a counter; cheaper than uuid4 (a syscall each)
        prefix, counter = os.urandom(8).hex(), itertools.count(1)
        self.new_request_id = lambda: f"{prefix}-{next(counter):x}"
        self.ready = False  # set by the app once startup loading is done

    # -- inference ----------------------------------------------------------------

    async def infer(
        self, req: InferRequest, protocol: str, started: float, deadline: float | None = None
    ) -> InferResponse:
        """Run one request; `started` is when the edge received it (perf_counter),
        `deadline` when its client stops waiting (monotonic; the gRPC deadline)."""
        model = version = OTHER
        outcome = "success"
        try:
            key = _routing_key(req.parameters) if req.parameters else None
            model_id = self._router.resolve(req.model_name, req.model_version, key)
            model = model_id.name
            s = self._cache.lease(model_id) or await self._cache.acquire(model_id)
            version = s.version
            try:
                t0 = time.perf_counter_ns()
                rows = _check_inputs(s, req)
                names = _output_names(s, req.outputs) if req.outputs else None
                timeout = _timeout(req.parameters) if req.parameters else None
                log_it = (
                    (s.feedback_rate or req.parameters)
                    and self._feedback is not None
                    and _sampled(s.feedback_rate, req.parameters)
                )
                batcher = s.batcher
                if batcher is None and s.batching is not None:
                    batcher = self._batcher(s)
                if batcher is not None:
                    outputs = await batcher.submit(req.inputs, names, rows, deadline, timeout)
                else:
                    t1 = time.perf_counter_ns()
                    if s.inline and rows * s.run_us < self._inline_run_us:
                        outputs = s.model.run(req.inputs, names)
                        t2, t3 = t1, time.perf_counter_ns()  # ran at once: waited 0
                    else:
                        if timeout:
                            limit = time.monotonic() + timeout
                            deadline = min(deadline, limit) if deadline else limit
                        outputs, t2, t3 = await self._run_in_pool(s, req.inputs, names, deadline)
                    s.stats.record_execution(rows, t1 - t0, t3 - t2, 0)
                    s.stats.record_request(t2 - t1, t1 - t0, t3 - t2, 0)
            except Exception as exc:
                s.stats.record_failure(time.perf_counter_ns() - t0)
                error = run_error(str(s.id), exc)
                self._metrics.triton.failed(s, error)
                raise error from None
            finally:
                self._cache.release(s)
            now = time.perf_counter_ns()
            s.stats.record_success(rows, now, now - int(started * 1e9))
            request_id = req.id
            if log_it:
                request_id = request_id or self.new_request_id()  # returned, to post feedback with
                # packed here, on the loop: measured cheaper overall than keeping the
                # arrays alive until the writer packs them (cache misses, GIL contention)
                record = PredictionRecord(
                    request_id, model, model_id.version, time.time(),
                    pack_tensors(req.inputs), pack_tensors(outputs),
                )  # fmt: skip
                if not self._feedback.offer(record):  # type: ignore[union-attr]
                    await self._feedback.record(record)  # type: ignore[union-attr]
            shadow = self._router.shadow(model_id)
            if shadow is not None:
                self._start_shadow(replace(req, id=request_id), shadow, s.id, outputs)
            return InferResponse(s.id.name, version, request_id, outputs, req.outputs)
        except ServerError as exc:
            outcome = exc.kind.value.lower()
            raise
        finally:
            self._observe((model, version, protocol, outcome), time.perf_counter() - started)

    def _start_shadow(
        self, req: InferRequest, target: ModelId, served: ModelId, outputs: dict
    ) -> None:
        """Send a copy of a served request to `target` in the background: its result is
        compared and logged, never returned. At most `max_shadows` run at once (fewer than
        the run threads, so a slow shadow version cannot take every thread from the
        served traffic); more are dropped and counted, never queued."""
        if len(self._shadows) >= self._max_shadows:
            self._metrics.shadows.inc((target.name, str(target.version), "dropped"))
            return
        # the copy is logged as the served request was asked to be (never without an id,
        # which the client could not post its ground truth for)
        flag = req.parameters.get("log_prediction") if req.parameters else None
        if not req.id:
            flag = False
        params = {} if flag is None else {"log_prediction": flag}
        copy = replace(req, model_version=str(target.version), parameters=params)
        task = asyncio.get_running_loop().create_task(self._shadow(copy, served, outputs))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, req: InferRequest, served: ModelId, expected: dict) -> None:
        labels = (req.model_name, req.model_version)
        try:
            got = (await self.infer(req, "shadow", time.perf_counter())).outputs
        except ServerError as exc:
            self._metrics.shadows.inc((*labels, "error"))
            log.info("shadow %s:%s of %s (request %r) failed: %s", *labels, served,
                     req.id, exc.message)  # fmt: skip
            return
        differs = _compare(expected, got)
        self._metrics.shadows.inc((*labels, "differ" if differs else "match"))
        log.info("shadow %s:%s of %s (request %r): %s", *labels, served, req.id,
                 differs or "outputs match")  # fmt: skip

    async def close(self) -> None:
        """Cancel the shadow copies still running (server stop)."""
        shadows = list(self._shadows)
        for task in shadows:
            task.cancel()
        await asyncio.gather(*shadows, return_exceptions=True)

    def _batcher(self, s: Servable) -> Batcher:
        """The batching queue of a version, made on its first request."""
        inline_us = self._inline_run_us if s.inline else 0.0
        s.batcher = Batcher(
            s.id.name,
            s.version,
            s.model,
            s.batching,  # type: ignore[arg-type]
            self._run_pool,
            lambda rows: rows * s.run_us < inline_us,
            s.stats,
            self._metrics,
            hold=functools.partial(self._cache.hold, s),
            release=functools.partial(self._cache.release, s),
        )
        return s.batcher

    async def _run_in_pool(
        self, s: Servable, inputs: dict, names: list[str] | None, deadline: float | None
    ) -> tuple[dict, int, int]:
        """Run in the pool: the outputs, when the run started and ended (perf_counter_ns;
        before it started, the request waited for a thread). A cancelled caller leaves
        the model leased until the run ends.

        A version that does not batch has no queue of its own, but its requests waiting
        for a run thread are bounded as a batching queue is: past `max_pending` the
        request is refused at once (503 / UNAVAILABLE), never queued without limit."""
        if s.pending >= self._max_pending:
            self._metrics.rejections.inc((s.id.name, s.version, "queue_full"))
            raise Unavailable(
                f"model {s.id}: {s.pending} requests already waiting for a run thread",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        future = self._run_pool.submit(_run_before, deadline, s.model.run, inputs, names)
        s.pending += 1
        try:
            return await asyncio.wrap_future(future, loop=loop)
        except asyncio.CancelledError:
            self._cache.hold(s)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._cache.release, s))
            raise
        finally:
            s.pending -= 1

    def queue_depths(self) -> dict[tuple[str, ...], int]:
        """Requests waiting per batching version (for the queue-depth gauge)."""
        return {
            (s.id.name, s.version): s.batcher.depth
            for s in self._cache.loaded()
            if s.batcher is not None
        }

    def post_feedback(self, record: FeedbackRecord) -> None:
        """Ground truth for a request id (joined with its prediction at export)."""
        self.check_model(record.model)
        if self._feedback is None:
            raise Unavailable("the feedback log is off (--feedback-sink none)")
        if not self._feedback.offer(record):
            raise Unavailable("the feedback log is full: retry shortly", retry_after=1)

    def reject(self, protocol: str, exc: ServerError, started: float) -> None:
        """Count a request the edge could not decode."""
        self._observe(
            (OTHER, OTHER, protocol, exc.kind.value.lower()), time.perf_counter() - started
        )

    # -- health and metadata --------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str | None) -> bool:
        """Ready = servable: within the version policy, and loaded or loadable.

        Models load on first use, so a version not loaded yet is ready unless its last
        load failed, it is unloading, or it was unloaded on request (until it is loaded
        again). A failed version turns ready again when a retry or a load succeeds.
        """
        try:
            model_id = self._router.resolve(name, version)
        except ServerError:
            return False
        return self._cache.in_service(model_id)

    async def _servable(self, name: str, version: str | None) -> Servable:
        """The loaded version (loading it first if needed), without keeping a lease."""
        model_id = self._router.resolve(name, version)
        servable = self._cache.servable(model_id)
        if servable is None:
            servable = await self._cache.acquire(model_id)
            self._cache.release(servable)
        return servable

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        s = await self._servable(name, version)
        return {
            "name": name,
            "versions": [str(v) for v in self._router.servable(name)],
            "platform": s.config.platform,
            "inputs": [_tensor(t) for t in s.inputs.values()],
            "outputs": [_tensor(t) for t in s.outputs.values()],
        }

    async def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's ModelConfig as JSON (field names of model_config.proto)."""
        return dict((await self._servable(name, version)).config.source)

    def model_statistics(self, name: str = "", version: str | None = None) -> dict[str, Any]:
        """Statistics of loaded versions; a named version that is not loaded has zeros."""
        if not name:
            if version:
                raise InvalidArgument("statistics for a version need a model name")
            servables = sorted(self._cache.loaded(), key=lambda s: (s.id.name, s.id.version))
            return {"model_stats": [_stats(s) for s in servables]}
        model_id = self._router.resolve(name, version)
        servable = self._cache.servable(model_id)
        if servable is None:
            state, reason = self._cache.state(model_id)
            if state is ModelState.FAILED:
                raise Unavailable(reason)
            return {"model_stats": [ModelStats().to_dict(name, str(model_id.version), 0)]}
        return {"model_stats": [_stats(servable)]}

    def check_model(self, name: str) -> None:
        """NotFound unless the repository has this model (for endpoints that only name one)."""
        if name not in self._repository.names:
            raise NotFound(f"unknown model {name[:140]!r}")


def _stats(s: Servable) -> dict[str, Any]:
    return s.stats.to_dict(s.id.name, s.version, s.size_bytes)


def _tensor(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _sampled(rate: float, parameters: dict[str, Any]) -> bool:
    """Log this prediction? The "log_prediction" parameter decides, else the model's rate."""
    flag = parameters.get("log_prediction") if parameters else None
    if flag is not None:
        if type(flag) is not bool:
            raise InvalidArgument('parameter "log_prediction" must be true or false')
        return flag
    return rate >= 1.0 or (rate > 0.0 and random.random() < rate)


def _routing_key(parameters: dict[str, Any]) -> str | None:
    """The "routing_key" parameter: requests with one key stick to one weighted version."""
    key = parameters.get("routing_key")
    if key is not None and (type(key) is not str or len(key) > 256):
        raise InvalidArgument('parameter "routing_key" must be a string of at most 256 chars')
    return key


def _compare(expected: dict, got: dict) -> str:
    """'' when a shadow's outputs equal the served ones, else how they differ."""
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape or have.dtype != want.dtype:
            return f"output {name}: shape/dtype differ"
        if want.dtype.kind in "fc":
            diff = float(np.max(np.abs(have - want), initial=0.0))
            if diff:
                return f"output {name}: max abs diff {diff:.6g}"
        elif not np.array_equal(have, want):
            return f"output {name}: values differ"
    return ""


def _timeout(parameters: dict[str, Any]) -> float | None:
    """The request's "timeout" parameter (microseconds, as Triton's clients send it)."""
    value = parameters.get("timeout")
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidArgument(
            f'parameter "timeout" must be a non-negative integer (microseconds), got {shown(value)}'
        )
    return value / 1e6 or None


def _run_before(
    deadline: float | None, run: Any, inputs: dict, names: list[str] | None
) -> tuple[dict, int, int]:
    """Run unless the request's deadline passed while it waited for a thread (in the pool);
    the outputs, and when the run started and ended."""
    started = time.perf_counter_ns()
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the request's deadline passed before it ran")
    return run(inputs, names), started, time.perf_counter_ns()


def _output_names(s: Servable, requested: list[RequestedOutput]) -> list[str]:
    """The outputs to compute: each a model output, each asked for once (both edges
    answer one entry per name asked for)."""
    names = [o.name for o in requested]
    for i, name in enumerate(names):
        if name not in s.outputs:
            raise InvalidArgument(
                f"model {s.id} has no output {name!r} (outputs: {', '.join(s.outputs)})"
            )
        if name in names[:i]:
            raise InvalidArgument(f"output {name!r} is requested more than once")
    return names


def _check_inputs(s: Servable, req: InferRequest) -> int:
    """Check the inputs against the signature; returns the batch size (1 if unbatched)."""
    inputs = req.inputs
    if inputs.keys() != s.inputs.keys():
        missing = [n for n in s.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in s.inputs]
        problems = [f"missing input(s) {', '.join(missing)}"] if missing else []
        problems += [f"unknown input(s) {', '.join(unknown)}"] if unknown else []
        raise InvalidArgument(
            f"model {s.id}: {'; '.join(problems)} (expects {', '.join(s.inputs)})"
        )
    max_batch = s.config.max_batch_size
    batch = 1
    first = True
    checks = s.checks
    for name, array in inputs.items():
        datatype, rank, fixed = checks[name]
        if req.datatypes[name] != datatype:
            raise InvalidArgument(
                f"input {name!r}: datatype {req.datatypes[name]}, model {s.id} expects {datatype}"
            )
        shape = array.shape
        bad = len(shape) != rank
        for axis, size in fixed:
            bad = bad or shape[axis] != size
        if bad:
            raise InvalidArgument(
                f"input {name!r}: shape {list(shape)} does not match the model's "
                f"{list(s.inputs[name].shape)} (-1 = any size)"
            )
        if max_batch > 0:
            rows = shape[0]
            if rows > max_batch or rows < 1:
                raise InvalidArgument(
                    f"input {name!r}: batch size {rows} is outside 1..{max_batch} "
                    f"(max_batch_size of {s.id})"
                )
            if first:
                batch, first = rows, False
            elif rows != batch:
                raise InvalidArgument(f"inputs disagree on the batch size ({batch} vs {rows})")
    return batch
