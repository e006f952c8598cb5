"""The REST listener's edge, over raw sockets and real clients: compressed and malformed
bodies, header bytes that are not UTF-8, size limits refused from the header, the read
timeouts (headers, body, keep-alive), SIGTERM with stalled clients, and 500s that are
the server's own fault, logged with their request id.

Timing tests use small timeouts and generous margins: they check what happens (a 408,
a closed connection, an exit), never how fast.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import socket
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from fleetserve.loaders import testing
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S
from tests.server_process import Server

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


# -- Content-Encoding ------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "GZip", "identity"])
def test_a_compressed_body_is_decoded(server, encoding):
    compress = {"deflate": zlib.compress, "identity": bytes}.get(encoding.lower(), gzip.compress)
    answer = exchange(
        server, request_bytes("POST", "/v2/models/mlp/infer", compress(DOC),
                              {"Content-Encoding": encoding})
    )  # fmt: skip
    assert answer.status == 200, answer
    plain = exchange(server, request_bytes("POST", "/v2/models/mlp/infer", DOC))
    assert json.loads(answer.body) == json.loads(plain.body)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_request_compression_is_decoded(server, algorithm):
    client = httpclient.InferenceServerClient(server.http)
    x = httpclient.InferInput("INPUT0", [2, 16], "FP32")
    data = np.arange(32, dtype=np.float32).reshape(2, 16)
    x.set_data_from_numpy(data, binary_data=True)
    plain = client.infer("mlp", [x]).as_numpy("OUTPUT0")
    squeezed = client.infer("mlp", [x], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(squeezed.as_numpy("OUTPUT0"), plain)


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize(
    ("encoding", "payload", "problem"),
    [
        ("gzip", b"this is not gzip", "incorrect header check"),
        ("deflate", b"this is not deflate", "incorrect header check"),
        ("gzip", gzip.compress(DOC)[:-12], "truncated"),
        ("gzip", gzip.compress(DOC) + b"trailing", "data after its end"),
    ],
    ids=["gzip", "deflate", "truncated", "trailing"],
)  # fmt: skip
def test_a_body_that_does_not_decode_is_400_naming_the_encoding(
    server, errors, method, path, body, encoding, payload, problem
):
    answer = exchange(server, request_bytes(method, path, payload, {"Content-Encoding": encoding}))
    assert answer.status == 400, answer
    assert f"does not decode as {encoding}" in answer.error() and problem in answer.error()
    still_serves(server)


@pytest.mark.parametrize(("method", "path", "body"), BODY_ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, deflate", "bogus"])
def test_an_unsupported_encoding_is_415_naming_it(server, errors, method, path, body, encoding):
    answer = exchange(server, request_bytes(method, path, body, {"Content-Encoding": encoding}))
    assert answer.status == 415, answer
    assert repr(encoding) in answer.error()
    assert answer.headers["accept-encoding"] == "gzip, deflate"


def test_a_decompression_bomb_is_cut_at_the_limit(server, errors):
    """256 MiB of zeros in 256 KB of deflate: refused once LIMIT bytes are inflated,
    and never inflated whole in memory (tracemalloc sees the server thread too)."""
    squeeze = zlib.compressobj()
    bomb = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(256)) + squeeze.flush()
    assert len(bomb) < LIMIT
    request = request_bytes("POST", "/v2/models/mlp/infer", bomb, {"Content-Encoding": "deflate"})
    tracemalloc.start()
    try:
        answer = exchange(server, request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 400, answer
    assert f"exceeds the limit of {LIMIT} bytes" in answer.error()
    assert peak < 16 * LIMIT
    still_serves(server)


def test_an_upload_takes_no_content_encoding(server, errors, repo):
    answer = exchange(
        server, request_bytes("PUT", "/v2/admin/models/mlp/versions/9", gzip.compress(b"x" * 100),
                              {"Content-Encoding": "gzip"})
    )  # fmt: skip
    assert answer.status == 415, answer
    assert "takes no Content-Encoding" in answer.error()
    assert not (repo / "mlp" / "9").exists()


# -- malformed bodies ------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n"],
    ids=["bad-size", "overrun", "negative"],
)
def test_bad_chunked_encoding_is_400_json_and_the_connection_closes(server, errors, chunks):
    with connect(server) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer", chunks, {"Transfer-Encoding": "chunked"})
        )
        answer = read_answer(sock)
        assert answer.status == 400, answer
        assert "chunk" in answer.error().lower()
        assert closed_by_server(sock)
    still_serves(server)


def test_bad_chunk_after_the_handler_started_reading_is_400(server, errors):
    with connect(server) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer", b"4\r\n{\"in\r\n",
                          {"Transfer-Encoding": "chunked"})
        )  # fmt: skip
        time.sleep(0.2)  # the handler now waits for the rest
        sock.sendall(b"zz\r\n")
        answer = read_answer(sock)
    assert answer.status == 400, answer
    assert "malformed" in answer.error() or "chunk" in answer.error()
    still_serves(server)


@pytest.mark.parametrize(
    "path", ["/v2/models/mlp/infer", "/v2/admin/models/mlp/versions/9"], ids=["infer", "upload"]
)
def test_a_client_gone_mid_body_is_no_error(server, errors, path):
    with connect(server) as sock:
        sock.sendall(request_bytes("POST" if "infer" in path else "PUT", path, b"{" * 100,
                                   {"Content-Length": "10000"}))  # fmt: skip
        time.sleep(0.2)  # the handler now waits for the rest
    time.sleep(0.2)  # and hears the connection go
    still_serves(server)


@pytest.mark.parametrize(
    ("content_type", "body", "problem"),
    [
        ("multipart/form-data", b"--x\r\n\r\n", "malformed multipart body: boundary missed"),
        ("multipart/form-data; boundary=\xff", b"", "header Content-Type is not valid UTF-8"),
        ("multipart/form-data; boundary=\xe9", b"", "malformed multipart body"),
        ("multipart/form-data; boundary=xyz", b"--abc\r\n\r\nx\r\n--abc--\r\n",
         "malformed multipart body: Could not find starting boundary"),
        ("multipart/form-data; boundary=xyz", b"--xyz--\r\n", '"model" part'),
    ],
    ids=["no-boundary", "non-utf8-boundary", "non-ascii-boundary", "wrong-boundary", "empty"],
)  # fmt: skip
def test_a_malformed_multipart_upload_is_400(server, errors, repo, content_type, body, problem):
    answer = exchange(
        server, request_bytes("PUT", "/v2/admin/models/mlp/versions/9", body,
                              {"Content-Type": content_type.encode("latin-1")
                               if "\xff" in content_type else content_type.encode()})
    )  # fmt: skip
    assert answer.status == 400, answer
    assert problem in answer.error()
    assert not (repo / "mlp" / "9").exists()


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


# -- size limits, refused from the header ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "limit", "problem"),
    [("POST", "/v2/models/mlp/infer", LIMIT, "request body of {} bytes exceeds the limit"),
     ("PUT", "/v2/admin/models/mlp/routing", LIMIT, "request body of {} bytes exceeds the limit"),
     ("PUT", "/v2/admin/models/mlp/versions/9", UPLOAD_LIMIT,
      "model file of {} bytes exceeds the upload limit")],
    ids=["infer", "admin", "upload"],
)  # fmt: skip
def test_a_content_length_over_the_limit_is_refused_before_the_body(
    server, errors, method, path, limit, problem
):
    """Only the headers are sent: the answer comes at once and the connection closes,
    so the body the client has not sent yet is never read."""
    length = limit + 1
    with connect(server) as sock:
        sock.sendall(request_bytes(method, path, headers={"Content-Length": str(length)}))
        answer = read_answer(sock)
        assert answer.status == 400, answer
        assert answer.error() == problem.format(length) + f" of {limit} bytes"
        assert answer.headers["connection"].lower() == "close"
        assert closed_by_server(sock)


def test_a_body_over_the_limit_without_a_length_is_refused_and_the_connection_closes(
    server, errors
):
    with connect(server) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer", headers={"Transfer-Encoding": "chunked"})
        )
        piece = b" " * 65536
        for _ in range(LIMIT // len(piece) + 2):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        answer = read_answer(sock)
        assert answer.status == 400, answer
        assert f"exceeds the limit of {LIMIT} bytes" in answer.error()
        assert closed_by_server(sock)


def test_an_answer_given_before_the_body_is_read_still_reaches_the_client(server):
    """A request refused before its body is read (here: an unsupported encoding) is
    answered while the client still sends; the server reads the rest (lingering, so the
    client gets the answer, not a reset) and the connection serves on."""
    body = b" " * (512 * 1024)
    with connect(server) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer", body[:1000],
                          {"Content-Length": str(len(body)), "Content-Encoding": "br"})
        )  # fmt: skip
        assert read_answer(sock).status == 415
        sock.sendall(body[1000:])
        sock.sendall(request_bytes("POST", "/v2/models/mlp/infer", DOC))
        assert read_answer(sock).status == 200


def test_expect_100_continue_is_answered_before_the_body(server):
    with connect(server) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer",
                          headers={"Content-Length": str(len(DOC)), "Expect": "100-continue"})
        )  # fmt: skip
        assert read_answer(sock, skip_continue=False).status == 100
        sock.sendall(DOC)
        assert read_answer(sock).status == 200


def test_expect_100_continue_is_answered_before_a_multipart_upload(server, repo):
    boundary = "edge-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="m"\r\n'
        f"\r\n".encode()
        + testing.mlp(seed=5)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with connect(server) as sock:
        sock.sendall(
            request_bytes("PUT", "/v2/admin/models/fresh/versions/1",
                          headers={"Content-Length": str(len(body)), "Expect": "100-continue",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
        )  # fmt: skip
        assert read_answer(sock, skip_continue=False).status == 100
        sock.sendall(body)
        answer = read_answer(sock)
    assert answer.status == 201, answer
    assert (repo / "fresh" / "1" / "model.onnx").read_bytes() == testing.mlp(seed=5)


def test_expect_100_continue_over_the_limit_is_refused_instead(server):
    with connect(server) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer",
                          headers={"Content-Length": str(LIMIT + 1), "Expect": "100-continue"})
        )  # fmt: skip
        assert read_answer(sock, skip_continue=False).status == 400


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


# -- read timeouts ---------------------------------------------------------------------

HEADER_S, BODY_S, IDLE_S = 1.0, 1.0, 1.5


@pytest.fixture(scope="module")
def quick(repo: Path) -> Iterator[RunningServer]:
    """A server with small read timeouts."""
    running = start_server(
        test_settings(repo, http_header_timeout=HEADER_S, http_body_timeout=BODY_S,
                      http_keepalive_timeout=IDLE_S, admin_token=TOKEN)
    )  # fmt: skip
    yield running
    stop_server(running)


def timed_close(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and after how long."""
    started, data = time.monotonic(), b""
    sock.settimeout(WAIT_S)
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_partial_headers_get_408_after_the_header_timeout(quick, errors):
    with connect(quick) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        data, after = timed_close(sock)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    assert b"the request headers took longer than 1 s" in data
    assert after >= HEADER_S * 0.9


