"""AdminService: the control-plane core that REST and gRPC both call.

Triton's model repository extension: the index of every model and version with its
state, explicit loads (a reload when loaded) and draining unloads. The edges only
translate; the access rule (`authorize`) and every decision live here.

Repository rescans read directories and configs, so they run on `executor`, off the
event loop; the result is swapped in on the loop. A rescan never unloads anything: a
model whose directory was removed keeps serving until it is unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from server.cache import ModelCache
from server.errors import InvalidArgument, NotFound, ServerError, Unauthenticated, Unavailable
from server.repository import ModelEntry, Repository, Snapshot, check_model_name
from server.types import ModelId, ModelState

log = logging.getLogger(__name__)

# ModelState -> the state names of Triton's repository index
INDEX_STATE = {
    ModelState.READY: "READY",
    ModelState.LOADING: "LOADING",
    ModelState.DRAINING: "UNLOADING",
    ModelState.UNLOADED: "UNAVAILABLE",
    ModelState.FAILED: "UNAVAILABLE",
}
# versions outside the version policy are listed only while the cache holds them
ACTIVE = frozenset({ModelState.READY, ModelState.LOADING, ModelState.DRAINING})
NOT_LOADED = "not loaded yet"


def is_loopback(address: str | None) -> bool:
    """True for a loopback peer: 127.0.0.0/8, ::1, or an IPv4-mapped 127.x (::ffff:127.x)."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("%lo")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def authorize(address: str | None) -> None:
    """The access rule for repository control, for both edges: the peer's IP address in,
    Unauthenticated out. There is no admin token yet, so only loopback peers pass."""
    if not is_loopback(address):
        raise Unauthenticated(
            "repository control is loopback-only until an admin token is configured"
        )


