"""The fuzz repository, and the Hypothesis strategies both edges' fuzzers share: model
names, versions, JSON values, shapes, tensor data, request parameters.

Every fuzz strategy is valid-ish: it starts from a request the repository's models
would serve, then bends a part of it now and then (names, datatypes, shapes, data,
sizes, parameters, nesting, encodings, framing), so most cases reach past the first
check into the decoders and the core. tests/fuzz_rest_cases.py and
tests/fuzz_grpc_cases.py build the requests; tests/test_fuzz.py (bounded, in CI) and
benchmarks/fuzz_run.py (long runs) send them.
"""

from __future__ import annotations

import string
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fleetserve.loaders import testing
from fleetserve.server.types import DTYPES
from tests.conftest import SIMPLE_CONFIG

ADMIN_TOKEN = "fuzz-admin-token"  # the fuzzers never send it
LOGGED = 'parameters { key: "feedback_sample_rate" value: { string_value: "0.5" } }\n'

# model -> inputs (name, datatype, dims; -1 is the batch) and output names
SIGNATURES: dict[str, tuple[list[tuple[str, str, list[int]]], list[str]]] = {
    **{f"identity_{dt.lower()}": ([("INPUT0", dt, [-1, 4])], ["OUTPUT0"]) for dt in DTYPES},
    "mlp": ([("INPUT0", "FP32", [-1, 16])], ["OUTPUT0"]),
    "simple": (
        [("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])],
        ["OUTPUT0", "OUTPUT1"],
    ),
    "fixed": ([("INPUT0", "FP32", [3, 4])], ["OUTPUT0"]),
    "routed": ([("INPUT0", "FP32", [2])], ["OUTPUT0"]),  # weighted routing: X-Routing-Key
}
# in the repository but never servable (503 naming why), and not in it (404)
MODELS = [*SIGNATURES, "corrupt", "bad_config", "no_such_model"]
ROUTING = {"weights": {"1": 50, "2": 50}}  # for "routed"


def build_repository(root: Path) -> Path:
    """The models the strategies aim at, in Triton's layout."""
    for datatype in DTYPES:
        testing.write_model(root, f"identity_{datatype.lower()}", testing.identity(datatype))
    testing.write_model(root, "mlp", testing.mlp(seed=1), config=LOGGED)
    testing.write_model(root, "simple", testing.add_sub("INT32"), config=SIMPLE_CONFIG)
    testing.write_model(root, "fixed", testing.fixed_shape((3, 4)))
    for v in (1, 2):
        testing.write_model(root, "routed", testing.fixed_shape((2,), factor=v), version=v,
                            config="version_policy: { all: {} }\n" + LOGGED)  # fmt: skip
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    testing.write_model(root, "bad_config", testing.mlp(), config="max_batch_size: 4\nfoo: 1\n")
    return root


def rarely(draw: st.DrawFn, one_in: int = 10) -> bool:
    """True once in `one_in` draws (Hypothesis still shrinks towards False)."""
    return draw(st.integers(0, one_in - 1)) == 1


# -- names, JSON values, shapes, tensor data ----------------------------------------------

TEXT = st.text(max_size=10)
PRINTABLE = st.text(string.ascii_letters + string.digits + "-_.:", min_size=1, max_size=16)


@st.composite
def model_names(draw: st.DrawFn) -> str:
    return draw(TEXT.filter(bool)) if rarely(draw) else draw(st.sampled_from(MODELS))


@st.composite
def versions(draw: st.DrawFn) -> str | None:
    if not rarely(draw, 6):
        return None
    return draw(st.sampled_from(["1", "2", "0", "-1", "99", "latest"]) | TEXT)


EDGE_INTS = st.sampled_from(
    [0, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
)
SCALARS = (
    st.none() | st.booleans() | st.integers() | EDGE_INTS | TEXT
    | st.floats(allow_nan=False, allow_infinity=False)
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested near or past orjson's limits (254 levels to encode, 1024 to decode)."""
    value: Any = draw(SCALARS)
    for _ in range(draw(st.sampled_from([200, 254, 255, 300, 1023, 1025, 2000]))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


ANY_JSON = JSON | deep()

BAD_SHAPES = st.one_of(
    st.lists(st.integers(0, 3), min_size=60, max_size=70),  # numpy's limit is 64 dimensions
    st.lists(st.sampled_from([0, 1, 2**31 - 1, 2**32, 2**62, 2**63 - 1]), min_size=1, max_size=5),
    st.permutations([0, 2**31 - 1, 2**31 - 1, 2**31 - 1]),  # no elements, a vast size
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    st.just([]),
)


@st.composite
def shapes(draw: st.DrawFn, dims: list[int]) -> list[int]:
    """A shape for a signature's `dims` (a batch of 1 to 3, rarely 0), or rarely a bad one."""
    if rarely(draw):
        return draw(BAD_SHAPES)
    batch = 0 if rarely(draw, 20) else draw(st.integers(1, 3))
    return [batch if d < 0 else d for d in dims]


def element_count(shape: list[int]) -> int:
    """Elements of a shape the strategies fill with data; -1 for a bad or large one."""
    if len(shape) > 64 or any(d < 0 for d in shape) or prod(shape) > 64:
        return -1
    return prod(shape)


def values(datatype: str, count: int, binary: bool = False) -> st.SearchStrategy[list[Any]]:
    """`count` elements of `datatype` (NaN and infinities only in binary form)."""
    dtype = DTYPES[datatype]
    if datatype == "BYTES":
        element: st.SearchStrategy[Any] = st.binary(max_size=8) if binary else TEXT
    elif datatype == "BOOL":
        element = st.booleans()
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        element = st.integers(int(info.min), int(info.max))
    else:
        element = st.floats(width=dtype.itemsize * 8, allow_nan=binary, allow_infinity=binary)
    return st.lists(element, min_size=count, max_size=count)


def raw_of(datatype: str, items: list[Any]) -> bytes:
    """Triton's binary layout: little-endian elements, BYTES each after a u32 length."""
    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b for b in items)
    return np.array(items, dtype=DTYPES[datatype].newbyteorder("<")).tobytes()


SENSIBLE_PARAMETERS = {
    "binary_data_output": st.booleans(),
    "log_prediction": st.booleans(),
    "routing_key": PRINTABLE,
    "timeout": st.integers(0, 10**7),
    "priority": st.integers(0, 3),
}


@st.composite
def parameters(draw: st.DrawFn) -> dict[str, Any]:
    """Request parameters: known keys with fitting values, now and then anything."""
    keys = draw(st.lists(st.sampled_from(list(SENSIBLE_PARAMETERS)), max_size=2, unique=True))
    doc = {key: draw(SENSIBLE_PARAMETERS[key]) for key in keys}
    if rarely(draw, 5):
        key = draw(st.sampled_from([*SENSIBLE_PARAMETERS, "binary_data_size", "classification"])
                   | TEXT)  # fmt: skip
        doc[key] = draw(ANY_JSON)
    return doc
