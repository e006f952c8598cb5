"""Loaded models: lazy single-flight loads, leases, draining unloads.

Every model version has one `Slot` holding its state. `lease()` is the hot path: a
dict lookup and a lease count when the version is READY; on a miss `acquire()` starts
(or joins) the one load of that version. Loads run on their own thread pool, so a slow
load never starves inference. `unload()` marks the version DRAINING, waits for its
leases to reach zero (bounded), then frees it off the loop: a request never loses
its model under it.

Under a memory budget the books (loaded sizes plus reservations of loads in flight)
never exceed it: a load reserves room first, setting idle versions aside (out of
service, still in memory) and freeing them only once it has loaded, so a load that
fails gives them back. Sizes are measured one load at a time (`memory.py`).

Unloaded on request (Triton's unload) is a version's own state, kept here on its slot:
such a version is out of service (requests get UNAVAILABLE naming the unload) until an
explicit `load()`; only versions never unloaded load lazily on first use. An eviction or
a drain (`unload(..., out_of_service=False)`) leaves a version lazily loadable. The
state lives in memory only: a restart clears it, as Triton's does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetserve.loaders.base import LoadedModel, Loader, LoadError
from fleetserve.loaders.registry import loader_class
from fleetserve.server.config import BatchPolicy, ModelConfig
from fleetserve.server.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServerError,
    Unavailable,
)
from fleetserve.server.eviction import POLICIES, Candidate
from fleetserve.server.memory import MemorySection
from fleetserve.server.metrics import Metrics
from fleetserve.server.repository import Repository
from fleetserve.server.settings import Settings
from fleetserve.server.signature import checked_config
from fleetserve.server.stats import ModelStats
from fleetserve.server.types import ModelId, ModelState, TensorSpec
from fleetserve.server.warmup import warm_up

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Servable:
    """A loaded model version and everything the request path needs to use it."""

    id: ModelId
    config: ModelConfig  # completed from the model's own signature
    model: LoadedModel
    inputs: dict[str, TensorSpec]  # full shapes (batch dimension included)
    outputs: dict[str, TensorSpec]
    inline: bool  # run on the event loop: measured faster than a thread hop
    run_us: float  # measured time of one warm batch-1 run
    stats: ModelStats = field(default_factory=ModelStats)
    batching: BatchPolicy | None = None  # None: each request runs on its own
    feedback_rate: float = 0.0  # share of its predictions sent to the feedback log
    batcher: Any = None  # its Batcher, made by the inference core on first use
    pinned: bool = False  # never evicted (config parameter "pinned")
    size_bytes: int = 0  # what it counts against the budget: measured, else estimated
    size_measured: int | None = None  # bytes allocated by its load and warm-up (memory.py)
    size_estimated: int = 0  # the loader's guess before loading
    load_seconds: float = 0.0
    last_used: int = 0  # the cache's use counter at its last lease (for eviction)
    leases: int = 0  # requests using it now
    pending: int = 0  # unbatched requests submitted to the run pool and not finished
    draining: bool = False  # no new leases; `idle` is set when the last one is released
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    version: str = field(init=False)  # the version as the protocol spells it
    # per input: (datatype, rank, ((axis, size), ...) for every fixed axis); checked per request
    checks: dict[str, tuple[str, int, tuple[tuple[int, int], ...]]] = field(init=False)

    def __post_init__(self) -> None:
        self.version = str(self.id.version)
        self.checks = {
            name: (
                spec.datatype,
                len(spec.shape),
                tuple((i, d) for i, d in enumerate(spec.shape) if d != -1),
            )
            for name, spec in self.inputs.items()
        }


@dataclass(eq=False)
class Slot:
    """The state of one model version, loaded or not."""

    state: ModelState = ModelState.UNLOADED
    reason: str = ""
    servable: Servable | None = None
    loading: asyncio.Task[Servable] | None = None
    failures: int = 0  # consecutive failed loads
    retry_at: float = 0.0  # monotonic time before which a request does not retry a failed load
    error: ServerError | None = None  # the last failed load's error, re-raised until retry_at
    waiters: int = 0  # callers awaiting `loading`: the new copy is theirs, not evictable yet
    out_of_service: bool = False  # unloaded on request: no lazy load until an explicit one
    # the size measured at its last load, with the (size, mtime) of the file it loaded:
    # a reload of the same file reserves exactly that
    known_size: tuple[tuple[int, int], int] | None = None


class NoRoom(Unavailable):
    """The budget is full of models in use: try again shortly (not a failed load)."""


# a failed load is retried by requests after 1, 2, 4 ... up to 60 s
MAX_RETRY_BACKOFF_S = 60.0


class ModelCache:
    """Owns every loaded model; the only place that loads or unloads one."""

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        metrics: Metrics,
        load_pool: ThreadPoolExecutor,
        inline_run_us: float,
    ) -> None:
        self._repository = repository
        self._settings = settings
        self._metrics = metrics
        self._load_pool = load_pool
        self._inline_run_us = inline_run_us
        self._slots: dict[ModelId, Slot] = {}
        self._pins: set[ModelId] = set()  # pinned at run time (admin API), never evicted
        self._policy = POLICIES[settings.eviction_policy]
        self._unload_first = settings.reload_policy == "resources"
        self._memory = MemorySection()
        self._freeing: set[asyncio.Task[None]] = set()  # victims being freed
        self._budget_bytes = settings.max_loaded_bytes  # 0 = no limit
        self._budget_models = settings.max_loaded_models  # 0 = no limit
        self.used_bytes = 0  # sizes of the loaded versions
        self._reserved_bytes = 0  # estimates of the loads in flight
        self.loaded_count = 0
        self._loading = 0
        self._uses = 0  # use counter: the LRU clock
        self.hits = 0  # requests that found their version loaded
        self.misses = 0  # requests that had to wait for a load

    # -- request path -------------------------------------------------------------

    def lease(self, model_id: ModelId) -> Servable | None:
        """A leased servable if the version is READY now, else None (then `acquire`)."""
        slot = self._slots.get(model_id)
        if slot is None or slot.state is not ModelState.READY:
            return None
        servable = slot.servable
        servable.leases += 1  # type: ignore[union-attr]
        self._uses += 1
        servable.last_used = self._uses  # type: ignore[union-attr]
        self.hits += 1
        return servable

    async def acquire(self, model_id: ModelId) -> Servable:
        """A leased, READY servable; loads it first if needed (unless it was unloaded on
        request: Unavailable). Pair with `release`."""
        self.misses += 1
        slot = self._slots.get(model_id)
        if slot is not None and slot.out_of_service:
            raise Unavailable(
                f"model {model_id} was unloaded; it serves again once loaded (repository "
                "load or admin load)"
            )
        await self._load_shared(model_id, reload=False)
        slot = self._slots[model_id]
        if slot.state is not ModelState.READY:
            raise Unavailable(f"model {model_id} is {slot.state.value.lower()}")
        servable = slot.servable
        servable.leases += 1  # type: ignore[union-attr]
        self._uses += 1
        servable.last_used = self._uses  # type: ignore[union-attr]
        return servable  # type: ignore[return-value]

    def hold(self, servable: Servable) -> None:
        """One more lease on a servable already leased (a run that outlives its request)."""
        servable.leases += 1

    def release(self, servable: Servable) -> None:
        servable.leases -= 1
        if servable.draining and servable.leases == 0:
            servable.idle.set()

    def pin(self, model_id: ModelId, pinned: bool = True) -> None:
        """Keep a version from eviction (or let it go again); it may not be loaded yet."""
        if pinned:
            self._pins.add(model_id)
        else:
            self._pins.discard(model_id)

    def pinned(self, model_id: ModelId) -> bool:
        slot = self._slots.get(model_id)
        by_config = slot is not None and slot.servable is not None and slot.servable.pinned
        return by_config or model_id in self._pins

    # -- state --------------------------------------------------------------------

    def state(self, model_id: ModelId) -> tuple[ModelState, str]:
        slot = self._slots.get(model_id)
        return (slot.state, slot.reason) if slot else (ModelState.UNLOADED, "")

    def in_service(self, model_id: ModelId) -> bool:
        """Would a request be served: loaded, loading, or loadable on first use (not
        unloaded on request, not failed, not draining)."""
        slot = self._slots.get(model_id)
        if slot is None:
            return True
        if slot.state is ModelState.UNLOADED:
            return not slot.out_of_service
        return slot.state in (ModelState.READY, ModelState.LOADING)

    def reinstate(self, name: str) -> None:
        """Every version of a model loads lazily again (a repository load of the model:
        versions it does not load now, e.g. outside the version policy, are back too)."""
        for model_id, slot in self._slots.items():
            if model_id.name == name:
                slot.out_of_service = False

    def servable(self, model_id: ModelId) -> Servable | None:
        """The READY servable of a version, without taking a lease."""
        slot = self._slots.get(model_id)
        return slot.servable if slot is not None and slot.state is ModelState.READY else None

    def loaded(self) -> list[Servable]:
        return [s.servable for s in self._slots.values() if s.servable is not None]

    def states(self) -> dict[ModelId, tuple[ModelState, str]]:
        """Every version the cache has seen (loaded, loading, failed, unloaded): a snapshot."""
        return {model_id: (slot.state, slot.reason) for model_id, slot in self._slots.items()}

    async def settle(self, model_id: ModelId) -> None:
        """Wait for a load of this version in flight, if any (its outcome is ignored)."""
        slot = self._slots.get(model_id)
        if slot is not None and slot.loading is not None:
            await asyncio.gather(asyncio.shield(slot.loading), return_exceptions=True)

    # -- loading ------------------------------------------------------------------

    async def load(self, model_id: ModelId, *, reload: bool = True) -> Servable:
        """Load one version explicitly, putting it back in service if it was unloaded;
        `reload=False` returns a READY version as it is (a pin). See `_load_shared`."""
        slot = self._slots.setdefault(model_id, Slot())
        slot.out_of_service = False
        return await self._load_shared(model_id, reload=reload)

    async def _load_shared(self, model_id: ModelId, *, reload: bool) -> Servable:
        """Load one version; concurrent callers share one load (single flight).

        The load runs as its own task, so a caller that goes away does not cancel it.
        `reload=False` (the request path) returns a READY version as it is and does not
        retry a failed load before its backoff has passed. A reload keeps the old copy
        serving until the new one is ready, then drains it.
        """
        slot = self._slots.setdefault(model_id, Slot())
        if slot.loading is None:
            if slot.state is ModelState.READY and not reload:
                return slot.servable  # type: ignore[return-value]
            if slot.state is ModelState.DRAINING:
                raise Unavailable(f"model {model_id} is unloading")
            wait = slot.retry_at - time.monotonic()
            if slot.state is ModelState.FAILED and not reload and wait > 0 and slot.error:
                slot.error.retry_after = wait
                raise slot.error
            slot.loading = asyncio.get_running_loop().create_task(self._load_slot(model_id, slot))
        # the caller leases the new copy right after this returns, with no await between:
        # until then `waiters` keeps it out of eviction
        slot.waiters += 1
        try:
            return await asyncio.shield(slot.loading)
        finally:
            slot.waiters -= 1

    async def _load_slot(self, model_id: ModelId, slot: Slot) -> Servable:
        old = slot.servable
        if old is not None and self._unload_first:  # --reload-policy resources
            # its requests now wait for the new copy, as for a first load
            slot.state, slot.servable = ModelState.LOADING, None
            await self._drain_and_free(old)
            old = None
        if old is None:
            slot.state, slot.reason = ModelState.LOADING, ""
        started = time.perf_counter()
        try:
            servable, victims = await self._load(model_id, slot)
        except Exception as error:
            exc = error
            if not isinstance(exc, ServerError):
                log.exception("unexpected error loading %s", model_id)
                exc = Internal(f"{type(error).__name__}: {error}")
            if isinstance(exc, NoRoom):  # not the model's fault: no backoff, no failure
                if old is None:
                    slot.state, slot.reason = ModelState.UNLOADED, exc.message
                raise exc from None
            if not isinstance(exc, NotFound | Unavailable | ResourceExhausted):
                exc = Unavailable(f"model {model_id} failed to load: {exc.message}")
            slot.error = exc
            slot.failures += 1
            slot.retry_at = time.monotonic() + min(MAX_RETRY_BACKOFF_S, 2.0 ** (slot.failures - 1))
            if old is None:
                slot.state, slot.reason = ModelState.FAILED, exc.message
            self._metrics.load_failures.inc()
            log.warning("load of %s failed: %s", model_id, exc.message)
            raise exc from None
        finally:
            slot.loading = None
        slot.state, slot.servable, slot.reason, slot.failures = ModelState.READY, servable, "", 0
        self._uses += 1
        servable.last_used = self._uses
        self._free_later(victims, f"evicted for {model_id}")
        elapsed = time.perf_counter() - started
        self._metrics.loads.inc()
        self._metrics.load_seconds.observe(elapsed)
        log.info(
            "loaded %s in %.3fs: %s bytes (measured %s, estimated %s), run %.0fus %s",
            model_id, elapsed, servable.size_bytes, servable.size_measured,
            servable.size_estimated, servable.run_us, "inline" if servable.inline else "in pool",
        )  # fmt: skip
        if old is not None:
            await self._drain_and_free(old)
        return servable

    async def _load(self, model_id: ModelId, slot: Slot) -> tuple[Servable, list[Servable]]:
        entry = self._repository.entry(model_id.name)
        if entry.config is None:
            raise InvalidArgument(entry.error)
        if model_id.version not in entry.versions:
            raise NotFound(f"model {model_id.name!r} has no version {model_id.version}")
        loader = self._repository.loader(model_id, entry.config, self._settings)
        try:
            return await self._load_copy(model_id, entry.config, loader, slot)
        except LoadError as exc:
            raise Unavailable(f"model {model_id} failed to load: {exc}") from None

    async def trial(self, model_id: ModelId, config: ModelConfig, path: Path) -> None:
        """Load a file as a load of `model_id` would (memory budget, config check,
        warm-up), then drop it: the admin API's check of an upload before it is
        published. The versions set aside to make room come back. LoadError when the
        file does not load."""
        loader = loader_class(config.platform)(path, config.load_options(self._settings))
        servable, victims = await self._load_copy(model_id, config, loader, None)
        await self._drain_and_free(servable)
        self._give_back(victims)

    async def _load_copy(
        self, model_id: ModelId, config: ModelConfig, loader: Loader, slot: Slot | None
    ) -> tuple[Servable, list[Servable]]:
        """Load, prepare and count one copy within the budgets; returns it and the idle
        versions set aside to make room for it, for the caller to free (or give back).

        Whatever needs no memory comes first: the file is read through (a missing or
        unreadable file sets nothing aside) and its size checked against the whole
        budget. Room is then made for the best-known size (what this file measured at
        its last load, else the loader's estimate): idle versions are set aside, out of
        the books but still in memory, so a load that fails gives them back untouched.
        The copy loads and warms up alone in the memory section; if it measures more
        than it reserved, more idle versions make room, or it is dropped (NoRoom). The
        counted bytes never exceed the budget; the process holds the set-aside versions
        beside the new copy until the caller frees them.
        """
        loop = asyncio.get_running_loop()
        pool = self._load_pool
        try:
            stamp, estimate = await loop.run_in_executor(pool, _stamp_and_estimate, loader)
            known = slot.known_size if slot is not None else None
            reserve = known[1] if known is not None and known[0] == stamp else estimate
            if self._budget_bytes and reserve > self._budget_bytes:
                raise ResourceExhausted(
                    f"model {model_id} needs about {reserve} bytes, more than the whole memory "
                    f"budget of {self._budget_bytes} bytes"
                )
            await loop.run_in_executor(pool, loader.prefetch)
        except OSError as exc:
            raise Unavailable(
                f"model {model_id}: cannot read its model file: {exc.strerror}"
            ) from None
        victims = self._make_room(model_id, reserve, f"no room to load model {model_id}")
        load = functools.partial(self._load_prepared, model_id, config, loader)
        try:
            servable, measured = await loop.run_in_executor(
                pool, self._memory.measure, f"load of {model_id}", load
            )
        except BaseException:
            self._unreserve(reserve)
            self._give_back(victims)
            raise
        # never less than the file (resident growth, where that is the measure, can hide
        # in memory the heap reuses)
        size = reserve if measured is None else max(measured, stamp[0])
        if slot is not None and measured is not None:
            slot.known_size = (stamp, size)
        self._unreserve(reserve)
        try:  # what it measured, in place of what it reserved
            victims += self._make_room(
                model_id, size, f"model {model_id} measured {size} bytes, more than the "
                f"{reserve} reserved for it, and there is no room for them",
            )  # fmt: skip
        except NoRoom:
            self._give_back(victims)
            await loop.run_in_executor(pool, self._memory.free, servable.model)
            raise
        self._unreserve(size)
        servable.size_bytes, servable.size_estimated, servable.size_measured = (
            size, estimate, measured
        )  # fmt: skip
        self.used_bytes += size
        self.loaded_count += 1
        self._publish_usage()
        return servable, victims

    def _load_prepared(self, model_id: ModelId, config: ModelConfig, loader: Loader) -> Servable:
        """Load and prepare one copy (in the load pool, in the memory section)."""
        started = time.perf_counter()
        model = loader.load()
        seconds = time.perf_counter() - started
        try:
            servable = self._prepare(model_id, config, model)
        except BaseException:
            model.unload()
            raise
        servable.load_seconds = seconds
        return servable

    def _make_room(self, model_id: ModelId, nbytes: int, why: str) -> list[Servable]:
        """Reserve `nbytes` and a model for a load, setting aside the idle versions to
        evict to make room, or refuse (NoRoom, saying `why`).

        Synchronous, so no other load can pick the same victims or the same room; the
        caller releases the reservation (`_unreserve`) and frees or gives back the victims.
        """
        budget, max_models = self._budget_bytes, self._budget_models
        need_bytes = self.used_bytes + self._reserved_bytes + nbytes - budget if budget else 0
        need_models = self.loaded_count + self._loading + 1 - max_models if max_models else 0
        victims: list[Servable] = []
        if need_bytes > 0 or need_models > 0:
            chosen = self._choose_victims(need_bytes, need_models)
            if sum(s.size_bytes for s in chosen) < need_bytes or len(chosen) < need_models:
                slot = self._slots.get(model_id)
                hint = (
                    "; a reload needs room for both copies (--reload-policy resources frees "
                    "the old copy first)"
                    if slot is not None and slot.servable is not None
                    else ""
                )
                raise NoRoom(
                    f"{why}: the memory budget is held by models in use, pinned or loading" + hint,
                    retry_after=1,
                )
            victims = [self._set_aside(s) for s in chosen]
        self._reserved_bytes += nbytes
        self._loading += 1
        return victims

    def _unreserve(self, nbytes: int) -> None:
        self._reserved_bytes -= nbytes
        self._loading -= 1

    def _choose_victims(self, need_bytes: int, need_models: int) -> list[Servable]:
        """What the policy would evict among the idle versions (maybe not enough)."""
        idle = [
            slot.servable
            for slot in self._slots.values()
            if slot.state is ModelState.READY
            and slot.servable is not None
            and slot.servable.leases == 0
            and not slot.servable.pinned
            and slot.servable.id not in self._pins
            and slot.loading is None  # not a version being reloaded (its old copy)
            and slot.waiters == 0  # not a copy its waiters are about to lease
        ]
        by_id = {s.id: s for s in idle}
        candidates = [Candidate(s.id, s.size_bytes, s.last_used, s.load_seconds) for s in idle]
        return [by_id[i] for i in self._policy(candidates, need_bytes, need_models)]

    def _set_aside(self, servable: Servable) -> Servable:
        """Take an idle version out of service and off the books at once (to make room);
        its memory stays until it is freed or given back."""
        slot = self._slots[servable.id]
        slot.servable, slot.state, slot.reason = None, ModelState.UNLOADED, "evicted"
        self.used_bytes -= servable.size_bytes
        self.loaded_count -= 1
        self._publish_usage()
        return servable

    def _give_back(self, victims: list[Servable]) -> None:
        """A load that set versions aside did not keep its room: put back in service
        those still in memory whose slot is free and that fit; free the others."""
        lost = []
        for servable in victims:
            slot = self._slots[servable.id]
            untouched = slot.state is ModelState.UNLOADED and slot.reason == "evicted"
            if (
                untouched
                and slot.loading is None
                and not slot.out_of_service
                and (self._room_for(servable.size_bytes))
            ):
                slot.servable, slot.state, slot.reason = servable, ModelState.READY, ""
                self.used_bytes += servable.size_bytes
                self.loaded_count += 1
            else:
                lost.append(servable)
        self._publish_usage()
        self._free_later(lost, "evicted")

    def _room_for(self, nbytes: int) -> bool:
        """Would one more version of `nbytes` fit both budgets now, evicting nothing."""
        budget, max_models = self._budget_bytes, self._budget_models
        if budget and self.used_bytes + self._reserved_bytes + nbytes > budget:
            return False
        return not max_models or self.loaded_count + self._loading < max_models

    def _free_later(self, victims: list[Servable], why: str) -> None:
        """Free versions already off the books, in a task of their own (their turn in
        the memory section may wait for a load); `close` waits for them."""
        for servable in victims:
            self._metrics.evictions.inc()
            log.info("%s: %s (%d bytes, idle)", why, servable.id, servable.size_bytes)
        if victims:
            task = asyncio.get_running_loop().create_task(self._free_all(victims))
            self._freeing.add(task)
            task.add_done_callback(self._freeing.discard)

    async def _free_all(self, victims: list[Servable]) -> None:
        loop = asyncio.get_running_loop()
        for servable in victims:
            await loop.run_in_executor(self._load_pool, self._memory.free, servable.model)

    def _publish_usage(self) -> None:
        self._metrics.loaded_models.set(self.loaded_count)
        self._metrics.loaded_bytes.set(self.used_bytes)

    def _prepare(self, model_id: ModelId, config: ModelConfig, model: LoadedModel) -> Servable:
        """Check the config against the model, complete it, and time one warm run."""
        settings = self._settings
        config = checked_config(model_id, config, model, settings)
        batch = (-1,) if config.max_batch_size > 0 else ()
        full_in = {s.name: TensorSpec(s.name, s.datatype, batch + s.shape) for s in config.inputs}
        full_out = {s.name: TensorSpec(s.name, s.datatype, batch + s.shape) for s in config.outputs}
        run_us = _time_run(model, full_in.values())
        warm_up(model_id, model, config, self._repository.root / model_id.name / "warmup")
        return Servable(
            id=model_id,
            config=config,
            model=model,
            inputs=full_in,
            outputs=full_out,
            inline=run_us is not None and run_us < self._inline_run_us,
            run_us=run_us if run_us is not None else float("nan"),
            pinned=config.pinned,
            batching=config.batch_policy(settings.max_queue_size),
            feedback_rate=config.feedback_rate(settings.feedback_sample_rate),
        )

    async def unload(self, model_id: ModelId, *, out_of_service: bool = True) -> None:
        """Stop leasing one version, let its requests finish (bounded), free it.

        A load in flight finishes first. Idempotent: a version that is not loaded is
        only marked. `out_of_service` (Triton's unload): requests are refused until an
        explicit `load`; without it (a version left the policy or was deleted) the next
        request loads it again.
        """
        slot = self._slots.setdefault(model_id, Slot())
        if out_of_service:
            slot.out_of_service = True  # first: no request starts a new load meanwhile
        await self.settle(model_id)
        if slot.state is not ModelState.READY or slot.servable is None:
            if slot.state is not ModelState.DRAINING and out_of_service:
                slot.state, slot.reason, slot.error = ModelState.UNLOADED, "unloaded", None
            return
        servable = slot.servable
        slot.state = ModelState.DRAINING

        async def drain() -> None:
            try:
                await self._drain_and_free(servable)
            finally:
                slot.servable, slot.state = None, ModelState.UNLOADED
                slot.reason = "unloaded" if slot.out_of_service else ""

        # its own task: a caller that goes away (a client disconnect) must not stop an
        # unload half-way, with the version's memory still counted
        await asyncio.shield(asyncio.get_running_loop().create_task(drain()))

    async def _drain_and_free(self, servable: Servable) -> None:
        servable.draining = True
        if servable.leases:
            try:
                await asyncio.wait_for(servable.idle.wait(), self._settings.shutdown_timeout)
            except TimeoutError:
                log.warning(
                    "freeing %s with %d requests still running", servable.id, servable.leases
                )
                if servable.batcher is not None:  # those still queued must not run on it
                    servable.batcher.close("was unloaded while the request waited")
        self.used_bytes -= servable.size_bytes
        self.loaded_count -= 1
        self._publish_usage()
        await asyncio.get_running_loop().run_in_executor(
            self._load_pool, self._memory.free, servable.model
        )

    async def close(self) -> None:
        """Shutdown: cancel loads in flight, then unload everything."""
        loads = [s.loading for s in self._slots.values() if s.loading is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        await asyncio.gather(*self._freeing, return_exceptions=True)
        for model_id, slot in list(self._slots.items()):
            if slot.state is ModelState.READY:
                await self.unload(model_id, out_of_service=False)


def _stamp_and_estimate(loader: Loader) -> tuple[tuple[int, int], int]:
    """The model file's (size, mtime) and the loader's estimate of its loaded size."""
    stat = loader.path.stat()
    return (stat.st_size, stat.st_mtime_ns), loader.estimate_bytes()


def _time_run(model: LoadedModel, inputs: object) -> float | None:
    """Microseconds of one warm run at batch 1 on zeros; None if the model refuses zeros."""
    feed = {}
    for spec in inputs:  # type: ignore[attr-defined]
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(shape, b"", dtype=object)
        else:
            feed[spec.name] = np.zeros(shape, dtype=spec.dtype)
    try:
        model.run(feed)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            model.run(feed)
            times.append(time.perf_counter() - t0)
    except Exception:  # a model may reject zeros; it then runs in the pool
        return None
    return sorted(times)[2] * 1e6
