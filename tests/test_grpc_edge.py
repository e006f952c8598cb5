"""The gRPC edge against what clients should not send: messages that do not parse, calls
with odd arguments, HTTP/2 abuse, and a stop while a slow client reads a large answer.

Every request a client can send ends in the matching status with a message naming the
problem, never INTERNAL or UNKNOWN; a fault of the server's own is INTERNAL, logged with
the request id the client is told, and its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from fleetserve.loaders import testing
from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.protos import health_pb2
from fleetserve.server.grpc_api import REPOSITORY, UNSUPPORTED, GrpcApi
from fleetserve.server.grpc_drain import connections
from tests.helpers import mlp_input, ort_run
from tests.http2_raw import (
    CANCEL,
    CONTINUATION,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    HEADERS,
    MAX_CONCURRENT_STREAMS,
    PING,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    RawConnection,
    frame,
    grpc_headers,
)
from tests.server_process import Server

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


# -- odd arguments: a status naming the problem, never INTERNAL or UNKNOWN -------------

ODD_NAMES = ["", "x" * 100_000, "../../etc/passwd", "a/b", "\x00", "mlp\x00", " mlp", "MLP",
             ".", "..", "é", "%2e%2e", "a" * 300]  # fmt: skip
ODD_VERSIONS = ["", "0", "-1", "abc", "99999999999999999999999", "1.0", " 1", "+1", "01",
                "\x00", "x" * 100_000, "٣", "1e3", "latest"]  # fmt: skip
P = pb.InferParameter
ODD_PARAMETERS = [P(bool_param=True), P(int64_param=-5), P(int64_param=2**63 - 1),
                  P(string_param="x"), P(string_param=""), P(double_param=float("nan")),
                  P(double_param=-1e300), P(uint64_param=2**64 - 1), P()]  # fmt: skip
PARAMETER_KEYS = ["timeout", "priority", "sequence_id", "sequence_start", "binary_data",
                  "binary_data_size", "classification", "routing_key", "binary_data_output",
                  "shared_memory_region", "headers", "unknown"]  # fmt: skip


def odd_requests() -> Iterator[tuple[str, Any]]:
    """Requests with odd names, versions and parameters for every RPC that takes them."""
    for name in ODD_NAMES:
        for version in ODD_VERSIONS:
            for method in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"):
                yield method, getattr(pb, f"{method}Request")(name=name, version=version)
            request = mlp_request(mlp_input(1))
            request.model_name, request.model_version = name or "mlp", version
            yield "ModelInfer", request
        yield "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name)
        yield "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name)
    for key in PARAMETER_KEYS:
        for value in ODD_PARAMETERS:
            request = mlp_request(mlp_input(1))
            request.parameters[key].CopyFrom(value)
            request.inputs[0].parameters[key].CopyFrom(value)
            request.outputs.add(name="OUTPUT0").parameters[key].CopyFrom(value)
            yield "ModelInfer", request
            load = pb.RepositoryModelLoadRequest(model_name="no_such_model")
            load.parameters[key].string_param = "x"
            yield "RepositoryModelLoad", load
    for value in (pb.ModelRepositoryParameter(bool_param=True),
                  pb.ModelRepositoryParameter(string_param="{"),
                  pb.ModelRepositoryParameter(bytes_param=b"\xff"),
                  pb.ModelRepositoryParameter()):  # fmt: skip
        for key in ("config", "file:1/model.onnx", "file:"):
            load = pb.RepositoryModelLoadRequest(model_name="mlp")
            load.parameters[key].CopyFrom(value)
            yield "RepositoryModelLoad", load
    yield "RepositoryIndex", pb.RepositoryIndexRequest(repository_name="elsewhere")


def test_odd_arguments_to_every_rpc_are_answered_by_a_status_naming_the_problem(
    server: Any,
) -> None:
    unlimited = [("grpc.max_send_message_length", -1)]
    offenders = []
    with grpc.insecure_channel(server.grpc, options=unlimited) as channel:
        for method, request in odd_requests():
            call = channel.unary_unary(
                SERVICE + method, request_serializer=type(request).SerializeToString
            )
            try:
                call(request, timeout=30)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    offenders.append((method, str(request)[:120], exc.code(), exc.details()))
    assert offenders == []


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


# -- HTTP/2 abuse ---------------------------------------------------------------------
# A real server process (its memory is read from /proc) on a tiny model; while raw
# connections abuse HTTP/2, a tritonclient client keeps asking and must keep getting
# correct answers within a bound, and the server's resident memory must stay bounded.

ABUSE_S = 3  # seconds each abuse runs
# connections abusing at once: fewer than 1000 / --grpc-max-concurrent-streams, past
# which grpc-core's server-wide queue of calls waiting for the application (1000 soft)
# starts refusing calls at random, an honest client's too (docs/architecture.md)
ABUSERS = 3
ANSWER_BOUND_S = 5  # the slowest answer the honest client may get meanwhile
RSS_BOUND = 48 << 20  # growth of the server's resident memory while abused
INFER = SERVICE + "ModelInfer"


@pytest.fixture(scope="module")
def abused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    repo = tmp_path_factory.mktemp("abuse_models")
    testing.write_model(repo, "mlp", testing.mlp(seed=1))
    with Server(
        "--model-repository", str(repo), "--http-port", "0", "--grpc-port", "0",
        "--metrics-port", "-1", "--preload",
    ) as server:  # fmt: skip
        _, grpc_port, _ = server.wait_ready()
        yield server, grpc_port


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class HonestClient(threading.Thread):
    """tritonclient asking `mlp` again and again: the latency of each answer, and errors."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        x = mlp_input(1)
        self.input = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        self.input.set_data_from_numpy(x)
        self.expected = self.client.infer("mlp", [self.input]).as_numpy("OUTPUT0")
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                result = self.client.infer("mlp", [self.input], client_timeout=2 * ANSWER_BOUND_S)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), self.expected)
                self.latencies.append(time.monotonic() - started)
            except Exception as exc:
                self.errors.append(str(exc))
            time.sleep(0.01)

    def stop(self) -> None:
        self.done.set()
        self.join(4 * ANSWER_BOUND_S)
        self.client.close()


