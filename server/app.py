"""Composition root and lifecycle: the only place that builds concrete objects.

Start order: pools, core, listeners (live at once, ready once startup loads finish),
then the repository poll when asked for. Stop order is the reverse, each step bounded
by the shutdown timeout: stop polling, stop accepting, let in-flight requests finish,
unload models, shut the pools down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from aiohttp import web

from fleetserve import __version__
from fleetserve.loaders.registry import warm_up_all
from fleetserve.server.admin import AdminService
from fleetserve.server.cache import ModelCache
from fleetserve.server.errors import ServerError
from fleetserve.server.event_loop import describe
from fleetserve.server.feedback import FeedbackLog
from fleetserve.server.grpc_api import GrpcApi, server_options
from fleetserve.server.grpc_drain import drain
from fleetserve.server.inference import InferenceService
from fleetserve.server.metrics import Metrics
from fleetserve.server.repository import Repository
from fleetserve.server.rest_api import RestApi, metrics_app
from fleetserve.server.router import Router
from fleetserve.server.settings import Settings
from fleetserve.server.sinks import SINKS
from fleetserve.server.types import ModelId

log = logging.getLogger(__name__)


class CannotListen(Exception):
    """A listener could not have its port (in use, or not allowed)."""


async def measure_thread_hop_us(pool: ThreadPoolExecutor, samples: int = 200) -> float:
    """Median microseconds of a round trip to `pool` and back: the price of running off-loop."""
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        await loop.run_in_executor(pool, int)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


class App:
    """One fleetserve server: REST, gRPC and metrics listeners over one core."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.metrics_max_models)
        self.repository = Repository(settings)
        self.router = Router(self.repository)
        self.load_pool = ThreadPoolExecutor(settings.load_threads, thread_name_prefix="load")
        self.run_pool = ThreadPoolExecutor(settings.run_threads, thread_name_prefix="run")
        # repository rescans (directory listings, config reads): one at a time, in order,
        # and never queued behind a slow model load
        self.repository_pool = ThreadPoolExecutor(1, thread_name_prefix="repository")
        self.cache: ModelCache | None = None
        self.service: InferenceService | None = None
        self.admin: AdminService | None = None
        self.feedback: FeedbackLog | None = None
        self._poll: asyncio.Task[None] | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._runners: list[web.BaseRunner] = []
        self._grpc: grpc.aio.Server | None = None
        self._grpc_api: GrpcApi | None = None

    async def start(self) -> None:
        s = self.settings
        loop, loop_version = describe(asyncio.get_running_loop())
        log.info("fleetserve %s on event loop %s %s", __version__, loop, loop_version)
        self.metrics.build_info(__version__, loop, loop_version)
        inline_us = s.inline_run_us
        if inline_us is None:
            inline_us = await measure_thread_hop_us(self.run_pool)
        log.info("thread hop %.1fus: models faster than that run on the event loop", inline_us)
        self.cache = cache = ModelCache(self.repository, s, self.metrics, self.load_pool, inline_us)
        self.metrics.count_from(
            "fleetserve_model_cache_hits", "Requests whose model was loaded", lambda: cache.hits
        )
        self.metrics.count_from(
            "fleetserve_model_cache_misses",
            "Requests that waited for their model to load (cold starts)",
            lambda: cache.misses,
        )
        self.feedback = self._start_feedback()
        self.service = InferenceService(
            self.repository, self.router, self.cache, self.metrics, self.run_pool, inline_us,
            max_shadows=max(1, s.run_threads - 1), feedback=self.feedback,
            max_pending=s.max_queue_size,
        )  # fmt: skip
        self.metrics.queue_depths(self.service.queue_depths)
        self.metrics.triton.watch(cache.loaded)
        self.admin = AdminService(self.repository, self.cache, self.router, s, self.repository_pool)
        # runtimes' one-time start-up, so it is not counted as the first model's size
        await asyncio.get_running_loop().run_in_executor(self.load_pool, warm_up_all)
        names = self.repository.scan()
        pinned = await self.admin.restore()
        log.info("model repository %s: %d models", s.model_repository, len(names))

        timeout = s.shutdown_timeout
        rest = RestApi(
            self.service, s.max_request_size, self.admin, s.max_upload_size, s.access_log,
            s.http_body_timeout,
        )  # fmt: skip
        listener = rest.server(s.http_header_timeout, s.http_keepalive_timeout, access_log=None)
        rest_runner = web.ServerRunner(listener, shutdown_timeout=timeout)
        self.http_port = await self._serve_http(rest_runner, s.http_port, "REST")
        if s.metrics_port >= 0:
            metrics_runner = web.AppRunner(
                metrics_app(self.metrics.render), access_log=None, shutdown_timeout=timeout
            )
            self.metrics_port = await self._serve_http(metrics_runner, s.metrics_port, "metrics")
        if s.grpc_port >= 0:
            self._grpc = grpc.aio.server(
                options=server_options(s.max_request_size, s.grpc_max_concurrent_streams)
            )
            self._grpc_api = GrpcApi(self.service, self.admin, s.access_log)
            self._grpc.add_generic_rpc_handlers(self._grpc_api.handlers())
            if s.grpc_port:  # grpc's own bind error is vague and logged by grpc-core: ask first
                self._bind(s.grpc_port, "gRPC").close()
            try:
                self.grpc_port = self._grpc.add_insecure_port(f"{_host(s.host)}:{s.grpc_port}")
            except RuntimeError as exc:
                raise CannotListen(f"gRPC on {s.host}:{s.grpc_port}: {exc}") from None
            await self._grpc.start()

        # pinned versions are kept loaded, across restarts too; --preload loads the rest
        await self._load(pinned + (self._servable_ids(names) if s.preload else []))
        if s.repository_poll_secs > 0:
            self._poll = asyncio.create_task(self.admin.poll(s.repository_poll_secs))
        self.service.ready = True
        log.info(
            "fleetserve ready: http %s:%d grpc %s:%d metrics %s:%d",
            s.host, self.http_port, s.host, self.grpc_port, s.host, self.metrics_port,
        )  # fmt: skip

    async def _serve_http(self, runner: web.BaseRunner, port: int, what: str) -> int:
        await runner.setup()
        self._runners.append(runner)
        sock = self._bind(port, what)
        site = web.SockSite(runner, sock, backlog=1024)
        await site.start()
        return sock.getsockname()[1]

    def _bind(self, port: int, what: str) -> socket.socket:
        host = self.settings.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise CannotListen(f"{what} port {port} on {host}: {exc.strerror}") from None
        return sock

    def _servable_ids(self, names: list[str]) -> list[ModelId]:
        """Every version a request may reach: within the policy, or routed."""
        ids = []
        for name in names:
            entry = self.repository.entry(name)
            if entry.config is None:
                log.error("model %s: %s", name, entry.error)
                continue
            ids += [ModelId(name, v) for v in self.router.servable(name)]
        return ids

    async def _load(self, ids: list[ModelId]) -> None:
        """Load versions at startup; a failure leaves the others serving."""
        assert self.cache is not None
        ids = list(dict.fromkeys(ids))
        results = await asyncio.gather(*(self.cache.load(i) for i in ids), return_exceptions=True)
        for model_id, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, ServerError):
                log.error("model %s: unexpected load error", model_id, exc_info=result)

    def _start_feedback(self) -> FeedbackLog | None:
        """The feedback log, or None when it is off."""
        s = self.settings
        if s.feedback_sink == "none":
            return None
        sink = SINKS[s.feedback_sink]
        log_ = FeedbackLog(
            lambda: sink(s.state_dir, s.feedback_fsync), self.metrics, s.feedback_buffer,
            s.feedback_flush_secs, s.feedback_when_full == "block", s.feedback_retention,
            s.feedback_max_size,
        )  # fmt: skip
        log_.start()
        return log_

    async def stop(self) -> None:
        """Graceful stop: refuse new work, finish in-flight requests, free everything."""
        timeout = self.settings.shutdown_timeout
        if self.service is not None:
            self.service.ready = False
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        tasks = [runner.cleanup() for runner in self._runners]
        if self._grpc is not None:
            tasks.append(self._stop_grpc(timeout))
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.service is not None:
            await self.service.close()  # shadow copies still running
        if self.feedback is not None:
            await self.feedback.close(timeout)  # everything buffered is written
        if self.cache is not None:
            await self.cache.close()
        self.run_pool.shutdown(wait=True, cancel_futures=True)
        self.load_pool.shutdown(wait=True, cancel_futures=True)
        self.repository_pool.shutdown(wait=True, cancel_futures=True)
        log.info("fleetserve stopped")

    async def _stop_grpc(self, timeout: float) -> None:
        """Answer what is in flight and deliver it, then let grpc close (grpc_drain.py)."""
        assert self._grpc is not None and self._grpc_api is not None
        deadline = time.monotonic() + timeout
        await drain(self._grpc_api, self.grpc_port, deadline)
        await self._grpc.stop(grace=max(0.0, deadline - time.monotonic()))


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
