"""The compatibility promise: Triton's own Python clients work against fleetserve unchanged.

Every test drives the real server (conftest's `server`) with the newest tritonclient
(the test extra asks for 2.73 or later), over HTTP and gRPC where both make sense, and
checks results against onnxruntime run directly on the same model file with the same input.
"""

from __future__ import annotations

import importlib.metadata
import queue
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.utils import InferenceServerException

from tests.conftest import DATATYPES
from tests.helpers import NUMPY, assert_identical, extremes, mlp_input, ort_run

# What tritonclient's InferenceServerException.status() gives for each outcome.
STATUS = {
    "http": {
        "not_found": "404",
        "invalid": "400",
        "unavailable": "503",
        "internal": "500",
    },
    "grpc": {
        "not_found": "StatusCode.NOT_FOUND",
        "invalid": "StatusCode.INVALID_ARGUMENT",
        "unavailable": "StatusCode.UNAVAILABLE",
        "internal": "StatusCode.INTERNAL",
    },
}


def error_of(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    """The InferenceServerException a client call raises.

    Its traceback is dropped: tritonclient's frames hold the exception and the client, and
    the resulting cycle would be collected on an arbitrary thread, where tritonclient.http's
    gevent-based __del__ fails (InvalidThreadUseError).
    """
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return exc.with_traceback(None)
    pytest.fail(f"{getattr(call, '__name__', call)} did not raise InferenceServerException")


# --------------------------------------------------------------------------
# clients


@dataclass
class Triton:
    protocol: str  # "http" or "grpc"
    mod: ModuleType  # tritonclient.http or tritonclient.grpc
    client: Any

    def status(self, outcome: str) -> str:
        return STATUS[self.protocol][outcome]

    def input(self, name: str, array: np.ndarray, datatype: str, binary: bool = True) -> Any:
        tensor = self.mod.InferInput(name, list(array.shape), datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def output(self, name: str, binary: bool = True) -> Any:
        if self.protocol == "http":
            return self.mod.InferRequestedOutput(name, binary_data=binary)
        return self.mod.InferRequestedOutput(name)

    def response_field(self, result: Any, field: str) -> Any:
        response = result.get_response()
        return response[field] if self.protocol == "http" else getattr(response, field)


@pytest.fixture(scope="module", params=["http", "grpc"])
def triton(request: pytest.FixtureRequest, server: Any) -> Any:
    if request.param == "http":
        client = httpclient.InferenceServerClient(server.http, concurrency=4)
        yield Triton("http", httpclient, client)
    else:
        client = grpcclient.InferenceServerClient(server.grpc)
        yield Triton("grpc", grpcclient, client)
    client.close()


# --------------------------------------------------------------------------
# health and metadata


def test_server_reports_live_and_ready(triton: Triton) -> None:
    assert triton.client.is_server_live() is True
    assert triton.client.is_server_ready() is True


def test_model_ready_is_true_for_served_models_and_versions(triton: Triton) -> None:
    assert triton.client.is_model_ready("simple") is True
    assert triton.client.is_model_ready("mlp") is True
    for version in ("1", "2", "3"):
        assert triton.client.is_model_ready("versioned", version) is True


def test_model_ready_is_false_for_broken_models_and_unserved_versions(triton: Triton) -> None:
    assert triton.client.is_model_ready("corrupt") is False
    assert triton.client.is_model_ready("bad_config") is False
    # mlp has versions 1 and 2 on disk, but the default policy serves only the latest
    assert triton.client.is_model_ready("mlp", "1") is False
    assert triton.client.is_model_ready("versioned", "4") is False


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_ready_is_false_for_unknown_model(server: Any, protocol: str) -> None:
    """Code written for Triton asks is_model_ready and expects False, not an exception."""
    client_module = httpclient if protocol == "http" else grpcclient
    address = server.http if protocol == "http" else server.grpc
    with client_module.InferenceServerClient(address) as client:
        assert client.is_model_ready("no_such_model") is False


def test_server_metadata_names_fleetserve_and_its_extensions(triton: Triton) -> None:
    meta = triton.client.get_server_metadata()
    if triton.protocol == "http":
        name, version, extensions = meta["name"], meta["version"], meta["extensions"]
    else:
        name, version, extensions = meta.name, meta.version, list(meta.extensions)
    assert name == "fleetserve"
    assert version == importlib.metadata.version("fleetserve")  # the installed release
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(extensions)


def test_model_metadata_describes_the_simple_model(triton: Triton) -> None:
    meta = triton.client.get_model_metadata("simple")
    if triton.protocol == "grpc":
        meta = {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in meta.inputs
            ],
            "outputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in meta.outputs
            ],
        }
    assert meta["name"] == "simple"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    tensor = {"datatype": "INT32", "shape": [-1, 16]}
    assert meta["inputs"] == [{"name": "INPUT0", **tensor}, {"name": "INPUT1", **tensor}]
    assert meta["outputs"] == [{"name": "OUTPUT0", **tensor}, {"name": "OUTPUT1", **tensor}]


