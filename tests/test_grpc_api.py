"""The gRPC edge, driven with raw grpc and our own messages from protos/.

No tritonclient here: requests are built by hand, so both ways of carrying tensors
(raw_input_contents and typed InferTensorContents) and every error path are reachable.
Our stubs live in package fleetserve.inference but the server answers on Triton's wire
names, so methods are called by path on a plain channel.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.protos import health_pb2
from fleetserve.protos import model_config_pb2 as mc
from tests.helpers import (
    NUMPY,
    assert_identical,
    extremes,
    mlp_input,
    ort_run,
    raw_bytes,
    split_bytes,
)

SERVICE = "/inference.GRPCInferenceService/"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# which InferTensorContents field carries each datatype (PROTOCOL.md 2.6)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# --------------------------------------------------------------------------
# wire helpers


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as ch:
        yield ch


def call(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> Any:
    stub = channel.unary_unary(
        SERVICE + method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    return stub(request, timeout=30)


def infer(channel: grpc.Channel, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return call(channel, "ModelInfer", request, pb.ModelInferResponse)


def failure(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, method, request, response_type)
    return info.value


def infer_failure(channel: grpc.Channel, request: pb.ModelInferRequest) -> grpc.RpcError:
    return failure(channel, "ModelInfer", request, pb.ModelInferResponse)


def request_of(
    model: str,
    tensors: dict[str, tuple[str, np.ndarray]],
    *,
    typed: bool = False,
    version: str = "",
    request_id: str = "",
    outputs: list[str] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with each (datatype, array) in raw_input_contents or in contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, (datatype, array) in tensors.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if typed:
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
        else:
            request.raw_input_contents.append(raw_bytes(array))
    for name in outputs or []:
        request.outputs.add(name=name)
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode raw_output_contents (the server always answers raw, as Triton does)."""
    assert len(response.raw_output_contents) == len(response.outputs)
    assert all(not t.HasField("contents") for t in response.outputs)
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = list(tensor.shape)
        if tensor.datatype == "BYTES":
            array = np.empty(int(np.prod(shape)), dtype=np.object_)
            array[:] = split_bytes(raw)
            out[tensor.name] = array.reshape(shape)
        else:
            out[tensor.name] = np.frombuffer(raw, dtype=NUMPY[tensor.datatype]).reshape(shape)
    return out


