"""InferenceService: the data-plane core that REST and gRPC both call.

The edges decode their wire format into `InferRequest` and encode `InferResponse`;
everything between (resolving the version, leasing the model, checking inputs
against its signature, running it, statistics and metrics) happens here, once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loaders.base import InputError, RunError
from server.cache import ModelCache, Servable
from server.errors import Internal, InvalidArgument, NotFound, ServerError, Unavailable
from server.metrics import OTHER, Metrics
from server.repository import Repository
from server.router import Router
from server.stats import ModelStats
from server.types import InferRequest, InferResponse, ModelState, RequestedOutput

SERVABLE_STATES = frozenset({ModelState.UNLOADED, ModelState.LOADING, ModelState.READY})
SERVER_NAME = "fleetserve"
SERVER_VERSION = "0.1.0"
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
    ) -> None:
        self._repository = repository
        self._router = router
        self._cache = cache
        self._observe = metrics.requests.observe
        self._run_pool = run_pool
        self._inline_run_us = inline_run_us
        self.ready = False  # set by the app once startup loading is done

    # -- inference ----------------------------------------------------------------

    async def infer(self, req: InferRequest, protocol: str, started: float) -> InferResponse:
        """Run one request; `started` is when the edge received it (perf_counter)."""
        model = version = OTHER
        outcome = "success"
        try:
            model_id = self._router.resolve(req.model_name, req.model_version)
            model = model_id.name
            s = self._cache.lease(model_id) or await self._cache.acquire(model_id)
            version = s.version
            try:
                t0 = time.perf_counter_ns()
                batch = _check_inputs(s, req)
                names = _output_names(s, req.outputs) if req.outputs else None
                t1 = time.perf_counter_ns()
                if s.inline and batch * s.run_us < self._inline_run_us:
                    outputs = s.model.run(req.inputs, names)
                else:
                    loop = asyncio.get_running_loop()
                    outputs = await loop.run_in_executor(
                        self._run_pool, s.model.run, req.inputs, names
                    )
                t2 = time.perf_counter_ns()
            except InputError as exc:
                s.stats.record_failure(time.perf_counter_ns() - t0)
                raise InvalidArgument(str(exc)) from None
            except RunError as exc:
                s.stats.record_failure(time.perf_counter_ns() - t0)
                raise Internal(f"model {s.id} failed to run: {exc}") from None
            finally:
                self._cache.release(s)
            s.stats.record_success(batch, t2, t2 - int(started * 1e9), t1 - t0, t2 - t1, 0)
            return InferResponse(s.id.name, version, req.id, outputs, req.outputs)
        except ServerError as exc:
            outcome = exc.kind.value.lower()
            raise
        finally:
            self._observe((model, version, protocol, outcome), time.perf_counter() - started)

    def reject(self, protocol: str, exc: ServerError, started: float) -> None:
        """Count a request the edge could not decode."""
        self._observe(
            (OTHER, OTHER, protocol, exc.kind.value.lower()), time.perf_counter() - started
        )

    # -- health and metadata --------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: str | None) -> bool:
        """Ready = servable: within the version policy, and loaded or loadable.

        Models load on first use, so an unloaded version is ready unless its last load
        failed (or it is unloading). A failed version turns ready again when a retry
        or an explicit load succeeds.
        """
        try:
            model_id = self._router.resolve(name, version)
        except ServerError:
            return False
        return self._cache.state(model_id)[0] in SERVABLE_STATES

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
        entry = self._repository.entry(name)
        return {
            "name": name,
            "versions": [str(v) for v in entry.servable],
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


def _output_names(s: Servable, requested: list[RequestedOutput]) -> list[str]:
    names = [o.name for o in requested]
    for name in names:
        if name not in s.outputs:
            raise InvalidArgument(
                f"model {s.id} has no output {name!r} (outputs: {', '.join(s.outputs)})"
            )
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