def test_model_metadata_lists_every_served_version(triton: Triton) -> None:
    meta = triton.client.get_model_metadata("versioned", "2")
    versions = meta["versions"] if triton.protocol == "http" else list(meta.versions)
    assert versions == ["1", "2", "3"]


def test_model_config_over_http_is_tritons_json(server: Any) -> None:
    with httpclient.InferenceServerClient(server.http) as client:
        config = client.get_model_config("simple")
    assert config["name"] == "simple"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 8
    assert config["input"] == [
        {"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]},
        {"name": "INPUT1", "data_type": "TYPE_INT32", "dims": [16]},
    ]
    assert [o["name"] for o in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]


def test_model_config_over_grpc_decodes_as_tritons_model_config(server: Any) -> None:
    with grpcclient.InferenceServerClient(server.grpc) as client:
        response = client.get_model_config("simple")
    config = response.config
    assert isinstance(config, triton_mc.ModelConfig)  # tritonclient's own message type
    assert config.name == "simple"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", triton_mc.TYPE_INT32, [16]),
        ("INPUT1", triton_mc.TYPE_INT32, [16]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", triton_mc.TYPE_INT32, [16]),
        ("OUTPUT1", triton_mc.TYPE_INT32, [16]),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, triton_mc.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.parameters["intra_op_thread_count"].string_value == "1"


def _stats(triton: Triton, model: str) -> dict[str, Any]:
    response = triton.client.get_inference_statistics(model)
    if triton.protocol == "http":
        (entry,) = response["model_stats"]
        inference = entry["inference_stats"]
        return {
            "name": entry["name"],
            "version": entry["version"],
            "inference_count": entry["inference_count"],
            "execution_count": entry["execution_count"],
            "success": inference["success"]["count"],
            "fail": inference["fail"]["count"],
        }
    (entry,) = response.model_stats
    return {
        "name": entry.name,
        "version": entry.version,
        "inference_count": entry.inference_count,
        "execution_count": entry.execution_count,
        "success": entry.inference_stats.success.count,
        "fail": entry.inference_stats.fail.count,
    }


def test_inference_statistics_count_successes_and_failures(triton: Triton) -> None:
    before = _stats(triton, "fails_at_run")
    good = triton.input("INPUT0", np.ones((1, 4), np.float32), "FP32")
    bad = triton.input("INPUT0", np.ones((2, 4), np.float32), "FP32")
    for _ in range(3):
        triton.client.infer("fails_at_run", [good])
    assert error_of(triton.client.infer, "fails_at_run", [bad]).status() == triton.status(
        "internal"
    )
    after = _stats(triton, "fails_at_run")
    assert (after["name"], after["version"]) == ("fails_at_run", "1")
    assert after["success"] - before["success"] == 3
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 3
    assert after["fail"] - before["fail"] == 1


def test_inference_statistics_without_a_model_cover_every_loaded_version(triton: Triton) -> None:
    response = triton.client.get_inference_statistics()
    if triton.protocol == "http":
        names = [(m["name"], m["version"]) for m in response["model_stats"]]
    else:
        names = [(m.name, m.version) for m in response.model_stats]
    expected = {("simple", "1"), ("mlp", "2"), ("identity_bytes", "1")}
    expected |= {("versioned", v) for v in ("1", "2", "3")}
    assert expected <= set(names)
    assert "corrupt" not in {name for name, _ in names}


def test_inference_statistics_for_unknown_model_is_not_found(triton: Triton) -> None:
    error = error_of(triton.client.get_inference_statistics, "no_such_model")
    assert error.status() == triton.status("not_found")


# --------------------------------------------------------------------------
# inference


def test_mlp_result_equals_onnxruntime(triton: Triton, repo: Path) -> None:
    x = mlp_input(rows=5, seed=11)
    result = triton.client.infer("mlp", [triton.input("INPUT0", x, "FP32")])
    expected = ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.float32
    assert out.shape == (5, 4)
    np.testing.assert_array_equal(out, expected)
    assert triton.response_field(result, "model_name") == "mlp"
    assert triton.response_field(result, "model_version") == "2"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_mlp_over_http_json_and_binary_equals_onnxruntime(
    server: Any, repo: Path, binary: bool
) -> None:
    x = mlp_input(rows=2, seed=5)
    with httpclient.InferenceServerClient(server.http) as client:
        tensor = httpclient.InferInput("INPUT0", [2, 16], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(
            "mlp", [tensor], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary)]
        )
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


def _simple_inputs(triton: Triton, rows: int = 2) -> tuple[list, dict[str, np.ndarray]]:
    a = np.arange(rows * 16, dtype=np.int32).reshape(rows, 16) * 1000 - 7
    b = np.full((rows, 16), -3, dtype=np.int32)
    b[:, ::2] = np.iinfo(np.int32).max // 2
    arrays = {"INPUT0": a, "INPUT1": b}
    return [triton.input(n, v, "INT32") for n, v in arrays.items()], arrays


def test_simple_add_sub_returns_both_outputs(triton: Triton, repo: Path) -> None:
    inputs, arrays = _simple_inputs(triton)
    outputs = [triton.output("OUTPUT0"), triton.output("OUTPUT1")]
    result = triton.client.infer("simple", inputs, outputs=outputs)
    expected = ort_run(repo, "simple", 1, arrays)
    for name in ("OUTPUT0", "OUTPUT1"):
        out = result.as_numpy(name)
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, expected[name])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), arrays["INPUT0"] + arrays["INPUT1"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), arrays["INPUT0"] - arrays["INPUT1"])


