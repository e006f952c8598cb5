"""gRPC edge: inference.GRPCInferenceService and grpc.health.v1.Health on grpc.aio.

The services are registered under their wire names by hand (generic handlers), so
our generated messages can live in their own proto package (fleetserve.*) and be
imported next to tritonclient's. Every method gets its request as bytes and parses it
itself (`parse`), so a message that does not parse is INVALID_ARGUMENT rather than
grpc's UNKNOWN "Unexpected <DecodeError>"; one wrapper (`unary`) maps every
ServerError to a status and logs anything else as INTERNAL, with a request id.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.protos import health_pb2
from fleetserve.protos import model_config_pb2 as mc
from fleetserve.server import logs
from fleetserve.server.admin import AdminService
from fleetserve.server.errors import (
    ErrorKind,
    Internal,
    InvalidArgument,
    NotFound,
    ServerError,
    Unavailable,
)
from fleetserve.server.inference import InferenceService
from fleetserve.server.proto_codec import decode_infer, encode_infer, from_json

PROTOCOL = "grpc"
SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"

STATUS = {
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

Rpc = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def parse(raw: bytes | None, request_type: Any) -> Any:
    """The request message, parsed from the bytes grpc received; InvalidArgument if it
    does not parse (malformed protobuf, a string field that is not UTF-8, nesting past
    protobuf's depth limit) or a unary call carried no message at all."""
    name = request_type.DESCRIPTOR.name
    if raw is None:
        raise InvalidArgument(f"the call carried no {name} message")
    try:
        return request_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"the request is not a valid {name} message") from None


def internal_error(exc: Exception, request_id: str) -> Internal:
    """The INTERNAL answer to an unexpected exception: its message carries the request id
    the server's log line has, so a client's report leads to the traceback."""
    error = Internal(f"internal server error (request id {request_id})")
    error.__cause__ = exc
    return error


def server_options(max_request_size: int, max_concurrent_streams: int) -> list[tuple[str, int]]:
    """grpc-core's channel arguments for our server (docs/architecture.md, HTTP/2 abuse).

    grpc-core advertises no stream limit by default, so one connection could open streams
    without end, each a call for the event loop, and a client resetting them at once
    ("Rapid Reset") never hits a limit. With a limit, its overload protection counts a
    stream until its call is freed, reset or not, and refuses the rest in C before they
    cost Python anything. Its other defaults already fit: PING floods get a GOAWAY
    (keepalive enforcement: at most 2 pings per 5 minutes without data), header lists
    past 16 KiB are refused per stream, pending calls are bounded (1000 soft, 3000 hard).
    """
    return [
        ("grpc.max_receive_message_length", max_request_size),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
    ]