def simple_inputs(rows: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    info = np.iinfo(np.int32)
    a = rng.integers(info.min // 2, info.max // 2, (rows, 16), dtype=np.int32)
    b = rng.integers(info.min // 2, info.max // 2, (rows, 16), dtype=np.int32)
    return {"INPUT0": a, "INPUT1": b}


# --------------------------------------------------------------------------
# ModelInfer: raw and typed contents


def test_raw_input_contents_on_mlp_equal_onnxruntime(channel: grpc.Channel, repo: Path) -> None:
    x = mlp_input(rows=3, seed=1)
    response = infer(channel, request_of("mlp", {"INPUT0": ("FP32", x)}, request_id="r-1"))
    assert (response.model_name, response.model_version, response.id) == ("mlp", "2", "r-1")
    [tensor] = response.outputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("OUTPUT0", "FP32", [3, 4])
    assert_identical(
        outputs_of(response)["OUTPUT0"], ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


def test_fp32_contents_on_mlp_equal_onnxruntime(channel: grpc.Channel, repo: Path) -> None:
    x = mlp_input(rows=2, seed=2)
    response = infer(channel, request_of("mlp", {"INPUT0": ("FP32", x)}, typed=True))
    assert_identical(
        outputs_of(response)["OUTPUT0"], ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"]
    )


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "int_contents"])
def test_simple_add_sub_equal_onnxruntime(channel: grpc.Channel, repo: Path, typed: bool) -> None:
    arrays = simple_inputs(rows=3, seed=int(typed))
    request = request_of("simple", {n: ("INT32", a) for n, a in arrays.items()}, typed=typed)
    response = infer(channel, request)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("OUTPUT0", "INT32", [3, 16]),
        ("OUTPUT1", "INT32", [3, 16]),
    ]
    got, expected = outputs_of(response), ort_run(repo, "simple", 1, arrays)
    for name in ("OUTPUT0", "OUTPUT1"):
        assert_identical(got[name], expected[name])


def test_requested_outputs_come_back_alone_and_in_the_order_asked(
    channel: grpc.Channel, repo: Path
) -> None:
    arrays = simple_inputs(rows=1, seed=3)
    tensors = {n: ("INT32", a) for n, a in arrays.items()}
    expected = ort_run(repo, "simple", 1, arrays)
    only = infer(channel, request_of("simple", tensors, outputs=["OUTPUT1"]))
    assert [t.name for t in only.outputs] == ["OUTPUT1"]
    assert_identical(outputs_of(only)["OUTPUT1"], expected["OUTPUT1"])
    both = infer(channel, request_of("simple", tensors, outputs=["OUTPUT1", "OUTPUT0"]))
    assert [t.name for t in both.outputs] == ["OUTPUT1", "OUTPUT0"]
    got = outputs_of(both)
    assert_identical(got["OUTPUT0"], expected["OUTPUT0"])
    assert_identical(got["OUTPUT1"], expected["OUTPUT1"])


@pytest.mark.parametrize("datatype", list(CONTENTS_FIELD))
def test_typed_contents_of_every_datatype_round_trip_as_raw_output(
    channel: grpc.Channel, repo: Path, datatype: str
) -> None:
    """bool_contents, int_contents, int64/uint/uint64/fp32/fp64/bytes_contents, with extremes."""
    x = extremes(datatype)
    model = f"identity_{datatype.lower()}"
    response = infer(channel, request_of(model, {"INPUT0": (datatype, x)}, typed=True))
    [tensor] = response.outputs
    assert (tensor.datatype, list(tensor.shape)) == (datatype, [3, 4])
    out = outputs_of(response)["OUTPUT0"]
    assert_identical(out, x)
    assert_identical(out, ort_run(repo, model, 1, {"INPUT0": x})["OUTPUT0"])


@pytest.mark.parametrize("datatype", list(NUMPY))
def test_raw_contents_of_every_datatype_round_trip(channel: grpc.Channel, datatype: str) -> None:
    x = extremes(datatype)
    response = infer(channel, request_of(f"identity_{datatype.lower()}", {"INPUT0": (datatype, x)}))
    assert response.outputs[0].datatype == datatype
    assert_identical(outputs_of(response)["OUTPUT0"], x)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", -129), ("INT16", 32768), ("UINT8", 256), ("UINT16", 70000)],
)
def test_typed_value_out_of_range_for_the_datatype_is_invalid_argument(
    channel: grpc.Channel, datatype: str, value: int
) -> None:
    """int_contents/uint_contents are 32-bit, wider than INT8/16 and UINT8/16: no wrap-around."""
    x = np.zeros((1, 4), dtype=np.int64)
    x[0, 2] = value
    request = pb.ModelInferRequest(model_name=f"identity_{datatype.lower()}")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[1, 4])
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(x.ravel().tolist())
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in error.details()
    assert "out of range" in error.details()


# --------------------------------------------------------------------------
# ModelInfer: malformed requests


def test_fp16_in_typed_contents_is_invalid_argument_asking_for_raw(
    channel: grpc.Channel,
) -> None:
    request = pb.ModelInferRequest(model_name="identity_fp16")
    tensor = request.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in error.details()
    assert "raw_input_contents" in error.details()


def test_raw_input_contents_count_differing_from_inputs_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    arrays = simple_inputs(rows=1)
    request = request_of("simple", {n: ("INT32", a) for n, a in arrays.items()})
    del request.raw_input_contents[1]
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 1 entries for 2 inputs" in error.details()


def test_raw_size_wrong_for_the_shape_is_invalid_argument_naming_the_input(
    channel: grpc.Channel,
) -> None:
    arrays = simple_inputs(rows=1)
    request = request_of("simple", {n: ("INT32", a) for n, a in arrays.items()})
    request.raw_input_contents[1] = request.raw_input_contents[1][:-4]
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'INPUT1'" in error.details()
    assert "needs 64 bytes, got 60" in error.details()


def test_truncated_raw_bytes_tensor_is_invalid_argument(channel: grpc.Channel) -> None:
    x = extremes("BYTES")
    request = request_of("identity_bytes", {"INPUT0": ("BYTES", x)})
    request.raw_input_contents[0] = request.raw_input_contents[0][:-2]
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'INPUT0'" in error.details()


def test_typed_contents_count_wrong_for_the_shape_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    request = pb.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    tensor.contents.fp32_contents.extend([0.5] * 15)
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 16 elements, contents has 15" in error.details()


