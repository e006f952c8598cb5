"""The feedback log through real servers: what is recorded, sampling, ground truth, a
stalled sink, graceful stop, kill -9 and restarts.

What the server recorded is read back from its SQLite file (read-only, as an export
would) and compared with what the test sent and what the server answered.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from fleetserve.loaders import testing
from fleetserve.server.sinks import DB_FILENAME, SINKS, SqliteSink
from fleetserve.server.tensors import pack_tensors, unpack_tensors
from fleetserve.server.types import PredictionRecord
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, mlp_input
from tests.test_shutdown import ServerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
LOGGED = 'parameters { key: "feedback_sample_rate" value: { string_value: "1" } }\n'
HALF = 'parameters { key: "feedback_sample_rate" value: { string_value: "0.5" } }\n'


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("feedback")
    testing.write_model(root, "logged", testing.mlp(seed=1), config=LOGGED)
    testing.write_model(root, "half", testing.mlp(seed=2), config=HALF)
    testing.write_model(root, "quiet", testing.mlp(seed=3))
    testing.write_model(
        root, "bad_rate", testing.mlp(seed=4),
        config='parameters { key: "feedback_sample_rate" value: { string_value: "2" } }\n',
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("feedback_data")
    running = start_server(
        test_settings(repo, preload=False, data_dir=data, feedback_flush_secs=0.05)
    )
    yield running
    stop_server(running)


# -- helpers -------------------------------------------------------------------------


def post(url: str, doc: dict) -> tuple[int, dict[str, str], dict]:
    request = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def infer(base: str, model: str, x: np.ndarray, **extra: Any) -> tuple[int, dict, dict]:
    doc = {"inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                       "data": x.ravel().tolist()}], **extra}  # fmt: skip
    return post(f"{base}/v2/models/{model}/infer", doc)


def rows(data_dir: Path, table: str = "predictions", model: str | None = None) -> list[tuple]:
    path = data_dir / DB_FILENAME
    if not path.exists():
        return []
    query = f"SELECT * FROM {table}" + (" WHERE model = ?" if model else "") + " ORDER BY id"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return db.execute(query, (model,) if model else ()).fetchall()
    except sqlite3.OperationalError:  # the sink is still creating its tables
        return []


def wait_rows(data_dir: Path, count: int, model: str | None = None, table: str = "predictions"):
    deadline = time.monotonic() + WAIT_S
    while len(found := rows(data_dir, table, model)) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} {table} rows written"
        time.sleep(0.01)
    return found


def wait_id(data_dir: Path, request_id: str, table: str = "predictions") -> tuple:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = [r for r in rows(data_dir, table) if r[1] == request_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{request_id} never written to {table}"
        time.sleep(0.01)


def data_dir(server: RunningServer) -> Path:
    return server.app.settings.state_dir


def metric(server: RunningServer, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=WAIT_S) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


# -- what is recorded ----------------------------------------------------------------


def test_rest_and_grpc_predictions_are_recorded_as_served(server: RunningServer) -> None:
    x, y = mlp_input(2, 1), mlp_input(1, 2)
    status, _, reply = infer(server.http_url, "logged", x, id="rest-1")
    assert status == 200 and reply["id"] == "rest-1"
    client = grpcclient.InferenceServerClient(server.grpc)
    i = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    i.set_data_from_numpy(y)
    served = client.infer("logged", [i], request_id="grpc-1").as_numpy("OUTPUT0")
    found = {r[1]: r for r in wait_rows(data_dir(server), 2, "logged")}
    rest, grpc = found["rest-1"], found["grpc-1"]
    assert rest[2:4] == ("logged", 1) and abs(rest[4] - time.time()) < 60
    inputs, outputs = unpack_tensors(rest[5]), unpack_tensors(rest[6])
    assert np.array_equal(inputs["INPUT0"], x) and inputs["INPUT0"].dtype == np.float32
    served_json = np.array(reply["outputs"][0]["data"], np.float32)
    assert np.array_equal(outputs["OUTPUT0"].ravel(), served_json)
    assert np.array_equal(unpack_tensors(grpc[5])["INPUT0"], y)
    assert np.array_equal(unpack_tensors(grpc[6])["OUTPUT0"], served)  # bit for bit


def test_a_logged_request_without_an_id_gets_one_back(server: RunningServer) -> None:
    status, headers, reply = infer(server.http_url, "logged", mlp_input(1, 3))
    assert status == 200 and reply["id"] and headers["X-Request-Id"] == reply["id"]
    assert wait_id(data_dir(server), reply["id"])[2] == "logged"


def test_sampling_follows_the_model_rate_and_the_request_parameter(server: RunningServer) -> None:
    for seed in range(400):
        assert infer(server.http_url, "half", mlp_input(1, seed))[0] == 200
    status, _, reply = infer(server.http_url, "quiet", mlp_input(1, 0))
    assert status == 200 and reply.get("id", "") == ""  # not logged: no id made up
    forced = infer(server.http_url, "quiet", mlp_input(1, 1), parameters={"log_prediction": True})
    skipped = infer(server.http_url, "logged", mlp_input(1, 2), id="skip-me",
                    parameters={"log_prediction": False})  # fmt: skip
    assert forced[0] == skipped[0] == 200
    wait_id(data_dir(server), forced[2]["id"])
    time.sleep(0.2)  # four flush intervals: anything else would be written by now
    half = len(rows(data_dir(server), model="half"))
    assert abs(half - 200) < 5 * 10  # binomial sd = sqrt(400 * 0.25)
    assert [r[1] for r in rows(data_dir(server), model="quiet")] == [forced[2]["id"]]
    assert "skip-me" not in {r[1] for r in rows(data_dir(server))}


def test_bad_sampling_settings_are_clear_errors(server: RunningServer) -> None:
    status, _, reply = infer(server.http_url, "logged", mlp_input(1, 0),
                             parameters={"log_prediction": "yes"})  # fmt: skip
    assert status == 400 and "log_prediction" in reply["error"]
    status, _, reply = infer(server.http_url, "bad_rate", mlp_input(1, 0))
    assert status == 503 and "feedback_sample_rate" in reply["error"]


# -- ground truth --------------------------------------------------------------------


def test_ground_truth_is_stored_for_known_late_and_unknown_ids(server: RunningServer) -> None:
    url = f"{server.http_url}/v2/models/logged/feedback"
    truth = [{"name": "OUTPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4.5]}]
    assert post(url, {"id": "rest-1", "label": "cat", "metadata": {"by": "qa"}})[0] == 200
    assert post(url, {"id": "not-yet-served", "truth": truth})[0] == 200
    found = {r[1]: r for r in wait_rows(data_dir(server), 2, "logged", "feedback")}
    assert json.loads(found["rest-1"][4]) == "cat" and json.loads(found["rest-1"][6]) == {
        "by": "qa"
    }
    stored = unpack_tensors(found["not-yet-served"][5])["OUTPUT0"]
    assert stored.dtype == np.float32 and stored.tolist() == [[1, 2, 3, 4.5]]
    # the prediction arrives after its ground truth: both are kept, to be joined at export
    infer(server.http_url, "logged", mlp_input(1, 9), id="not-yet-served")
    assert wait_id(data_dir(server), "not-yet-served")[2] == "logged"


@pytest.mark.parametrize(
    ("doc", "status", "problem"),
    [
        ({"label": "cat"}, 400, "'id'"),
        ({"id": "", "label": 1}, 400, "'id'"),
        ({"id": "x"}, 400, "'label' or 'truth'"),
        ({"id": "x", "label": [1]}, 400, "'label' must be"),
        ({"id": "x", "truth": []}, 400, "non-empty list"),
        ({"id": "x", "truth": [{"name": "T", "shape": [2], "datatype": "FP32", "data": [1]}]},
         400, "T"),
        ({"id": "x", "label": 1, "metadata": [1]}, 400, "'metadata'"),
        ({"id": "x", "label": 1, "extra": 1}, 400, "unknown feedback field"),
    ],
)  # fmt: skip
def test_bad_ground_truth_is_400_naming_the_problem(
    server: RunningServer, doc: dict, status: int, problem: str
) -> None:
    got, _, reply = post(f"{server.http_url}/v2/models/logged/feedback", doc)
    assert got == status and problem in reply["error"]


def test_ground_truth_for_an_unknown_model_is_404(server: RunningServer) -> None:
    got, _, reply = post(f"{server.http_url}/v2/models/nope/feedback", {"id": "x", "label": 1})
    assert got == 404 and "nope" in reply["error"]


# -- a sink that falls behind --------------------------------------------------------


class StalledSink(SqliteSink):
    """The real SQLite sink, whose writes wait until the test lets them through."""

    release = threading.Event()

    def write(self, records: Any) -> None:
        assert self.release.wait(WAIT_S)
        super().write(records)


@pytest.mark.parametrize("block", [False, True], ids=["drop", "block"])
def test_a_stalled_sink_drops_what_does_not_fit_and_serving_goes_on(
    repo: Path, tmp_path: Path, block: bool
) -> None:
    SINKS["stalled"] = StalledSink
    StalledSink.release.clear()
    running = start_server(
        test_settings(repo, preload=False, data_dir=tmp_path, feedback_sink="stalled",
                      feedback_buffer=5, feedback_flush_secs=0.02,
                      feedback_when_full="block" if block else "drop")
    )  # fmt: skip
    try:
        for seed in range(30):
            assert infer(running.http_url, "logged", mlp_input(1, seed))[0] == 200
        with urllib.request.urlopen(f"{running.http_url}/v2/health/ready", timeout=WAIT_S) as r:
            assert r.status == 200
        enqueued = metric(running, "fleetserve_feedback_enqueued_total")
        dropped = metric(running, "fleetserve_feedback_dropped_total")
        assert enqueued + dropped == 30 and dropped >= 30 - 10  # 5 stalled + 5 buffered
        assert metric(running, "fleetserve_feedback_buffer_depth") <= 5
        StalledSink.release.set()
        written = wait_rows(tmp_path, int(enqueued))
        assert len(written) == enqueued
    finally:
        StalledSink.release.set()
        stop_server(running)
        del SINKS["stalled"]


# -- durability ----------------------------------------------------------------------


def spawn(repo: Path, data: Path, *flags: str) -> tuple[ServerProcess, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetserve", "serve", "--model-repository", str(repo),
         "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "-1", "--metrics-port", "0",
         "--data-dir", str(data), *flags],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    server = ServerProcess(proc)
    threading.Thread(target=server.read_stderr, daemon=True).start()
    http = server.wait_ready()[0]
    return server, f"http://127.0.0.1:{http}"


def test_a_graceful_stop_writes_everything_buffered(repo: Path, tmp_path: Path) -> None:
    # a flush interval far longer than the test: only the stop can write these
    server, base = spawn(repo, tmp_path, "--feedback-flush-secs", "3600")
    try:
        ids = [f"g{i}" for i in range(50)]
        for i, rid in enumerate(ids):
            assert infer(base, "logged", mlp_input(1, i), id=rid)[0] == 200
        assert rows(tmp_path) == []  # nothing flushed yet
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert [r[1] for r in rows(tmp_path)] == ids


def test_kill_9_loses_at_most_the_last_flush_interval(repo: Path, tmp_path: Path) -> None:
    server, base = spawn(repo, tmp_path, "--feedback-flush-secs", "0.1")
    try:
        early = [f"early{i}" for i in range(100)]
        for i, rid in enumerate(early):
            assert infer(base, "logged", mlp_input(1, i), id=rid)[0] == 200
        time.sleep(0.5)  # five flush intervals
        for i in range(20):
            assert infer(base, "logged", mlp_input(1, i), id=f"late{i}")[0] == 200
        server.proc.kill()  # SIGKILL: no chance to flush
        server.proc.wait(30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    written = [r[1] for r in rows(tmp_path)]
    assert written[:100] == early  # everything acknowledged a flush interval ago is there
    assert len(written) == len(set(written))


def test_a_restart_in_the_middle_keeps_every_record_once(repo: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        server, base = spawn(repo, tmp_path)
        try:
            for i in range(30):
                assert infer(base, "logged", mlp_input(1, i), id=f"{run}{i}")[0] == 200
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait_exit(60) == 0
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
    written = [r[1] for r in rows(tmp_path)]
    assert written == [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]


def test_feedback_metrics_are_exported(server: RunningServer) -> None:
    infer(server.http_url, "logged", mlp_input(1, 0))
    deadline = time.monotonic() + WAIT_S
    while metric(server, "fleetserve_feedback_written_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert metric(server, "fleetserve_feedback_enqueued_total") >= 1
    assert metric(server, "fleetserve_feedback_write_duration_seconds_count") >= 1


# -- edge cases found in review ------------------------------------------------------


def test_a_failed_batch_leaves_nothing_behind_for_the_next_commit(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path)
    x = {"INPUT0": np.zeros((1, 2), np.float32)}
    blob = pack_tensors(x)
    good = [PredictionRecord(f"ok{i}", "m", 1, 1.0, blob, blob) for i in range(200)]
    # the second slice holds a record SQLite cannot store (not bytes)
    bad = [*good[:150], PredictionRecord("bad", "m", 1, 1.0, object(), blob)]  # type: ignore[arg-type]
    with pytest.raises(sqlite3.Error):
        sink.write(bad)
    sink.write(good[:3])
    sink.flush()
    sink.close()
    assert [r[1] for r in rows(tmp_path)] == ["ok0", "ok1", "ok2"]


def test_a_small_buffer_wakes_the_writer_before_the_flush_interval(
    repo: Path, tmp_path: Path
) -> None:
    running = start_server(
        test_settings(repo, preload=False, data_dir=tmp_path, feedback_buffer=4,
                      feedback_flush_secs=3600.0)
    )  # fmt: skip
    try:
        for i in range(2):
            assert infer(running.http_url, "logged", mlp_input(1, i), id=f"w{i}")[0] == 200
        assert [r[1] for r in wait_rows(tmp_path, 2)] == ["w0", "w1"]
    finally:
        stop_server(running)


def test_a_stop_is_bounded_even_when_the_sink_hangs(repo: Path, tmp_path: Path) -> None:
    SINKS["stalled"] = StalledSink
    StalledSink.release.clear()
    running = start_server(
        test_settings(repo, preload=False, data_dir=tmp_path, feedback_sink="stalled",
                      feedback_flush_secs=0.01, shutdown_timeout=1)
    )  # fmt: skip
    try:
        for i in range(5):
            assert infer(running.http_url, "logged", mlp_input(1, i))[0] == 200
        started = time.monotonic()
        stop_server(running)
        assert time.monotonic() - started < WAIT_S / 2  # the sink would hold it for WAIT_S
    finally:
        StalledSink.release.set()
        del SINKS["stalled"]


@pytest.mark.parametrize(
    ("request_id", "problem"), [("a\nb", "control characters"), ("x" * 257, "256")]
)
def test_a_request_id_that_cannot_go_back_in_a_header_is_400(
    server: RunningServer, request_id: str, problem: str
) -> None:
    status, _, reply = infer(server.http_url, "logged", mlp_input(1, 0), id=request_id)
    assert status == 400 and problem in reply["error"]


def test_a_shadow_copy_is_logged_as_its_request_asked(repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    for v in (1, 2):
        testing.write_model(root, "canary", testing.mlp(seed=v), version=v, config=LOGGED)
    running = start_server(test_settings(root, preload=False, data_dir=tmp_path / "data",
                                         feedback_flush_secs=0.02))  # fmt: skip
    try:
        shadow = {"shadow": {"version": 1, "fraction": 1.0}}
        url = f"{running.http_url}/v2/admin/models/canary/routing"
        request = urllib.request.Request(url, data=json.dumps(shadow).encode(), method="PUT")
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            assert reply.status == 200
        base = running.http_url
        assert infer(base, "canary", mlp_input(1, 0), id="secret",
                     parameters={"log_prediction": False})[0] == 200  # fmt: skip
        # one copy runs at a time: let the first (which loads version 1) finish
        deadline = time.monotonic() + WAIT_S
        while (
            metric(
                running,
                'fleetserve_shadow_requests_total{model="canary",outcome="differ",version="1"}',
            )
            < 1
        ):
            assert time.monotonic() < deadline, "the first shadow copy never finished"
            time.sleep(0.01)
        assert infer(base, "canary", mlp_input(1, 1), id="both")[0] == 200
        wait_rows(tmp_path / "data", 2)
        time.sleep(0.1)  # five flush intervals: nothing else may appear
        found = rows(tmp_path / "data")
        assert sorted((r[1], r[3]) for r in found) == [("both", 1), ("both", 2)]
    finally:
        stop_server(running)
