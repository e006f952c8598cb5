"""The REST edge over real HTTP: health, metadata, JSON and binary inference, errors,
configuration, statistics, metrics and concurrency.

Every request goes through a real socket to the session's server (conftest `server`).
Inference results are compared bit for bit with onnxruntime run directly on the same
model file from the `repo` fixture.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetserve.loaders import testing
from tests.conftest import start_server, stop_server, test_settings
from tests.helpers import (
    NUMPY,
    assert_identical,
    extremes,
    mlp_input,
    ort_run,
    raw_bytes,
    split_bytes,
)

HEADER_LENGTH = "Inference-Header-Content-Length"

# Values for each identity_<dt> model, shape [2, 4]: the extremes of every integer type,
# awkward floats (subnormals, -0.0, the largest finite value, non-representable decimals)
# and text that needs escaping or multi-byte UTF-8.
VALUES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, False, False, False, True, True],
    "INT8": [-128, 127, 0, -1, 1, -127, 126, 42],
    "INT16": [-32768, 32767, 0, -1, 1, 255, 256, -256],
    "INT32": [-(2**31), 2**31 - 1, 0, -1, 1, 65535, 65536, -65536],
    "INT64": [-(2**63), 2**63 - 1, 0, -1, 1, 2**53 + 1, -(2**53) - 1, 2**32],
    "UINT8": [0, 255, 1, 128, 127, 254, 2, 3],
    "UINT16": [0, 65535, 1, 32768, 32767, 65534, 2, 3],
    "UINT32": [0, 2**32 - 1, 1, 2**31, 2**31 - 1, 2**32 - 2, 2, 3],
    "UINT64": [0, 2**64 - 1, 1, 2**63, 2**63 - 1, 2**64 - 2, 2**53 + 1, 3],
    "FP16": [1.5, -0.0, 65504.0, -65504.0, 0.1, 6e-08, 6.1e-05, -3.14],
    "FP32": [0.1, -0.0, 3.4028235e38, -3.4028235e38, 1e-45, 1.1754944e-38, 1 / 3, -2.5],
    "FP64": [0.1, -0.0, 1.7976931348623157e308, -1.7976931348623157e308, 5e-324, 1 / 3,
             1e-300, 2.5],
    "BYTES": ["", "a", "héllo", "日本語", 'quote " and \\ backslash', "tab\tnewline\n", "🙂",
              "x" * 300],
}  # fmt: skip


def identity_input(datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(8, dtype=object)
        array[:] = [s.encode() for s in VALUES["BYTES"]]
        return array.reshape(2, 4)
    return np.array(VALUES[datatype], dtype=NUMPY[datatype]).reshape(2, 4)


# ---------------------------------------------------------------------------------------
# client helpers (stdlib urllib: a real HTTP client, one connection per request)


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def error(self) -> str:
        """The message of a protocol error body, checking its shape on the way."""
        doc = self.json()
        assert isinstance(doc, dict) and set(doc) == {"error"}, doc
        assert isinstance(doc["error"], str) and doc["error"]
        return doc["error"]


def call(
    server: Any,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, Any] | None = None,
) -> Reply:
    request = urllib.request.Request(
        server.http_url + path, data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())


def get(server: Any, path: str) -> Reply:
    return call(server, "GET", path)


def post_json(server: Any, path: str, doc: Any) -> Reply:
    return call(
        server, "POST", path, json.dumps(doc).encode(), {"Content-Type": "application/json"}
    )


def infer_path(model: str, version: str | None = None) -> str:
    if version is None:
        return f"/v2/models/{model}/infer"
    return f"/v2/models/{model}/versions/{version}/infer"


def json_input(name: str, array: np.ndarray, datatype: str, *, nested: bool = False) -> dict:
    if datatype == "BYTES":
        data = [b.decode() for b in array.ravel()]
        if nested:
            data = np.array(data, dtype=object).reshape(array.shape).tolist()
    else:
        data = array.tolist() if nested else array.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def binary_request(
    inputs: list[tuple[str, str, np.ndarray, bool]],
    outputs: list[dict] | None = None,
    parameters: dict | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a request; each input is (name, datatype, array, as_binary)."""
    entries, chunks = [], []
    for name, datatype, array, as_binary in inputs:
        if as_binary:
            raw = raw_bytes(array)
            chunks.append(raw)
            entries.append(
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
        else:
            entries.append(json_input(name, array, datatype))
    doc: dict[str, Any] = {"inputs": entries}
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters is not None:
        doc["parameters"] = parameters
    header = json.dumps(doc).encode()
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(chunks), headers


def response_arrays(reply: Reply) -> tuple[dict, dict[str, np.ndarray]]:
    """The response document and its outputs as arrays, JSON or binary."""
    assert reply.status == 200, reply.body[:500]
    length = reply.headers.get(HEADER_LENGTH)
    if length is None:
        assert reply.headers.get("Content-Type", "").startswith("application/json")
        doc, binary = orjson.loads(reply.body), b""
    else:
        doc, binary = orjson.loads(reply.body[: int(length)]), reply.body[int(length) :]
    arrays, offset = {}, 0
    for out in doc["outputs"]:
        datatype, shape = out["datatype"], out["shape"]
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            assert "data" not in out
            raw = binary[offset : offset + size]
            assert len(raw) == size
            offset += size
            if datatype == "BYTES":
                array = np.empty(int(np.prod(shape)), dtype=object)
                array[:] = split_bytes(raw)
            else:
                array = np.frombuffer(raw, dtype=np.dtype(NUMPY[datatype]).newbyteorder("<"))
        elif datatype == "BYTES":
            array = np.empty(len(out["data"]), dtype=object)
            array[:] = [s.encode() for s in out["data"]]
        else:
            array = np.array(out["data"], dtype=NUMPY[datatype])
        arrays[out["name"]] = array.reshape(shape)
    assert offset == len(binary), "the response has binary data no output claims"
    return doc, arrays


def simple_inputs(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
    return a, b


def simple_json_inputs(a: np.ndarray, b: np.ndarray) -> list[dict]:
    """The `simple` model's two INT32 inputs as JSON tensors."""
    return [json_input("INPUT0", a, "INT32"), json_input("INPUT1", b, "INT32")]


# ---------------------------------------------------------------------------------------
# health and metadata


def test_health_live_and_ready_answer_200_with_empty_bodies(server):
    for path in ("/v2/health/live", "/v2/health/ready"):
        reply = get(server, path)
        assert reply.status == 200, path
        assert reply.body == b"", path


@pytest.mark.parametrize("path", ["/v2", "/v2/"])
def test_server_metadata_names_server_and_extensions(server, path):
    reply = get(server, path)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    doc = reply.json()
    assert doc["name"] == "fleetserve"
    assert isinstance(doc["version"], str) and doc["version"]
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(doc["extensions"])


def test_model_metadata_reports_policy_versions_platform_and_signature(server):
    reply = get(server, "/v2/models/mlp")
    assert reply.status == 200
    doc = reply.json()
    assert doc["name"] == "mlp"
    assert doc["versions"] == ["2"]  # default policy: latest 1 of versions 1 and 2
    assert doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    assert doc["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 4]}]


def test_versioned_model_metadata_lists_every_version(server):
    reply = get(server, "/v2/models/versioned/versions/2")
    assert reply.status == 200
    doc = reply.json()
    assert doc["name"] == "versioned"
    assert doc["versions"] == ["1", "2", "3"]
    assert doc["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [2]}]


def test_model_metadata_of_unknown_model_or_version_is_404(server):
    reply = get(server, "/v2/models/no_such_model")
    assert reply.status == 404
    assert "no_such_model" in reply.error()
    reply = get(server, "/v2/models/mlp/versions/1")
    assert reply.status == 404
    assert "available: 2" in reply.error()


def test_model_ready_is_200_for_a_serving_model(server):
    for path in ("/v2/models/mlp/ready", "/v2/models/mlp/versions/2/ready"):
        reply = get(server, path)
        assert reply.status == 200, path
        assert reply.body == b""


def test_model_ready_of_version_outside_the_policy_is_400(server):
    reply = get(server, "/v2/models/mlp/versions/1/ready")
    assert reply.status == 400
    assert reply.body == b""


def test_model_ready_of_unknown_model_is_404(server):
    reply = get(server, "/v2/models/no_such_model/ready")
    assert reply.status == 404
    assert "no_such_model" in reply.error()


# ---------------------------------------------------------------------------------------
# JSON inference


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_mlp_json_inference_equals_onnxruntime(server, repo, nested):
    x = mlp_input(3, seed=10 + nested)
    reply = post_json(
        server, infer_path("mlp"), {"inputs": [json_input("INPUT0", x, "FP32", nested=nested)]}
    )
    doc, arrays = response_arrays(reply)
    assert doc["model_name"] == "mlp"
    assert doc["model_version"] == "2"
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT0"]
    assert doc["outputs"][0]["datatype"] == "FP32"
    assert_identical(arrays["OUTPUT0"], ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"])


def test_response_echoes_id_only_when_the_request_gives_one(server):
    x = mlp_input(1, seed=3)
    with_id = post_json(
        server, infer_path("mlp"), {"id": "req-42", "inputs": [json_input("INPUT0", x, "FP32")]}
    )
    assert with_id.status == 200
    assert with_id.json()["id"] == "req-42"
    without = post_json(server, infer_path("mlp"), {"inputs": [json_input("INPUT0", x, "FP32")]})
    assert without.status == 200
    assert "id" not in without.json()


def test_explicit_version_path_serves_that_version(server, repo):
    x = mlp_input(2, seed=4)
    reply = post_json(server, infer_path("mlp", "2"), {"inputs": [json_input("INPUT0", x, "FP32")]})
    doc, arrays = response_arrays(reply)
    assert doc["model_version"] == "2"
    assert_identical(arrays["OUTPUT0"], ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"])
    # version 2's weights, not version 1's
    assert not np.array_equal(arrays["OUTPUT0"], ort_run(repo, "mlp", 1, {"INPUT0": x})["OUTPUT0"])


def test_outputs_selects_a_subset(server, repo):
    a, b = simple_inputs(2, seed=5)
    reply = post_json(
        server,
        infer_path("simple"),
        {
            "inputs": simple_json_inputs(a, b),
            "outputs": [{"name": "OUTPUT1"}],
        },
    )
    doc, arrays = response_arrays(reply)
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT1"]
    expected = ort_run(repo, "simple", 1, {"INPUT0": a, "INPUT1": b})
    assert_identical(arrays["OUTPUT1"], expected["OUTPUT1"])
    np.testing.assert_array_equal(arrays["OUTPUT1"], a - b)


def test_without_outputs_every_output_is_returned_in_model_order(server):
    a, b = simple_inputs(1, seed=6)
    reply = post_json(server, infer_path("simple"), {"inputs": simple_json_inputs(a, b)})
    doc, arrays = response_arrays(reply)
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(arrays["OUTPUT0"], a + b)
    np.testing.assert_array_equal(arrays["OUTPUT1"], a - b)


# ---------------------------------------------------------------------------------------
# Triton binary tensor data


def test_binary_input_and_binary_output_by_output_parameter(server, repo):
    x = mlp_input(4, seed=7)
    body, headers = binary_request(
        [("INPUT0", "FP32", x, True)],
        outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    )
    reply = call(server, "POST", infer_path("mlp"), body, headers)
    assert reply.status == 200
    assert HEADER_LENGTH in reply.headers
    assert reply.headers["Content-Type"].startswith("application/octet-stream")
    doc, arrays = response_arrays(reply)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 4 * 4 * 4}
    assert_identical(arrays["OUTPUT0"], ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"])


def test_binary_data_output_parameter_makes_every_output_binary(server, repo):
    a, b = simple_inputs(3, seed=8)
    body, headers = binary_request(
        [("INPUT0", "INT32", a, True), ("INPUT1", "INT32", b, True)],
        parameters={"binary_data_output": True},
    )
    reply = call(server, "POST", infer_path("simple"), body, headers)
    doc, arrays = response_arrays(reply)
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    assert all("data" not in o for o in doc["outputs"])
    expected = ort_run(repo, "simple", 1, {"INPUT0": a, "INPUT1": b})
    assert_identical(arrays["OUTPUT0"], expected["OUTPUT0"])
    assert_identical(arrays["OUTPUT1"], expected["OUTPUT1"])


def test_output_binary_data_false_overrides_binary_data_output(server):
    a, b = simple_inputs(1, seed=9)
    body, headers = binary_request(
        [("INPUT0", "INT32", a, True), ("INPUT1", "INT32", b, True)],
        outputs=[
            {"name": "OUTPUT1", "parameters": {"binary_data": True}},
            {"name": "OUTPUT0", "parameters": {"binary_data": False}},
        ],
        parameters={"binary_data_output": True},
    )
    reply = call(server, "POST", infer_path("simple"), body, headers)
    doc, arrays = response_arrays(reply)
    # outputs in the requested order; only OUTPUT1 in the binary part
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT1", "OUTPUT0"]
    assert "data" in doc["outputs"][1]
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 16 * 4
    np.testing.assert_array_equal(arrays["OUTPUT0"], a + b)
    np.testing.assert_array_equal(arrays["OUTPUT1"], a - b)


def test_bytes_binary_round_trip_with_length_prefixes(server):
    x = identity_input("BYTES")
    body, headers = binary_request(
        [("INPUT0", "BYTES", x, True)],
        outputs=[{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    )
    reply = call(server, "POST", infer_path("identity_bytes"), body, headers)
    doc, arrays = response_arrays(reply)
    out = doc["outputs"][0]
    assert out["datatype"] == "BYTES"
    assert out["parameters"]["binary_data_size"] == len(raw_bytes(x))
    assert_identical(arrays["OUTPUT0"], x)


def test_mixed_json_and_binary_inputs(server, repo):
    a, b = simple_inputs(2, seed=11)
    for first_binary in (True, False):
        body, headers = binary_request(
            [("INPUT0", "INT32", a, first_binary), ("INPUT1", "INT32", b, not first_binary)]
        )
        reply = call(server, "POST", infer_path("simple"), body, headers)
        _, arrays = response_arrays(reply)
        expected = ort_run(repo, "simple", 1, {"INPUT0": a, "INPUT1": b})
        assert_identical(arrays["OUTPUT0"], expected["OUTPUT0"])
        assert_identical(arrays["OUTPUT1"], expected["OUTPUT1"])


def test_binary_input_of_non_utf8_bytes_is_rejected_for_onnx_strings(server):
    x = np.empty((1, 4), dtype=object)
    x[:] = [[b"ok", b"\xff\xfe", b"", b"x"]]
    body, headers = binary_request([("INPUT0", "BYTES", x, True)])
    reply = call(server, "POST", infer_path("identity_bytes"), body, headers)
    assert reply.status == 400
    assert "UTF-8" in reply.error()


# ---------------------------------------------------------------------------------------
# every datatype, both encodings


@pytest.mark.parametrize("datatype", list(NUMPY))
def test_every_datatype_round_trips_over_json(server, datatype):
    x = identity_input(datatype)
    reply = post_json(
        server,
        infer_path(f"identity_{datatype.lower()}"),
        {"inputs": [json_input("INPUT0", x, datatype)]},
    )
    doc, arrays = response_arrays(reply)
    out = doc["outputs"][0]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 4]
    if datatype == "BOOL":
        assert out["data"] == VALUES["BOOL"]  # JSON true/false, not 1/0
    if datatype == "BYTES":
        assert out["data"] == VALUES["BYTES"]  # UTF-8 strings come back as strings
    assert_identical(arrays["OUTPUT0"], x)


@pytest.mark.parametrize("datatype", list(NUMPY))
def test_every_datatype_round_trips_over_binary(server, datatype):
    x = identity_input(datatype)
    body, headers = binary_request(
        [("INPUT0", datatype, x, True)], parameters={"binary_data_output": True}
    )
    reply = call(server, "POST", infer_path(f"identity_{datatype.lower()}"), body, headers)
    doc, arrays = response_arrays(reply)
    out = doc["outputs"][0]
    assert out["datatype"] == datatype
    assert out["shape"] == [2, 4]
    assert out["parameters"]["binary_data_size"] == len(raw_bytes(x))
    assert_identical(arrays["OUTPUT0"], x)


def test_bool_input_given_as_strings_is_rejected_not_read_as_true(server):
    doc = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "BOOL",
                "shape": [1, 4],
                "data": ["false", "0", "", "no"],
            }
        ]
    }
    reply = post_json(server, infer_path("identity_bool"), doc)
    assert reply.status == 400, f"the server read them as {reply.json()['outputs'][0]['data']}"
    assert "BOOL" in reply.error()


# ---------------------------------------------------------------------------------------
# shapes: fixed and versioned models


def test_fixed_shape_model_takes_its_exact_shape(server, repo):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    reply = post_json(server, infer_path("fixed"), {"inputs": [json_input("INPUT0", x, "FP32")]})
    doc, arrays = response_arrays(reply)
    assert doc["outputs"][0]["shape"] == [3, 4]
    assert_identical(arrays["OUTPUT0"], ort_run(repo, "fixed", 1, {"INPUT0": x})["OUTPUT0"])
    np.testing.assert_array_equal(arrays["OUTPUT0"], x * 2)


def test_fixed_shape_model_rejects_an_added_batch_dimension(server):
    x = np.zeros((1, 3, 4), dtype=np.float32)
    reply = post_json(server, infer_path("fixed"), {"inputs": [json_input("INPUT0", x, "FP32")]})
    assert reply.status == 400
    message = reply.error()
    assert "INPUT0" in message and "[1, 3, 4]" in message and "[3, 4]" in message


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_each_version_serves_its_own_weights(server, version):
    x = np.array([1.5, -4.0], dtype=np.float32)
    reply = post_json(
        server, infer_path("versioned", version), {"inputs": [json_input("INPUT0", x, "FP32")]}
    )
    doc, arrays = response_arrays(reply)
    assert doc["model_version"] == version
    np.testing.assert_array_equal(arrays["OUTPUT0"], x * int(version))


def test_unversioned_request_goes_to_the_latest_version(server):
    x = np.array([1.0, 2.0], dtype=np.float32)
    reply = post_json(
        server, infer_path("versioned"), {"inputs": [json_input("INPUT0", x, "FP32")]}
    )
    doc, arrays = response_arrays(reply)
    assert doc["model_version"] == "3"
    np.testing.assert_array_equal(arrays["OUTPUT0"], x * 3)


def test_missing_version_is_404_listing_available_versions(server):
    x = np.array([1.0, 2.0], dtype=np.float32)
    reply = post_json(
        server, infer_path("versioned", "4"), {"inputs": [json_input("INPUT0", x, "FP32")]}
    )
    assert reply.status == 404
    message = reply.error()
    assert "'4'" in message and "1, 2, 3" in message


# ---------------------------------------------------------------------------------------
# errors: status and {"error": ...} naming the problem


def mlp_doc(**changes: Any) -> dict:
    item = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}
    item.update(changes)
    return {"inputs": [item]}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b'{"inputs": [', "malformed JSON", id="malformed-json"),
        pytest.param(b"", "malformed JSON", id="empty-body"),
        pytest.param(b"[1, 2]", "JSON object", id="body-not-object"),
        pytest.param(b"{}", "'inputs'", id="no-inputs"),
        pytest.param(b'{"inputs": []}', "'inputs'", id="empty-inputs"),
        pytest.param(orjson.dumps(mlp_doc(datatype="FP8")), "unknown datatype 'FP8'",
                     id="datatype"),
        pytest.param(orjson.dumps(mlp_doc(datatype="INT64", data=[1] * 16)), "datatype INT64",
                     id="wrong-datatype"),
        pytest.param(orjson.dumps(mlp_doc(shape=[1, 15], data=[0.5] * 15)), "[1, 15]",
                     id="shape-mismatch"),
        pytest.param(orjson.dumps(mlp_doc(data=[0.5] * 15)), "needs 16 elements, data has 15",
                     id="element-count"),
        pytest.param(orjson.dumps(mlp_doc(shape=[1, -16])), "negative dim", id="negative-dim"),
        pytest.param(orjson.dumps(mlp_doc(data=["a"] * 16)), "not valid FP32", id="text-as-fp32"),
        pytest.param(orjson.dumps(mlp_doc(name="NOPE")), "missing input(s) INPUT0",
                     id="misnamed-input"),
        pytest.param(orjson.dumps(mlp_doc(shape=[0, 16], data=[])), "batch size 0", id="batch-0"),
        pytest.param(orjson.dumps({**mlp_doc(), "id": 7}), "'id'", id="id-not-string"),
        pytest.param(orjson.dumps({**mlp_doc(), "outputs": [{"name": "NOPE"}]}), "no output 'NOPE'",
                     id="unknown-output"),
    ],
)  # fmt: skip
def test_bad_request_is_400_naming_the_problem(server, body, fragment):
    reply = call(server, "POST", infer_path("mlp"), body, {"Content-Type": "application/json"})
    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("application/json")
    assert fragment in reply.error()