def test_unknown_datatype_is_invalid_argument(channel: grpc.Channel) -> None:
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[b"\0" * 16])
    request.inputs.add(name="INPUT0", datatype="FP8", shape=[1, 16])
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown datatype 'FP8'" in error.details()


def test_missing_input_is_invalid_argument_naming_it(channel: grpc.Channel) -> None:
    arrays = simple_inputs(rows=1)
    error = infer_failure(channel, request_of("simple", {"INPUT0": ("INT32", arrays["INPUT0"])}))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "missing input(s) INPUT1" in error.details()


def test_request_without_inputs_is_invalid_argument(channel: grpc.Channel) -> None:
    error = infer_failure(channel, pb.ModelInferRequest(model_name="mlp"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "no inputs" in error.details()


def test_input_given_twice_is_invalid_argument(channel: grpc.Channel) -> None:
    x = mlp_input(rows=1, seed=0)
    request = request_of("mlp", {"INPUT0": ("FP32", x)})
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(raw_bytes(x))
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "appears twice" in error.details()


def test_shape_mismatch_is_invalid_argument(channel: grpc.Channel) -> None:
    x = np.zeros((1, 15), np.float32)
    error = infer_failure(channel, request_of("mlp", {"INPUT0": ("FP32", x)}))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'INPUT0'" in error.details()
    assert "[1, 15]" in error.details()


def test_wrong_datatype_for_the_model_is_invalid_argument(channel: grpc.Channel) -> None:
    x = np.zeros((1, 16), np.float64)
    error = infer_failure(channel, request_of("mlp", {"INPUT0": ("FP64", x)}))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "datatype FP64" in error.details()


def test_negative_dimension_is_invalid_argument(channel: grpc.Channel) -> None:
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[b""])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[-1, 16])
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "negative dimension" in error.details()


