"""REST edge: aiohttp routes of the Open Inference Protocol and Triton's extensions.

Handlers only translate: HTTP -> json_codec -> InferenceService -> json_codec -> HTTP.
Errors are mapped to statuses in one table. No middleware: the infer route is the hot
path and each handler already catches what it must.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from server.errors import ErrorKind, Internal, InvalidArgument, ServerError
from server.inference import InferenceService
from server.json_codec import decode_request, encode_response, error_body
from server.types import InferRequest

log = logging.getLogger(__name__)

PROTOCOL = "rest"
HEADER_LENGTH = "Inference-Header-Content-Length"

STATUS = {
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.RESOURCE_EXHAUSTED: 507,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.UNIMPLEMENTED: 501,
    ErrorKind.INTERNAL: 500,
}
JSON = "application/json"

Handler = Callable[["RestApi", web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: ServerError) -> web.Response:
    headers = None
    if exc.kind is ErrorKind.UNAVAILABLE:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))}
    return web.Response(
        status=STATUS[exc.kind], body=error_body(exc.message), content_type=JSON, headers=headers
    )


def endpoint(fn: Handler) -> Handler:
    """Turn ServerError into the protocol's {"error": ...}; anything else into a 500."""

    @functools.wraps(fn)
    async def wrapper(self: RestApi, request: web.Request) -> web.StreamResponse:
        try:
            return await fn(self, request)
        except ServerError as exc:
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge as exc:
            return error_response(InvalidArgument(f"request body too large: {exc.text}"))
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(Internal("internal server error"))

    return wrapper


def json_response(doc: object) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type=JSON)


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


class RestApi:
    def __init__(self, service: InferenceService, max_request_bytes: int) -> None:
        self._service = service
        self._max_bytes = max_request_bytes

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_bytes)
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        app.router.add_post(model + "/infer", self.infer)
        app.router.add_post(versioned + "/infer", self.infer)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/", self.server_metadata)
        app.router.add_get("/v2/models/stats", self.statistics)
        for base in (model, versioned):
            app.router.add_get(base, self.model_metadata)
            app.router.add_get(base + "/ready", self.model_ready)
            app.router.add_get(base + "/config", self.model_config)
            app.router.add_get(base + "/stats", self.statistics)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        return app

    async def infer(self, request: web.Request) -> web.Response:
        """The hot path: no decorator layer, errors handled here."""
        started = time.perf_counter()
        try:
            req = await self._decode(request)
        except ServerError as exc:
            self._service.reject(PROTOCOL, exc, started)
            return error_response(exc)
        try:
            resp = await self._service.infer(req, PROTOCOL, started)
            payload, header_length = encode_response(
                resp, binary_default=req.parameters.get("binary_data_output") is True
            )
        except ServerError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unhandled error in infer")
            return error_response(Internal("internal server error"))
        if header_length is None:
            return web.Response(body=payload, content_type=JSON)
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )

    async def _decode(self, request: web.Request) -> InferRequest:
        length = request.content_length
        if length is not None and length > self._max_bytes:
            raise InvalidArgument(
                f"request body of {length} bytes exceeds the limit of {self._max_bytes}"
            )
        header = request.headers.get(HEADER_LENGTH)
        if header is not None and not (header.isascii() and header.isdigit()):
            raise InvalidArgument(f"{HEADER_LENGTH} must be a non-negative integer")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise InvalidArgument(
                f"request body exceeds the limit of {self._max_bytes} bytes"
            ) from None
        match = request.match_info
        return decode_request(
            body, int(header) if header else None, match["name"], match.get("version")
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._service.ready else 400)

    @endpoint
    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(self._service.server_metadata())

    @endpoint
    async def model_metadata(self, request: web.Request) -> web.Response:
        return json_response(
            self._service.model_metadata(request.match_info["name"], _version(request))
        )

    @endpoint
    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._service.check_model(name)
        return web.Response(
            status=200 if self._service.model_ready(name, _version(request)) else 400
        )

    @endpoint
    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(
            self._service.model_config(request.match_info["name"], _version(request))
        )

    @endpoint
    async def statistics(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        return json_response(self._service.model_statistics(name, _version(request)))

    @endpoint
    async def not_found(self, request: web.Request) -> web.Response:
        return web.Response(
            status=404,
            body=error_body(f"no route {request.method} {request.path}"),
            content_type=JSON,
        )


def metrics_app(render: Callable[[], bytes]) -> web.Application:
    """The Prometheus scrape endpoint, on its own port as Triton does."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
