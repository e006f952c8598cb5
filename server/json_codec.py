"""V2 REST wire format <-> domain types: JSON tensors and Triton's binary tensor data.

Pure functions of bytes and arrays: no aiohttp here, so they are tested directly and
the REST edge stays a thin translation.
"""

from __future__ import annotations

import json
import math
import re
import time
from math import prod
from typing import Any

import numpy as np
import orjson

from fleetserve.server.errors import InvalidArgument, shown
from fleetserve.server.tensors import array_from_bytes, byte_elements, bytes_of, check_shape
from fleetserve.server.types import (
    DTYPES,
    FeedbackRecord,
    InferRequest,
    InferResponse,
    RequestedOutput,
    datatype_of,
)

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def decode_request(
    body: bytes, header_length: int | None, model_name: str, model_version: str | None
) -> InferRequest:
    """Decode an infer request body; `header_length` is Inference-Header-Content-Length."""
    if header_length is None:
        header, binary = body, b""
    elif header_length == 0:
        raise InvalidArgument(
            "raw binary requests (Inference-Header-Content-Length: 0) are not supported; "
            "send a JSON header"
        )
    elif 0 < header_length <= len(body):
        header, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        raise InvalidArgument(
            f"Inference-Header-Content-Length {header_length} is outside the body "
            f"({len(body)} bytes)"
        )
    doc = json_object(header, "request body")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument("request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for item in raw_inputs:
        name, datatype, shape, params = _tensor_header(item, "input")
        if name in inputs:
            raise InvalidArgument(f"input {name!r} appears twice")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidArgument(
                    f"input {name!r}: binary_data_size {size} overruns the binary data "
                    f"({len(binary) - offset} bytes left)"
                )
            array = array_from_bytes(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            if "data" not in item:
                raise InvalidArgument(f"input {name!r} has neither 'data' nor binary_data_size")
            array = _array_from_json(name, datatype, shape, item["data"])
        inputs[name] = array
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidArgument(
            f"request has {len(binary) - offset} bytes of binary data that no input claims"
        )
    parameters = doc.get("parameters")
    parameters = {} if parameters is None else _dict(parameters, "parameters")
    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidArgument("'outputs' must be a list")
        outputs = [_requested_output(o) for o in raw_outputs]
    request_id = doc.get("id", "")
    if not isinstance(request_id, str) or len(request_id) > 256:
        raise InvalidArgument("'id' must be a string of at most 256 characters")
    if not request_id.isprintable():  # it goes back in a header (X-Request-Id)
        raise InvalidArgument("'id' must not hold control characters")
    return InferRequest(
        model_name, model_version, inputs, datatypes, request_id, parameters, outputs
    )


MAX_METADATA_BYTES = 64 * 1024
# orjson reads JSON nested up to 1024 levels deep but writes only 254: a value the server
# stores (feedback metadata) must fit the lower bound
MAX_READ_DEPTH = 1024
MAX_WRITE_DEPTH = 254
_NON_FINITE = re.compile(rb"NaN|Infinity")


def json_object(body: bytes | memoryview, what: str) -> dict:
    """A body that must hold one JSON object; InvalidArgument naming `what` otherwise.

    NaN, Infinity and -Infinity are read as numbers, as Triton reads them (rapidjson's
    kParseNanAndInfFlag) and as tritonclient.http writes non-finite inputs.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if exc.msg.startswith("depth limit"):
            raise InvalidArgument(
                f"{what} nests JSON more than {MAX_READ_DEPTH} levels deep"
            ) from None
        if not _NON_FINITE.search(body):
            raise InvalidArgument(f"malformed JSON in {what}: {exc}") from None
        doc = _loads_non_finite(body, what)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return doc


def _loads_non_finite(body: bytes | memoryview, what: str) -> Any:
    """A body orjson refused that holds NaN or Infinity, read by the stdlib's parser, which
    takes them (only such bodies pay for it). Made to read as orjson would otherwise:
    integers beyond 64 bits as floats; numbers beyond double range, lone surrogates and
    more nesting than orjson writes refused (orjson.dumps checks the last two)."""
    try:
        doc = json.loads(bytes(body).decode(), parse_int=_int, parse_float=_finite)
        orjson.dumps(doc)
    except RecursionError:
        raise InvalidArgument(f"{what} nests JSON too deeply") from None
    except (ValueError, orjson.JSONEncodeError) as exc:
        raise InvalidArgument(f"malformed JSON in {what}: {exc}") from None
    return doc


def _int(text: str) -> int | float:
    if len(text) <= 20:  # 64 bits' worth of digits, and a sign
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return _finite(text)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def decode_feedback(body: bytes, model_name: str) -> FeedbackRecord:
    """Ground truth for a request id: {"id", "label"?, "truth": [tensors]?, "metadata"?}."""
    doc = json_object(body, "feedback body")
    unknown = set(doc) - {"id", "label", "truth", "metadata"}
    if unknown:
        raise InvalidArgument(f"unknown feedback field(s): {', '.join(sorted(unknown))[:200]}")
    request_id = doc.get("id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
        raise InvalidArgument("feedback needs the request's 'id' (a string of 1..256 chars)")
    label = doc.get("label")
    if label is not None and (
        type(label) not in (str, int, float, bool)
        or (type(label) is str and len(label) > 4096)
        or (type(label) is float and not math.isfinite(label))  # stored as JSON: no NaN
    ):
        raise InvalidArgument(
            "'label' must be a string (up to 4096 chars), finite number or boolean"
        )
    truth = None
    if doc.get("truth") is not None:
        if not isinstance(doc["truth"], list) or not doc["truth"]:
            raise InvalidArgument("'truth' must be a non-empty list of tensors")
        truth = {}
        for item in doc["truth"]:
            name, datatype, shape, _ = _tensor_header(item, "truth tensor")
            if "data" not in item:
                raise InvalidArgument(f"truth tensor {name!r} has no 'data'")
            truth[name] = _array_from_json(name, datatype, shape, item["data"])
    if label is None and truth is None:
        raise InvalidArgument("feedback needs a 'label' or 'truth' (or both)")
    metadata = doc.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidArgument("'metadata' must be a JSON object")
        try:
            size = len(orjson.dumps(metadata))
        except orjson.JSONEncodeError:  # nested too deeply for orjson to write it back
            raise InvalidArgument(
                f"'metadata' is limited to {MAX_WRITE_DEPTH} levels of nesting"
            ) from None
        if size > MAX_METADATA_BYTES:
            raise InvalidArgument(f"'metadata' is limited to {MAX_METADATA_BYTES} bytes of JSON")
    return FeedbackRecord(request_id, model_name, time.time(), label, truth, metadata)


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"'{what}' must be a JSON object")
    return value


def _tensor_header(item: Any, what: str) -> tuple[str, str, list[int], dict]:
    if not isinstance(item, dict):
        raise InvalidArgument(f"each {what} must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"an {what} has no 'name'")
    datatype = item.get("datatype")
    if type(datatype) is not str or datatype not in DTYPES:
        raise InvalidArgument(
            f"{what} {name!r}: unknown datatype {shown(datatype)} (one of {', '.join(DTYPES)})"
        )
    shape = item.get("shape")
    if type(shape) is not list:
        raise InvalidArgument(f"{what} {name!r}: 'shape' must be a list of non-negative integers")
    for d in shape:
        if type(d) is not int:
            raise InvalidArgument(
                f"{what} {name!r}: 'shape' must be a list of non-negative integers"
            )
    check_shape(what, name, datatype, shape)
    params = item.get("parameters")
    return (
        name,
        datatype,
        shape,
        {} if params is None else _dict(params, f"{what} {name!r} parameters"),
    )


def _requested_output(item: Any) -> RequestedOutput:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidArgument("each requested output must be an object with a 'name'")
    params = _dict(item.get("parameters"), f"output {item['name']!r} parameters")
    if params.get("classification"):
        raise InvalidArgument("the classification extension is not supported")
    binary = params.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise InvalidArgument(f"output {item['name']!r}: binary_data must be true or false")
    return RequestedOutput(item["name"], binary, params)


def _array_from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    count = prod(shape)
    if datatype == "BYTES":
        flat = _flatten_text(name, data)
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        array = _numbers(name, datatype, data)
    if array.size != count:
        raise InvalidArgument(
            f"input {name!r}: shape {shape} needs {count} elements, data has {array.size}"
        )
    return array.reshape(shape)


# which JSON value kinds (numpy's inference of them) each datatype accepts: no strings,
# no nulls, no floats for integers, only true/false for BOOL (as Triton)
_ACCEPTS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_WORDS = {"b": "true/false", "iu": "integers", "iuf": "numbers"}
_TAKES = {"b": (bool,), "iu": (int,), "iuf": (int, float)}  # the JSON values, as Python types


def _numbers(name: str, datatype: str, data: Any) -> np.ndarray:
    dtype = DTYPES[datatype]
    try:
        raw = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidArgument(f"input {name!r}: data is not valid {datatype}: {exc}") from None
    accepts = _ACCEPTS[dtype.kind]
    if dtype.kind in "iu" and raw.dtype.kind in "fO" and _all_ints(data):
        # numpy infers float or object for integers beyond int64 (large UINT64 values)
        try:
            return np.asarray(data, dtype=dtype)
        except OverflowError:
            raise InvalidArgument(
                f"input {name!r}: data is not valid {datatype}: values outside its range"
            ) from None
    if raw.dtype.kind not in accepts and raw.size:
        raise InvalidArgument(
            f"input {name!r}: data is not valid {datatype}: it takes {_KIND_WORDS[accepts]}, "
            f"got values such as {shown(_refused(data, accepts))}"
        )
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise InvalidArgument(
                f"input {name!r}: data is not valid {datatype}: values outside "
                f"{info.min}..{info.max}"
            )
    return raw.astype(dtype, copy=False)


def _refused(data: Any, accepts: str) -> Any:
    """The first JSON value in `data` that a datatype accepting `accepts` refuses, as the
    client sent it (numpy's inference would show np.str_('a'), or a float for 2**64)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif type(item) not in _TAKES[accepts]:
            return item
    return data


def _all_ints(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif type(item) is not int:
            return False
    return True


def _flatten_text(name: str, data: Any) -> list[bytes]:
    out: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, list):
            stack.extend(reversed(item))
        else:
            raise InvalidArgument(f"input {name!r}: BYTES data must be strings, got {shown(item)}")
    return out


def encode_response(resp: InferResponse, binary_default: bool) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows."""
    # (name, binary?) per output, in the order asked for (all outputs when none were)
    if resp.requested:
        wanted = [
            (o.name, binary_default if o.binary is None else o.binary) for o in resp.requested
        ]
    else:
        wanted = [(name, binary_default) for name in resp.outputs]
    entries = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        array = resp.outputs[name]
        datatype = datatype_of(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": array.shape}
        if binary:
            raw = bytes_of(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_text(name, b) for b in byte_elements(array)]
        else:
            entry["data"] = array.ravel()
        entries.append(entry)
    doc: dict[str, Any] = {
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "outputs": entries,
    }
    if resp.id:
        doc["id"] = resp.id
    header = orjson.dumps(doc, option=_DUMPS_OPTIONS)
    if b"null" in header:  # a non-finite float, or text that says null: rare, checked below
        header = _spell_non_finite(doc)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _spell_non_finite(doc: dict[str, Any]) -> bytes:
    """The response with NaN and infinities written as Triton writes them (rapidjson's
    kWriteNanAndInfFlag: NaN, Infinity, -Infinity), which tritonclient.http reads back;
    orjson writes them as null, as strict JSON has no such numbers."""
    for entry in doc["outputs"]:
        data = entry.get("data")
        if isinstance(data, np.ndarray) and data.dtype.kind == "f":
            finite = np.isfinite(data)
            if not finite.all():
                # in a numeric array orjson writes null for these and nothing else
                parts = orjson.dumps(data, option=_DUMPS_OPTIONS).split(b"null")
                words = [
                    b"NaN" if math.isnan(v) else b"Infinity" if v > 0 else b"-Infinity"
                    for v in data[~finite].tolist()
                ]
                spelled = [parts[0]]
                for word, part in zip(words, parts[1:], strict=True):
                    spelled += (word, part)
                entry["data"] = orjson.Fragment(b"".join(spelled))
    return orjson.dumps(doc, option=_DUMPS_OPTIONS)


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"output {name!r} holds bytes that are not UTF-8; request it with binary_data"
        ) from None


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})
