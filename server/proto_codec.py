"""gRPC messages <-> domain types: raw contents both ways, typed contents on input.

Outputs always go back as raw_output_contents, as Triton does and tritonclient reads.
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
from google.protobuf import json_format

from fleetserve.protos import grpc_service_pb2 as pb
from fleetserve.server.errors import InvalidArgument
from fleetserve.server.tensors import array_from_bytes, bytes_of, check_shape
from fleetserve.server.types import (
    DTYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
)

# which InferTensorContents field carries each datatype (FP16 only travels raw)
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


def parameter_value(param: pb.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def parameters_dict(params: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()} if params else {}


def decode_infer(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as an InferRequest; InvalidArgument names what is wrong."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    if not request.inputs:
        raise InvalidArgument("request has no inputs")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if datatype not in DTYPES:
            raise InvalidArgument(
                f"input {name!r}: unknown datatype {datatype!r} (one of {', '.join(DTYPES)})"
            )
        if name in inputs:
            raise InvalidArgument(f"input {name!r} appears twice")
        shape = list(tensor.shape)
        check_shape("input", name, datatype, shape)
        if raw:
            inputs[name] = array_from_bytes(name, datatype, shape, raw[i])
        else:
            inputs[name] = _from_contents(name, datatype, shape, tensor)
        datatypes[name] = datatype
    outputs = None
    if request.outputs:
        outputs = [
            RequestedOutput(o.name, None, parameters_dict(o.parameters)) for o in request.outputs
        ]
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version or None,
        inputs=inputs,
        datatypes=datatypes,
        id=request.id,
        parameters=parameters_dict(request.parameters),
        outputs=outputs,
    )


def _from_contents(name: str, datatype: str, shape: list[int], tensor: Any) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    count = prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: shape {shape} needs {count} elements, contents has {len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    else:
        try:
            array = np.array(list(values), dtype=DTYPES[datatype])
        except OverflowError as exc:
            raise InvalidArgument(
                f"input {name!r}: value out of range for {datatype}: {exc}"
            ) from None
    return array.reshape(shape)


def encode_infer(resp: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=resp.model_version, id=resp.id
    )
    names = [o.name for o in resp.requested] if resp.requested else list(resp.outputs)
    for name in names:
        array = resp.outputs[name]
        message.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        message.raw_output_contents.append(bytes_of(array))
    return message


def from_json(doc: dict[str, Any], message: Any) -> Any:
    """Fill a message from the core's JSON-shaped answer (config, statistics)."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)