def abuse(port: int, burst: Callable[[RawConnection], bytes]) -> list[RawConnection]:
    """ABUSERS connections sending `burst(connection)` for ABUSE_S; one the server closes
    is replaced. Returns them all, their counts of what the server sent back."""
    live = [RawConnection(port) for _ in range(ABUSERS)]
    every = list(live)
    deadline = time.monotonic() + ABUSE_S
    while time.monotonic() < deadline:
        for i, connection in enumerate(live):
            if not connection.send(burst(connection)):
                connection.close()
                live[i] = RawConnection(port)
                every.append(live[i])
    for connection in live:
        connection.close()
    return every


def run_abuse(
    abused: tuple[Server, int], burst: Callable[[RawConnection], bytes]
) -> list[RawConnection]:
    """Abuse the server while an honest client asks; check the client and the memory."""
    server, port = abused
    honest = HonestClient(port)
    before = rss(server.proc.pid)
    peak = before
    honest.start()
    try:
        connections = abuse(port, burst)
        peak = max(peak, rss(server.proc.pid))
        time.sleep(0.5)  # answers to the last requests sent while abused
    finally:
        honest.stop()
    assert honest.errors == []
    assert len(honest.latencies) >= ABUSE_S, "the honest client was starved"
    assert max(honest.latencies) < ANSWER_BOUND_S
    assert peak - before < RSS_BOUND, f"resident memory grew {(peak - before) >> 20} MiB"
    return connections


def total(connections: list[RawConnection], counter: str, key: int) -> int:
    return sum(getattr(c, counter)[key] for c in connections)


def test_server_advertises_its_stream_limit(server: Any) -> None:
    with RawConnection(server.app.grpc_port) as connection:
        deadline = time.monotonic() + 10
        while MAX_CONCURRENT_STREAMS not in connection.settings and time.monotonic() < deadline:
            time.sleep(0.01)
    limit = server.app.settings.grpc_max_concurrent_streams
    assert connection.settings[MAX_CONCURRENT_STREAMS] == limit == 256  # the default


def test_rapid_reset_leaves_other_clients_served(abused: tuple[Server, int]) -> None:
    """CVE-2023-44487: HEADERS then RST_STREAM in a loop, 100 streams a burst."""
    _, port = abused

    def burst(connection: RawConnection) -> bytes:
        frames = b""
        for _ in range(100):
            stream = connection.new_stream()
            frames += frame(HEADERS, END_HEADERS, stream, grpc_headers(port, INFER))
            frames += frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big"))
        return frames

    connections = run_abuse(abused, burst)
    # reset streams count until their calls are freed: the excess is refused at once
    assert total(connections, "rst_codes", REFUSED_STREAM) > 0


def test_more_streams_than_allowed_are_refused_and_others_served(
    abused: tuple[Server, int],
) -> None:
    """Streams opened and never finished, far past the advertised limit."""
    _, port = abused

    def burst(connection: RawConnection) -> bytes:
        return b"".join(
            frame(HEADERS, END_HEADERS, connection.new_stream(), grpc_headers(port, INFER))
            for _ in range(100)
        )

    connections = run_abuse(abused, burst)
    assert total(connections, "rst_codes", REFUSED_STREAM) > 0