def test_simple_returns_only_the_requested_output(triton: Triton, repo: Path) -> None:
    inputs, arrays = _simple_inputs(triton, rows=1)
    result = triton.client.infer("simple", inputs, outputs=[triton.output("OUTPUT1")])
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT1"), ort_run(repo, "simple", 1, arrays)["OUTPUT1"]
    )
    assert result.as_numpy("OUTPUT0") is None


def test_unknown_requested_output_is_invalid_argument(triton: Triton) -> None:
    inputs, _ = _simple_inputs(triton, rows=1)
    error = error_of(triton.client.infer, "simple", inputs, outputs=[triton.output("OUTPUT9")])
    assert error.status() == triton.status("invalid")
    assert "OUTPUT9" in error.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_http_requests_and_responses(server: Any, repo: Path, algorithm: str) -> None:
    x = mlp_input(rows=4, seed=8)
    with httpclient.InferenceServerClient(server.http) as client:
        tensor = httpclient.InferInput("INPUT0", [4, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(
            "mlp",
            [tensor],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


def test_gzip_compressed_grpc_request(server: Any, repo: Path) -> None:
    x = mlp_input(rows=4, seed=9)
    with grpcclient.InferenceServerClient(server.grpc) as client:
        tensor = grpcclient.InferInput("INPUT0", [4, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor], compression_algorithm="gzip")
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


def test_request_parameters_priority_and_timeout_are_accepted(triton: Triton, repo: Path) -> None:
    """Options tritonclient sends as request parameters do not disturb the result."""
    x = mlp_input(rows=1, seed=10)
    result = triton.client.infer(
        "mlp",
        [triton.input("INPUT0", x, "FP32")],
        parameters={"custom_text": "v", "custom_int": 3, "custom_bool": True},
        priority=1,
        timeout=10_000_000,
    )
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


def test_async_infer_delivers_the_result(triton: Triton, repo: Path) -> None:
    x = mlp_input(rows=2, seed=12)
    inputs = [triton.input("INPUT0", x, "FP32")]
    if triton.protocol == "http":
        result = triton.client.async_infer("mlp", inputs, request_id="async").get_result()
    else:
        answers: queue.Queue = queue.Queue()
        triton.client.async_infer(
            "mlp",
            inputs,
            callback=lambda result, error: answers.put((result, error)),
            request_id="async",
        )
        result, error = answers.get(timeout=30)
        assert error is None, error
    assert triton.response_field(result, "id") == "async"
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


def test_unsupported_extensions_raise_inference_server_exception(triton: Triton) -> None:
    for call in (
        triton.client.get_cuda_shared_memory_status,
        triton.client.get_system_shared_memory_status,
    ):
        error = error_of(call)
        if triton.protocol == "grpc":
            assert error.status() == "StatusCode.UNIMPLEMENTED"
            assert "not supported" in error.message()
    # ... and the client is still usable
    assert triton.client.is_server_live() is True


# -- every datatype, through identity_<dt> -----------------------------------


def test_the_datatype_table_covers_every_model_in_the_repository() -> None:
    assert sorted(NUMPY) == sorted(DATATYPES)


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize(
    "transport", ["http-binary", "http-json", "grpc"], ids=["http-binary", "http-json", "grpc"]
)
def test_every_datatype_round_trips_unchanged(
    server: Any, repo: Path, datatype: str, transport: str
) -> None:
    x = extremes(datatype, finite_only=transport == "http-json")
    model = f"identity_{datatype.lower()}"
    if transport == "grpc":
        with grpcclient.InferenceServerClient(server.grpc) as client:
            tensor = grpcclient.InferInput("INPUT0", list(x.shape), datatype)
            tensor.set_data_from_numpy(x)
            result = client.infer(model, [tensor])
            meta = result.get_output("OUTPUT0")
            out_datatype, out_shape = meta.datatype, list(meta.shape)
    else:
        binary = transport == "http-binary"
        with httpclient.InferenceServerClient(server.http) as client:
            tensor = httpclient.InferInput("INPUT0", list(x.shape), datatype)
            tensor.set_data_from_numpy(x, binary_data=binary)
            requested = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
            result = client.infer(model, [tensor], outputs=requested)
            meta = result.get_output("OUTPUT0")
            out_datatype, out_shape = meta["datatype"], meta["shape"]
            assert ("binary_data_size" in meta.get("parameters", {})) is binary
    assert out_datatype == datatype
    assert out_shape == [3, 4]
    out = result.as_numpy("OUTPUT0")
    if transport == "http-json" and datatype == "BYTES":
        # JSON carries BYTES as UTF-8 strings, and tritonclient hands back str
        out = np.array([s.encode() for s in out.ravel()], dtype=np.object_).reshape(out.shape)
    assert_identical(out, x)
    assert_identical(out, ort_run(repo, model, 1, {"INPUT0": x})["OUTPUT0"].astype(x.dtype))


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_bytes_that_are_not_utf8_are_rejected_by_onnx_string_models(
    server: Any, repo: Path, transport: str
) -> None:
    """ONNX string tensors hold UTF-8 text: other bytes are a client error, not a crash."""
    x = np.array([[b"ok", b"\xff\xfe\x00\x01", b"\x80", b"\xc3\x28"]], dtype=np.object_)
    mod = httpclient if transport == "http" else grpcclient
    url = server.http if transport == "http" else server.grpc
    with mod.InferenceServerClient(url) as client:
        tensor = mod.InferInput("INPUT0", [1, 4], "BYTES")
        tensor.set_data_from_numpy(x)
        error = error_of(client.infer, "identity_bytes", [tensor])
        assert error.status() == STATUS[transport]["invalid"]
        assert "UTF-8" in error.message()
        assert "INPUT0" in error.message()
        # ... and valid text right after goes through
        text = np.array([["ok", "ü", "", "日本"]], dtype=np.object_)
        tensor = mod.InferInput("INPUT0", [1, 4], "BYTES")
        tensor.set_data_from_numpy(text)
        result = client.infer("identity_bytes", [tensor])
    assert result.as_numpy("OUTPUT0").tolist() == [[s.encode() for s in text.ravel()]]


# -- versions and request ids ----------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2", "3", ""], ids=["v1", "v2", "v3", "default"])
def test_versioned_model_serves_the_requested_version(
    triton: Triton, repo: Path, version: str
) -> None:
    x = np.array([1.5, -2.25], dtype=np.float32)
    result = triton.client.infer(
        "versioned", [triton.input("INPUT0", x, "FP32")], model_version=version
    )
    served = version or "3"  # the default is the latest version
    expected = ort_run(repo, "versioned", int(served), {"INPUT0": x})["OUTPUT0"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * float(served))
    assert triton.response_field(result, "model_version") == served


def test_request_id_is_echoed(triton: Triton) -> None:
    x = np.array([1.0, 2.0], dtype=np.float32)
    result = triton.client.infer(
        "versioned", [triton.input("INPUT0", x, "FP32")], request_id="req-42/ü"
    )
    assert triton.response_field(result, "id") == "req-42/ü"


# -- errors ------------------------------------------------------------------------


ERRORS = {
    # case: (model, version, input array, datatype, outcome, words in the message)
    "unknown_model": ("no_such_model", "", np.zeros((1, 16), np.float32), "FP32", "not_found",
                      ["no_such_model"]),
    "unknown_version": ("versioned", "7", np.zeros(2, np.float32), "FP32", "not_found",
                        ["versioned", "7"]),
    "shape_mismatch": ("mlp", "", np.zeros((1, 15), np.float32), "FP32", "invalid",
                       ["INPUT0", "[1, 15]"]),
    "wrong_datatype": ("mlp", "", np.zeros((1, 16), np.float64), "FP64", "invalid",
                       ["INPUT0", "FP64", "FP32"]),
    "batch_too_large": ("simple", "", np.zeros((9, 16), np.int32), "INT32", "invalid",
                        ["batch size 9"]),
    "corrupt_model": ("corrupt", "", np.zeros((1, 16), np.float32), "FP32", "unavailable",
                      ["corrupt", "failed to load"]),
    "bad_config": ("bad_config", "", np.zeros((1, 16), np.float32), "FP32", "unavailable",
                   ["bad_config", "foo"]),
    "runtime_failure": ("fails_at_run", "", np.zeros((2, 4), np.float32), "FP32", "internal",
                        ["fails_at_run", "failed to run"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_surface_as_inference_server_exception_with_status(
    triton: Triton, repo: Path, case: str
) -> None:
    model, version, x, datatype, outcome, words = ERRORS[case]
    inputs = [triton.input("INPUT0", x, datatype)]
    if model == "simple":
        inputs.append(triton.input("INPUT1", x, datatype))
    error = error_of(triton.client.infer, model, inputs, model_version=version)
    assert error.status() == triton.status(outcome)
    for word in words:
        assert word in error.message()
    # ... and the server goes on serving
    ok = np.array([[1.0, -2.0, 3.0, -4.0]], dtype=np.float32)
    result = triton.client.infer("fails_at_run", [triton.input("INPUT0", ok, "FP32")])
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "fails_at_run", 1, {"INPUT0": ok})["OUTPUT0"]
    )


def test_metadata_of_unknown_model_is_not_found(triton: Triton) -> None:
    for call in (triton.client.get_model_metadata, triton.client.get_model_config):
        assert error_of(call, "no_such_model").status() == triton.status("not_found")


def test_metadata_of_broken_model_is_unavailable_with_the_reason(triton: Triton) -> None:
    error = error_of(triton.client.get_model_metadata, "bad_config")
    assert error.status() == triton.status("unavailable")
    assert "foo" in error.message()


# --------------------------------------------------------------------------
# gRPC streaming


def test_stream_infer_answers_each_request_in_order(server: Any, repo: Path) -> None:
    answers: queue.Queue = queue.Queue()
    requests = []  # (id, model, input array)
    for i in range(4):
        requests.append((f"mlp-{i}", "mlp", mlp_input(rows=i + 1, seed=i)))
        requests.append((f"fails-{i}", "fails_at_run", np.full((1, 4), i, np.float32)))
    with grpcclient.InferenceServerClient(server.grpc) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for request_id, model, x in requests:
                tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                client.async_stream_infer(model, [tensor], request_id=request_id)
            received = [answers.get(timeout=30) for _ in requests]
        finally:
            client.stop_stream()
    for (request_id, model, x), (result, error) in zip(requests, received, strict=True):
        assert error is None, error
        assert result.get_response().id == request_id
        assert result.get_response().model_name == model
        version = 2 if model == "mlp" else 1
        expected = ort_run(repo, model, version, {"INPUT0": x})["OUTPUT0"]
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    assert answers.empty()


def test_stream_infer_error_answers_only_that_request(server: Any, repo: Path) -> None:
    answers: queue.Queue = queue.Queue()
    good = np.ones((1, 4), np.float32)
    bad = np.ones((2, 4), np.float32)  # fails_at_run fails at run time for batch > 1
    sequence = [("a", good), ("b", bad), ("c", good)]
    with grpcclient.InferenceServerClient(server.grpc) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for request_id, x in sequence:
                tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                client.async_stream_infer("fails_at_run", [tensor], request_id=request_id)
            received = [answers.get(timeout=30) for _ in sequence]
        finally:
            client.stop_stream()
    (r1, e1), (r2, e2), (r3, e3) = received
    assert e1 is None and e3 is None
    assert (r1.get_response().id, r3.get_response().id) == ("a", "c")
    np.testing.assert_array_equal(r3.as_numpy("OUTPUT0"), good)
    assert r2 is None
    assert isinstance(e2, InferenceServerException)
    assert "failed to run" in e2.message()


# --------------------------------------------------------------------------
# asyncio clients


@pytest.mark.asyncio
async def test_grpc_aio_client_infers(server: Any, repo: Path) -> None:
    x = mlp_input(rows=2, seed=3)
    async with grpcclient_aio.InferenceServerClient(server.grpc) as client:
        assert await client.is_server_ready() is True
        tensor = grpcclient_aio.InferInput("INPUT0", [2, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("mlp", [tensor], request_id="aio-grpc")
    assert result.get_response().id == "aio-grpc"
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


@pytest.mark.asyncio
async def test_grpc_aio_stream_infer_yields_results_in_order(server: Any, repo: Path) -> None:
    inputs = [mlp_input(rows=1, seed=s) for s in range(3)]

    async def requests():
        for i, x in enumerate(inputs):
            tensor = grpcclient_aio.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(x)
            yield {"model_name": "mlp", "inputs": [tensor], "request_id": str(i)}

    received = []
    async with grpcclient_aio.InferenceServerClient(server.grpc) as client:
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            received.append(result)
            if len(received) == len(inputs):
                break
    for i, (x, result) in enumerate(zip(inputs, received, strict=True)):
        assert result.get_response().id == str(i)
        np.testing.assert_array_equal(
            result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
        )


@pytest.mark.asyncio
async def test_http_aio_client_infers(server: Any, repo: Path) -> None:
    x = mlp_input(rows=2, seed=4)
    client = httpclient_aio.InferenceServerClient(server.http)
    try:
        assert await client.is_server_ready() is True
        tensor = httpclient_aio.InferInput("INPUT0", [2, 16], "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("mlp", [tensor], request_id="aio-http")
    finally:
        await client.close()
    assert result.get_response()["id"] == "aio-http"
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


@pytest.mark.asyncio
async def test_http_aio_client_raises_with_status(server: Any) -> None:
    client = httpclient_aio.InferenceServerClient(server.http)
    try:
        tensor = httpclient_aio.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
        with pytest.raises(InferenceServerException) as info:
            await client.infer("no_such_model", [tensor])
    finally:
        await client.close()
    assert info.value.status() == "404"
