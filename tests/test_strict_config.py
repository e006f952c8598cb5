"""A config.pbtxt field fleetserve does not act on is an error naming it at every entry
point: the repository index, loads (and requests), and the admin API's config and model
uploads, all through the one check in server/config.py.

One server on a repository holding a model per field with that field in its config.pbtxt
(as on disk), driven with tritonclient over both protocols and the admin REST API.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from fleetserve.loaders import testing
from tests.conftest import RunningServer, start_server, stop_server, test_settings
from tests.helpers import WAIT_S, tree, upload_with_config

# the fields the issue found accepted silently: (config.pbtxt text, the field as named)
FIELDS = {
    "response_cache": ("response_cache { enable: true }", "response_cache"),
    "decoupled": (
        "model_transaction_policy { decoupled: true }",
        "model_transaction_policy.decoupled",
    ),
    "openvino": (
        "optimization { execution_accelerators {\n"
        '  cpu_execution_accelerator: [ { name: "openvino" } ] } }',
        "optimization.execution_accelerators.cpu_execution_accelerator['openvino']",
    ),
    "label_filename": (
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] label_filename: "l.txt" } ]',
        "output['OUTPUT0'].label_filename",
    ),
    "preserve_ordering": (
        "dynamic_batching { preserve_ordering: true }",
        "dynamic_batching.preserve_ordering",
    ),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("strict")
    for key, (text, _) in FIELDS.items():
        testing.write_model(root, f"bad_{key}", testing.fixed_shape((2,)), config=text)
    testing.write_model(root, "good", testing.fixed_shape((2,)), config="max_batch_size: 0\n")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    running = start_server(test_settings(repo, preload=False))
    yield running
    stop_server(running)


def client(protocol: str, server: RunningServer) -> httpclient.InferenceServerClient:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http)
    return grpcclient.InferenceServerClient(server.grpc)


def triton_error(call: Callable[[], object]) -> InferenceServerException:
    try:
        call()
    except InferenceServerException as exc:
        return exc.with_traceback(None)
    pytest.fail("no InferenceServerException")


def put(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(params=list(FIELDS))
def field(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(model name, config text, the field as the error names it)."""
    text, named = FIELDS[request.param]
    return f"bad_{request.param}", text, named


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_repository_index_names_the_field(
    server: RunningServer, field: tuple[str, str, str], protocol: str
) -> None:
    name, _, named = field
    with client(protocol, server) as c:
        rows = c.get_model_repository_index()
        if protocol == "grpc":
            rows = c.get_model_repository_index(as_json=True)["models"]
        [row] = [r for r in rows if r["name"] == name]
    assert "version" not in row and row["state"] == "UNAVAILABLE"
    assert f"{named} is set, but fleetserve does not act on it" in row["reason"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_load_and_a_request_name_the_field(
    server: RunningServer, field: tuple[str, str, str], protocol: str
) -> None:
    name, _, named = field
    unavailable = "503" if protocol == "http" else "StatusCode.UNAVAILABLE"
    module = httpclient if protocol == "http" else grpcclient
    with client(protocol, server) as c:
        error = triton_error(lambda: c.load_model(name))
        assert error.status() == unavailable and named in error.message()
        assert not c.is_model_ready(name)
        tensor = module.InferInput("INPUT0", [2], "FP32")
        tensor.set_data_from_numpy(np.ones(2, np.float32))
        error = triton_error(lambda: c.infer(name, [tensor]))
        assert error.status() == unavailable and named in error.message()


def test_a_config_upload_names_the_field(
    server: RunningServer, repo: Path, field: tuple[str, str, str]
) -> None:
    _, text, named = field
    before = tree(repo)
    status, body = put(f"{server.http_url}/v2/admin/models/good/config", text.encode())
    assert status == 400 and named in body
    assert tree(repo) == before


@pytest.mark.parametrize("target", ["new-model", "new-version"])
def test_a_model_upload_with_the_config_names_the_field(
    server: RunningServer, repo: Path, field: tuple[str, str, str], target: str
) -> None:
    _, text, named = field
    path = "fresh/versions/1" if target == "new-model" else "good/versions/2"
    before = tree(repo)
    status, reply = upload_with_config(
        f"{server.http_url}/v2/admin/models/{path}", testing.fixed_shape((2,)), text
    )
    assert status == 400 and named in reply["error"]
    assert tree(repo) == before
