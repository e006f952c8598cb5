"""REST edge: the Open Inference Protocol and Triton's extensions over aiohttp.

Handlers only translate: HTTP -> json_codec -> InferenceService -> json_codec -> HTTP.
Errors become statuses through one table.

It runs on aiohttp's low-level `web.Server` with the small router below instead of a
`web.Application`: the application layer (router objects, match info, middleware
chain, full Request objects) measured about 10 us of CPU per request on the 2-core
dev machine, a fifth of a small model's whole request. The routes are few and fixed.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import BodyPartReader, web

from fleetserve.server import http_body, logs
from fleetserve.server.admin import AdminService
from fleetserve.server.errors import ErrorKind, Internal, InvalidArgument, NotFound, ServerError
from fleetserve.server.http_connection import Listener
from fleetserve.server.inference import InferenceService
from fleetserve.server.json_codec import (
    decode_feedback,
    decode_request,
    encode_response,
    error_body,
    json_object,
)
from fleetserve.server.types import InferRequest

PROTOCOL = "rest"
HEADER_LENGTH = "Inference-Header-Content-Length"
ROUTING_KEY_HEADER = "X-Routing-Key"
REQUEST_ID_HEADER = "X-Request-Id"
JSON = "application/json"

STATUS = {
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.FAILED_PRECONDITION: 412,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.RESOURCE_EXHAUSTED: 507,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.UNIMPLEMENTED: 501,
    ErrorKind.INTERNAL: 500,
}

# /v2/models/{name}[/versions/{version}][/{action}]; no action = model metadata
MODEL_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>[a-z]+))?"
)

# /v2/admin/models[/{name}[/versions/{version}][/{action}]] (the admin API)
ADMIN_PATH = re.compile(
    r"/v2/admin/models(?:/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>[a-z]+))?)?"
)

# /v2/repository/models/{name}/{load|unload} (Triton's model repository extension)
REPOSITORY_PATH = re.compile(r"/v2/repository/models/(?P<name>[^/]+)/(?P<action>[a-z]+)")

Handler = Callable[..., Awaitable[web.StreamResponse]]
T = TypeVar("T")


def error_response(exc: ServerError) -> web.Response:
    status, headers = STATUS[exc.kind], None
    if exc.kind is ErrorKind.UNAVAILABLE:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))}
    elif exc.kind is ErrorKind.UNAUTHENTICATED:
        headers = {"WWW-Authenticate": 'Bearer realm="fleetserve admin"'}
    elif isinstance(exc, http_body.Refused):
        status, headers = exc.status, exc.headers
    return web.Response(status=status, body=error_body(exc.message), content_type=JSON,
                        headers=headers)  # fmt: skip


def header(request: web.BaseRequest, name: str) -> str | None:
    """A request header as text: aiohttp keeps bytes that are not UTF-8 as surrogates,
    which nothing downstream can encode, so they are the client's error, named here."""
    value = request.headers.get(name)
    if value is None or value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"header {name} is not valid UTF-8") from None
    return value


def endpoint(fn: Handler) -> Handler:
    """Turn ServerError into the protocol's {"error": ...} (anything else is dispatch's)."""

    @functools.wraps(fn)
    async def wrapper(
        self: RestApi, request: web.BaseRequest, *args: str | None
    ) -> web.StreamResponse:
        try:
            return await fn(self, request, *args)
        except ServerError as exc:
            return self._error(request, exc)

    return wrapper


def json_response(doc: object) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type=JSON)


def routing_response(routing: tuple[dict[str, Any], str]) -> web.Response:
    """A routing with its ETag, for a read-modify-write with If-Match."""
    doc, etag = routing
    return web.Response(body=orjson.dumps(doc), content_type=JSON, headers={"ETag": etag})


