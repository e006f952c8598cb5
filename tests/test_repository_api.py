"""Triton's model repository extension: index, load and unload over REST and gRPC.

Each test starts its own server (lazy loading, as by default) on a repository of its
own in tmp_path, so it can add, break, fix and remove models on disk, and drives it
with tritonclient (HTTP and gRPC) or, where tritonclient has no call for a feature
(the `ready` filter), with raw requests. The loopback-only rule is tested on the
address check itself and on the edges with fake peers: no traffic leaves loopback.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from aiohttp.test_utils import make_mocked_request
from tritonclient.utils import InferenceServerException

from fleetserve.loaders import testing
from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.server.admin import AdminService, is_loopback
from fleetserve.server.grpc_api import GrpcApi, peer_address
from fleetserve.server.repository import Repository
from fleetserve.server.rest_api import RestApi
from fleetserve.server.settings import Settings
from fleetserve.server.types import ModelId
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import mlp_input, ort_run

PROTOCOLS = ["http", "grpc"]
# what tritonclient's InferenceServerException.status() gives, per protocol
NOT_FOUND = {"http": "404", "grpc": "StatusCode.NOT_FOUND"}
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
UNAVAILABLE = {"http": "503", "grpc": "StatusCode.UNAVAILABLE"}
EXHAUSTED = {"http": "507", "grpc": "StatusCode.RESOURCE_EXHAUSTED"}
SERVICE = "/inference.GRPCInferenceService/"
DEADLINE_S = 30  # for anything awaited: generous, never slept through


def error_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> InferenceServerException:
    """The InferenceServerException a tritonclient call raises (traceback dropped: see
    test_tritonclient.error_of)."""
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return exc.with_traceback(None)
    pytest.fail(f"{getattr(call, '__name__', call)} did not raise InferenceServerException")


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    """Poll `condition` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- servers and clients -----------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """mlp (versions 1, 2; latest policy: 2 servable), versioned (1-3, all servable),
    a config Triton's schema rejects, and a model directory without versions."""
    root = tmp_path / "models"
    testing.write_model(root, "mlp", testing.mlp(seed=1), version=1)
    testing.write_model(root, "mlp", testing.mlp(seed=2), version=2)
    for v in (1, 2, 3):
        testing.write_model(
            root, "versioned", testing.fixed_shape((2,), factor=float(v)), version=v,
            config="version_policy: { all: {} }",
        )  # fmt: skip
    testing.write_model(root, "bad_config", testing.mlp(), config="max_batch_size: 4\nfoo: 1\n")
    (root / "empty").mkdir()
    return root


