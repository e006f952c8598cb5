"""Logs of a real server process: JSON lines, the access log over REST and gRPC
(tritonclient), and failed requests logged with their request id."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fleetserve.loaders import testing
from tests.server_process import Server

ROW = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    # batch 1 runs; a batch of 2 fails inside onnxruntime (a 500 / INTERNAL)
    testing.write_model(root, "reshape", testing.runtime_failure())
    return root


def serve(repo: Path, *flags: str) -> Server:
    return Server(
        "--model-repository", str(repo), "--host", "127.0.0.1", "--http-port", "0",
        "--grpc-port", "0", "--metrics-port", "-1", *flags,
    )  # fmt: skip


def rest_infer(
    port: int, rows: int, request_id: str | None = None, datatype: str = "FP32"
) -> tuple[int, str]:
    """Status and X-Request-Id of one REST infer request to `reshape`."""
    doc: dict = {"inputs": [{"name": "INPUT0", "shape": [rows, 4], "datatype": datatype,
                             "data": list(range(4 * rows))}]}  # fmt: skip
    if request_id is not None:
        doc["id"] = request_id
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/reshape/infer", json.dumps(doc))
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.headers["X-Request-Id"]
    finally:
        conn.close()


def grpc_infer(port: int, rows: int, request_id: str) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        x = grpcclient.InferInput("INPUT0", [rows, 4], "FP32")
        x.set_data_from_numpy(np.repeat(ROW, rows, axis=0))
        client.infer("reshape", [x], request_id=request_id)
    finally:
        client.close()


def test_json_lines_with_access_log_and_request_errors(repo):
    with serve(repo, "--log-format", "json", "--access-log", "--log-level", "verbose") as server:
        http_port, grpc_port, _ = server.wait_ready()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        x = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(ROW)
        assert client.infer("reshape", [x], request_id="rest-1").get_response()["id"] == "rest-1"
        client.close()
        grpc_infer(grpc_port, 1, "grpc-1")
        status, failed_id = rest_infer(http_port, rows=2)  # no id: the server makes one
        assert status == 500 and failed_id
        with pytest.raises(InferenceServerException, match="failed to run"):
            grpc_infer(grpc_port, 2, "grpc-2")
        status, bad_id = rest_infer(http_port, 1, request_id="bad-1", datatype="INT32")
        assert (status, bad_id) == (400, "bad-1")
        assert server.stop() == 0
    records = [json.loads(line) for line in server.lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys()
    access = {r["request_id"]: r for r in records if r["logger"] == "fleetserve.access"}
    fields = ("protocol", "model", "version", "status")
    assert [access[i][f] for i in ("rest-1", "grpc-1") for f in fields] == [
        "rest", "reshape", "1", 200, "grpc", "reshape", "1", "OK",
    ]  # fmt: skip
    assert access["rest-1"]["duration_ms"] > 0
    assert access[failed_id]["status"] == 500 and access["grpc-2"]["status"] == "INTERNAL"
    assert access["bad-1"]["status"] == 400
    errors = {r["request_id"]: r for r in records if r["logger"] == "fleetserve.request"}
    for request_id, status in ((failed_id, 500), ("grpc-2", "INTERNAL")):
        error = errors[request_id]
        assert (error["level"], error["status"]) == ("ERROR", status)
        assert "reshape" in error["message"] and "failed to run" in error["message"]
        # the traceback of what failed: onnxruntime's error, not our re-raise
        assert "Traceback" in error["exception"] and "Reshape" in error["exception"]
    assert errors["bad-1"]["level"] == "DEBUG" and "exception" not in errors["bad-1"]


def test_text_access_lines_are_off_by_default(repo):
    with serve(repo) as server:
        http_port, _, _ = server.wait_ready()
        assert rest_infer(http_port, rows=1, request_id="quiet")[0] == 200
        assert server.stop() == 0
    assert not any("fleetserve.access" in line for line in server.lines)
    # at WARNING the ready line is not logged: find the server by a port chosen here
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    with serve(
        repo, "--access-log", "--log-level", "warning", f"--http-port={http_port}"
    ) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = rest_infer(http_port, rows=1, request_id="r-9")[0]
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert status == 200
        assert server.stop() == 0
    access = [line for line in server.lines if "fleetserve.access" in line]
    assert len(access) == 1, server.lines
    assert re.fullmatch(
        r"\S+ \S+ INFO fleetserve.access: rest r-9 reshape:1 200 \d+\.\d{3}ms", access[0]
    )