def peer_address(peer: str) -> str | None:
    """The IP address in a grpc peer string: "ipv4:127.0.0.1:5000" -> "127.0.0.1",
    "ipv6:[::1]:5000" (or its %-encoded form) -> "::1"; None for anything else."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6" and rest.startswith("[") and "]" in rest:
        return rest[1 : rest.index("]")] or None
    return None


class GrpcApi:
    def __init__(
        self,
        service: InferenceService,
        admin: AdminService | None = None,  # None: the repository RPCs answer UNIMPLEMENTED
        access_log: bool = False,
    ) -> None:
        self._service = service
        self._admin = admin
        self._access_log = access_log
        self.in_flight = 0  # calls (and stream messages) being answered: grpc_drain waits
        self.draining = False  # stopping: new inference answers UNAVAILABLE

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._service.ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        # an unknown model is simply not ready (as Triton answers over gRPC)
        return pb.ModelReadyResponse(
            ready=self._service.model_ready(request.name, request.version or None)
        )

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self._service.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        doc = await self._service.model_metadata(request.name, request.version or None)
        return from_json(doc, pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        doc = await self._service.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=from_json(doc, mc.ModelConfig()))

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        doc = self._service.model_statistics(request.name, request.version or None)
        return from_json(doc, pb.ModelStatisticsResponse())

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def _infer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        try:
            if self.draining:
                raise Unavailable("the server is shutting down")
            try:
                req = decode_infer(request)
            except ServerError as exc:
                self._service.reject(PROTOCOL, exc, started)
                raise
            remaining = context.time_remaining()  # None without a client deadline
            deadline = None if remaining is None else time.monotonic() + remaining
            response = encode_infer(await self._service.infer(req, PROTOCOL, started, deadline))
        except ServerError as exc:
            self._failed(exc, request, started, request.id or self._service.new_request_id())
            raise
        except asyncio.CancelledError:  # the client's deadline passed, or it went away
            if self._access_log:
                logs.access(PROTOCOL, request.id or "-", request.model_name,
                            request.model_version, "CANCELLED", started)  # fmt: skip
            raise
        except Exception as exc:
            request_id = request.id or self._service.new_request_id()
            error = internal_error(exc, request_id)
            self._failed(error, request, started, request_id)
            raise error from exc
        if self._access_log:  # off by default: then this test is all the hot path pays
            response.id = response.id or self._service.new_request_id()
            logs.access(PROTOCOL, response.id, response.model_name, response.model_version,
                        "OK", started)  # fmt: skip
        return response

    def _failed(self, exc: ServerError, request: Any, started: float, request_id: str) -> None:
        """Log a failed infer request with its id."""
        status = STATUS[exc.kind].name
        logs.failed(PROTOCOL, request_id, status, exc)
        if self._access_log:
            logs.access(PROTOCOL, request_id, request.model_name, request.model_version,
                        status, started)  # fmt: skip

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; an error answers that request only."""
        async for raw in requests:
            request_id = ""
            self.in_flight += 1
            try:
                request = parse(raw, pb.ModelInferRequest)
                request_id = request.id
                response = await self._infer(request, context)
                yield pb.ModelStreamInferResponse(infer_response=response)
            except ServerError as exc:
                yield pb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=pb.ModelInferResponse(id=request_id),
                )
            except Exception as exc:  # not from _infer, which answers ServerErrors only
                request_id = request_id or self._service.new_request_id()
                error = internal_error(exc, request_id)
                logs.failed(PROTOCOL, request_id, grpc.StatusCode.INTERNAL.name, error)
                yield pb.ModelStreamInferResponse(
                    error_message=error.message,
                    infer_response=pb.ModelInferResponse(id=request_id),
                )
            finally:
                self.in_flight -= 1

    # -- model repository extension (repository control: loopback-only for now) --------

    def _authorize(self, request: Any, context: Any) -> AdminService:
        assert self._admin is not None
        metadata = dict(context.invocation_metadata() or ())
        self._admin.authorize(peer_address(context.peer()), metadata.get("authorization"))
        if request.repository_name:
            raise InvalidArgument(
                "fleetserve serves one model repository: leave repository_name empty"
            )
        return self._admin

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        rows = await self._authorize(request, context).index(request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**row) for row in rows])

    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        admin = self._authorize(request, context)
        await admin.load(request.model_name, request.parameters, context.peer())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        # "unload_dependents" is accepted and ignored: there are no ensembles
        await self._authorize(request, context).unload(request.model_name, context.peer())
        return pb.RepositoryModelUnloadResponse()

    async def unimplemented(self, request: bytes | None, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, UNIMPLEMENTED)

    async def HealthCheck(self, request: Any, context: Any) -> health_pb2.HealthCheckResponse:
        status = health_pb2.HealthCheckResponse
        if request.service not in ("", SERVICE):
            raise NotFound(f"unknown service {request.service!r}")
        return status(status=status.SERVING if self._service.ready else status.NOT_SERVING)

    def _unary(self, fn: Rpc, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
        """A unary method: parse the request, call `fn`, map every error to its status."""

        async def handler(raw: bytes | None, context: grpc.aio.ServicerContext) -> Any:
            self.in_flight += 1
            try:
                return await fn(parse(raw, request_type), context)
            except ServerError as exc:
                await context.abort(STATUS[exc.kind], exc.message)
            except Exception as exc:
                request_id = self._service.new_request_id()
                error = internal_error(exc, request_id)
                logs.failed(PROTOCOL, request_id, grpc.StatusCode.INTERNAL.name, error)
                await context.abort(grpc.StatusCode.INTERNAL, error.message)
            finally:
                self.in_flight -= 1

        return grpc.unary_unary_rpc_method_handler(
            handler, response_serializer=response_type.SerializeToString
        )

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """Both services, under their wire names."""
        method = self._unary
        methods = {
            "ServerLive": method(self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": method(self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": method(self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": method(
                self.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": method(
                self.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelConfig": method(self.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": method(
                self.ModelStatistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse
            ),
            "ModelInfer": method(self.ModelInfer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer,
                response_serializer=pb.ModelStreamInferResponse.SerializeToString,
            ),
        }
        if self._admin is not None:
            for name in REPOSITORY:
                request_type = getattr(pb, f"{name}Request")
                response_type = getattr(pb, f"{name}Response")
                methods[name] = method(getattr(self, name), request_type, response_type)
        for name in UNSUPPORTED + (() if self._admin is not None else REPOSITORY):
            # whatever the request holds: these methods are not there to parse it
            methods[name] = grpc.unary_unary_rpc_method_handler(self.unimplemented)
        health = {
            "Check": method(
                self.HealthCheck, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
            )
        }
        return [
            grpc.method_handlers_generic_handler(SERVICE, methods),
            grpc.method_handlers_generic_handler(HEALTH_SERVICE, health),
        ]


UNIMPLEMENTED = "this extension is not supported by fleetserve"
REPOSITORY = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
UNSUPPORTED = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)
