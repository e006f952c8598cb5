"""Sending fuzz cases to a real server, and judging each answer.

A judgement is a `Verdict`: the outcome (for counts), and a problem when the answer
breaks the rule of issue 12: every request a client can send ends in a 4xx or the
matching gRPC status with a message naming the problem; never a 5xx (but 503 / 504,
which name a state of the server), INTERNAL or UNKNOWN; no server paths or numpy
reprs in messages; and a successful answer is well formed. A problem that matches a
defect the issue already lists carries its item number (`KNOWN`), so a run can tell
known from new.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import grpc
import numpy as np

from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.server.types import DTYPES
from tests.fuzz_cases import ADMIN_TOKEN, ROUTING
from tests.fuzz_grpc_cases import grpc_garbage, grpc_requests
from tests.fuzz_rest_cases import (
    HttpCase,
    binary_bodies,
    feedback_bodies,
    json_bodies,
    raw_requests,
)

TIMEOUT_S = 20.0  # for one answer: far above any the server gives

# issue 12's list, by item: the defects fixed in other branches
KNOWN = {
    1: "shapes numpy cannot build are 500 / INTERNAL",
    2: "a Content-Encoding that does not decode is 500",
    3: "header bytes that are not UTF-8 are 500",
    6: "duplicate requested outputs are answered twice",
    7: "messages expose server paths or numpy reprs",
    8: "an undecodable gRPC message is UNKNOWN",
    10: "NaN outputs are null in JSON; metadata nested past the encoder's depth is 500",
}
NUMPY_REPR = re.compile(r"\bnp\.[a-z_]+[0-9]*\(")


class KnownDefect(Exception):
    """The fuzzers met only defects issue 12 already lists (`KNOWN`)."""


@dataclass
class Verdict:
    outcome: str  # what happened, e.g. "http 400", "grpc INVALID_ARGUMENT"
    problem: str = ""  # empty: the answer keeps the rules
    item: int | None = None  # issue 12's item, when the problem is a known one


# -- HTTP ---------------------------------------------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def send_http(port: int, case: HttpCase, timeout: float = TIMEOUT_S) -> list[HttpReply] | None:
    """The replies to `case` on a new connection (None: no end of answer within `timeout`)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server answered and closed before all was sent
            sock.sendall(case.wire())
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                return None
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return parse_replies(bytes(data), head=case.method == b"HEAD")


def parse_replies(data: bytes, head: bool = False) -> list[HttpReply]:
    """HTTP/1.1 responses, one after another (a pipelined body may get its own)."""
    replies = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            raise ValueError(f"a response without the end of its headers: {data[:200]!r}")
        status_line, *lines = data[:end].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        data = data[end + 4 :]
        if 100 <= status < 200:
            continue
        if (head and data[:5] in (b"", b"HTTP/")) or status in (204, 304):
            body = b""  # (aiohttp's answer to an unparsable HEAD request has a body)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, data = _dechunk(data)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, data = data[:length], data[length:]
        else:
            body, data = data, b""
        replies.append(HttpReply(status, headers, body))
    return replies


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = bytearray()
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return bytes(body), data.partition(b"\r\n")[2]
        body += data[:size]
        data = data[size + 2 :]


def judge_http(
    case: HttpCase, replies: list[HttpReply] | None, secrets: Sequence[str]
) -> list[Verdict]:
    """Each reply to `case`; `secrets` are strings no message may show (server paths)."""
    if replies is None:
        return [Verdict("no answer", f"no answer within {TIMEOUT_S:.0f} s")]
    if not replies:
        return [Verdict("closed", "the connection closed without an answer")]
    return [_judge_reply(case, reply, secrets) for reply in replies]


def _judge_reply(case: HttpCase, reply: HttpReply, secrets: Sequence[str]) -> Verdict:
    outcome = f"http {reply.status}"
    if case.method == b"HEAD" and reply.status < 500:
        return Verdict(outcome)  # no body to judge
    json_body = reply.headers.get("content-type", "").startswith("application/json")
    if reply.status >= 500 and reply.status not in (503, 504):
        return Verdict(outcome, f"status {reply.status}: {reply.body[:200]!r}",
                       _known_5xx(case))  # fmt: skip
    if reply.status == 400 and case.target.endswith(b"/ready") and not reply.body:
        return Verdict(outcome)  # readiness: 200 or 400, no body (the protocol's answer)
    if reply.status >= 400:
        if not json_body:
            # aiohttp's own answer to an unparsable request (text/plain): it names the problem
            if reply.status in (400, 405, 413, 417, 431) and reply.body:
                return Verdict(outcome)
            return Verdict(outcome, f"a {reply.status} that is not JSON: {reply.body[:200]!r}")
        try:
            message = json.loads(reply.body)["error"]
            assert isinstance(message, str) and message
        except (ValueError, KeyError, TypeError, AssertionError):
            return Verdict(outcome, f"not a JSON error naming the problem: {reply.body[:200]!r}")
        return _judge_message(outcome, message, secrets)
    if reply.status == 200 and case.target.endswith(b"/infer") and case.method == b"POST":
        return _judge_infer_response(outcome, reply)
    return Verdict(outcome)


