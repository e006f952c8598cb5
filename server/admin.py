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
import functools
import hmac
import ipaddress
import json
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleetserve.loaders.base import LoadError
from fleetserve.server.cache import ModelCache
from fleetserve.server.config import CONFIG_FILENAME, ModelConfig, parse_model_config
from fleetserve.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from fleetserve.server.files import flush_file, retire, write_atomically
from fleetserve.server.repository import ModelEntry, Repository, Snapshot, check_model_name
from fleetserve.server.router import Router
from fleetserve.server.routing import Routing, RoutingStore, if_match, parse_routing
from fleetserve.server.settings import Settings
from fleetserve.server.staging import deleted_dir, install, sweep, upload_dir
from fleetserve.server.types import ModelId, ModelState
from fleetserve.server.versions import parse_version

log = logging.getLogger(__name__)
_audit = logging.getLogger("fleetserve.audit")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
VERSION_ACTIONS = ("load", "unload", "pin", "unpin")
MAX_CONFIG_CHARS = 1024 * 1024

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


def authorize(
    token: str | None,
    address: str | None,
    authorization: str | None,
    host: str | None = None,
    origin: str | None = None,
) -> None:
    """The access rule for the admin API and repository control, for both edges.

    With a token configured, every caller must send `Authorization: Bearer <token>`
    (compared in constant time); without one, only loopback peers pass (secure by
    default), and over HTTP only when the Host is a loopback name and no Origin is sent:
    a web page the operator opens must not reach the API (CSRF, DNS rebinding).
    Unauthenticated out.
    """
    if token is None:
        if not is_loopback(address):
            raise Unauthenticated(
                "the admin API is loopback-only: the server has no admin token configured"
            )
        if origin is not None or (host is not None and not _loopback_host(host)):
            raise Unauthenticated(
                "the admin API without a token answers local clients only (no browser "
                "Origin, a loopback Host)"
            )
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise Unauthenticated("missing or wrong admin token (Authorization: Bearer <token>)")


def to_completion(fn: F) -> F:
    """A change runs as its own task: a caller that goes away (a client disconnect, a
    deadline) must not stop it half-way and leave disk, memory and routing apart."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await asyncio.shield(asyncio.ensure_future(fn(*args, **kwargs)))

    return wrapper  # type: ignore[return-value]


def _loopback_host(host: str) -> bool:
    """A Host header naming this machine's loopback: localhost, 127.x, [::1] (port aside)."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    elif host.count(":") == 1:
        name = host.split(":", 1)[0]
    else:
        name = host  # a bare name, or a bare IPv6 address
    return name.lower() == "localhost" or is_loopback(name)