def test_missing_input_is_400_naming_it(server):
    a, _ = simple_inputs(1, seed=12)
    reply = post_json(server, infer_path("simple"), {"inputs": [json_input("INPUT0", a, "INT32")]})
    assert reply.status == 400
    assert "missing input(s) INPUT1" in reply.error()


def test_unknown_extra_input_is_400_naming_it(server):
    a, b = simple_inputs(1, seed=12)
    inputs = [json_input(n, x, "INT32") for n, x in (("INPUT0", a), ("INPUT1", b), ("EXTRA", a))]
    reply = post_json(server, infer_path("simple"), {"inputs": inputs})
    assert reply.status == 400
    assert "unknown input(s) EXTRA" in reply.error()


def test_duplicate_input_is_400(server):
    a, b = simple_inputs(1, seed=12)
    inputs = [json_input(n, x, "INT32") for n, x in (("INPUT0", a), ("INPUT0", b))]
    reply = post_json(server, infer_path("simple"), {"inputs": inputs})
    assert reply.status == 400
    assert "'INPUT0' appears twice" in reply.error()


def test_batch_larger_than_max_batch_size_is_400(server):
    a, b = simple_inputs(9, seed=13)
    reply = post_json(server, infer_path("simple"), {"inputs": simple_json_inputs(a, b)})
    assert reply.status == 400
    message = reply.error()
    assert "batch size 9" in message and "1..8" in message


