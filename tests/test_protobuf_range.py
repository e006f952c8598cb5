"""The protobuf range pyproject declares is the range the checked-in stubs run on.

Its floor is the stubs' gencode version (protobuf refuses a runtime older than the
gencode). At both ends, the floor and the newest 7.x, protobuf is installed with
`pip install --target` and put first on a subprocess's path: the stubs import with
warnings as errors, messages round-trip, and a `fleetserve serve` process answers
tritonclient over HTTP and gRPC. The test process keeps its own protobuf (6.x, which
tritonclient needs), so the clients also check the wire across the two versions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fleetserve.loaders import testing
from tests.helpers import mlp_input, ort_run
from tests.server_process import Server, environment

REPO_ROOT = Path(__file__).resolve().parent.parent
GENCODE_LINE = re.compile(r"^# Protobuf Python Version: (\S+)$", re.MULTILINE)

# Run under the protobuf being tested, with every warning an error.
IMPORT_AND_ROUND_TRIP = """
import sys
import google.protobuf
from google.protobuf import json_format, text_format
from fleetserve.protos import grpc_service_pb2 as pb, health_pb2, model_config_pb2 as mc

assert google.protobuf.__version__ == sys.argv[1], google.protobuf.__file__
config = text_format.Parse(
    'name: "m" max_batch_size: 8 input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]'
    ' dynamic_batching { preferred_batch_size: [4] }',
    mc.ModelConfig(),
)
request = pb.ModelInferRequest(
    model_name="m",
    id="r1",
    parameters={"priority": pb.InferParameter(uint64_param=2)},
    inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])],
    raw_input_contents=[bytes(16)],
)
for message in (config, pb.ModelConfigResponse(config=config), request,
                health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)):
    assert type(message).FromString(message.SerializeToString()) == message
    assert json_format.ParseDict(json_format.MessageToDict(message), type(message)()) == message
assert text_format.Parse(text_format.MessageToString(config), mc.ModelConfig()) == config
print("ok")
"""


def declared_range() -> SpecifierSet:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = (r for r in map(Requirement, project["dependencies"]) if r.name == "protobuf")
    return requirement.specifier


def gencode_versions() -> set[str]:
    return {
        match[1]
        for path in (REPO_ROOT / "protos").glob("*_pb2.py")
        for match in [GENCODE_LINE.search(path.read_text())]
        if match
    }


def test_range_floor_is_the_gencode_version_and_it_spans_one_major_more() -> None:
    (gencode,) = gencode_versions()
    major = Version(gencode).major
    # gencode of major V is supported on runtimes V and V+1 (protos/README.md)
    assert {str(s) for s in declared_range()} == {f">={gencode}", f"<{major + 2}"}
    assert len(list((REPO_ROOT / "protos").glob("*_pb2.py"))) == 3


@pytest.fixture(scope="module", params=["floor", "newest 7.x"])
def protobuf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only protobuf, at one end of the declared range."""
    (floor,) = (s.version for s in declared_range() if s.operator == ">=")
    wanted = f"protobuf=={floor}" if request.param == "floor" else "protobuf>=7,<8"
    target = tmp_path_factory.mktemp("protobuf")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
    subprocess.run([*pip, target, wanted], check=True, timeout=300, stdin=subprocess.DEVNULL)
    version = Version(installed_version(target))
    assert version in declared_range()
    assert version == Version(floor) if request.param == "floor" else version.major == 7
    return target


def installed_version(target: Path) -> str:
    (dist,) = (d for d in distributions(path=[str(target)]) if d.metadata["Name"] == "protobuf")
    return dist.version


def env_with(target: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    return env


def test_stubs_import_without_warnings_and_round_trip(protobuf_dir: Path) -> None:
    version = installed_version(protobuf_dir)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", IMPORT_AND_ROUND_TRIP, version],
        env=env_with(protobuf_dir),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "ok\n"), (
        f"protobuf {version}:\n{result.stderr}"
    )


def test_server_answers_tritonclient_over_http_and_grpc(protobuf_dir: Path, tmp_path: Path) -> None:
    testing.write_model(tmp_path, "mlp", testing.mlp(seed=1))
    x = mlp_input(rows=2)
    expected = ort_run(tmp_path, "mlp", 1, {"INPUT0": x})["OUTPUT0"]
    args = ("--model-repository", str(tmp_path), "--host", "127.0.0.1", "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "-1")  # fmt: skip
    with Server(*args, env=environment(**env_with(protobuf_dir))) as server:
        http_port, grpc_port, _ = server.wait_ready()
        for mod, port in ((httpclient, http_port), (grpcclient, grpc_port)):
            address = f"127.0.0.1:{port}"
            client = mod.InferenceServerClient(address)
            try:
                tensor = mod.InferInput("INPUT0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                config = client.get_model_config("mlp")  # ModelConfig, written by the server
                result = client.infer("mlp", [tensor], request_id="range")
            finally:
                client.close()
            name = config["name"] if mod is httpclient else config.config.name
            assert name == "mlp"
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    log = "\n".join(server.lines)
    assert "Traceback" not in log and "gencode" not in log.lower(), log