class AdminService:
    def __init__(self, repository: Repository, cache: ModelCache, executor: Executor) -> None:
        self._repository = repository
        self._cache = cache
        self._executor = executor  # for rescans: directory listings and config reads
        self._locks: dict[str, _Held] = {}  # one load/unload of a model at a time

    # -- repository ---------------------------------------------------------------

    async def rescan(self, *, read_all: bool = False, fresh: Collection[str] = ()) -> Snapshot:
        """Rescan the repository off the loop and make the result current; unloads nothing."""
        loop = asyncio.get_running_loop()
        snapshot: Snapshot = await loop.run_in_executor(
            self._executor, lambda: self._repository.rescan(read_all=read_all, fresh=fresh)
        )
        # models gone from disk that are still loaded keep their entries (and serve)
        loaded = {model_id.name for model_id, (state, _) in self._cache.states().items()
                  if state in ACTIVE}  # fmt: skip
        self._repository.install(snapshot, keep=loaded)
        return snapshot

    async def poll(self, interval_s: float) -> None:
        """Rescan every `interval_s` seconds until cancelled; a failed rescan is logged."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                before = set(self._repository.names)
                after = set((await self.rescan()).names)
                if before != after:
                    log.info(
                        "repository rescan: %d models (new: %s; gone: %s)", len(after),
                        ", ".join(sorted(after - before))[:500] or "none",
                        ", ".join(sorted(before - after))[:500] or "none",
                    )  # fmt: skip
            except ServerError as exc:
                log.warning("repository rescan failed: %s", exc.message)
            except Exception:
                log.exception("repository rescan failed")

    async def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every model and version: {"name", "version", "state", "reason"}, Triton's states.

        Versions within the version policy are all listed: READY (loaded), LOADING,
        UNLOADING (draining) or UNAVAILABLE with the reason ("not loaded yet",
        "unloaded", "evicted", or why its load failed). Versions outside the policy are
        left out, as Triton does, unless they are still loaded, loading or draining. A
        model that cannot serve at all (a broken config, no version directory) appears
        once, without "version", as UNAVAILABLE with the reason. `ready_only` keeps READY.
        """
        await self.rescan(read_all=True)
        states = self._cache.states()
        by_name: dict[str, dict[int, tuple[ModelState, str]]] = {}
        for model_id, state in states.items():
            by_name.setdefault(model_id.name, {})[model_id.version] = state
        rows: list[dict[str, Any]] = []
        for name in self._repository.names:
            try:
                entry = self._repository.entry(name)  # read by the rescan: no file I/O
            except NotFound:
                continue
            seen = by_name.get(name, {})
            versions = set(entry.servable) | {v for v, (s, _) in seen.items() if s in ACTIVE}
            if (entry.config is None or not entry.servable) and not ready_only:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": _why(entry)})
            for version in sorted(versions):
                state, reason = seen.get(version, (ModelState.UNLOADED, NOT_LOADED))
                if state is ModelState.UNLOADED and not reason:
                    reason = NOT_LOADED
                if ready_only and state is not ModelState.READY:
                    continue
                rows.append(
                    {
                        "name": name,
                        "version": str(version),
                        "state": INDEX_STATE[state],
                        "reason": reason,
                    }
                )
        return rows

    # -- load and unload ------------------------------------------------------------

    async def load(self, name: str, parameters: Collection[str] = ()) -> None:
        """Load (or reload, when loaded) every servable version of a model.

        Rescans first, so a directory added since is found. Triton's load parameters
        ("config" override, "file:..." contents) are refused: models come from the
        repository on disk only. A failed load raises Unavailable with the reason (the
        version then reports it in the index); a model larger than the memory budget
        raises ResourceExhausted. Once every version is loaded, versions that left the
        version policy are unloaded (drained); a failed load leaves them serving.
        """
        check_model_name(name)
        if parameters:
            raise InvalidArgument(
                f"load parameters are not supported ({', '.join(sorted(parameters))[:200]}): "
                "fleetserve loads models from the repository on disk only; change the "
                "model there and load it again"
            )
        async with self._exclusive(name):
            snapshot = await self.rescan(fresh=(name,))
            if name not in snapshot.names:
                if name in self._repository.names:  # still loaded: kept, serving
                    raise NotFound(
                        f"model {name!r} is no longer in the repository (its loaded "
                        "versions serve until it is unloaded)"
                    )
                raise NotFound(f"unknown model {name!r}")
            entry = self._repository.entry(name)
            if entry.config is None or not entry.servable:
                raise Unavailable(f"model {name!r} failed to load: {_why(entry)}")
            ids = [ModelId(name, v) for v in entry.servable]
            results = await asyncio.gather(
                *(self._cache.load(i, reload=True) for i in ids), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            stale = [
                model_id
                for model_id, (state, _) in self._cache.states().items()
                if model_id.name == name and model_id.version not in entry.servable
                and state in ACTIVE
            ]  # fmt: skip
            await self._unload(stale)

    async def unload(self, name: str) -> None:
        """Unload every loaded version of a model, letting its requests finish (drain).

        Idempotent: a model that is not loaded is a success. Unknown model: NotFound.
        Models load lazily, so a later request loads it again.
        """
        check_model_name(name)
        async with self._exclusive(name):
            self._known(name)
            await self._unload([i for i in self._cache.states() if i.name == name])
            if not any(
                i.name == name and s in ACTIVE for i, (s, _) in self._cache.states().items()
            ):
                self._repository.forget(name)  # only if the last rescan did not list it

    async def _unload(self, ids: list[ModelId]) -> None:
        async def one(model_id: ModelId) -> None:
            await self._cache.settle(model_id)  # a load in flight finishes first
            if self._cache.state(model_id)[0] is ModelState.READY:
                await self._cache.unload(model_id)

        results = await asyncio.gather(*(one(i) for i in ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, NotFound):
                raise result

    def _known(self, name: str) -> ModelEntry:
        """The model's entry; NotFound if the repository does not have it."""
        if name not in self._repository.names:
            raise NotFound(f"unknown model {name!r}")
        return self._repository.entry(name)

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """One load or unload of a model at a time; the lock goes once nobody holds it."""
        held = self._locks.setdefault(name, _Held(asyncio.Lock()))
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if held.users == 0:
                del self._locks[name]


@dataclass(slots=True)
class _Held:
    lock: asyncio.Lock
    users: int = 0  # holding or waiting


def _why(entry: ModelEntry) -> str:
    """Why a model has nothing to serve."""
    if entry.config is None:
        return entry.error
    on_disk = ", ".join(map(str, entry.versions)) or "none"
    return f"no version directory within the version policy (versions on disk: {on_disk})"