def test_inputs_disagreeing_on_batch_size_is_400(server):
    a, _ = simple_inputs(2, seed=14)
    _, b = simple_inputs(3, seed=14)
    reply = post_json(server, infer_path("simple"), {"inputs": simple_json_inputs(a, b)})
    assert reply.status == 400
    assert "batch size" in reply.error()


def test_binary_data_size_overrunning_the_body_is_400(server):
    x = mlp_input(1, seed=15)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "FP32",
                    "shape": [1, 16],
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    )
    body = header + x.tobytes()[:60]
    reply = call(server, "POST", infer_path("mlp"), body, {HEADER_LENGTH: str(len(header))})
    assert reply.status == 400
    message = reply.error()
    assert "binary_data_size 64" in message and "60 bytes left" in message


def test_header_length_beyond_the_body_is_400(server):
    body = orjson.dumps(mlp_doc())
    reply = call(server, "POST", infer_path("mlp"), body, {HEADER_LENGTH: str(len(body) + 1)})
    assert reply.status == 400
    assert HEADER_LENGTH in reply.error()


def test_non_numeric_header_length_is_400(server):
    body = orjson.dumps(mlp_doc())
    reply = call(server, "POST", infer_path("mlp"), body, {HEADER_LENGTH: "12abc"})
    assert reply.status == 400
    assert HEADER_LENGTH in reply.error()


