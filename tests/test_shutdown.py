"""Graceful shutdown of a real `python -m fleetserve serve` process.

Each test starts the server as a subprocess on ephemeral ports (read back from its
"fleetserve ready: ..." log line), talks to it over real sockets, signals it and checks
what `server.cli.serve` / `App.stop` guarantee:

* in-flight requests (REST and gRPC) finish with a correct result;
* the REST and metrics listeners close at once, so new connections are refused while
  draining; the gRPC listener stays until the calls in flight are answered and
  delivered (server/grpc_drain.py), new inference calls meanwhile answering UNAVAILABLE;
* the process exits 0, logs "fleetserve stopped" and no traceback.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from fleetserve.loaders import testing
from fleetserve.protos import grpc_service_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parent.parent
DIM = 1024
SHUTDOWN_TIMEOUT_S = 20
# CPU seconds the in-flight run should take, so there is time to observe draining
TARGET_RUN_S = 1.5
# CPU a server worker thread must have burnt before we call the slow run "in flight"
IN_FLIGHT_CPU_S = 0.15
READY_LINE = re.compile(
    r"fleetserve ready: http [\w.:]+:(\d+) grpc [\w.:]+:(\d+) metrics [\w.:]+:(-?\d+)"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="needs /proc to see server threads"
)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_batch() -> int:
    """A batch for `slow` that takes about TARGET_RUN_S of CPU, measured with onnxruntime here.

    The server runs models with one intra-op thread by default, so the measurement does too;
    onnxruntime then runs in the calling thread, whose CPU time (unlike wall time) does not
    depend on how busy the machine is.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(
        testing.slow(dim=DIM, depth=8), so, providers=["CPUExecutionProvider"]
    )
    x = np.ones((256, DIM), dtype=np.float32)
    session.run(None, {"INPUT0": x[:8]})  # warm up
    t0 = time.thread_time()
    session.run(None, {"INPUT0": x})
    per_row = (time.thread_time() - t0) / len(x)
    return int(min(max(TARGET_RUN_S / per_row, 256), 8192))  # <= 32 MiB of input


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shutdown_models")
    # without a config the server would cap the batch at --default-max-batch-size (64)
    testing.write_model(
        root, "slow", testing.slow(dim=DIM, depth=8), config="max_batch_size: 16384\n"
    )
    # the same run with a small response: OUTPUT0 is INPUT0's first column
    testing.write_model(
        root,
        "slow_head",
        testing.slow(dim=DIM, depth=8, out_cols=1),
        config="max_batch_size: 16384\n",
    )
    testing.write_model(root, "mlp", testing.mlp(seed=1))
    return root


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    stderr_closed: threading.Event = field(default_factory=threading.Event)
    ports: tuple[int, int, int] | None = None

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            match = READY_LINE.search(line)
            if match and self.ports is None:
                self.ports = (int(match[1]), int(match[2]), int(match[3]))
                self.ready.set()
        self.ready.set()  # stderr closed: the process ended (wait_ready reports it)
        self.stderr_closed.set()

    def wait_ready(self, timeout: float = 60) -> tuple[int, int, int]:
        if not self.ready.wait(timeout) or self.ports is None:
            raise AssertionError(f"server not ready within {timeout}s:\n{self.stderr}")
        return self.ports

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the process has exited and its last log lines have been read.

        The process can end before the reader thread has got to its last lines (a loaded
        test process), so this also waits for stderr to reach end of file.
        """
        code = self.proc.wait(timeout)
        if not self.stderr_closed.wait(timeout):
            raise AssertionError(f"server stderr still open {timeout}s after exit:\n{self.stderr}")
        return code


@pytest.fixture
def start_server(model_repo: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(repo: Path = model_repo) -> ServerProcess:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "fleetserve", "serve",
                "--model-repository", str(repo), "--host", "127.0.0.1",
                "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        server = ServerProcess(proc)
        started.append(server)
        threading.Thread(target=server.read_stderr, daemon=True).start()
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


# -- helpers --------------------------------------------------------------------------


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid` except its main thread."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        if tid == pid:
            continue
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread just ended
        fields = stat.rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    return out


def wait_until_running(pid: int, baseline: dict[int, float], pending: Future) -> None:
    """Return once the server is running the slow model for our request.

    The statistics only count finished requests, and "the bytes were sent" does not mean
    the server has accepted the connection, let alone started the handler. Instead this
    watches the server's threads: the event loop (main thread) decodes the request, then
    the model runs on a run-pool thread, and onnxruntime (one intra-op thread) runs it in
    that same thread. Nothing else in an idle server burns CPU off the main thread, so a
    worker thread that has used IN_FLIGHT_CPU_S of CPU since the baseline proves the
    request is inside its handler, running, with most of the run still ahead. This holds
    however loaded the machine is: it counts CPU used, not wall time.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if pending.done():
            raise AssertionError(
                f"the slow request finished before it was seen running: {pending.result()!r:.200}"
            )
        now = thread_cpu_s(pid)
        if any(cpu - baseline.get(tid, 0.0) >= IN_FLIGHT_CPU_S for tid, cpu in now.items()):
            return
        time.sleep(0.01)  # poll interval
    raise AssertionError("the slow request was never seen running in the server")