@pytest.fixture
def serve(repo: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start a lazy-loading server on `repo` (settings overridable); stopped afterwards."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        settings = test_settings(repo, preload=False, inline_run_us=0, **overrides)
        server = start_server(settings)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.thread.is_alive():  # a test may have stopped it already
            stop_server(server)


class Client:
    """tritonclient over one protocol, with the index normalised to (state, reason) rows."""

    def __init__(self, protocol: str, server: RunningServer) -> None:
        self.protocol = protocol
        if protocol == "http":
            self.triton: Any = httpclient.InferenceServerClient(server.http)
        else:
            self.triton = grpcclient.InferenceServerClient(server.grpc)

    def index(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(name, version) -> (state, reason); version "" for a model-level row."""
        if self.protocol == "http":
            rows = self.triton.get_model_repository_index()
        else:
            rows = self.triton.get_model_repository_index(as_json=True).get("models", [])
        out = {}
        for row in rows:
            key = (row["name"], row.get("version", ""))
            assert key not in out, f"duplicate index row {key}"
            out[key] = (row.get("state", ""), row.get("reason", ""))
        return out

    def infer_mlp(self, rows: int = 2) -> np.ndarray:
        x = mlp_input(rows)
        mod = httpclient if self.protocol == "http" else grpcclient
        tensor = mod.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return self.triton.infer("mlp", [tensor]).as_numpy("OUTPUT0")

    def status(self, table: dict[str, str]) -> str:
        return table[self.protocol]

    def close(self) -> None:
        self.triton.close()


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(serve: Callable[..., RunningServer], protocol: str) -> Iterator[Client]:
    c = Client(protocol, serve())
    yield c
    c.close()


def raw_post(server: RunningServer, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.http, timeout=DEADLINE_S)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_grpc(server: RunningServer, method: str, request: Any, response_type: Any) -> Any:
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, timeout=DEADLINE_S)


# -- the index -----------------------------------------------------------------------


def test_index_reports_states_before_and_after_a_request_and_after_unload(
    client: Client, repo: Path
) -> None:
    index = client.index()
    assert index[("mlp", "2")] == ("UNAVAILABLE", "not loaded yet")
    assert ("mlp", "1") not in index  # outside the version policy (latest 1), as Triton
    assert [index[("versioned", v)][0] for v in "123"] == ["UNAVAILABLE"] * 3
    state, reason = index[("bad_config", "")]  # a broken config: once, without a version
    assert state == "UNAVAILABLE" and "foo" in reason
    state, reason = index[("empty", "")]
    assert state == "UNAVAILABLE" and "no version directory" in reason
    assert {name for name, _ in index} == {"mlp", "versioned", "bad_config", "empty"}

    # a request loads the model (lazily) ...
    expected = ort_run(repo, "mlp", 2, {"INPUT0": mlp_input(2)})["OUTPUT0"]
    np.testing.assert_array_equal(client.infer_mlp(), expected)
    assert client.index()[("mlp", "2")] == ("READY", "")

    # ... an unload unloads it ...
    client.triton.unload_model("mlp")
    assert client.index()[("mlp", "2")] == ("UNAVAILABLE", "unloaded")

    # ... and a load brings it back
    client.triton.load_model("mlp")
    np.testing.assert_array_equal(client.infer_mlp(), expected)
    assert client.index()[("mlp", "2")] == ("READY", "")


# -- Triton's unload semantics: out of service until loaded -----------------------------


def assert_out_of_service(client: Client, model: str = "mlp") -> None:
    """Not ready, and a request is UNAVAILABLE naming the unload (and loads nothing)."""
    assert not client.triton.is_model_ready(model)
    error = error_of(client.infer_mlp)
    assert error.status() == client.status(UNAVAILABLE)
    assert "was unloaded" in error.message() and "mlp:2" in error.message()
    assert client.index()[(model, "2")] == ("UNAVAILABLE", "unloaded")


def test_an_unloaded_model_is_out_of_service_until_loaded(client: Client, repo: Path) -> None:
    expected = ort_run(repo, "mlp", 2, {"INPUT0": mlp_input(2)})["OUTPUT0"]
    assert client.triton.is_model_ready("mlp")  # never loaded: loads on first use
    np.testing.assert_array_equal(client.infer_mlp(), expected)
    client.triton.unload_model("mlp")
    assert_out_of_service(client)
    assert_out_of_service(client)  # a refused request did not load it either
    client.triton.load_model("mlp")
    assert client.triton.is_model_ready("mlp")
    np.testing.assert_array_equal(client.infer_mlp(), expected)


def test_unloading_a_model_never_loaded_takes_it_out_of_service_too(client: Client) -> None:
    client.triton.unload_model("mlp")
    assert_out_of_service(client)
    client.triton.load_model("mlp")
    assert client.index()[("mlp", "2")] == ("READY", "")


def test_metadata_of_an_unloaded_model_is_unavailable(client: Client) -> None:
    client.triton.unload_model("versioned")
    for call in (client.triton.get_model_metadata, client.triton.get_model_config):
        error = error_of(call, "versioned", "2")
        assert error.status() == client.status(UNAVAILABLE)
        assert "versioned:2 was unloaded" in error.message()
    assert not client.triton.is_model_ready("versioned", "1")


def test_an_unload_is_not_persisted_a_restart_clears_it(
    serve: Callable[..., RunningServer],
) -> None:
    first = serve()
    c = Client("grpc", first)
    c.triton.unload_model("mlp")
    assert_out_of_service(c)
    c.close()
    stop_server(first)
    c = Client("grpc", serve())
    assert c.triton.is_model_ready("mlp")
    assert c.infer_mlp().shape == (2, 4)
    c.close()


def test_an_evicted_model_is_not_unloaded_it_loads_again_on_first_use(
    serve: Callable[..., RunningServer], repo: Path, protocol: str
) -> None:
    testing.write_model(repo, "other", testing.fixed_shape((2,)))
    c = Client(protocol, serve(max_loaded_models=1))
    expected = ort_run(repo, "mlp", 2, {"INPUT0": mlp_input(2)})["OUTPUT0"]
    np.testing.assert_array_equal(c.infer_mlp(), expected)
    c.triton.load_model("other")  # room for one model: mlp is evicted
    assert c.index()[("mlp", "2")] == ("UNAVAILABLE", "evicted")
    assert c.triton.is_model_ready("mlp")
    np.testing.assert_array_equal(c.infer_mlp(), expected)  # loaded again, lazily
    assert c.index()[("mlp", "2")] == ("READY", "")
    assert c.index()[("other", "1")] == ("UNAVAILABLE", "evicted")
    c.close()


def test_ready_only_index_keeps_ready_versions(serve: Callable[..., RunningServer]) -> None:
    server = serve()
    with grpcclient.InferenceServerClient(server.grpc) as c:
        c.load_model("versioned")
    expected = [("versioned", str(v), "READY") for v in (1, 2, 3)]

    status, body = raw_post(server, "/v2/repository/index", b'{"ready": true}')
    assert status == 200
    assert [(r["name"], r["version"], r["state"]) for r in json.loads(body)] == expected

    reply = raw_grpc(server, "RepositoryIndex", pb.RepositoryIndexRequest(ready=True),
                     pb.RepositoryIndexResponse)  # fmt: skip
    assert [(m.name, m.version, m.state) for m in reply.models] == expected

    # without the filter (empty body, as tritonclient sends, or ready: false) all rows come
    for body_sent in (b"", b"{}", b'{"ready": false}'):
        status, body = raw_post(server, "/v2/repository/index", body_sent)
        assert status == 200
        assert len(json.loads(body)) == 6  # mlp:2, versioned:1-3, bad_config, empty
    reply = raw_grpc(server, "RepositoryIndex", pb.RepositoryIndexRequest(),
                     pb.RepositoryIndexResponse)  # fmt: skip
    assert len(reply.models) == 6


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"ready": "yes"}', '"ready" must be a boolean'),
        (b"[true]", "must be a JSON object"),
        (b"{not json", "malformed JSON"),
    ],
)
def test_malformed_index_request_is_invalid_argument(
    serve: Callable[..., RunningServer], body: bytes, message: str
) -> None:
    status, reply = raw_post(serve(), "/v2/repository/index", body)
    assert status == 400
    assert message in json.loads(reply)["error"]


def test_repository_name_other_than_empty_is_invalid_argument(
    serve: Callable[..., RunningServer],
) -> None:
    server = serve()
    with pytest.raises(grpc.RpcError) as info:
        raw_grpc(server, "RepositoryIndex", pb.RepositoryIndexRequest(repository_name="other"),
                 pb.RepositoryIndexResponse)  # fmt: skip
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "one model repository" in info.value.details()


# -- load and unload -----------------------------------------------------------------


def test_load_and_unload_with_tritonclient(client: Client) -> None:
    client.triton.load_model("versioned")
    index = client.index()
    assert [index[("versioned", v)] for v in "123"] == [("READY", "")] * 3
    assert client.triton.is_model_ready("versioned", "2")

    client.triton.load_model("versioned")  # loaded: a reload, still READY throughout
    assert [client.index()[("versioned", v)] for v in "123"] == [("READY", "")] * 3

    client.triton.unload_model("versioned")
    index = client.index()
    assert [index[("versioned", v)] for v in "123"] == [("UNAVAILABLE", "unloaded")] * 3
    client.triton.unload_model("versioned")  # not loaded: still a success (as Triton)
    client.triton.unload_model("mlp", unload_dependents=True)  # never loaded; flag ignored


def test_load_and_unload_of_unknown_model_is_not_found(client: Client) -> None:
    for call in (client.triton.load_model, client.triton.unload_model):
        error = error_of(call, "no_such_model")
        assert error.status() == client.status(NOT_FOUND)
        assert "no_such_model" in error.message()


def test_load_of_invalid_model_name_is_invalid_argument(client: Client) -> None:
    error = error_of(client.triton.load_model, "bad name")
    assert error.status() == client.status(INVALID)
    assert "invalid model name" in error.message()


def test_load_with_config_override_is_refused_as_invalid_argument(client: Client) -> None:
    error = error_of(client.triton.load_model, "mlp", config=json.dumps({"max_batch_size": 4}))
    assert error.status() == client.status(INVALID)
    assert "not supported" in error.message()
    assert "config" in error.message()
    assert client.index()[("mlp", "2")] == ("UNAVAILABLE", "not loaded yet")  # nothing loaded


def test_load_with_file_override_is_refused_as_invalid_argument(
    serve: Callable[..., RunningServer],
) -> None:
    # over gRPC only: tritonclient.http 2.41 cannot send files (it puts base64 bytes in json)
    with grpcclient.InferenceServerClient(serve().grpc) as c:
        error = error_of(
            c.load_model, "mlp", config="{}", files={"file:1/model.onnx": testing.mlp()}
        )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "file:1/model.onnx" in error.message()


def test_load_reloads_with_the_version_policy_on_disk(
    serve: Callable[..., RunningServer], repo: Path
) -> None:
    c = Client("http", serve())
    c.triton.load_model("mlp")
    assert c.index()[("mlp", "2")] == ("READY", "")
    testing.write_model(repo, "mlp", testing.mlp(seed=3), version=3)  # a new latest version
    assert c.index()[("mlp", "2")] == ("READY", "")  # an index or rescan loads nothing
    c.triton.load_model("mlp")
    index = c.index()
    assert index[("mlp", "3")] == ("READY", "")
    assert ("mlp", "2") not in index  # left the policy: unloaded, no longer listed
    expected = ort_run(repo, "mlp", 3, {"INPUT0": mlp_input(2)})["OUTPUT0"]
    np.testing.assert_array_equal(c.infer_mlp(), expected)
    c.close()


def test_model_added_after_startup_is_found_by_index_and_load(client: Client, repo: Path) -> None:
    testing.write_model(repo, "late", testing.fixed_shape((2,), factor=5.0))
    assert client.index()[("late", "1")] == ("UNAVAILABLE", "not loaded yet")
    testing.write_model(repo, "later", testing.fixed_shape((2,), factor=7.0))
    client.triton.load_model("later")  # no index first: load rescans by itself
    assert client.index()[("later", "1")] == ("READY", "")
    mod = httpclient if client.protocol == "http" else grpcclient
    tensor = mod.InferInput("INPUT0", [2], "FP32")
    tensor.set_data_from_numpy(np.array([1.0, 2.0], np.float32))
    result = client.triton.infer("later", [tensor]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(result, [7.0, 14.0])


def test_poll_finds_a_new_model_directory_by_itself(
    serve: Callable[..., RunningServer], repo: Path
) -> None:
    server = serve(repository_poll_secs=0.2)
    with httpclient.InferenceServerClient(server.http) as c:
        assert not c.is_model_ready("polled")
        testing.write_model(repo, "polled", testing.fixed_shape((2,), factor=3.0))
        # is_model_ready does not rescan: only the poll task can make the model known
        wait_for(lambda: c.is_model_ready("polled"), "the poll to find model 'polled'")
        tensor = httpclient.InferInput("INPUT0", [2], "FP32")
        tensor.set_data_from_numpy(np.array([1.0, -1.0], np.float32))
        np.testing.assert_array_equal(c.infer("polled", [tensor]).as_numpy("OUTPUT0"), [3, -3])
    poll = server.app._poll
    assert poll is not None and not poll.done()
    stop_server(server)
    assert poll.cancelled()  # App.stop cancelled the poll task and waited for it


def test_removed_model_keeps_serving_until_unloaded(client: Client, repo: Path) -> None:
    expected = ort_run(repo, "mlp", 2, {"INPUT0": mlp_input(2)})["OUTPUT0"]
    client.triton.load_model("mlp")
    shutil.rmtree(repo / "mlp")
    index = client.index()  # rescans: the directory is gone, the loaded version stays
    assert index[("mlp", "2")] == ("READY", "")
    np.testing.assert_array_equal(client.infer_mlp(), expected)
    error = error_of(client.triton.load_model, "mlp")  # nothing on disk to load
    assert error.status() == client.status(NOT_FOUND)
    client.triton.unload_model("mlp")
    assert not any(name == "mlp" for name, _ in client.index())
    error = error_of(client.infer_mlp)
    assert error.status() == client.status(NOT_FOUND)


def test_failed_load_is_reported_in_the_index_then_fixed_on_disk_and_loaded(
    client: Client, repo: Path
) -> None:
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")

    error = error_of(client.triton.load_model, "broken")
    assert error.status() == client.status(UNAVAILABLE)
    assert "failed to load" in error.message()
    state, reason = client.index()[("broken", "1")]
    assert state == "UNAVAILABLE"
    assert "failed to load" in reason and reason in error.message()

    testing.write_model(repo, "broken", testing.fixed_shape((2,), factor=4.0))  # fixed
    client.triton.load_model("broken")  # an explicit load ignores the retry backoff
    assert client.index()[("broken", "1")] == ("READY", "")
    assert client.triton.is_model_ready("broken")


def test_model_larger_than_the_budget_is_resource_exhausted(
    serve: Callable[..., RunningServer], protocol: str
) -> None:
    c = Client(protocol, serve(max_loaded_bytes=1000))
    error = error_of(c.triton.load_model, "mlp")
    assert error.status() == c.status(EXHAUSTED)
    assert "budget" in error.message()
    state, reason = c.index()[("mlp", "2")]
    assert state == "UNAVAILABLE" and "budget" in reason
    c.close()


def test_unload_drains_a_request_in_flight(serve: Callable[..., RunningServer], repo: Path) -> None:
    """The slow model's run is held at a gate inside the server: the request is
    provably in flight while unload is called, and both finish once it opens."""
    testing.write_model(repo, "slow", testing.slow(dim=64, depth=2))
    server = serve()
    with httpclient.InferenceServerClient(server.http) as c:
        c.load_model("slow")
    servable = server.app.cache.servable(ModelId("slow", 1))
    assert servable is not None and not servable.inline
    entered, gate = threading.Event(), threading.Event()
    run = servable.model.run

    def gated(*args: Any) -> Any:
        entered.set()
        assert gate.wait(DEADLINE_S), "the test never opened the gate"
        return run(*args)

    servable.model.run = gated  # type: ignore[method-assign]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)

    def infer() -> np.ndarray:
        with httpclient.InferenceServerClient(server.http) as c:
            tensor = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return c.infer("slow", [tensor]).as_numpy("OUTPUT0")

    def unload() -> None:
        with grpcclient.InferenceServerClient(server.grpc) as c:
            c.unload_model("slow")

    with ThreadPoolExecutor(2) as pool, httpclient.InferenceServerClient(server.http) as c:
        try:
            pending = pool.submit(infer)
            assert entered.wait(DEADLINE_S), "the request never reached the model"
            unloading = pool.submit(unload)

            def state() -> str:
                return next(r["state"] for r in c.get_model_repository_index()
                            if r["name"] == "slow")  # fmt: skip

            wait_for(lambda: state() == "UNLOADING", "the unload to start draining")
            assert not unloading.done() and not pending.done()
        finally:
            gate.set()
        np.testing.assert_array_equal(pending.result(DEADLINE_S), x)  # identity weights
        unloading.result(DEADLINE_S)
        assert state() == "UNAVAILABLE"
    assert servable.leases == 0


# -- access control --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.2", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("0.0.0.0", False),
        ("", False),
        (None, False),
        ("localhost", False),  # a name, not an address: never trusted
        ("not an address", False),
    ],
)
def test_only_loopback_addresses_may_control_the_repository(
    address: str | None, allowed: bool
) -> None:
    assert is_loopback(address) is allowed


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:50051", "127.0.0.1"),
        ("ipv4:10.0.0.1:1234", "10.0.0.1"),
        ("ipv6:[::1]:50051", "::1"),
        ("ipv6:%5B::1%5D:50051", "::1"),
        ("ipv6:[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1"),
        ("unix:/tmp/socket", None),
        ("", None),
    ],
)
def test_grpc_peer_address(peer: str, address: str | None) -> None:
    assert peer_address(peer) == address


def refusing_admin() -> AdminService:
    """An AdminService whose every use fails the test: a refused call must not reach it."""
    nothing = mock.NonCallableMock
    return AdminService(
        nothing(), nothing(), nothing(), Settings(model_repository=Path("m")), nothing()
    )


@pytest.mark.parametrize(
    "path",
    ["/v2/repository/index", "/v2/repository/models/mlp/load", "/v2/repository/models/mlp/unload"],
)
def test_rest_repository_control_from_a_remote_peer_is_unauthenticated(path: str) -> None:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: (
        ("10.0.0.1", 40000) if key == "peername" else default
    )
    request = make_mocked_request("POST", path, transport=transport)
    rest = RestApi(mock.NonCallableMock(), 1024, refusing_admin())
    response = asyncio.run(rest.dispatch(request))
    assert response.status == 401
    assert "loopback-only" in json.loads(response.body)["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("RepositoryIndex", pb.RepositoryIndexRequest()),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="mlp")),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="mlp")),
    ],
)
@pytest.mark.parametrize("peer", ["ipv4:192.168.1.2:5000", "ipv6:[::ffff:10.0.0.1]:5000"])
def test_grpc_repository_control_from_a_remote_peer_is_unauthenticated(
    method: str, request_message: Any, peer: str
) -> None:
    class Aborted(Exception):
        pass

    context = mock.Mock()
    context.peer.return_value = peer
    context.invocation_metadata.return_value = ()
    context.abort = mock.AsyncMock(side_effect=Aborted)
    api = GrpcApi(mock.NonCallableMock(), refusing_admin())
    # the method as registered: its bytes are parsed and its errors mapped by the edge
    details = mock.Mock(method=f"/inference.GRPCInferenceService/{method}")
    handler = api.handlers()[0].service(details)
    with pytest.raises(Aborted):
        asyncio.run(handler.unary_unary(request_message.SerializeToString(), context))
    code, message = context.abort.call_args.args
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "loopback-only" in message


def test_reload_under_a_model_limit_evicts_another_model_not_its_own_old_copy(
    serve: Callable[..., RunningServer], repo: Path
) -> None:
    testing.write_model(repo, "other", testing.fixed_shape((2,)))
    server = serve(max_loaded_models=2)
    c = Client("http", server)
    c.triton.load_model("mlp")
    c.triton.load_model("other")
    c.triton.load_model("mlp")  # needs room for a second copy: `other` makes way
    index = c.index()
    assert index[("mlp", "2")] == ("READY", "")
    assert index[("other", "1")] == ("UNAVAILABLE", "evicted")
    cache = server.app.cache
    servable = cache.servable(ModelId("mlp", 2))
    assert (cache.loaded_count, cache.used_bytes) == (1, servable.size_bytes)
    c.close()


# -- rescans (Repository.rescan / install) -----------------------------------------------


def test_rescan_reuses_unchanged_entries_rereads_changed_ones_and_keeps_lazy_ones_lazy(
    repo: Path,
) -> None:
    repository = Repository(Settings(model_repository=repo))
    repository.scan()
    mlp, versioned = repository.entry("mlp"), repository.entry("versioned")
    (repo / "versioned" / "config.pbtxt").write_text("max_batch_size: 0\n")  # latest 1 now
    snapshot = repository.rescan()
    assert set(snapshot.entries) == {"mlp", "versioned"}  # the others were never read
    repository.install(snapshot)
    assert repository.entry("mlp") is mlp  # unchanged: not read again
    assert repository.entry("versioned") is not versioned
    assert repository.entry("versioned").servable == (3,)
    testing.write_model(repo, "mlp", testing.mlp(), version=3)  # a new version directory
    repository.install(repository.rescan())
    assert repository.entry("mlp").servable == (3,)
    snapshot = repository.rescan(read_all=True)
    assert set(snapshot.entries) == {"mlp", "versioned", "bad_config", "empty"}


def test_install_keeps_a_removed_model_only_when_asked(repo: Path) -> None:
    repository = Repository(Settings(model_repository=repo))
    repository.scan()
    entry = repository.entry("mlp")
    shutil.rmtree(repo / "mlp")
    snapshot = repository.rescan()
    repository.install(snapshot, keep={"mlp"})
    assert "mlp" in repository.names and repository.entry("mlp") is entry
    repository.forget("mlp")  # the last listing did not find it
    assert "mlp" not in repository.names
    repository.install(snapshot)
    assert "mlp" not in repository.names


@pytest.mark.parametrize(
    ("token", "address", "authorization", "host", "origin", "allowed"),
    [
        (None, "127.0.0.1", None, "127.0.0.1:8000", None, True),
        (None, "127.0.0.1", None, "localhost:8000", None, True),
        (None, "::1", None, "[::1]:8000", None, True),
        (None, "127.0.0.1", None, None, None, True),  # gRPC: no Host header
        (None, "127.0.0.1", None, "evil.example:8000", None, False),  # DNS rebinding
        (None, "127.0.0.1", None, "localhost:8000", "http://evil.example", False),  # CSRF
        (None, "10.0.0.1", None, "127.0.0.1:8000", None, False),
        ("t0k", "10.0.0.1", "Bearer t0k", "anything:1", "http://x", True),
        ("t0k", "127.0.0.1", None, "localhost:8000", None, False),
        ("t0k", "127.0.0.1", "bearer  t0k ", "localhost", None, True),
    ],
)
def test_the_admin_access_rule(
    token: str | None, address: str, authorization: str | None, host: str | None,
    origin: str | None, allowed: bool,
) -> None:  # fmt: skip
    from fleetserve.server.admin import authorize
    from fleetserve.server.errors import Unauthenticated

    if allowed:
        authorize(token, address, authorization, host, origin)
    else:
        with pytest.raises(Unauthenticated):
            authorize(token, address, authorization, host, origin)