def test_model_without_batching_takes_its_exact_shape(channel: grpc.Channel, repo: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    response = infer(channel, request_of("fixed", {"INPUT0": ("FP32", x)}))
    assert list(response.outputs[0].shape) == [3, 4]
    assert_identical(
        outputs_of(response)["OUTPUT0"], ort_run(repo, "fixed", 1, {"INPUT0": x})["OUTPUT0"]
    )
    error = infer_failure(channel, request_of("fixed", {"INPUT0": ("FP32", x[None])}))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "[1, 3, 4]" in error.details()


@pytest.mark.parametrize(("rows", "accepted"), [(8, True), (9, False)])
def test_batch_size_is_bounded_by_max_batch_size(
    channel: grpc.Channel, repo: Path, rows: int, accepted: bool
) -> None:
    arrays = simple_inputs(rows=rows, seed=rows)
    request = request_of("simple", {n: ("INT32", a) for n, a in arrays.items()})
    if accepted:
        got = outputs_of(infer(channel, request))
        assert_identical(got["OUTPUT0"], ort_run(repo, "simple", 1, arrays)["OUTPUT0"])
    else:
        error = infer_failure(channel, request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "batch size 9 is outside 1..8" in error.details()


def test_unknown_model_is_not_found(channel: grpc.Channel) -> None:
    x = np.zeros((1, 16), np.float32)
    error = infer_failure(channel, request_of("no_such_model", {"INPUT0": ("FP32", x)}))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in error.details()


@pytest.mark.parametrize("version", ["4", "0", "latest"])
def test_unknown_version_is_not_found(channel: grpc.Channel, version: str) -> None:
    x = np.zeros(2, np.float32)
    request = request_of("versioned", {"INPUT0": ("FP32", x)}, version=version)
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "available: 1, 2, 3" in error.details()


def test_corrupt_model_is_unavailable_with_the_reason(channel: grpc.Channel) -> None:
    x = np.zeros((1, 16), np.float32)
    error = infer_failure(channel, request_of("corrupt", {"INPUT0": ("FP32", x)}))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "corrupt" in error.details()
    assert "failed to load" in error.details()
    assert "protobuf parsing failed" in error.details()


def test_bad_config_is_unavailable_naming_the_field(channel: grpc.Channel) -> None:
    x = np.zeros((1, 16), np.float32)
    error = infer_failure(channel, request_of("bad_config", {"INPUT0": ("FP32", x)}))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "bad_config" in error.details()
    assert 'no field named "foo"' in error.details()


def test_runtime_failure_is_internal_and_the_next_request_succeeds(
    channel: grpc.Channel, repo: Path
) -> None:
    bad = np.ones((2, 4), np.float32)  # fails_at_run reshapes to [1, 4]: batch 2 fails
    error = infer_failure(channel, request_of("fails_at_run", {"INPUT0": ("FP32", bad)}))
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "fails_at_run:1 failed to run" in error.details()
    good = np.array([[1.0, -2.0, 3.5, 0.0]], np.float32)
    response = infer(channel, request_of("fails_at_run", {"INPUT0": ("FP32", good)}))
    assert_identical(
        outputs_of(response)["OUTPUT0"],
        ort_run(repo, "fails_at_run", 1, {"INPUT0": good})["OUTPUT0"],
    )


def bytes_tensor(element_size: int) -> np.ndarray:
    """A [64, 4] BYTES tensor (64 = identity_bytes' max batch) of `element_size`-byte elements."""
    array = np.empty(256, dtype=np.object_)
    array[:] = [bytes([65 + i % 26]) * element_size for i in range(256)]
    return array.reshape(64, 4)


def test_message_over_the_size_limit_is_resource_exhausted(
    channel: grpc.Channel, repo: Path
) -> None:
    """conftest sets max_request_size to 1 MiB, which bounds gRPC messages too."""
    over = bytes_tensor(4200)  # 1,076,224 bytes of raw contents
    error = infer_failure(channel, request_of("identity_bytes", {"INPUT0": ("BYTES", over)}))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()
    # ... and the server goes on serving, a message just under the limit included
    under = bytes_tensor(4000)  # 1,025,024 bytes of raw contents
    request = request_of("identity_bytes", {"INPUT0": ("BYTES", under)})
    assert request.ByteSize() < 1024 * 1024
    response = infer(channel, request)
    assert_identical(outputs_of(response)["OUTPUT0"], under)
    assert_identical(
        outputs_of(response)["OUTPUT0"],
        ort_run(repo, "identity_bytes", 1, {"INPUT0": under})["OUTPUT0"],
    )


# --------------------------------------------------------------------------
# ModelStreamInfer


def test_stream_infer_answers_in_order_and_an_error_answers_only_its_request(
    channel: grpc.Channel, repo: Path
) -> None:
    good = [mlp_input(rows=1, seed=s) for s in range(3)]
    requests = [
        request_of("mlp", {"INPUT0": ("FP32", good[0])}, request_id="first"),
        request_of("no_such_model", {"INPUT0": ("FP32", good[1])}, request_id="missing"),
        request_of("mlp", {"INPUT0": ("FP32", good[1])}, request_id="second"),
        pb.ModelInferRequest(model_name="mlp", id="empty"),
        request_of("mlp", {"INPUT0": ("FP32", good[2])}, request_id="third"),
    ]
    stream = channel.stream_stream(
        SERVICE + "ModelStreamInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    responses = list(stream(iter(requests), timeout=30))
    assert [r.infer_response.id for r in responses] == [r.id for r in requests]
    assert [bool(r.error_message) for r in responses] == [False, True, False, True, False]
    assert "no_such_model" in responses[1].error_message
    assert "no inputs" in responses[3].error_message
    for response, x in zip([responses[0], responses[2], responses[4]], good, strict=True):
        assert_identical(
            outputs_of(response.infer_response)["OUTPUT0"],
            ort_run(repo, "mlp", 2, {"INPUT0": x})["OUTPUT0"],
        )


# --------------------------------------------------------------------------
# health, metadata, configuration, statistics


def test_server_live_and_ready(channel: grpc.Channel) -> None:
    assert call(channel, "ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live is True
    ready = call(channel, "ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse)
    assert ready.ready is True


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [
        ("simple", "", True),
        ("versioned", "1", True),
        ("versioned", "3", True),
        ("versioned", "4", False),
        ("mlp", "1", False),  # on disk, but the default policy serves only the latest
        ("corrupt", "", False),
        ("bad_config", "", False),
    ],
)
def test_model_ready(channel: grpc.Channel, name: str, version: str, ready: bool) -> None:
    request = pb.ModelReadyRequest(name=name, version=version)
    assert call(channel, "ModelReady", request, pb.ModelReadyResponse).ready is ready


def test_model_ready_for_unknown_model_is_false_as_in_triton(channel: grpc.Channel) -> None:
    request = pb.ModelReadyRequest(name="no_such_model")
    assert call(channel, "ModelReady", request, pb.ModelReadyResponse).ready is False


def test_server_metadata(channel: grpc.Channel) -> None:
    meta = call(channel, "ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse)
    assert meta.name == "fleetserve"
    assert meta.version == importlib.metadata.version("fleetserve")
    assert list(meta.extensions) == [
        "binary_tensor_data",
        "model_configuration",
        "model_repository",
        "model_repository(unload_dependents)",
        "statistics",
    ]


def test_model_metadata_of_simple(channel: grpc.Channel) -> None:
    request = pb.ModelMetadataRequest(name="simple")
    meta = call(channel, "ModelMetadata", request, pb.ModelMetadataResponse)
    assert (meta.name, list(meta.versions), meta.platform) == ("simple", ["1"], "onnxruntime_onnx")
    described = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    assert described == [("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    described = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    assert described == [("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16])]


def test_model_metadata_of_a_version_lists_all_versions(channel: grpc.Channel) -> None:
    request = pb.ModelMetadataRequest(name="versioned", version="1")
    meta = call(channel, "ModelMetadata", request, pb.ModelMetadataResponse)
    assert list(meta.versions) == ["1", "2", "3"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "FP32", [2])]


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("no_such_model", grpc.StatusCode.NOT_FOUND, ["no_such_model"]),
        ("corrupt", grpc.StatusCode.UNAVAILABLE, ["failed to load"]),
        ("bad_config", grpc.StatusCode.UNAVAILABLE, ["foo"]),
    ],
)
@pytest.mark.parametrize("method", ["ModelMetadata", "ModelConfig", "ModelStatistics"])
def test_metadata_of_unknown_or_broken_model_fails_with_the_reason(
    channel: grpc.Channel, method: str, name: str, code: grpc.StatusCode, words: list[str]
) -> None:
    request = getattr(pb, f"{method}Request")(name=name)
    error = failure(channel, method, request, getattr(pb, f"{method}Response"))
    assert error.code() is code
    for word in words:
        assert word in error.details()


def test_model_config_of_simple(channel: grpc.Channel) -> None:
    response = call(
        channel, "ModelConfig", pb.ModelConfigRequest(name="simple"), pb.ModelConfigResponse
    )
    config = response.config
    assert isinstance(config, mc.ModelConfig)
    assert (config.name, config.platform, config.backend) == (
        "simple",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", mc.TYPE_INT32, [16]),
        ("INPUT1", mc.TYPE_INT32, [16]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", mc.TYPE_INT32, [16]),
        ("OUTPUT1", mc.TYPE_INT32, [16]),
    ]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, mc.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.parameters["intra_op_thread_count"].string_value == "1"


def test_model_config_is_auto_completed_without_config_pbtxt(channel: grpc.Channel) -> None:
    request = pb.ModelConfigRequest(name="fixed")
    config = call(channel, "ModelConfig", request, pb.ModelConfigResponse).config
    assert config.name == "fixed"
    assert config.max_batch_size == 0  # no variable first dimension: no batching
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", mc.TYPE_FP32, [3, 4])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", mc.TYPE_FP32, [3, 4])
    ]