def test_headers_sent_slowly_within_the_timeout_are_served(quick):
    request = request_bytes("POST", "/v2/models/mlp/infer", DOC)
    head, body = request[: -len(DOC)], request[-len(DOC) :]
    with connect(quick) as sock:
        for i in range(0, len(head), len(head) // 4 + 1):
            sock.sendall(head[i : i + len(head) // 4 + 1])
            time.sleep(HEADER_S / 8)
        sock.sendall(body)
        assert read_answer(sock).status == 200


def test_a_stalled_body_gets_408_after_the_body_timeout(quick, errors):
    with connect(quick) as sock:
        sock.sendall(request_bytes("POST", "/v2/models/mlp/infer", DOC[:10],
                                   {"Content-Length": str(len(DOC))}))  # fmt: skip
        started = time.monotonic()
        answer = read_answer(sock)
        assert answer.status == 408, answer
        assert "stalled" in answer.error()
        assert time.monotonic() - started >= BODY_S * 0.9
        assert closed_by_server(sock)


def test_a_slow_but_steady_body_is_read_whole(quick):
    """The body timeout is counted between reads: a body that takes several timeouts in
    all, but never pauses for one, is served."""
    with connect(quick) as sock:
        sock.sendall(
            request_bytes("POST", "/v2/models/mlp/infer", headers={"Content-Length": str(len(DOC))})
        )
        pieces = [DOC[i : i + 20] for i in range(0, len(DOC), 20)]
        assert len(pieces) * BODY_S / 3 > 2 * BODY_S
        for piece in pieces:
            time.sleep(BODY_S / 3)
            sock.sendall(piece)
        assert read_answer(sock).status == 200


def test_a_stalled_upload_gets_408(quick, errors, repo):
    with connect(quick) as sock:
        sock.sendall(request_bytes("PUT", "/v2/admin/models/mlp/versions/9", b"x" * 100,
                                   {"Content-Length": "1000"}))  # fmt: skip
        assert read_answer(sock).status == 408
    assert not (repo / "mlp" / "9").exists()


@pytest.mark.parametrize("first", [True, False], ids=["after-connect", "after-a-response"])
def test_an_idle_connection_closes_after_the_keepalive_timeout(quick, first):
    with connect(quick) as sock:
        if not first:
            sock.sendall(request_bytes("GET", "/v2/health/live"))
            assert read_answer(sock).status == 200
        data, after = timed_close(sock)
    assert data == b""
    assert after >= IDLE_S * 0.9


def test_a_kept_alive_connection_serves_requests_within_the_timeout(quick):
    with connect(quick) as sock:
        for _ in range(3):
            sock.sendall(request_bytes("POST", "/v2/models/mlp/infer", DOC))
            assert read_answer(sock).status == 200
            time.sleep(IDLE_S / 3)


# -- SIGTERM ---------------------------------------------------------------------------


def test_sigterm_with_stalled_clients_and_nothing_in_flight_exits_at_once(repo):
    """Idle, stalled-in-headers and stalled-in-body connections are not requests the
    server works on: they close at once, though the drain time is a minute."""
    shutdown_s = 60
    with Server(
        "--model-repository", str(repo), "--host", "127.0.0.1", "--http-port", "0",
        "--grpc-port", "0", "--metrics-port", "0", "--shutdown-timeout", str(shutdown_s),
        "--no-preload",
    ) as process:  # fmt: skip
        port = process.wait_ready()[0]
        stalls = [
            b"",
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Le",
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{",
            b"PUT /v2/admin/models/mlp/versions/9 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 5000\r\n\r\nonnx",
            # answered (404) before its body came: the server lingers to read the rest
            b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc",
        ]
        socks = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in stalls]
        for sock, data in zip(socks, stalls, strict=True):
            sock.sendall(data)
        live = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        live.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(live).status == 200  # and now idle, kept alive
        time.sleep(0.5)  # the stalled requests are inside their handlers
        started = time.monotonic()
        code = process.stop(timeout=shutdown_s + 30)
        took = time.monotonic() - started
        for sock in [*socks, live]:
            sock.close()
    assert code == 0, "\n".join(process.lines)
    assert took < shutdown_s / 4, f"exit took {took:.1f} s"
    assert not [line for line in process.lines if "Traceback" in line or " ERROR " in line]
