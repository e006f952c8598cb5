"""The gRPC edge against what clients should not send: messages that do not parse, calls
with odd arguments, HTTP/2 abuse, and a stop while a slow client reads a large answer.

Every request a client can send ends in the matching status with a message naming the
problem, never INTERNAL or UNKNOWN; a fault of the server's own is INTERNAL, logged with
the request id the client is told, and its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.protos import health_pb2
from fleetserve.server.grpc_api import REPOSITORY, UNSUPPORTED, GrpcApi
from tests.helpers import mlp_input, ort_run

SERVICE = "/inference.GRPCInferenceService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# every method that takes a request, with its message type
UNARY = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
         "ModelConfig", "ModelStatistics", "ModelInfer", *REPOSITORY)  # fmt: skip
PARSED = {
    **{SERVICE + name: getattr(pb, f"{name}Request") for name in UNARY},
    HEALTH_CHECK: health_pb2.HealthCheckRequest,
}
NOT_PROTOBUF = b"\xff\xff\xff\xff"  # a field number 0 with a truncated varint


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as ch:
        yield ch


def raw_call(channel: grpc.Channel, path: str, body: bytes) -> grpc.RpcError:
    """Send `body` as the request message, unserialized; the error the server answers."""
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(path)(body, timeout=30)
    return info.value


def mlp_request(x: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="INPUT0", datatype="FP32", shape=list(x.shape)
    )
    return pb.ModelInferRequest(
        model_name="mlp", model_version="2", id=request_id, inputs=[tensor],
        raw_input_contents=[x.tobytes()],
    )  # fmt: skip


# -- messages that do not parse -------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PARSED))
def test_message_that_does_not_parse_is_invalid_argument_naming_the_message(
    channel: grpc.Channel, path: str
) -> None:
    error = raw_call(channel, path, NOT_PROTOBUF)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    name = PARSED[path].DESCRIPTOR.name
    assert error.details() == f"the request is not a valid {name} message"


# the first string field of each message that has one
STRING_FIELD = {
    path: strings[0].number
    for path, request_type in PARSED.items()
    if (strings := [f for f in request_type.DESCRIPTOR.fields if f.type == f.TYPE_STRING])
}


@pytest.mark.parametrize("path", sorted(STRING_FIELD))
def test_string_field_that_is_not_utf8_is_invalid_argument(
    channel: grpc.Channel, path: str
) -> None:
    request_type = PARSED[path]
    body = bytes([STRING_FIELD[path] << 3 | 2, 1, 0xFF])  # length 1, one byte not UTF-8
    error = raw_call(channel, path, body)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"the request is not a valid {request_type.DESCRIPTOR.name} message"


@pytest.mark.parametrize("method", UNSUPPORTED)
def test_unsupported_method_is_unimplemented_whatever_the_message(
    channel: grpc.Channel, method: str
) -> None:
    error = raw_call(channel, SERVICE + method, NOT_PROTOBUF)
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED


def test_stream_answers_a_message_that_does_not_parse_and_serves_the_next(
    channel: grpc.Channel, repo: Any
) -> None:
    x = mlp_input(2)
    stream = channel.stream_stream(
        SERVICE + "ModelStreamInfer", response_deserializer=pb.ModelStreamInferResponse.FromString
    )
    bodies = [NOT_PROTOBUF, mlp_request(x, "after").SerializeToString()]
    first, second = list(stream(iter(bodies), timeout=30))
    assert first.error_message == "the request is not a valid ModelInferRequest message"
    assert second.error_message == ""
    assert second.infer_response.id == "after"
    output = np.frombuffer(second.infer_response.raw_output_contents[0], np.float32)
    expected = ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    np.testing.assert_array_equal(output.reshape(expected.shape), expected)


def test_a_valid_request_succeeds_after_the_bad_ones(channel: grpc.Channel, repo: Any) -> None:
    x = mlp_input(1)
    for path in PARSED:
        raw_call(channel, path, NOT_PROTOBUF)
    infer = channel.unary_unary(
        SERVICE + "ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    response = infer(mlp_request(x), timeout=30)
    output = np.frombuffer(response.raw_output_contents[0], np.float32)
    expected = ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    np.testing.assert_array_equal(output.reshape(expected.shape), expected)


# -- a fault of the server's own ------------------------------------------------------


class FaultyMetadata(GrpcApi):
    """The real edge with one method broken, as a bug in the server would break it."""

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        raise RuntimeError("the server's own bug")


@pytest.mark.asyncio
async def test_server_fault_is_internal_with_a_request_id_logged_with_its_traceback(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers(FaultyMetadata(server.app.service).handlers())
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                SERVICE + "ServerMetadata",
                request_serializer=pb.ServerMetadataRequest.SerializeToString,
            )
            with (
                caplog.at_level(logging.ERROR, logger="fleetserve.request"),
                pytest.raises(grpc.aio.AioRpcError) as info,
            ):
                await call(pb.ServerMetadataRequest(), timeout=30)
    finally:
        await grpc_server.stop(None)
    assert info.value.code() is grpc.StatusCode.INTERNAL
    details = info.value.details() or ""
    assert details.startswith("internal server error (request id ")
    request_id = details.removeprefix("internal server error (request id ").removesuffix(")")
    [record] = [r for r in caplog.records if r.name == "fleetserve.request"]
    assert record.levelno == logging.ERROR
    assert record.request_id == request_id  # type: ignore[attr-defined]
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "the server's own bug"