class RestApi:
    def __init__(
        self,
        service: InferenceService,
        max_request_bytes: int,
        admin: AdminService | None = None,  # None: no repository or admin routes
        max_upload_bytes: int = 0,
        access_log: bool = False,
        body_timeout: float = 60,
    ) -> None:
        self._service = service
        self._access_log = access_log
        self._admin = admin
        self._max_bytes = max_request_bytes
        self._max_upload = max_upload_bytes
        self._body_timeout = body_timeout
        # (method, path) -> handler, for the paths without parameters
        self._fixed: dict[tuple[str, str], Handler] = {
            ("GET", "/v2/health/live"): self.live,
            ("GET", "/v2/health/ready"): self.ready,
            ("GET", "/v2"): self.server_metadata,
            ("GET", "/v2/"): self.server_metadata,
            ("GET", "/v2/models/stats"): self.statistics,
        }
        # (method, action) -> handler, for /v2/models/{name}[/versions/{version}][/{action}]
        self._model: dict[tuple[str, str | None], Handler] = {
            ("POST", "infer"): self.infer,
            ("GET", None): self.model_metadata,
            ("GET", "ready"): self.model_ready,
            ("GET", "config"): self.model_config,
            ("GET", "stats"): self.statistics,
            ("POST", "feedback"): self.feedback,
        }
        # (method, action) -> handler, for /v2/repository/models/{name}/{action}
        self._repository: dict[tuple[str, str], Handler] = {}
        if admin is not None:
            self._fixed[("POST", "/v2/repository/index")] = self.repository_index
            self._repository = {
                ("POST", "load"): self.repository_load,
                ("POST", "unload"): self.repository_unload,
            }

    def server(self, header_timeout: float, keepalive_timeout: float, **kwargs: Any) -> Listener:
        """The low-level aiohttp server for these routes (kwargs go to aiohttp)."""
        max_bytes = self._max_bytes

        def make_request(message, payload, protocol, writer, task):  # type: ignore[no-untyped-def]
            return web.BaseRequest(
                message, payload, protocol, writer, task, task.get_loop(), client_max_size=max_bytes
            )

        # handler_cancellation: a client that disconnects cancels its request (and takes
        # it out of a batching queue). auto_decompress=False: http_body decodes, bounded,
        # with statuses of its own.
        return Listener(
            self.dispatch, request_factory=make_request, handler_cancellation=True,
            header_timeout=header_timeout, keepalive_timeout=keepalive_timeout,
            auto_decompress=False, **kwargs,
        )  # fmt: skip

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route a request; whatever escapes a handler is the server's fault: a logged 500."""
        method, path = request.method, request.path
        try:
            match = MODEL_PATH.fullmatch(path)
            if match is not None and path != "/v2/models/stats":
                handler = self._model.get((method, match["action"]))
                if handler is not None:
                    return await handler(request, match["name"], match["version"])
            else:
                handler = self._fixed.get((method, path))
                if handler is not None:
                    return await handler(request, None, None)
                match = REPOSITORY_PATH.fullmatch(path)
                if match is not None:
                    handler = self._repository.get((method, match["action"]))
                    if handler is not None:
                        return await handler(request, match["name"], None)
                match = ADMIN_PATH.fullmatch(path)
                if match is not None and self._admin is not None:
                    name, version, action = match["name"], match["version"], match["action"]
                    return await self.admin(request, name, version, action)
        except Exception as exc:
            error = Internal("internal server error")
            error.__cause__ = exc
            return self._error(request, error)
        return web.Response(
            status=404, body=error_body(f"no route {method} {path[:200]}"), content_type=JSON
        )

    async def infer(self, request: web.BaseRequest, name: str, version: str | None) -> web.Response:
        """The hot path: no decorator layer, errors handled here."""
        started = time.perf_counter()
        try:
            req = await self._decode(request, name, version)
        except ServerError as exc:
            self._service.reject(PROTOCOL, exc, started)
            return self._failed(request, exc, "", name, version, started)
        try:
            resp = await self._service.infer(req, PROTOCOL, started)
            payload, header_length = encode_response(
                resp, binary_default=req.parameters.get("binary_data_output") is True
            )
        except ServerError as exc:
            return self._failed(request, exc, req.id, name, version, started)
        except asyncio.CancelledError:  # the client went away (nginx would say 499)
            if self._access_log:
                logs.access(PROTOCOL, req.id or "-", name, version or "", 499, started)
            raise
        except Exception as exc:
            error = Internal("internal server error")
            error.__cause__ = exc
            return self._failed(request, error, req.id, name, version, started)
        request_id = resp.id
        if self._access_log:  # off by default: then this test is all the hot path pays
            request_id = request_id or self._service.new_request_id()
            logs.access(PROTOCOL, request_id, resp.model_name, resp.model_version, 200, started)
        headers = {REQUEST_ID_HEADER: request_id} if request_id else None
        if header_length is None:
            return web.Response(body=payload, content_type=JSON, headers=headers)
        headers = headers or {}
        headers[HEADER_LENGTH] = str(header_length)
        return web.Response(body=payload, content_type="application/octet-stream", headers=headers)

    def _failed(
        self,
        request: web.BaseRequest,
        exc: ServerError,
        request_id: str,
        name: str,
        version: str | None,
        started: float,
    ) -> web.Response:
        """The answer to a failed infer request, which carries (and is logged with) its id."""
        response = self._error(request, exc, request_id)
        if self._access_log:
            request_id = response.headers[REQUEST_ID_HEADER]
            logs.access(PROTOCOL, request_id, name, version or "", response.status, started)
        return response

    def _error(
        self, request: web.BaseRequest, exc: ServerError, request_id: str = ""
    ) -> web.Response:
        """A failed request's answer, carrying the request id it is logged with (a 500 at
        ERROR with its traceback)."""
        response = error_response(exc)
        request_id = request_id or self._service.new_request_id()
        response.headers[REQUEST_ID_HEADER] = request_id
        logs.failed(PROTOCOL, request_id, response.status, exc)
        if isinstance(exc, http_body.Refused) and exc.close:
            response.force_close()
        return response

    async def _decode(
        self, request: web.BaseRequest, name: str, version: str | None
    ) -> InferRequest:
        length = request.headers.get(HEADER_LENGTH)
        if length is not None and not (length.isascii() and length.isdigit()):
            raise InvalidArgument(f"{HEADER_LENGTH} must be a non-negative integer")
        body = await self._read(request)
        req = decode_request(body, int(length) if length else None, name, version)
        key = header(request, ROUTING_KEY_HEADER)
        if key is not None:  # the header form of the "routing_key" parameter
            req.parameters.setdefault("routing_key", key)
        return req

    async def live(self, request: web.BaseRequest, *_: str | None) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.BaseRequest, *_: str | None) -> web.Response:
        return web.Response(status=200 if self._service.ready else 400)

    @endpoint
    async def server_metadata(self, request: web.BaseRequest, *_: str | None) -> web.Response:
        return json_response(self._service.server_metadata())

    @endpoint
    async def model_metadata(
        self, request: web.BaseRequest, name: str, version: str | None
    ) -> web.Response:
        return json_response(await self._service.model_metadata(name, version))

    @endpoint
    async def model_ready(
        self, request: web.BaseRequest, name: str, version: str | None
    ) -> web.Response:
        self._service.check_model(name)
        return web.Response(status=200 if self._service.model_ready(name, version) else 400)

    @endpoint
    async def model_config(
        self, request: web.BaseRequest, name: str, version: str | None
    ) -> web.Response:
        return json_response(await self._service.model_config(name, version))

    @endpoint
    async def feedback(
        self, request: web.BaseRequest, name: str, version: str | None
    ) -> web.Response:
        """Ground truth for an earlier prediction, by its request id."""
        record = decode_feedback(await self._read(request), name)
        self._service.post_feedback(record)
        return json_response({"id": record.request_id})

    @endpoint
    async def statistics(
        self, request: web.BaseRequest, name: str | None, version: str | None
    ) -> web.Response:
        return json_response(self._service.model_statistics(name or "", version))

    # -- model repository extension (the admin API's access rule) ---------------------

    @endpoint
    async def repository_index(self, request: web.BaseRequest, *_: str | None) -> web.Response:
        self._authorize(request)
        ready = (await self._json_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument('"ready" must be a boolean')
        return json_response(await self._admin.index(ready))  # type: ignore[union-attr]

    @endpoint
    async def repository_load(
        self, request: web.BaseRequest, name: str, *_: str | None
    ) -> web.Response:
        self._authorize(request)
        parameters = (await self._json_body(request)).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument('"parameters" must be an object')
        admin = self._admin
        assert admin is not None
        await admin.load(name, parameters.keys(), request.remote or "")
        return web.Response(status=200)

    @endpoint
    async def repository_unload(
        self, request: web.BaseRequest, name: str, *_: str | None
    ) -> web.Response:
        # {"parameters": {"unload_dependents": bool}} is accepted and ignored: no ensembles
        self._authorize(request)
        await self._json_body(request)
        admin = self._admin
        assert admin is not None
        await admin.unload(name, request.remote or "")
        return web.Response(status=200)

    # -- the admin API (bearer token, or loopback-only without one) ---------------------

    def _authorize(self, request: web.BaseRequest) -> None:
        self._admin.authorize(  # type: ignore[union-attr]
            request.remote, header(request, "Authorization"), header(request, "Host") or "",
            header(request, "Origin"),
        )  # fmt: skip

    @endpoint
    async def admin(
        self, request: web.BaseRequest, name: str | None, version: str | None, action: str | None
    ) -> web.Response:
        """One handler for /v2/admin/...: authorize, then dispatch on method and shape."""
        self._authorize(request)
        admin, method = self._admin, request.method
        assert admin is not None
        who = request.remote or "unknown"
        if name is None or (version is None and action is None):
            if method != "GET":
                raise NotFound(f"no route {method} {request.path[:200]}")
            models = await admin.status(name)
            return json_response({"models": models} if name is None else models[0])
        if version is None:
            if action == "routing" and method == "GET":
                return routing_response(admin.get_routing(name))
            if action == "routing" and method == "PUT":
                doc = await self._json_body(request)
                expected = header(request, "If-Match")
                return routing_response(await admin.put_routing(name, doc, who, expected))
            if action == "config" and method == "PUT":
                text = await self._text_body(request)
                await admin.put_config(name, text, who)
                return json_response({"name": name})
        elif action is None and method == "PUT":
            http_body.check_length(request, self._max_upload, "model file", "upload limit")
            http_body.identity_only(request, "a model upload")
            header(request, "Content-Type")  # multipart reads its boundary from it
            await http_body.proceed(request)
            config, model = None, http_body.stream(request, self._body_timeout, 1 << 20)
            if request.content_type == "multipart/form-data":
                config, model = await self._upload_parts(request)
            doc = await admin.upload(name, version, model, who, config)
            return web.Response(status=201, body=orjson.dumps(doc), content_type=JSON)
        elif action is None and method == "DELETE":
            await admin.delete(name, version, who)
            return json_response({})
        elif action is not None and method == "POST":
            await admin.version_action(name, version, action, who)
            return json_response({})
        raise NotFound(f"no route {method} {request.path[:200]}")

    async def _read(self, request: web.BaseRequest) -> bytes:
        """The whole body, decoded and bounded (http_body)."""
        return await http_body.read(request, self._max_bytes, self._body_timeout)

    async def _upload_parts(
        self, request: web.BaseRequest
    ) -> tuple[str | None, AsyncIterator[bytes]]:
        """A multipart upload: an optional "config" part (config.pbtxt, bounded like any
        body), then the "model" part, streamed."""
        timeout = self._body_timeout

        async def step(read: Awaitable[T]) -> T:
            try:
                return await http_body.within(timeout, read)
            except ValueError as exc:  # aiohttp's word for a malformed multipart body
                raise InvalidArgument(f"malformed multipart body: {exc}") from None

        reader = await step(request.multipart())
        part = await step(reader.next())
        config = None
        if isinstance(part, BodyPartReader) and part.name == "config":
            raw = bytearray()
            while chunk := await step(part.read_chunk()):
                raw += chunk
                if len(raw) > self._max_bytes:
                    raise http_body.too_large(self._max_bytes, "config part")
            try:
                config = raw.decode()
            except UnicodeDecodeError:
                raise InvalidArgument("the config part must be UTF-8 text") from None
            part = await step(reader.next())
        if not isinstance(part, BodyPartReader) or part.name != "model":
            raise InvalidArgument(
                'a multipart upload holds a "model" part, after an optional "config" part'
            )
        model = part

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await step(model.read_chunk(1 << 20)):
                yield chunk
            if await step(reader.next()) is not None:
                raise InvalidArgument('nothing may follow the "model" part')

        return config, chunks()

    async def _text_body(self, request: web.BaseRequest) -> str:
        try:
            return (await self._read(request)).decode()
        except UnicodeDecodeError:
            raise InvalidArgument("the body must be UTF-8 text") from None

    async def _json_body(self, request: web.BaseRequest) -> dict:
        """The request's JSON object; {} for an empty body."""
        body = await self._read(request)
        return json_object(body, "the request body") if body.strip() else {}


def metrics_app(render: Callable[[], bytes]) -> web.Application:
    """The Prometheus scrape endpoint, on its own port as Triton does."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