class AdminService:
    def __init__(
        self,
        repository: Repository,
        cache: ModelCache,
        router: Router,
        settings: Settings,
        executor: Executor,  # file I/O: rescans, uploads, the routing file
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._router = router
        self._settings = settings
        self._token = settings.admin_token
        self._executor = executor
        self._store = RoutingStore(settings.state_dir)
        self._store_lock = asyncio.Lock()  # routing writes, in order
        self._locks: dict[str, _Held] = {}  # one change of a model at a time

    def authorize(
        self,
        address: str | None,
        authorization: str | None,
        host: str | None = None,
        origin: str | None = None,
    ) -> None:
        authorize(self._token, address, authorization, host, origin)

    async def restore(self) -> list[ModelId]:
        """Routing and pins as the last run left them (server start), and a sweep of its
        staging leftovers started; returns the pinned versions, for the caller to load."""
        loop = asyncio.get_running_loop()
        # in the background: it lists every model directory (~17 us each), and it never
        # takes what an upload is writing now (far younger than its minimum age)
        sweeping = loop.run_in_executor(self._executor, sweep, self._repository.root)
        sweeping.add_done_callback(_swept)
        routes = await loop.run_in_executor(self._executor, self._store.load)
        pinned = []
        for name, routing in routes.items():
            self._router.set_routing(name, routing)
            for version in routing.pinned:
                self._cache.pin(ModelId(name, version))
                pinned.append(ModelId(name, version))
        if routes:
            log.info("routing restored for %d models from %s", len(routes), self._store.path)
        return pinned

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

    @to_completion
    async def load(self, name: str, parameters: Collection[str] = (), who: str = "") -> None:
        """Load (or reload, when loaded) every servable version of a model.

        Rescans first, so a directory added since is found. Triton's load parameters
        ("config" override, "file:..." contents) are refused: models come from the
        repository on disk only. A failed load raises Unavailable with the reason (the
        version then reports it in the index); a model larger than the memory budget
        raises ResourceExhausted. Once every version is loaded, versions that left the
        version policy are unloaded (drained); a failed load leaves them serving. Puts
        every version of the model back in service after an unload.
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
            self._cache.reinstate(name)
            servable = self._router.servable(name)  # the policy's, plus routed versions
            ids = [ModelId(name, v) for v in servable]
            results = await asyncio.gather(
                *(self._cache.load(i, reload=True) for i in ids), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            stale = [
                model_id
                for model_id, (state, _) in self._cache.states().items()
                if model_id.name == name and model_id.version not in servable
                and state in ACTIVE
            ]  # fmt: skip
            await self._unload(stale, out_of_service=False)
        audit(who or "unknown", "repository load", name, None)

    @to_completion
    async def unload(self, name: str, who: str = "") -> None:
        """Take a model out of service (Triton's unload): every version it has, loaded
        or not, drains (its requests finish) and is refused until the model or the
        version is loaded again. Idempotent. Unknown model: NotFound. Whatever its
        routing: the routing stays and applies again once the model is loaded.
        """
        check_model_name(name)
        async with self._exclusive(name):
            entry = self._known(name)
            ids = {ModelId(name, v) for v in entry.versions}
            ids.update(i for i in self._cache.states() if i.name == name)
            await self._unload(sorted(ids))
            if not any(
                i.name == name and s in ACTIVE for i, (s, _) in self._cache.states().items()
            ):
                self._repository.forget(name)  # only if the last rescan did not list it
        audit(who or "unknown", "repository unload", name, None)

    async def _unload(self, ids: list[ModelId], *, out_of_service: bool = True) -> None:
        """Drain and free versions; `out_of_service`: until loaded again (else they load
        again on first use: a version that left the policy, a deleted one)."""
        unloads = (self._cache.unload(i, out_of_service=out_of_service) for i in ids)
        for result in await asyncio.gather(*unloads, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    # -- the admin API ---------------------------------------------------------------

    async def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every model (or one): its versions with state, servable, pinned; its routing."""
        if name is not None:
            check_model_name(name)
        await self.rescan(read_all=name is None, fresh=(name,) if name else ())
        names = [name] if name is not None else list(self._repository.names)
        states = self._cache.states()
        out = []
        for model in names:
            entry = self._known(model)
            servable = set(self._router.servable(model)) if entry.config else set()
            seen = {i.version: st for i, st in states.items() if i.name == model}
            versions = []
            for version in sorted(set(entry.versions) | set(seen)):
                state, reason = seen.get(version, (ModelState.UNLOADED, NOT_LOADED))
                versions.append({
                    "version": str(version),
                    "state": INDEX_STATE[state],
                    "reason": reason or (NOT_LOADED if state is ModelState.UNLOADED else ""),
                    "servable": version in servable,
                    "pinned": self._cache.pinned(ModelId(model, version)),
                })  # fmt: skip
            doc = {"name": model, "versions": versions,
                   "routing": self._router.routing(model).to_json()}  # fmt: skip
            if entry.config is None:
                doc["error"] = entry.error
            out.append(doc)
        return out

    async def upload(
        self, name: str, version: str, body: AsyncIterator[bytes], who: str,
        config: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Add a version atomically, with the model's config.pbtxt when `config` is given.

        The file is staged in a hidden directory (for a new model, the whole model
        directory), fsynced, trial-loaded with the config it will serve with (a file
        that does not load or does not match the config is refused), then renamed into
        place. A refused upload leaves the repository as it was, a crash a hidden
        leftover at worst; an existing version is never overwritten. A model whose
        config.pbtxt on disk is broken takes a new version only with a new config.
        """
        check_model_name(name)
        number = _version_number(version)
        model_id = ModelId(name, number)
        new_config = None if config is None else self._parse_config(name, config)
        async with self._exclusive(name):
            await self.rescan(fresh=(name,))
            entry = self._repository.entry(name) if name in self._repository.names else None
            if entry is not None and number in entry.versions:
                raise AlreadyExists(f"model {name!r} already has version {number}")
            if entry is not None and entry.config is None and new_config is None:
                raise InvalidArgument(
                    f"{entry.error} (send a corrected config.pbtxt with the upload)"
                )
            serving = new_config or (entry.config if entry else None) or ModelConfig(name)
            model_dir = self._repository.root / name
            staging = upload_dir(model_dir, number, new_model=entry is None)
            if entry is None:  # a new model: staged whole, published by one rename
                target, version_dir = model_dir, staging / str(number)
            else:
                target, version_dir = model_dir / str(number), staging
            path = version_dir / serving.default_model_filename
            loop = asyncio.get_running_loop()
            try:
                size = await self._receive(body, path)
                try:
                    await self._cache.trial(model_id, serving, path)
                except LoadError as exc:
                    raise InvalidArgument(
                        f"the uploaded file is not a loadable model: {exc}"
                    ) from None
                await loop.run_in_executor(
                    self._executor, install, staging, target, version_dir, config
                )
            finally:
                await loop.run_in_executor(self._executor, shutil.rmtree, staging, True)
            await self.rescan(fresh=(name,))
        audit(
            who,
            "upload",
            name,
            number,
            f"{size} bytes" + (" and config" if config is not None else ""),
        )
        return {"name": name, "version": str(number), "bytes": size}

    async def _receive(self, body: AsyncIterator[bytes], path: Path) -> int:
        limit, size = self._settings.max_upload_size, 0
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, lambda: path.parent.mkdir(parents=True))
        f = await loop.run_in_executor(self._executor, open, path, "wb")
        try:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise InvalidArgument(f"model file exceeds the upload limit of {limit} bytes")
                await loop.run_in_executor(self._executor, f.write, chunk)
            if size == 0:
                raise InvalidArgument("empty model file")
            await loop.run_in_executor(self._executor, flush_file, f)
        finally:
            await loop.run_in_executor(self._executor, f.close)
        return size

    @staticmethod
    def _parse_config(name: str, text: str) -> ModelConfig:
        """The one check of an uploaded config.pbtxt: InvalidArgument naming the problem."""
        if len(text) > MAX_CONFIG_CHARS:
            raise InvalidArgument(f"config.pbtxt is limited to {MAX_CONFIG_CHARS} characters")
        return parse_model_config(text, name)

    @to_completion
    async def put_config(self, name: str, text: str, who: str) -> None:
        """Replace a model's config.pbtxt atomically after checking it parses. Loaded
        versions keep the config they loaded with until they are loaded again."""
        check_model_name(name)
        self._parse_config(name, text)
        path = self._repository.root / name / CONFIG_FILENAME
        async with self._exclusive(name):
            await self.rescan(fresh=(name,))
            if name not in self._repository.names:
                raise NotFound(
                    f"unknown model {name!r}: upload its first version with its config "
                    "(one request), so that no model without a version appears"
                )
            await asyncio.get_running_loop().run_in_executor(
                self._executor, write_atomically, path, text.encode()
            )
            await self.rescan(fresh=(name,))
        audit(who, "config", name, None, f"{len(text)} chars")

    @to_completion
    async def version_action(self, name: str, version: str, action: str, who: str) -> None:
        """load (or reload) | unload (drained) | pin (and load) | unpin one version."""
        check_model_name(name)
        number = _version_number(version)
        if action not in VERSION_ACTIONS:
            actions = ", ".join(VERSION_ACTIONS)
            raise NotFound(f"no admin action {action[:40]!r} (actions: {actions})")
        model_id = ModelId(name, number)
        async with self._exclusive(name):
            await self.rescan(fresh=(name,))
            entry = self._known(name)
            if number not in entry.versions and action != "unpin":
                raise NotFound(f"model {name!r} has no version {number} on disk")
            if action == "load":
                await self._cache.load(model_id, reload=True)
            elif action == "unload":
                self._unrouted(name, number, "unloading")
                await self._unload([model_id])
            else:
                routing = self._router.routing(name)
                pins = routing.pinned | {number} if action == "pin" else routing.pinned - {number}
                await self._save_routing(name, routing.with_pins(frozenset(pins)))
                self._cache.pin(model_id, action == "pin")
                if action == "pin":
                    await self._cache.load(model_id, reload=False)
        audit(who, action, name, number)

    @to_completion
    async def delete(self, name: str, version: str, who: str) -> None:
        """Remove a version from disk after draining it; refused while routing names it."""
        check_model_name(name)
        number = _version_number(version)
        async with self._exclusive(name):
            entry = self._known(name)
            if number not in entry.versions:
                raise NotFound(f"model {name!r} has no version {number} on disk")
            self._unrouted(name, number, "deleting")
            # disappear first (new requests go elsewhere, nothing reloads it), then drain:
            # the requests already on it finish there
            gone = deleted_dir(entry.path, number)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, retire, entry.path / str(number), gone)
            await self.rescan(fresh=(name,))
            await self._unload([ModelId(name, number)], out_of_service=False)
        audit(who, "delete", name, number)

    def get_routing(self, name: str) -> tuple[dict[str, Any], str]:
        """A model's routing in its JSON form, and its ETag."""
        check_model_name(name)
        self._known(name)
        routing = self._router.routing(name)
        return routing.to_json(), routing.etag

    @to_completion
    async def put_routing(
        self, name: str, doc: Any, who: str, expected: str | None = None
    ) -> tuple[dict[str, Any], str]:
        """Replace a model's routing (aliases, weights, shadow); pins are kept. With
        `expected` (an If-Match header), only if the routing's ETag is still one it names."""
        check_model_name(name)
        async with self._exclusive(name):
            await self.rescan(fresh=(name,))
            entry = self._known(name)
            current = self._router.routing(name)
            if expected is not None and not if_match(expected, current.etag):
                raise FailedPrecondition(
                    f"the routing of {name!r} changed since it was read (ETag now "
                    f"{current.etag}, If-Match {expected[:100]}): read it again"
                )
            routing = parse_routing(doc, current.pinned)
            missing = sorted((routing.versions - routing.pinned) - set(entry.versions))
            if missing:
                raise InvalidArgument(
                    f"model {name!r} has no version {', '.join(map(str, missing))} on disk "
                    f"(versions: {', '.join(map(str, entry.versions)) or 'none'})"
                )
            await self._save_routing(name, routing)
        audit(who, "route", name, None, json.dumps(routing.to_json(), sort_keys=True))
        return routing.to_json(), routing.etag

    async def _save_routing(self, name: str, routing: Routing) -> None:
        """Persist first, then apply: what serves is always what a restart would restore."""
        async with self._store_lock:
            routes = self._router.routes()
            routes[name] = routing
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._store.save, routes
            )
            self._router.set_routing(name, routing)

    def _unrouted(self, name: str, number: int, doing: str) -> None:
        """AlreadyExists while routing names the version: a split, shadow or alias must
        never point at a version taken out of service."""
        if number in self._router.routing(name).versions:
            raise AlreadyExists(
                f"version {number} of {name!r} is named by its routing (alias, weight, "
                f"shadow or pin): route traffic away from it before {doing} it"
            )

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


def audit(who: str, action: str, name: str, version: int | None, detail: str = "") -> None:
    """One line per admin change: who (peer address), what, when (the log's time)."""
    target = name if version is None else f"{name}:{version}"
    _audit.info("admin %s %s by %s%s", action, target, who, f" ({detail})" if detail else "")


def _swept(future: asyncio.Future[list[Path]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("sweeping staging leftovers failed", exc_info=future.exception())


def _version_number(text: str) -> int:
    number = parse_version(text)
    if number is None or number < 1:
        raise InvalidArgument(f"invalid version {text[:40]!r}: a positive integer")
    return number


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