def test_header_length_with_unicode_digit_is_400_not_500(server):
    body = orjson.dumps(mlp_doc())
    reply = call(server, "POST", infer_path("mlp"), body, {HEADER_LENGTH: "²".encode()})
    assert reply.status == 400
    assert HEADER_LENGTH in reply.error()


def test_unclaimed_binary_data_is_400(server):
    body = orjson.dumps(mlp_doc())
    reply = call(
        server, "POST", infer_path("mlp"), body + b"\0" * 8, {HEADER_LENGTH: str(len(body))}
    )
    assert reply.status == 400
    assert "8 bytes of binary data that no input claims" in reply.error()


def test_raw_binary_request_is_rejected_with_400(server):
    body = mlp_input(1, seed=16).tobytes()
    reply = call(server, "POST", infer_path("mlp"), body, {HEADER_LENGTH: "0"})
    assert reply.status == 400
    assert "raw binary" in reply.error()


def test_oversize_body_is_400_and_the_connection_keeps_serving(server):
    async def scenario() -> list[tuple[int, Any]]:
        results = []
        connector = aiohttp.TCPConnector(limit=1)  # one connection for every request
        async with aiohttp.ClientSession(connector=connector) as session:

            async def chunks():  # no Content-Length: the limit applies while reading
                for _ in range(17):
                    yield b" " * 65536

            for data in (b" " * (1024 * 1024 + 1), chunks()):
                async with session.post(server.http_url + infer_path("mlp"), data=data) as r:
                    results.append((r.status, orjson.loads(await r.read())))
            async with session.post(
                server.http_url + infer_path("mlp"), data=orjson.dumps(mlp_doc())
            ) as r:
                results.append((r.status, orjson.loads(await r.read())))
        return results

    (s1, doc1), (s2, doc2), (s3, doc3) = asyncio.run(scenario())
    assert (s1, s2) == (400, 400)
    assert "1048576" in doc1["error"] and "exceeds" in doc1["error"]
    assert "1048576" in doc2["error"] and "exceeds" in doc2["error"]
    assert s3 == 200 and doc3["model_name"] == "mlp"