def test_huge_header_lists_are_refused_and_others_served(abused: tuple[Server, int]) -> None:
    """1 MiB header lists (64 values of 16 KiB, in CONTINUATION frames), past the 16 KiB
    limit grpc-core advertises."""
    _, port = abused
    block = grpc_headers(port, INFER, [("x-big", "a" * 16000)] * 64)
    chunks = [block[i : i + 16000] for i in range(0, len(block), 16000)]

    def burst(connection: RawConnection) -> bytes:
        stream = connection.new_stream()
        frames = frame(HEADERS, 0, stream, chunks[0])
        for i, chunk in enumerate(chunks[1:], 2):
            frames += frame(CONTINUATION, END_HEADERS if i == len(chunks) else 0, stream, chunk)
        return frames

    connections = run_abuse(abused, burst)
    assert sum(c.received[HEADERS] + c.received[RST_STREAM] for c in connections) > 0


def test_ping_flood_is_sent_away_and_others_served(abused: tuple[Server, int]) -> None:
    connections = run_abuse(abused, lambda _: frame(PING, 0, 0, b"12345678") * 200)
    # grpc-core's keepalive enforcement: GOAWAY ENHANCE_YOUR_CALM "too_many_pings"
    goaways = [goaway for c in connections for goaway in c.goaway]
    assert (ENHANCE_YOUR_CALM, b"too_many_pings") in goaways


def test_settings_flood_leaves_other_clients_served(abused: tuple[Server, int]) -> None:
    initial_window = (4).to_bytes(2, "big") + (65535).to_bytes(4, "big")
    connections = run_abuse(abused, lambda _: frame(SETTINGS, 0, 0, initial_window) * 200)
    assert sum(c.received[SETTINGS] for c in connections) > len(connections)  # acks


# -- graceful stop while a slow client reads a large answer ----------------------------

ANSWER_MIB = 16
READ_BYTES_PER_S = 4 << 20  # the client reads the 16 MiB answer in about 4 s


class SlowProxy:
    """A TCP proxy that passes the server's bytes on at READ_BYTES_PER_S: a client on a
    slow link. Its small receive buffer leaves the rest of the answer in the server's
    kernel, as a slow network would."""

    def __init__(self, upstream: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream = upstream
        self.passed = 0  # bytes of the server's passed to the client
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.socket()
                server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
                server.connect(("127.0.0.1", self.upstream))
                threading.Thread(target=self._pipe, args=(client, server, 0), daemon=True).start()
                threading.Thread(
                    target=self._pipe, args=(server, client, READ_BYTES_PER_S), daemon=True
                ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, rate: int) -> None:
        try:
            while data := source.recv(16 << 10):
                sink.sendall(data)
                if rate:
                    self.passed += len(data)
                    time.sleep(len(data) / rate)
        except OSError as exc:
            self.errors.append(repr(exc))
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_sigterm_while_a_slow_client_reads_a_large_answer_delivers_all_of_it(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "models"
    testing.write_model(
        repo, "identity", testing.identity("FP32", (-1, 1024)), config="max_batch_size: 0\n"
    )
    x = np.arange(ANSWER_MIB << 18, dtype=np.float32).reshape(-1, 1024)
    with Server(
        "--model-repository", str(repo), "--http-port", "0", "--grpc-port", "0",
        "--metrics-port", "-1", "--max-request-size", "64MiB", "--shutdown-timeout", "30",
    ) as server:  # fmt: skip
        _, grpc_port, _ = server.wait_ready()
        proxy = SlowProxy(grpc_port)
        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{proxy.port}", channel_args=unlimited)
        tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.infer, "identity", [tensor], client_timeout=60)
            deadline = time.monotonic() + 30
            while proxy.passed < 1 << 20:  # the answer is on its way
                assert time.monotonic() < deadline and not answer.done(), answer
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            output = answer.result(timeout=60).as_numpy("OUTPUT0")
        assert server.wait(60) == 0
        client.close()
        proxy.close()
    np.testing.assert_array_equal(output, x)
    assert proxy.passed > ANSWER_MIB << 20
    assert "fleetserve stopped" in "\n".join(server.lines)


def test_finding_the_grpc_connections_leaves_no_descriptor_behind() -> None:
    """The drain duplicates every descriptor to find the connections; the others (pipes,
    grpc-core's own) must be closed again, or grpc-core would find them still open."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            read_end, write_end = os.pipe()
            try:
                before = len(os.listdir("/dev/fd"))
                found = connections(port)
                assert [sock.getpeername() for sock in found] == [client.getsockname()]
                for sock in found:
                    sock.close()
                assert len(os.listdir("/dev/fd")) == before
            finally:
                os.close(read_end)
                os.close(write_end)
                accepted.close()