def _statistics(channel: grpc.Channel, name: str, version: str = "") -> pb.ModelStatisticsResponse:
    request = pb.ModelStatisticsRequest(name=name, version=version)
    return call(channel, "ModelStatistics", request, pb.ModelStatisticsResponse)


def test_model_statistics_count_successes_failures_and_batches(channel: grpc.Channel) -> None:
    [before] = _statistics(channel, "fails_at_run").model_stats
    for rows in (1, 1, 2):
        x = np.ones((rows, 4), np.float32)
        try:
            infer(channel, request_of("fails_at_run", {"INPUT0": ("FP32", x)}))
        except grpc.RpcError as exc:
            assert rows == 2 and exc.code() is grpc.StatusCode.INTERNAL
    [after] = _statistics(channel, "fails_at_run").model_stats
    assert (after.name, after.version) == ("fails_at_run", "1")
    assert after.inference_count - before.inference_count == 2
    assert after.execution_count - before.execution_count == 2
    stats, old = after.inference_stats, before.inference_stats
    assert stats.success.count - old.success.count == 2
    assert stats.success.ns > old.success.ns
    assert stats.fail.count - old.fail.count == 1
    assert stats.compute_infer.count - old.compute_infer.count == 2
    assert after.last_inference >= before.last_inference > 0
    batch_one = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert batch_one[1] >= 2
    assert [m.type for m in after.memory_usage] == ["CPU"]