def test_unknown_model_is_404(server):
    reply = post_json(server, infer_path("no_such_model"), mlp_doc())
    assert reply.status == 404
    assert "no_such_model" in reply.error()


@pytest.mark.parametrize("version", ["1", "9", "latest"])
def test_unknown_version_is_404(server, version):
    reply = post_json(server, infer_path("mlp", version), mlp_doc())
    assert reply.status == 404
    message = reply.error()
    assert f"'{version}'" in message and "available: 2" in message


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nothing/here"), ("POST", "/v2/models/mlp/predict"), ("GET", "/v2/models/mlp/infer")],
)
def test_unknown_route_is_404_json(server, method, path):
    reply = call(server, method, path, b"{}" if method == "POST" else None)
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("application/json")
    assert path in reply.error()


def test_runtime_failure_is_500_and_the_server_keeps_serving(server, repo):
    before = model_stats(server, "fails_at_run")
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    reply = post_json(
        server, infer_path("fails_at_run"), {"inputs": [json_input("INPUT0", rows, "FP32")]}
    )
    assert reply.status == 500
    assert reply.headers["Content-Type"].startswith("application/json")
    message = reply.error()
    assert "fails_at_run" in message and "failed to run" in message
    after = model_stats(server, "fails_at_run")
    assert (
        after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    )
    assert (
        after["inference_stats"]["success"]["count"]
        == before["inference_stats"]["success"]["count"]
    )
    # the same model still serves a batch it can run ...
    one = rows[:1]
    reply = post_json(
        server, infer_path("fails_at_run"), {"inputs": [json_input("INPUT0", one, "FP32")]}
    )
    _, arrays = response_arrays(reply)
    np.testing.assert_array_equal(arrays["OUTPUT0"], one)
    # ... and so do the others
    x = mlp_input(1, seed=17)
    _, arrays = response_arrays(
        post_json(server, infer_path("mlp"), {"inputs": [json_input("INPUT0", x, "FP32")]})
    )
    assert_identical(arrays["OUTPUT0"], ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"])


def test_corrupt_model_is_503_with_its_load_failure_while_others_serve(server):
    reply = post_json(
        server,
        infer_path("corrupt"),
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
    )
    assert reply.status == 503
    message = reply.error()
    assert "corrupt" in message and "failed to load" in message
    assert "protobuf" in message.lower()  # onnxruntime's own reason
    assert get(server, "/v2/models/corrupt/ready").status == 400
    assert get(server, "/v2/models/mlp/ready").status == 200
    assert post_json(server, infer_path("mlp"), mlp_doc()).status == 200


def test_model_with_unknown_config_field_is_503_naming_the_field(server):
    reply = post_json(server, infer_path("bad_config"), mlp_doc())
    assert reply.status == 503
    message = reply.error()
    assert "bad_config" in message and '"foo"' in message
    assert get(server, "/v2/models/bad_config/ready").status == 400


# ---------------------------------------------------------------------------------------
# configuration


def test_config_of_model_with_config_pbtxt_is_triton_json(server):
    reply = get(server, "/v2/models/simple/config")
    assert reply.status == 200
    doc = reply.json()
    assert doc["name"] == "simple"
    assert doc["max_batch_size"] == 8
    assert doc["input"] == [
        {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]},
        {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [16]},
    ]
    assert [o["name"] for o in doc["output"]] == ["OUTPUT0", "OUTPUT1"]
    assert doc["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert doc["dynamic_batching"]["max_queue_delay_microseconds"] == 100  # a number, not "100"


def test_config_of_model_without_config_pbtxt_is_auto_completed(server):
    reply = get(server, "/v2/models/mlp/config")
    assert reply.status == 200
    doc = reply.json()
    assert doc["name"] == "mlp"
    assert doc["max_batch_size"] == 64
    assert doc["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}]
    assert doc["output"] == [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [4]}]


def test_config_of_model_without_batch_dimension_has_max_batch_size_0(server):
    doc = get(server, "/v2/models/fixed/config").json()
    assert doc["max_batch_size"] == 0
    assert doc["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [3, 4]}]


def test_config_of_unknown_model_is_404(server):
    reply = get(server, "/v2/models/no_such_model/config")
    assert reply.status == 404
    assert "no_such_model" in reply.error()


# ---------------------------------------------------------------------------------------
# statistics


def model_stats(server: Any, model: str) -> dict:
    reply = get(server, f"/v2/models/{model}/stats")
    assert reply.status == 200
    (entry,) = reply.json()["model_stats"]
    assert entry["name"] == model
    return entry


def test_statistics_count_successful_inferences(server):
    n = 5
    before = model_stats(server, "identity_fp32")
    for i in range(n):
        x = np.full((1, 4), i, dtype=np.float32)
        assert post_json(
            server, infer_path("identity_fp32"), {"inputs": [json_input("INPUT0", x, "FP32")]}
        ).status == 200  # fmt: skip
    after = model_stats(server, "identity_fp32")
    assert after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == n
    assert after["execution_count"] - before["execution_count"] == n
    success_before = before["inference_stats"]["success"]
    success_after = after["inference_stats"]["success"]
    assert success_after["count"] - success_before["count"] == n
    assert success_after["ns"] > success_before["ns"]
    assert after["last_inference"] >= before["last_inference"]
    assert after["last_inference"] > 0
    assert 1 in [b["batch_size"] for b in after["batch_stats"]]


def test_statistics_count_rows_of_a_batch(server):
    before = model_stats(server, "identity_int32")
    x = np.zeros((3, 4), dtype=np.int32)
    reply = post_json(
        server, infer_path("identity_int32"), {"inputs": [json_input("INPUT0", x, "INT32")]}
    )
    assert reply.status == 200
    after = model_stats(server, "identity_int32")
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 1


def test_all_model_statistics_list_loaded_models(server):
    reply = get(server, "/v2/models/stats")
    assert reply.status == 200
    entries = reply.json()["model_stats"]
    names = {(e["name"], e["version"]) for e in entries}
    assert {("mlp", "2"), ("simple", "1"), ("versioned", "1"), ("versioned", "3")} <= names
    assert not any(e["name"] in ("corrupt", "bad_config") for e in entries)
    assert ("mlp", "1") not in names


def test_statistics_of_unknown_model_is_404(server):
    reply = get(server, "/v2/models/no_such_model/stats")
    assert reply.status == 404
    assert "no_such_model" in reply.error()


# ---------------------------------------------------------------------------------------
# metrics


def request_count(server: Any, **labels: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fleetserve_requests_total" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def test_metrics_count_requests_by_model_protocol_and_outcome(server):
    ok = {"model": "mlp", "protocol": "rest", "outcome": "success"}
    bad = {"model": "mlp", "protocol": "rest", "outcome": "invalid_argument"}
    ok_before, bad_before = request_count(server, **ok), request_count(server, **bad)
    assert post_json(server, infer_path("mlp"), mlp_doc()).status == 200
    wrong_type = mlp_doc(datatype="INT64", data=[1] * 16)
    assert post_json(server, infer_path("mlp"), wrong_type).status == 400
    assert request_count(server, **ok) == ok_before + 1
    assert request_count(server, **bad) == bad_before + 1
    assert request_count(server, **ok, version="2") >= 1


def test_metrics_do_not_label_unknown_model_names(server):
    name = "no_such_model_for_metrics"
    before = request_count(server, model="other", outcome="not_found")
    assert post_json(server, infer_path(name), mlp_doc()).status == 404
    assert request_count(server, model="other", outcome="not_found") == before + 1
    assert request_count(server, model=name) == 0


def test_metrics_count_undecodable_requests(server):
    labels = {"protocol": "rest", "outcome": "invalid_argument"}
    before = request_count(server, **labels)
    reply = call(server, "POST", infer_path("mlp"), b"not json")
    assert reply.status == 400
    assert request_count(server, **labels) == before + 1


# ---------------------------------------------------------------------------------------
# concurrency


def test_many_concurrent_requests_get_their_own_results(server, repo):
    n = 200

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict, dict]:
        if i % 2:
            doc = {"id": f"r{i}", "inputs": [json_input("INPUT0", mlp_input(1 + i % 3, i), "FP32")]}
            model = "mlp"
        else:
            a, b = simple_inputs(1 + i % 8, seed=i)
            doc = {"id": f"r{i}", "inputs": simple_json_inputs(a, b)}
            model = "simple"
        async with session.post(server.http_url + infer_path(model), data=orjson.dumps(doc)) as r:
            return r.status, doc, orjson.loads(await r.read())

    async def scenario() -> list[tuple[int, dict, dict]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session, i) for i in range(n)))

    results = asyncio.run(scenario())
    assert len(results) == n
    for i, (status, sent, got) in enumerate(results):
        assert status == 200, got
        assert got["id"] == f"r{i}"
        if i % 2:
            x = np.array(sent["inputs"][0]["data"], dtype=np.float32).reshape(-1, 16)
            expected = ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
            actual = np.array(got["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
            assert_identical(actual, expected)
        else:
            a, b = simple_inputs(1 + i % 8, seed=i)
            out = {o["name"]: np.array(o["data"], dtype=np.int32) for o in got["outputs"]}
            np.testing.assert_array_equal(out["OUTPUT0"], (a + b).ravel())
            np.testing.assert_array_equal(out["OUTPUT1"], (a - b).ravel())


# ---------------------------------------------------------------------------------------
# client input that must be a 4xx naming the problem, never a 500 (raw bodies, aiohttp)


def post_raw(server: Any, path: str, body: bytes, headers: dict | None = None) -> Reply:
    """POST `body` as it is, with aiohttp (no client-side JSON encoding)."""

    async def main() -> Reply:
        async with aiohttp.ClientSession() as http:
            url = server.http_url + path
            async with http.request("POST", url, data=body, headers=headers) as r:
                return Reply(r.status, r.headers, await r.read())

    return asyncio.run(main())


def put_raw(server: Any, path: str, body: bytes) -> Reply:
    async def main() -> Reply:
        async with (
            aiohttp.ClientSession() as http,
            http.put(server.http_url + path, data=body) as r,
        ):
            return Reply(r.status, r.headers, await r.read())

    return asyncio.run(main())


HUGE_SHAPES = {
    "65-dims": ([1] * 65, "shape has 65 dimensions, at most 64 are supported"),
    "int32-max-cubed": ([2147483647, 2147483647, 2147483647, 0], "is too large"),
    "2**62": ([4611686018427387904, 0], "is too large"),
}


@pytest.mark.parametrize("model", ["mlp", "no_such_model"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("shape", list(HUGE_SHAPES))
def test_shape_numpy_cannot_build_is_400_naming_the_input(server, model, binary, shape):
    dims, problem = HUGE_SHAPES[shape]
    size = 0 if 0 in dims else 4
    entry: dict[str, Any] = {"name": "INPUT0", "datatype": "FP32", "shape": dims}
    if binary:
        entry["parameters"] = {"binary_data_size": size}
        header = orjson.dumps({"inputs": [entry]})
        reply = post_raw(
            server, infer_path(model), header + b"\0" * size, {HEADER_LENGTH: str(len(header))}
        )
    else:
        entry["data"] = [1.0] * (size // 4)
        reply = post_raw(server, infer_path(model), orjson.dumps({"inputs": [entry]}))
    assert reply.status == 400, reply.body[:300]
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.error().startswith("input 'INPUT0': ") and problem in reply.error()


@pytest.mark.parametrize("binary", [None, True], ids=["json", "json-and-binary"])
def test_requesting_an_output_twice_is_400_naming_it(server, binary):
    a, b = simple_inputs(1, seed=3)
    second = {"name": "OUTPUT0"} if binary is None else {"name": "OUTPUT0", "parameters": {
        "binary_data": True}}  # fmt: skip
    doc = {"inputs": simple_json_inputs(a, b), "outputs": [{"name": "OUTPUT0"}, second]}
    reply = post_raw(server, infer_path("simple"), orjson.dumps(doc))
    assert reply.status == 400, reply.body[:300]
    assert reply.error() == "output 'OUTPUT0' is requested more than once"


def test_requesting_distinct_outputs_still_answers_each_once(server):
    a, b = simple_inputs(1, seed=3)
    doc = {
        "inputs": simple_json_inputs(a, b),
        "outputs": [{"name": "OUTPUT1"}, {"name": "OUTPUT0"}],
    }
    _, arrays = response_arrays(post_raw(server, infer_path("simple"), orjson.dumps(doc)))
    assert list(arrays) == ["OUTPUT1", "OUTPUT0"]


@pytest.mark.parametrize(
    ("model", "data", "shown"),
    [
        ("identity_bool", b'["a", "b", "c", "d", "e", "f", "g", "h"]', "got values such as 'a'"),
        ("identity_int64", b"[18446744073709551616, 1, 2, 3, 4, 5, 6, 7]",
         "got values such as 1.8446744073709552e+19"),
    ],
)  # fmt: skip
def test_a_refused_value_is_shown_as_sent_not_as_a_numpy_repr(server, model, data, shown):
    datatype = model.removeprefix("identity_").upper().encode()
    body = b'{"inputs": [{"name": "INPUT0", "datatype": "%s", "shape": [2, 4], "data": %s}]}'
    reply = post_raw(server, infer_path(model), body % (datatype, data))
    assert reply.status == 400
    assert shown in reply.error() and "np." not in reply.error()


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    "template",
    [
        b'{"inputs": [{"name": "INPUT0", "datatype": %s, "shape": [1, 16], "data": []}]}',
        b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [%s]}]}',
        b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ['
        + b"1," * 15 + b'1]}], "parameters": {"timeout": %s}}',
    ],
    ids=["datatype", "data", "timeout-parameter"],
)  # fmt: skip
def test_a_value_nested_past_the_recursion_limit_is_400(server, template):
    reply = post_raw(server, infer_path("mlp"), template % nested(1000))
    assert reply.status == 400, reply.body[:300]
    assert "an object" in reply.error()


def test_feedback_metadata_nested_deeper_than_the_server_stores_is_400(server):
    body = b'{"id": "r1", "label": 1, "metadata": %s}'
    reply = post_raw(server, "/v2/models/mlp/feedback", body % nested(255))
    assert reply.status == 400, reply.body[:300]
    assert reply.error() == "'metadata' is limited to 254 levels of nesting"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/mlp/infer"),
        ("POST", "/v2/models/mlp/feedback"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/mlp/load"),
        ("POST", "/v2/repository/models/mlp/unload"),
        ("PUT", "/v2/admin/models/mlp/routing"),
    ],
)
def test_every_json_route_names_nesting_past_the_parser_depth(server, method, path):
    body = b'{"parameters": ' + b"[" * 1100 + b"]" * 1100 + b"}"
    reply = (post_raw if method == "POST" else put_raw)(server, path, body)
    assert reply.status == 400, reply.body[:300]
    assert reply.error().endswith("nests JSON more than 1024 levels deep")


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_nan_and_infinities_round_trip_as_json_through_tritonclient(server, datatype):
    """tritonclient.http writes NaN, Infinity and -Infinity in JSON and reads them back
    (python-rapidjson); the server reads and writes them as Triton does."""
    import tritonclient.http as httpclient

    x = extremes(datatype)  # with inf, -inf and NaN
    with httpclient.InferenceServerClient(server.http) as client:
        tensor = httpclient.InferInput("INPUT0", list(x.shape), datatype)
        tensor.set_data_from_numpy(x, binary_data=False)
        wanted = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
        result = client.infer(f"identity_{datatype.lower()}", [tensor], outputs=[wanted])
    assert "binary_data_size" not in (result.get_output("OUTPUT0").get("parameters") or {})
    assert_identical(result.as_numpy("OUTPUT0"), x)


# a repository whose models fail on files the server cannot read, to see what the errors say


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("unreadable")
    testing.write_model(root, "cfgdir", testing.mlp(), version=1)
    (root / "cfgdir" / "config.pbtxt").mkdir()  # a directory where the config should be
    (root / "nofile" / "1").mkdir(parents=True)  # a version without its model file
    testing.write_model(root, "nowarmup", testing.mlp(), config=(
        'model_warmup [ { name: "w" batch_size: 1 inputs { key: "INPUT0" value: {'
        ' data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "missing.bin" } } } ]'))  # fmt: skip
    running = start_server(test_settings(root, preload=False))
    yield running, root
    stop_server(running)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("cfgdir", "model 'cfgdir': cannot read config.pbtxt: Is a directory"),
        ("nofile", "cannot read its model file: No such file or directory"),
        ("nowarmup", "cannot read 'missing.bin': No such file or directory"),
    ],
)
def test_file_errors_name_the_model_and_file_but_no_server_path(unreadable, model, reason):
    running, root = unreadable
    x = json_input("INPUT0", mlp_input(1), "FP32")
    reply = post_raw(running, infer_path(model), orjson.dumps({"inputs": [x]}))
    assert reply.status in (400, 503), reply.body[:300]
    assert reason in reply.error()
    index = post_raw(running, "/v2/repository/index", b"")
    for body in (reply.body, index.body):
        assert str(root).encode() not in body and b"Errno" not in body
