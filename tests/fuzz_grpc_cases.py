"""What a gRPC client can send, as Hypothesis strategies: ModelInferRequest messages
(raw or typed contents, right or wrong in every field) and bytes that are no message
(random, or a real message cut short or with a byte changed), to every method.

Valid-ish, as tests/fuzz_cases.py's REST strategies, and aimed at the same repository.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.server.types import DTYPES
from tests.fuzz_cases import (
    PRINTABLE,
    SENSIBLE_PARAMETERS,
    SIGNATURES,
    TEXT,
    element_count,
    model_names,
    rarely,
    raw_of,
    shapes,
    values,
    versions,
)

INT64 = st.integers(-(2**63), 2**63 - 1)
PARAMETER_KINDS = {
    "bool_param": st.booleans(),
    "int64_param": INT64,
    "string_param": TEXT,
    "double_param": st.floats(),
    "uint64_param": st.integers(0, 2**64 - 1),
}
TYPED_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": INT64,
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}
TYPED_OF = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}  # fmt: skip
PARAMETER_OF = {bool: "bool_param", int: "int64_param", str: "string_param"}


def fill_parameters(draw: st.DrawFn, message: Any) -> None:
    """A parameters map: known keys with fitting values, now and then any kind of value."""
    keys = draw(st.lists(st.sampled_from(list(SENSIBLE_PARAMETERS)), max_size=2, unique=True))
    for key in keys:
        value = draw(SENSIBLE_PARAMETERS[key])
        setattr(message[key], PARAMETER_OF[type(value)], value)
    if rarely(draw, 5):
        key = draw(st.sampled_from(list(SENSIBLE_PARAMETERS)) | TEXT)
        kind = draw(st.sampled_from(list(PARAMETER_KINDS)))
        setattr(message[key], kind, draw(PARAMETER_KINDS[kind]))


@st.composite
def grpc_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A ModelInferRequest for a model of the repository, now and then bent."""
    model = draw(model_names())
    request = pb.ModelInferRequest(model_name=model, model_version=draw(versions()) or "")
    if draw(st.booleans()):
        request.id = draw(TEXT) if rarely(draw) else draw(PRINTABLE)
    fill_parameters(draw, request.parameters)
    inputs, outputs = SIGNATURES.get(model, SIGNATURES["mlp"])
    raw = draw(st.booleans())
    for name, datatype, dims in inputs + (inputs[:1] if rarely(draw, 20) else []):
        if rarely(draw, 20):
            name = draw(TEXT)
        if rarely(draw, 20):
            datatype = draw(st.sampled_from([*DTYPES, "FP8", "", "int32"]))
        shape = [max(-(2**63), min(d, 2**63 - 1)) for d in draw(shapes(dims))]  # int64
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        if rarely(draw):
            fill_parameters(draw, tensor.parameters)
        count = element_count(shape)
        exact = count >= 0 and datatype in DTYPES and not rarely(draw)
        if raw:
            if exact:
                content = raw_of(datatype, draw(values(datatype, count, binary=True)))
            else:
                content = draw(st.binary(max_size=40))
            request.raw_input_contents.append(content)
        else:
            field = TYPED_OF.get(datatype, "fp32_contents")
            if not exact:
                field = draw(st.sampled_from(list(TYPED_FIELDS)))
                count = draw(st.integers(0, 5))
            contents = getattr(tensor.contents, field)
            contents.extend(draw(st.lists(TYPED_FIELDS[field], min_size=count, max_size=count)))
    if raw and rarely(draw, 20):
        request.raw_input_contents.append(draw(st.binary(max_size=8)))  # one too many
    if rarely(draw, 3):
        for name in draw(st.lists(st.sampled_from(outputs), min_size=1, max_size=3)):
            output = request.outputs.add(name=draw(TEXT) if rarely(draw) else name)
            if rarely(draw, 5):
                fill_parameters(draw, output.parameters)
    return request


METHODS = [
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
    "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus", "TraceSetting",
    "LogSettings", "NoSuchMethod",
]  # fmt: skip


@st.composite
def grpc_garbage(draw: st.DrawFn) -> tuple[str, bytes]:
    """(method path, message bytes): any bytes, or a real message cut short or changed."""
    path = "/inference.GRPCInferenceService/" + draw(st.sampled_from(METHODS))
    if rarely(draw):
        path = "/grpc.health.v1.Health/Check"
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return path, draw(st.binary(max_size=64))
    message = draw(grpc_requests()).SerializeToString()
    if kind == 1:
        return path, message[: draw(st.integers(0, max(0, len(message) - 1)))]
    data = bytearray(message or b"\x00")
    at = draw(st.integers(0, len(data) - 1))
    data[at] ^= draw(st.integers(1, 255))
    return path, bytes(data)