def connection_refused(port: int) -> bool:
    """True if a connect is refused: nothing listens on `port` any more.

    A connect that races the listener's close can be accepted into its backlog and then
    reset as the listener closes (ECONNRESET): not a refusal yet, so it is probed again.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def wait_refused(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not connection_refused(port):
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still accepts connections {timeout}s after signal")
        time.sleep(0.01)  # poll interval


def rest_infer(port: int, x: np.ndarray) -> tuple[int, np.ndarray | str]:
    """POST x to slow with Triton's binary tensor extension, both ways."""
    raw = x.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            "POST",
            "/v2/models/slow/infer",
            body=header + raw,
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            },
        )
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return resp.status, body.decode(errors="replace")
        split = int(resp.headers["Inference-Header-Content-Length"])
        doc = json.loads(body[:split])
        out = doc["outputs"][0]
        assert out["parameters"]["binary_data_size"] == len(body) - split
        return 200, np.frombuffer(body[split:], dtype=np.float32).reshape(out["shape"])
    finally:
        conn.close()


def grpc_infer_request(x: np.ndarray, model: str = "slow") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[x.tobytes()],
    )


def grpc_channel(port: int, *, new_connection: bool = False) -> grpc.Channel:
    """A channel to the server; `new_connection` makes it open its own TCP connection.

    By default grpc shares connections (subchannels) between channels of one process that
    have the same target and options, so a second channel would reuse the first one's.
    """
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    if new_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def infer_stub(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        INFER_METHOD,
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def assert_clean_exit(server: ServerProcess) -> None:
    code = server.wait_exit(SHUTDOWN_TIMEOUT_S + 10)
    log = server.stderr
    assert code == 0, log
    assert "Traceback" not in log, log
    assert "fleetserve stopped" in log, log
    assert "still running" not in log, log  # nothing was cut off by the drain timeout


def batch_input(rows: int) -> np.ndarray:
    # distinct, exactly representable values; slow multiplies by the identity
    return (np.arange(rows * DIM, dtype=np.float32) % 4093 - 2046).reshape(rows, DIM)


# -- tests ----------------------------------------------------------------------------


def test_sigterm_lets_in_flight_rest_request_finish_and_refuses_new_connections(
    start_server, slow_batch
):
    server = start_server()
    http_port, grpc_port, metrics_port = server.wait_ready()
    pid = server.proc.pid
    x = batch_input(slow_batch)
    baseline = thread_cpu_s(pid)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(rest_infer, http_port, x)
        wait_until_running(pid, baseline, pending)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        wait_refused(http_port)
        # the listener closed while the request was still being served: draining
        assert not pending.done(), "request finished before the listener closed"
        refused_after = time.monotonic() - signalled
        wait_refused(grpc_port)
        wait_refused(metrics_port)

        status, output = pending.result(timeout=SHUTDOWN_TIMEOUT_S)
    assert status == 200, output
    np.testing.assert_array_equal(output, x)
    assert refused_after < 5
    assert_clean_exit(server)


def test_sigterm_lets_in_flight_grpc_request_finish_and_rejects_new_rpcs(start_server, slow_batch):
    """While the in-flight RPC runs, a new inference call (on a new connection) answers
    UNAVAILABLE; the gRPC listener closes once the in-flight answer has been delivered
    (tests/test_grpc_edge.py checks a large answer read slowly arrives whole)."""
    server = start_server()
    http_port, grpc_port, _ = server.wait_ready()
    pid = server.proc.pid
    x = batch_input(slow_batch)
    with grpc_channel(grpc_port) as channel:
        infer = infer_stub(channel)
        baseline = thread_cpu_s(pid)
        pending = infer.future(grpc_infer_request(x, "slow_head"), timeout=120)
        wait_until_running(pid, baseline, pending)
        server.proc.send_signal(signal.SIGTERM)

        wait_refused(http_port)
        assert not pending.done(), "request finished before the REST listener closed"
        with grpc_channel(grpc_port, new_connection=True) as fresh:
            with pytest.raises(grpc.RpcError) as refused:
                infer_stub(fresh)(grpc_infer_request(x[:1]), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == "the server is shutting down"
        assert not pending.done(), "request finished before the new RPC was rejected"

        response = pending.result(timeout=SHUTDOWN_TIMEOUT_S)
        wait_refused(grpc_port)
    assert response.model_name == "slow_head"
    assert [o.name for o in response.outputs] == ["OUTPUT0"]
    assert list(response.outputs[0].shape) == [slow_batch, 1]
    output = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_array_equal(output.reshape(slow_batch, 1), x[:, :1])
    assert_clean_exit(server)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_server_exits_zero_on_signal(start_server, sig):
    server = start_server()
    http_port, _, _ = server.wait_ready()
    status, _ = rest_get(http_port, "/v2/health/ready")
    assert status == 200
    server.proc.send_signal(sig)
    assert_clean_exit(server)
    assert "signal received: draining" in server.stderr
    assert "KeyboardInterrupt" not in server.stderr


def rest_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_model_repository_that_is_not_a_directory_exits_2(tmp_path, kind):
    path = tmp_path / "no_such_repo"
    if kind == "file":
        path.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve", "serve", "--model-repository", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert f"model repository {path} is not a directory" in result.stderr
    assert "Traceback" not in result.stderr