def _judge_message(outcome: str, message: str, secrets: Sequence[str]) -> Verdict:
    if any(s in message for s in secrets) or NUMPY_REPR.search(message):
        return Verdict(outcome, f"message shows server internals: {message[:300]!r}", 7)
    return Verdict(outcome)


def _judge_infer_response(outcome: str, reply: HttpReply) -> Verdict:
    """A 200 to an infer request: outputs named once each, with their data."""
    length = reply.headers.get("inference-header-content-length")
    header = reply.body[: int(length)] if length else reply.body
    try:
        doc = json.loads(header)
        outputs = doc["outputs"]
        names = [o["name"] for o in outputs]
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict(outcome, f"a malformed infer response ({exc}): {reply.body[:200]!r}")
    if len(set(names)) != len(names):
        return Verdict(outcome, f"outputs named twice: {names}", 6)
    binary = 0
    for o in outputs:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is not None:
            binary += size
        elif len(o["data"]) != prod(o["shape"]):
            return Verdict(outcome, f"output {o['name']!r}: data does not fill its shape")
        elif o["datatype"] != "BYTES" and any(v is None for v in o["data"]):
            return Verdict(outcome, f"output {o['name']!r} holds null", 10)
    if len(reply.body) - len(header) != binary:
        return Verdict(outcome, "binary outputs do not add up to the body")
    return Verdict(outcome)


def _known_5xx(case: HttpCase) -> int | None:
    """Which of issue 12's items a 5xx to `case` is, if any."""
    for name, value in case.headers:
        lowered = name.lower()
        if lowered == b"content-encoding" and value.lower() not in (b"", b"identity"):
            return 2
        if lowered in (b"x-routing-key", b"authorization") and not _utf8(value):
            return 3
    doc = case.doc
    if isinstance(doc, dict):
        tensors = [*_list(doc.get("inputs")), *_list(doc.get("truth"))]
        if any(isinstance(t, dict) and cannot_build(t.get("shape"), t.get("datatype"))
               for t in tensors):  # fmt: skip
            return 1
        if case.target.endswith(b"/feedback") and depth(doc.get("metadata")) > 250:
            return 10
    return None