def test_model_statistics_without_a_name_cover_every_loaded_model(channel: grpc.Channel) -> None:
    names = [(s.name, s.version) for s in _statistics(channel, "").model_stats]
    assert names == sorted(names)
    assert {("simple", "1"), ("mlp", "2"), ("versioned", "1"), ("versioned", "3")} <= set(names)
    assert not {"corrupt", "bad_config"} & {name for name, _ in names}


def test_model_statistics_of_one_version(channel: grpc.Channel) -> None:
    [stats] = _statistics(channel, "versioned", "2").model_stats
    assert (stats.name, stats.version) == ("versioned", "2")


def test_model_statistics_version_without_name_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    request = pb.ModelStatisticsRequest(version="1")
    error = failure(channel, "ModelStatistics", request, pb.ModelStatisticsResponse)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_health_check_is_serving(channel: grpc.Channel, service: str) -> None:
    stub = channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = stub(health_pb2.HealthCheckRequest(service=service), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    stub = channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        stub(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in info.value.details()


@pytest.mark.parametrize(
    "method", ["CudaSharedMemoryStatus", "TraceSetting", "SystemSharedMemoryStatus", "LogSettings"]
)
def test_unsupported_extension_is_unimplemented(channel: grpc.Channel, method: str) -> None:
    request = getattr(pb, f"{method}Request")()
    error = failure(channel, method, request, getattr(pb, f"{method}Response"))
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "not supported" in error.details()


def test_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    error = failure(channel, "NoSuchRpc", pb.ServerLiveRequest(), pb.ServerLiveResponse)
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------------
# concurrency


@pytest.mark.asyncio
async def test_200_concurrent_model_infer_calls_are_all_correct(server: Any, repo: Path) -> None:
    requests, expected = [], []
    for i in range(200):
        if i % 2:
            arrays = simple_inputs(rows=1 + i % 4, seed=i)
            requests.append(
                request_of(
                    "simple", {n: ("INT32", a) for n, a in arrays.items()}, request_id=str(i)
                )
            )
            expected.append(ort_run(repo, "simple", 1, arrays))
        else:
            x = mlp_input(rows=1, seed=i)
            requests.append(request_of("mlp", {"INPUT0": ("FP32", x)}, request_id=str(i)))
            expected.append(ort_run(repo, "mlp", 2, {"INPUT0": x}))
    async with grpc.aio.insecure_channel(server.grpc) as aio_channel:
        stub = aio_channel.unary_unary(
            SERVICE + "ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        responses = await asyncio.gather(*(stub(r, timeout=60) for r in requests))
    for i, (response, want) in enumerate(zip(responses, expected, strict=True)):
        assert response.id == str(i)
        got = outputs_of(response)
        assert sorted(got) == sorted(want)
        for name, array in want.items():
            assert_identical(got[name], array)


# --------------------------------------------------------------------------
# client input that must be INVALID_ARGUMENT naming the problem, never INTERNAL


HUGE_SHAPES = {
    "65-dims": ([1] * 65, "shape has 65 dimensions, at most 64 are supported"),
    "int32-max-cubed": ([2147483647, 2147483647, 2147483647, 0], "is too large"),
    "2**62": ([4611686018427387904, 0], "is too large"),
}


@pytest.mark.parametrize("model", ["mlp", "no_such_model"])
@pytest.mark.parametrize("contents", ["raw", "fp32_contents", "bytes_contents"])
@pytest.mark.parametrize("shape", list(HUGE_SHAPES))
def test_shape_numpy_cannot_build_is_invalid_argument_naming_the_input(
    channel: grpc.Channel, model: str, contents: str, shape: str
) -> None:
    dims, problem = HUGE_SHAPES[shape]
    empty = 0 in dims
    request = pb.ModelInferRequest(model_name=model)
    datatype = "BYTES" if contents == "bytes_contents" else "FP32"
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=dims)
    if contents == "raw":
        request.raw_input_contents.append(b"" if empty else b"\0\0\0\0")
    elif contents == "fp32_contents":
        tensor.contents.fp32_contents.extend([] if empty else [1.0])
    else:
        tensor.contents.bytes_contents.extend([] if empty else [b"a"])
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("input 'INPUT0': ") and problem in error.details()


def test_requesting_an_output_twice_is_invalid_argument_naming_it(channel: grpc.Channel) -> None:
    tensors = {n: ("INT32", a) for n, a in simple_inputs(rows=1, seed=3).items()}
    request = request_of("simple", tensors, outputs=["OUTPUT0", "OUTPUT1", "OUTPUT0"])
    error = infer_failure(channel, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "output 'OUTPUT0' is requested more than once"
