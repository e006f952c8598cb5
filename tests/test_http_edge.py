"""The REST listener's edge, over raw sockets and real clients: header bytes that are
not UTF-8, and 500s that are the server's own fault, logged with their request id.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetserve.loaders import testing
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S

TOKEN = "edge-token"
LIMIT = 1024 * 1024  # --max-request-size of the servers here
UPLOAD_LIMIT = 256 * 1024
DOC = json.dumps(
    {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
).encode()
# routes that read a whole body: (method, path, a valid body)
BODY_ROUTES = [
    ("POST", "/v2/models/mlp/infer", DOC),
    ("POST", "/v2/models/mlp/feedback", b'{"id": "r1", "label": "cat"}'),
    ("POST", "/v2/repository/index", b"{}"),
    ("PUT", "/v2/admin/models/mlp/routing", b"{}"),
]
ROUTE_IDS = ["infer", "feedback", "repository", "admin"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("edge")
    for v in (1, 2):
        testing.write_model(root, "mlp", testing.mlp(seed=v), version=v)
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = test_settings(
        repo, admin_token=TOKEN, max_request_size=LIMIT, max_upload_size=UPLOAD_LIMIT,
        data_dir=tmp_path_factory.mktemp("edge_state"),
    )  # fmt: skip
    running = start_server(settings)
    yield running
    stop_server(running)


# -- a raw HTTP/1.1 client -------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def error(self) -> str:
        assert self.headers["content-type"].startswith("application/json"), self
        doc = json.loads(self.body)
        assert set(doc) == {"error"}, doc
        return doc["error"]


def connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.app.http_port), timeout=WAIT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request_bytes(
    method: str, path: str, body: bytes = b"", headers: dict[str, str | bytes] | None = None
) -> bytes:
    """A request; header values may be bytes (sent as they are). Content-Length is the
    body's unless `headers` gives one (or Transfer-Encoding)."""
    head = {"Host": "127.0.0.1", "Authorization": f"Bearer {TOKEN}", **(headers or {})}
    if "Content-Length" not in head and "Transfer-Encoding" not in head:
        head["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1".encode()]
    lines += [
        k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in head.items()
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def read_answer(sock: socket.socket, skip_continue: bool = True) -> Answer:
    """One response (a 100 Continue before it is skipped unless asked for)."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100 or not skip_continue:
            break
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(data) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        data += chunk
    return Answer(status, headers, data[:length])


def closed_by_server(sock: socket.socket, within: float = WAIT_S) -> bool:
    """True if the server closes the connection (EOF or reset) within `within` seconds
    and sends nothing more."""
    sock.settimeout(within)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def exchange(server: RunningServer, data: bytes) -> Answer:
    """Send `data` on a new connection; the answer."""
    with connect(server) as sock:
        sock.sendall(data)
        return read_answer(sock)


def still_serves(server: RunningServer) -> None:
    answer = exchange(server, request_bytes(*BODY_ROUTES[0]))
    assert answer.status == 200, answer


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """ERROR records logged while the test runs (a client's bad input must log none)."""
    caplog.set_level(logging.DEBUG)
    records: list[logging.LogRecord] = []
    yield records
    records += [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not records, [r.getMessage() for r in records]


# -- header bytes that are not UTF-8 ---------------------------------------------------


@pytest.fixture(scope="module")
def weighted(server: RunningServer) -> None:
    """mlp split between its two versions, so requests read the routing key."""
    answer = exchange(
        server,
        request_bytes("PUT", "/v2/admin/models/mlp/routing", b'{"weights": {"1": 1, "2": 1}}'),
    )
    assert answer.status == 200, answer


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/v2/models/mlp/infer", "X-Routing-Key"),
        ("GET", "/v2/admin/models", "Authorization"),
        ("GET", "/v2/admin/models", "Host"),
        ("GET", "/v2/admin/models", "Origin"),
        ("POST", "/v2/repository/index", "Authorization"),
        ("PUT", "/v2/admin/models/mlp/routing", "If-Match"),
    ],
)
@pytest.mark.parametrize("value", [b"\xff\xfe\x80", b"Bearer \xff\xfe", b"ok \xc3"])
def test_header_bytes_that_are_not_utf8_are_400_naming_the_header(
    server, weighted, errors, method, path, name, value
):
    body = DOC if path.endswith("infer") else b"{}"
    answer = exchange(server, request_bytes(method, path, body, {name: value}))
    assert answer.status == 400, answer
    assert answer.error() == f"header {name} is not valid UTF-8"
    assert answer.headers["x-request-id"]


def test_a_utf8_routing_key_still_routes(server, weighted):
    key = "clé-🙂".encode()
    versions = set()
    for _ in range(3):
        answer = exchange(
            server, request_bytes("POST", "/v2/models/mlp/infer", DOC, {"X-Routing-Key": key})
        )
        assert answer.status == 200, answer
        versions.add(json.loads(answer.body)["model_version"])
    assert len(versions) == 1  # sticky: one key, one version


# -- 500s: the server's own faults, logged with their request id -----------------------


def test_a_server_fault_is_a_json_500_logged_with_its_request_id_and_traceback(server, caplog):
    """The state directory turned into a file under the running server: saving a
    routing fails inside the server, which is a 500, logged."""
    state = server.app.settings.state_dir
    backup = state.with_name(state.name + ".bak")
    shutil.move(state, backup)
    state.write_text("not a directory")
    try:
        with caplog.at_level(logging.ERROR):
            answer = exchange(
                server,
                request_bytes("PUT", "/v2/admin/models/mlp/routing", b'{"aliases": {"a": 1}}'),
            )
    finally:
        state.unlink()
        shutil.move(backup, state)
    assert answer.status == 500, answer
    assert answer.error() == "internal server error"
    request_id = answer.headers["x-request-id"]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert getattr(record, "request_id", None) == request_id
    assert request_id in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)