def cannot_build(shape: Any, datatype: Any) -> bool:
    """True for a shape numpy has no array for: over 64 dimensions, or no elements but
    other dimensions whose product passes the largest array size (issue 12 item 1)."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return False
    itemsize = DTYPES[datatype].itemsize if datatype in DTYPES else 1
    return len(shape) > 64 or (0 in shape and prod(d for d in shape if d) * itemsize >= 2**63)


def depth(value: Any) -> int:
    """How deeply lists and objects nest in a JSON value (iteratively: it may be deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            stack.extend((child, level + 1) for child in (
                item.values() if isinstance(item, dict) else item))  # fmt: skip
            deepest = max(deepest, level + 1)
    return deepest


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


# -- gRPC ---------------------------------------------------------------------------------

SERVICE = "/inference.GRPCInferenceService/"


def call_grpc(
    channel: grpc.Channel, path: str, payload: bytes
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """(status, details, response messages) of one call with `payload` as the message bytes."""
    try:
        if path == SERVICE + "ModelStreamInfer":
            responses = list(channel.stream_stream(path)(iter([payload]), timeout=TIMEOUT_S))
            return grpc.StatusCode.OK, "", responses
        response, call = channel.unary_unary(path).with_call(payload, timeout=TIMEOUT_S)
        return call.code(), call.details() or "", [response]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", []


def judge_grpc(
    path: str,
    request: pb.ModelInferRequest | None,
    answer: tuple[grpc.StatusCode, str, list[bytes]],
    secrets: Sequence[str],
) -> Verdict:
    """An answer to a call; `request` is the message sent, when it was one (else bytes)."""
    code, details, responses = answer
    outcome = f"grpc {code.name}"
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        undecodable = code is grpc.StatusCode.UNKNOWN and "DecodeError" in details
        item = 8 if undecodable else _shape_item(request)
        return Verdict(outcome, f"{code.name}: {details[:200]!r}", item)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
        return Verdict(outcome, f"no answer within {TIMEOUT_S:.0f} s")  # grpc's, not ours
    if code is not grpc.StatusCode.OK:
        if not details:
            return Verdict(outcome, "an error without a message")
        return _judge_message(outcome, details, secrets)
    if path.endswith("/ModelStreamInfer"):
        for raw in responses:
            message = pb.ModelStreamInferResponse.FromString(raw)
            if message.error_message:
                verdict = _judge_message("grpc stream error", message.error_message, secrets)
                if "internal" in message.error_message.lower():
                    return Verdict(verdict.outcome, message.error_message, _shape_item(request))
                if verdict.problem:
                    return verdict
            else:
                verdict = _judge_infer(outcome, message.infer_response)
                if verdict.problem:
                    return verdict
        return Verdict(outcome if not responses else outcome + " stream")
    if path.endswith("/ModelInfer"):
        return _judge_infer(outcome, pb.ModelInferResponse.FromString(responses[0]))
    return Verdict(outcome)


def _shape_item(request: pb.ModelInferRequest | None) -> int | None:
    """1 when an input of `request` has a shape numpy cannot build (issue 12 item 1)."""
    if request is not None and any(cannot_build(list(t.shape), t.datatype) for t in request.inputs):
        return 1
    return None


def _judge_infer(outcome: str, response: pb.ModelInferResponse) -> Verdict:
    names = [o.name for o in response.outputs]
    if len(set(names)) != len(names):
        return Verdict(outcome, f"outputs named twice: {names}", 6)
    if len(response.raw_output_contents) != len(names):
        return Verdict(outcome, "raw_output_contents do not match the outputs")
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if output.datatype != "BYTES":
            size = prod(output.shape) * np.dtype(DTYPES[output.datatype]).itemsize
            if size != len(raw):
                return Verdict(outcome, f"output {output.name!r}: {len(raw)} bytes for {size}")
    return Verdict(outcome)


# -- a server under fuzzing ---------------------------------------------------------------


class Target:
    """A running server: sends cases to it and judges the answers. `secrets` are strings
    no message may show (its repository's path)."""

    def __init__(self, http_port: int, grpc_address: str, secrets: Sequence[str]) -> None:
        self.http_port = http_port
        self.channel = grpc.insecure_channel(grpc_address)
        self.secrets = list(secrets)

    def http(self, case: HttpCase) -> list[Verdict]:
        return judge_http(case, send_http(self.http_port, case), self.secrets)

    def grpc_message(self, request: pb.ModelInferRequest) -> list[Verdict]:
        path = SERVICE + "ModelInfer"
        answer = call_grpc(self.channel, path, request.SerializeToString())
        return [judge_grpc(path, request, answer, self.secrets)]

    def grpc_bytes(self, case: tuple[str, bytes]) -> list[Verdict]:
        path, payload = case
        return [judge_grpc(path, None, call_grpc(self.channel, path, payload), self.secrets)]

    def route(self) -> None:
        """Give the model "routed" its weighted routing (X-Routing-Key then matters)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v2/admin/models/routed/routing",
            json.dumps(ROUTING).encode(), method="PUT",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            assert reply.status == 200

    def assert_serves(self) -> None:
        """A valid request to `mlp` gets the same right answer over both protocols."""
        x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 16],
                                       "data": x.ravel().tolist()}]}).encode()  # fmt: skip
        url = f"http://127.0.0.1:{self.http_port}/v2/models/mlp/infer"
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=TIMEOUT_S) as r:
            rest = np.array(json.loads(r.read())["outputs"][0]["data"], np.float32)
        request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16])
        raw = self.channel.unary_unary(SERVICE + "ModelInfer")(
            request.SerializeToString(), timeout=TIMEOUT_S
        )
        served = np.frombuffer(pb.ModelInferResponse.FromString(raw).raw_output_contents[0],
                               np.float32)  # fmt: skip
        assert rest.shape == (8,) and np.isfinite(rest).all() and np.array_equal(rest, served)

    def close(self) -> None:
        self.channel.close()


# generator name -> (strategy, the Target method that sends and judges its cases)
GENERATORS = {
    "json": (json_bodies(), "http"),
    "feedback": (feedback_bodies(), "http"),
    "binary": (binary_bodies(), "http"),
    "http": (raw_requests(), "http"),
    "grpc": (grpc_requests(), "grpc_message"),
    "grpc_bytes": (grpc_garbage(), "grpc_bytes"),
}
