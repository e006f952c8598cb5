"""Unit tests of the REST wire codec (server.json_codec) and the binary tensor layout
(server.tensors): pure functions of bytes and arrays, driven directly.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import orjson
import pytest
import rapidjson

from fleetserve.server.errors import ErrorKind, InvalidArgument
from fleetserve.server.json_codec import (
    decode_feedback,
    decode_request,
    encode_response,
    error_body,
)
from fleetserve.server.tensors import array_from_bytes, bytes_of
from fleetserve.server.types import DTYPES, InferResponse, RequestedOutput
from tests.helpers import assert_identical


def body_of(doc: Any, binary: bytes = b"") -> tuple[bytes, int | None]:
    """A request body and its Inference-Header-Content-Length (None when JSON only)."""
    header = orjson.dumps(doc)
    return header + binary, (len(header) if binary else None)


def decode(doc: Any, binary: bytes = b"", model: str = "m", version: str | None = None):
    body, length = body_of(doc, binary)
    return decode_request(body, length, model, version)


def bytes_tensor(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


X1 = {"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}  # a valid input


def invalid(match: str):
    return pytest.raises(InvalidArgument, match=match)


def split_response(payload: bytes, header_length: int | None) -> tuple[dict, bytes]:
    if header_length is None:
        return orjson.loads(payload), b""
    return orjson.loads(payload[:header_length]), payload[header_length:]


# ---------------------------------------------------------------------------------------
# decode_request: JSON tensors


def test_flat_and_nested_data_decode_to_the_same_array():
    item = {"name": "X", "datatype": "INT32", "shape": [2, 3]}
    flat = decode({"inputs": [{**item, "data": [1, 2, 3, 4, 5, 6]}]})
    nested = decode({"inputs": [{**item, "data": [[1, 2, 3], [4, 5, 6]]}]})
    for req in (flat, nested):
        x = req.inputs["X"]
        assert x.dtype == np.int32 and x.shape == (2, 3)
        np.testing.assert_array_equal(x, [[1, 2, 3], [4, 5, 6]])
        assert req.datatypes == {"X": "INT32"}


def test_request_fields_pass_through():
    req = decode(
        {
            "id": "abc",
            "parameters": {"binary_data_output": True, "priority": 3},
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [0.5]}],
            "outputs": [
                {"name": "A"},
                {"name": "B", "parameters": {"binary_data": True}},
                {"name": "C", "parameters": {"binary_data": False}},
            ],
        },
        model="mlp",
        version="2",
    )
    assert (req.model_name, req.model_version, req.id) == ("mlp", "2", "abc")
    assert req.parameters == {"binary_data_output": True, "priority": 3}
    assert [(o.name, o.binary) for o in req.outputs] == [("A", None), ("B", True), ("C", False)]


def test_without_outputs_or_id_the_defaults_apply():
    req = decode({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [0.5]}]})
    assert req.outputs is None
    assert req.id == ""
    assert req.parameters == {}
    assert req.model_version is None


def test_float32_json_values_decode_exactly():
    values = np.array([0.1, 1e-45, 3.4028235e38, -0.0, 1 / 3], dtype=np.float32)
    req = decode(
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [5], "data": values.tolist()}]}
    )
    np.testing.assert_array_equal(req.inputs["X"].view(np.uint32), values.view(np.uint32))


def test_bytes_json_nested_keeps_row_major_order_and_utf8():
    req = decode(
        {
            "inputs": [
                {
                    "name": "S",
                    "datatype": "BYTES",
                    "shape": [2, 2],
                    "data": [["a", "héllo"], ["", "日本"]],
                }
            ]
        }
    )
    s = req.inputs["S"]
    assert s.dtype == object and s.shape == (2, 2)
    assert s.tolist() == [[b"a", "héllo".encode()], [b"", "日本".encode()]]


def test_bytes_json_rejects_non_strings():
    with invalid("BYTES data must be strings"):
        decode({"inputs": [{"name": "S", "datatype": "BYTES", "shape": [2], "data": ["a", 1]}]})


def test_bytes_json_element_count_must_match_shape():
    with invalid(r"shape \[3\] needs 3 elements, data has 2"):
        decode({"inputs": [{"name": "S", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}]})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2, 3], r"needs 4 elements, data has 3"),
        ([[1, 2], [3]], "not valid INT32"),  # ragged
        ([2**40, 1, 2, 3], "not valid INT32"),
        (["x", 1, 2, 3], "not valid INT32"),
        ({"a": 1}, "not valid INT32"),
    ],
    ids=["count", "ragged", "overflow", "text", "object"],
)
def test_bad_json_data_is_invalid_argument(data, match):
    with invalid(match):
        decode({"inputs": [{"name": "X", "datatype": "INT32", "shape": [4], "data": data}]})


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "must be a JSON object"),
        ({}, "non-empty 'inputs'"),
        ({"inputs": {}}, "non-empty 'inputs'"),
        ({"inputs": ["X"]}, "each input must be a JSON object"),
        ({"inputs": [{**X1, "name": ""}]}, "has no 'name'"),
        ({"inputs": [{**X1, "datatype": "fp32"}]}, "unknown datatype 'fp32'"),
        ({"inputs": [{**X1, "datatype": "BF16"}]}, "unknown datatype 'BF16'"),
        ({"inputs": [{**X1, "shape": [True]}]}, "'shape'"),
        ({"inputs": [{**X1, "shape": [-1]}]}, "negative dimension"),
        ({"inputs": [{**X1, "shape": "1"}]}, "'shape'"),
        ({"inputs": [{**X1, "shape": [2**31]}]}, "needs 2147483648 elements"),
        ({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1]}]},
         "neither 'data' nor binary_data_size"),
        ({"inputs": [X1, X1]}, "'X' appears twice"),
        ({"inputs": [{**X1, "parameters": 1}]}, "parameters' must be a JSON object"),
        ({"inputs": [X1], "id": 5}, "'id' must be a string"),
        ({"inputs": [X1], "parameters": []}, "'parameters' must be a JSON object"),
        ({"inputs": [X1], "outputs": {}}, "'outputs' must be a list"),
        ({"inputs": [X1], "outputs": [{}]}, "requested output must be an object with a 'name'"),
        ({"inputs": [X1], "outputs": [{"name": "Y", "parameters": {"binary_data": 1}}]},
         "binary_data must be true or false"),
        ({"inputs": [X1], "outputs": [{"name": "Y", "parameters": {"classification": 2}}]},
         "classification extension is not supported"),
    ],
)  # fmt: skip
def test_malformed_request_documents_are_invalid_argument(doc, match):
    with invalid(match) as info:
        decode(doc)
    assert info.value.kind is ErrorKind.INVALID_ARGUMENT


def test_malformed_json_is_invalid_argument():
    with invalid("malformed JSON"):
        decode_request(b'{"inputs": [', None, "m", None)


# ---------------------------------------------------------------------------------------
# decode_request: binary tensor data


def test_binary_and_json_inputs_take_binary_in_input_order():
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    c = np.array([[1, -2]], dtype=np.int16)
    doc = {
        "inputs": [
            {"name": "A", "datatype": "FP64", "shape": [2, 3],
             "parameters": {"binary_data_size": a.nbytes}},
            {"name": "B", "datatype": "INT8", "shape": [2], "data": [-1, 1]},
            {"name": "C", "datatype": "INT16", "shape": [1, 2],
             "parameters": {"binary_data_size": c.nbytes}},
        ]
    }  # fmt: skip
    req = decode(doc, a.tobytes() + c.tobytes())
    np.testing.assert_array_equal(req.inputs["A"], a)
    np.testing.assert_array_equal(req.inputs["B"], np.array([-1, 1], dtype=np.int8))
    np.testing.assert_array_equal(req.inputs["C"], c)
    assert req.inputs["C"].dtype == np.int16


def test_binary_bytes_input_with_an_empty_element():
    raw = prefixed(b"a", b"", "日本".encode(), b"\xff\x00")
    doc = {
        "inputs": [
            {"name": "S", "datatype": "BYTES", "shape": [2, 2],
             "parameters": {"binary_data_size": len(raw)}}
        ]
    }  # fmt: skip
    s = decode(doc, raw).inputs["S"]
    assert s.shape == (2, 2)
    assert s.tolist() == [[b"a", b""], ["日本".encode(), b"\xff\x00"]]


def test_binary_data_size_overrunning_the_body_is_invalid_argument():
    doc = {
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}
        ]
    }
    with invalid(r"binary_data_size 16 overruns the binary data \(12 bytes left\)"):
        decode(doc, b"\0" * 12)


@pytest.mark.parametrize("size", [-1, 1.5, "4"])
def test_binary_data_size_must_be_a_non_negative_integer(size):
    doc = {
        "inputs": [
            {
                "name": "X",
                "datatype": "UINT8",
                "shape": [4],
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    with invalid("binary_data_size"):
        decode(doc, b"\0" * 4)


def test_binary_data_size_true_is_rejected():
    doc = {
        "inputs": [
            {
                "name": "X",
                "datatype": "UINT8",
                "shape": [1],
                "parameters": {"binary_data_size": True},
            }
        ]
    }
    with invalid("binary_data_size"):
        decode(doc, b"\x07")


def test_binary_data_that_no_input_claims_is_invalid_argument():
    doc = {"inputs": [{"name": "X", "datatype": "UINT8", "shape": [2], "data": [1, 2]}]}
    with invalid("3 bytes of binary data that no input claims"):
        decode(doc, b"abc")


def test_binary_numeric_size_must_match_shape():
    doc = {
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 12}}
        ]
    }
    with invalid("needs 16 bytes, got 12"):
        decode(doc, b"\0" * 12)


def test_header_length_zero_is_rejected_as_raw_binary():
    with invalid("raw binary requests"):
        decode_request(b"\0\0\0\0", 0, "m", None)


@pytest.mark.parametrize("extra", [1, 1000])
def test_header_length_beyond_the_body_is_invalid_argument(extra):
    body, _ = body_of({"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [1]}]})
    with invalid(f"Inference-Header-Content-Length {len(body) + extra} is outside the body"):
        decode_request(body, len(body) + extra, "m", None)


def test_header_length_equal_to_the_body_means_no_binary_data():
    body, _ = body_of({"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [9]}]})
    req = decode_request(body, len(body), "m", None)
    assert req.inputs["X"].tolist() == [9]


def test_header_length_cutting_the_json_is_malformed_json():
    body, _ = body_of({"inputs": [{"name": "X", "datatype": "UINT8", "shape": [1], "data": [9]}]})
    with invalid("malformed JSON"):
        decode_request(body, len(body) - 2, "m", None)


# ---------------------------------------------------------------------------------------
# server.tensors


@pytest.mark.parametrize("datatype", [d for d in DTYPES if d != "BYTES"])
def test_numeric_bytes_round_trip_every_datatype(datatype):
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        array = np.array([[True, False, True], [False, False, True]])
    elif dtype.kind == "f":
        info = np.finfo(dtype)
        array = np.array([[info.max, info.min, info.tiny], [-0.0, 0.1, info.smallest_subnormal]],
                         dtype=dtype)  # fmt: skip
    else:
        info = np.iinfo(dtype)
        array = np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)
    raw = bytes_of(array)
    assert raw == array.astype(dtype.newbyteorder("<")).tobytes()  # little-endian, row-major
    back = array_from_bytes("X", datatype, [2, 3], raw)
    assert back.dtype == dtype and back.shape == (2, 3)
    np.testing.assert_array_equal(back.view(np.uint8), array.view(np.uint8))


def test_bool_is_one_byte_per_element():
    assert bytes_of(np.array([True, False, True])) == b"\x01\x00\x01"


def test_numeric_array_from_bytes_does_not_copy():
    raw = np.arange(8, dtype=np.int32).tobytes()
    array = array_from_bytes("X", "INT32", [2, 4], memoryview(raw)[:])
    assert np.shares_memory(array, np.frombuffer(raw, dtype=np.uint8))
    assert not array.flags.writeable


def test_bytes_of_non_contiguous_array_is_row_major():
    array = np.arange(6, dtype=np.int16).reshape(2, 3).T  # Fortran-ordered view
    assert bytes_of(array) == np.array([[0, 3], [1, 4], [2, 5]], dtype=np.int16).tobytes()


def test_bytes_elements_are_length_prefixed():
    array = bytes_tensor([b"", b"ab", "é".encode()])
    assert bytes_of(array) == b"\0\0\0\0" + b"\x02\0\0\0ab" + b"\x02\0\0\0\xc3\xa9"
    back = array_from_bytes("S", "BYTES", [3], bytes_of(array))
    assert back.dtype == object and back.tolist() == [b"", b"ab", "é".encode()]


def test_bytes_of_an_empty_string_only_tensor():
    assert bytes_of(bytes_tensor([b"", b""])) == b"\0" * 8
    assert array_from_bytes("S", "BYTES", [2, 1], b"\0" * 8).tolist() == [[b""], [b""]]


@pytest.mark.parametrize(
    ("raw", "shape", "match"),
    [
        (b"\x01\x00", [1], "truncated BYTES element length"),
        (prefixed(b"ab") + b"\x01\x00\x00", [2], "truncated BYTES element length"),
        (b"\x05\x00\x00\x00ab", [1], "BYTES element overruns the data"),
        (prefixed(b"a", b"b", b"c"), [2], "needs 2 BYTES elements, got 3"),
        (prefixed(b"a"), [2], "needs 2 BYTES elements, got 1"),
        (b"", [1], "needs 1 BYTES elements, got 0"),
    ],
    ids=["short-prefix", "short-second-prefix", "overrun", "too-many", "too-few", "empty"],
)
def test_malformed_binary_bytes_are_invalid_argument(raw, shape, match):
    with invalid(match):
        array_from_bytes("S", "BYTES", shape, raw)


def test_binary_numeric_length_must_match_shape():
    with invalid(r"shape \[2, 2\] of FP64 needs 32 bytes, got 31"):
        array_from_bytes("X", "FP64", [2, 2], b"\0" * 31)


# ---------------------------------------------------------------------------------------
# encode_response


def response(outputs: dict[str, np.ndarray], requested=None, id: str = "") -> InferResponse:
    return InferResponse(
        model_name="m", model_version="3", id=id, outputs=outputs, requested=requested
    )


def test_json_response_has_every_output_and_no_header_length():
    out0 = np.array([[0.1, -0.0]], dtype=np.float32)
    out1 = np.array([[True, False]])
    payload, length = encode_response(response({"O0": out0, "O1": out1}), binary_default=False)
    assert length is None
    doc = orjson.loads(payload)
    assert doc["model_name"] == "m" and doc["model_version"] == "3"
    assert "id" not in doc
    o0, o1 = doc["outputs"]
    assert (o0["name"], o0["datatype"], o0["shape"]) == ("O0", "FP32", [1, 2])
    parsed = np.array(o0["data"], dtype=np.float32)
    np.testing.assert_array_equal(parsed.view(np.uint32), out0.ravel().view(np.uint32))
    assert (o1["datatype"], o1["data"]) == ("BOOL", [True, False])


def test_response_echoes_id():
    payload, _ = encode_response(
        response({"O": np.zeros(1, np.int8)}, id="x-1"), binary_default=False
    )
    assert orjson.loads(payload)["id"] == "x-1"


def test_bytes_output_in_json_is_utf8_strings():
    out = bytes_tensor([b"", "日本".encode(), b'q"'])
    payload, length = encode_response(response({"S": out.reshape(1, 3)}), binary_default=False)
    assert length is None
    (entry,) = orjson.loads(payload)["outputs"]
    assert (entry["datatype"], entry["shape"], entry["data"]) == (
        "BYTES",
        [1, 3],
        ["", "日本", 'q"'],
    )


def test_non_utf8_bytes_output_in_json_suggests_binary_data():
    out = bytes_tensor([b"ok", b"\xff\xfe"])
    with invalid("not UTF-8; request it with binary_data") as info:
        encode_response(response({"S": out}), binary_default=False)
    assert "'S'" in info.value.message


def test_non_utf8_bytes_output_is_fine_as_binary():
    out = bytes_tensor([b"ok", b"\xff\xfe"])
    payload, length = encode_response(
        response({"S": out}, requested=[RequestedOutput("S", True)]), binary_default=False
    )
    doc, binary = split_response(payload, length)
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": len(binary)}
    assert binary == prefixed(b"ok", b"\xff\xfe")


def test_binary_and_json_outputs_mix_in_requested_order():
    a = np.array([1, 2], dtype=np.int32)
    b = np.array([3.5], dtype=np.float64)
    c = bytes_tensor([b"xy", b""])
    requested = [
        RequestedOutput("C", True),
        RequestedOutput("B", False),
        RequestedOutput("A", None),  # follows binary_default
    ]
    payload, length = encode_response(
        response({"A": a, "B": b, "C": c}, requested=requested), binary_default=True
    )
    assert length is not None
    doc, binary = split_response(payload, length)
    assert [o["name"] for o in doc["outputs"]] == ["C", "B", "A"]
    c_entry, b_entry, a_entry = doc["outputs"]
    assert b_entry["data"] == [3.5] and "parameters" not in b_entry
    assert "data" not in c_entry and "data" not in a_entry
    c_size = c_entry["parameters"]["binary_data_size"]
    a_size = a_entry["parameters"]["binary_data_size"]
    assert (c_size, a_size) == (len(prefixed(b"xy", b"")), 8)
    assert binary == prefixed(b"xy", b"") + a.tobytes()  # C then A, as listed


def test_binary_default_applies_to_outputs_without_their_own_flag():
    a = np.array([[1, 2]], dtype=np.uint16)
    payload, length = encode_response(response({"A": a}), binary_default=True)
    doc, binary = split_response(payload, length)
    assert doc["outputs"][0] == {
        "name": "A",
        "datatype": "UINT16",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 4},
    }
    assert binary == a.tobytes()


def test_requested_subset_only():
    payload, _ = encode_response(
        response(
            {"A": np.zeros(1, np.int8), "B": np.ones(1, np.int8)},
            requested=[RequestedOutput("B")],
        ),
        binary_default=False,
    )
    assert [o["name"] for o in orjson.loads(payload)["outputs"]] == ["B"]


def test_numpy_fixed_width_bytes_output_is_length_prefixed_in_binary():
    out = np.array([b"ab", b"c"])  # dtype |S2
    payload, length = encode_response(response({"S": out}), binary_default=True)
    doc, binary = split_response(payload, length)
    assert doc["outputs"][0]["datatype"] == "BYTES"
    assert binary == prefixed(b"ab", b"c")


def test_numpy_unicode_output_encodes_as_json_strings():
    out = np.array(["ab", "é"])  # dtype <U2
    payload, _ = encode_response(response({"S": out}), binary_default=False)
    assert orjson.loads(payload)["outputs"][0]["data"] == ["ab", "é"]


def test_decode_then_encode_round_trips_binary_bytes():
    raw = prefixed(b"", b"\x00\x01", "ü".encode())
    doc = {
        "inputs": [
            {
                "name": "S",
                "datatype": "BYTES",
                "shape": [3],
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    array = decode(doc, raw).inputs["S"]
    payload, length = encode_response(response({"S": array}), binary_default=True)
    _, binary = split_response(payload, length)
    assert binary == raw


def test_error_body_is_the_protocol_error_object():
    assert orjson.loads(error_body('bad "thing"')) == {"error": 'bad "thing"'}


# ---------------------------------------------------------------------------------------
# shapes numpy cannot build, messages, nesting, NaN and infinities


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([1] * 65, "shape has 65 dimensions, at most 64"),
        ([2147483647, 2147483647, 2147483647, 0], "shape .* is too large"),
        ([4611686018427387904, 0], "shape .* is too large"),
        ([2**61, 0], "shape .* is too large"),  # 2**63 bytes of FP32: one past numpy's limit
    ],
    ids=["65-dims", "int32-max-cubed", "2**62", "2**63-bytes"],
)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_shape_numpy_cannot_build_is_invalid_argument_naming_the_input(shape, match, binary):
    size = 0 if 0 in shape else 4
    item = {"name": "X", "datatype": "FP32", "shape": shape}
    if binary:
        doc = {"inputs": [{**item, "parameters": {"binary_data_size": size}}]}
        with invalid(f"input 'X': {match}"):
            decode(doc, b"\0" * size if size else b"")
    else:
        with invalid(f"input 'X': {match}"):
            decode({"inputs": [{**item, "data": [1.0] * (size // 4)}]})


def test_shapes_at_numpy_limits_still_decode():
    deep = decode({"inputs": [{"name": "X", "datatype": "INT8", "shape": [1] * 64, "data": [7]}]})
    assert deep.inputs["X"].shape == (1,) * 64
    empty = {"name": "E", "datatype": "FP32", "shape": [(2**63 - 1) // 4, 0], "data": []}
    assert decode({"inputs": [empty]}).inputs["E"].shape == ((2**63 - 1) // 4, 0)


def test_truth_tensor_shape_numpy_cannot_build_is_invalid_argument():
    body = orjson.dumps(
        {"id": "r", "truth": [{"name": "T", "datatype": "BYTES", "shape": [2**61, 0], "data": []}]}
    )
    with invalid("truth tensor 'T': shape .* is too large"):
        decode_feedback(body, "m")


@pytest.mark.parametrize(
    ("datatype", "data", "shown"),
    [
        ("BOOL", b'["a"]', "got values such as 'a'"),
        ("INT64", b"[18446744073709551616]", "got values such as 1.8446744073709552e+19"),
        ("INT32", b"[1, 2.5]", "got values such as 2.5"),
        ("INT8", b"[true]", "got values such as True"),
    ],
)
def test_refused_values_are_shown_as_plain_values_not_numpy_reprs(datatype, data, shown):
    body = b'{"inputs": [{"name": "X", "datatype": "%s", "shape": [%d], "data": %s}]}' % (
        datatype.encode(),
        len(orjson.loads(data)),
        data,
    )
    with invalid(re.escape(shown)) as info:
        decode_request(body, None, "m", None)
    assert "np." not in info.value.message


DEEP = 1000  # deeper than Python's repr can go (its recursion limit), within orjson's reach


def nested_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    "template",
    [
        b'{"inputs": [{"name": "X", "datatype": %s, "shape": [1], "data": [1]}]}',
        b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [%s]}]}',
        b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": %s}]}',
        b'{"inputs": [{"name": "X", "datatype": "BYTES", "shape": [1], "data": [%s]}]}',
    ],
    ids=["datatype", "data-element", "data", "bytes-element"],
)
def test_values_nested_past_the_recursion_limit_are_invalid_argument(template):
    with invalid("an object"):
        decode_request(template % nested_object(DEEP), None, "m", None)


def test_metadata_nested_deeper_than_orjson_writes_is_invalid_argument():
    ok = b'{"id": "r", "label": 1, "metadata": %s}' % nested_object(254)
    assert decode_feedback(ok, "m").metadata is not None
    with invalid("'metadata' is limited to 254 levels of nesting"):
        decode_feedback(b'{"id": "r", "label": 1, "metadata": %s}' % nested_object(255), "m")


def test_body_nested_deeper_than_orjson_reads_names_the_depth():
    body = b'{"inputs": [{"name": "X", "data": %s}]}' % (b"[" * 1100 + b"]" * 1100)
    with invalid("request body nests JSON more than 1024 levels deep"):
        decode_request(body, None, "m", None)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_nan_and_infinity_tokens_are_read_as_numbers_as_triton_reads_them(datatype):
    body = b'{"inputs": [{"name": "X", "datatype": "%s", "shape": [2, 2], ' % datatype.encode()
    body += b'"data": [NaN, Infinity, -Infinity, 1.5]}], "id": "NaN Infinity"}'
    req = decode_request(body, None, "m", None)
    x = req.inputs["X"]
    assert x.dtype == DTYPES[datatype] and x.shape == (2, 2)
    assert np.isnan(x[0, 0]) and x[0, 1] == np.inf and x[1, 0] == -np.inf and x[1, 1] == 1.5
    assert req.id == "NaN Infinity"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"[NaN, 1e400]", "out of range"),  # orjson refuses numbers past double range too
        (b'[NaN], "id": "\\ud800"', "surrogates"),  # and lone surrogates
        (b"[NaN", "malformed JSON"),
        (b"[NaN, 1" + b"0" * 5000 + b"]", "out of range"),  # no 4300-digit limit message
    ],
    ids=["1e400", "lone-surrogate", "truncated", "5000-digits"],
)
def test_bodies_with_nan_are_refused_where_orjson_refuses_them(data, match):
    body = b'{"inputs": [{"name": "X", "datatype": "FP64", "shape": [2], "data": %s}]}' % data
    with invalid(match):
        decode_request(body, None, "m", None)


def test_integers_beyond_64_bits_read_as_floats_beside_nan_as_orjson_reads_them():
    body = b'{"inputs": [{"name": "X", "datatype": "UINT64", "shape": [2], '
    body += b'"data": [18446744073709551615, 18446744073709551616]}], "parameters": {"n": NaN}}'
    with invalid(re.escape("got values such as 1.8446744073709552e+19")):
        decode_request(body, None, "m", None)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_outputs_are_written_as_triton_writes_them(dtype):
    finfo = np.finfo(dtype)
    out = np.array([[np.nan, np.inf, -np.inf], [finfo.max, -0.0, finfo.tiny]], dtype=dtype)
    text = bytes_tensor([b"null", b"NaN"])
    payload, length = encode_response(
        response({"Y": out, "S": text}, id="null"), binary_default=False
    )
    assert length is None
    assert b"[NaN,Infinity,-Infinity," in payload and b"null" in payload  # the text's "null"
    doc = rapidjson.loads(payload)  # tritonclient.http's parser
    y, s = doc["outputs"]
    assert_identical(np.array(y["data"], dtype=dtype).reshape(y["shape"]), out)
    assert s["data"] == ["null", "NaN"] and doc["id"] == "null"


def test_finite_outputs_are_written_by_orjson_alone():
    out = np.array([0.1, -0.0, 3.4028235e38], dtype=np.float32)
    payload, _ = encode_response(response({"Y": out}), binary_default=False)
    assert payload == orjson.dumps(
        {"model_name": "m", "model_version": "3",
         "outputs": [{"name": "Y", "datatype": "FP32", "shape": [3], "data": out}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )  # fmt: skip


@pytest.mark.parametrize("label", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_feedback_label_is_invalid_argument_not_stored_as_null(label):
    with invalid("'label' must be a string .*, finite number or boolean"):
        decode_feedback(b'{"id": "r", "label": %s}' % label, "m")
