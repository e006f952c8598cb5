"""Binary tensor encodings shared by both wire formats.

Triton's binary tensor data (REST) and gRPC's raw_input_contents / raw_output_contents
use one layout: raw little-endian row-major elements, and BYTES elements each prefixed
by a 4-byte little-endian length.
"""

from __future__ import annotations

import struct
from math import prod

import numpy as np
import orjson

from fleetserve.server.errors import InvalidArgument
from fleetserve.server.types import DTYPES, datatype_of

_U32 = struct.Struct("<I")

# numpy's limits (NPY_MAXDIMS, and a byte count in a signed 64-bit integer): a shape past
# them cannot become an array, even an empty one
MAX_DIMS = 64
MAX_BYTES = 2**63 - 1


def check_shape(what: str, name: str, datatype: str, shape: list[int]) -> None:
    """InvalidArgument unless numpy can build a `datatype` tensor of `shape`.

    Both codecs call it before they size or build anything. A zero-size shape is bound
    too: numpy multiplies its other dimensions (times the element size) all the same.
    """
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(
            f"{what} {name!r}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported"
        )
    nbytes = DTYPES[datatype].itemsize
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"{what} {name!r}: shape {_text(shape)} has a negative dimension")
        if d:
            nbytes *= d
    if nbytes > MAX_BYTES:
        raise InvalidArgument(
            f"{what} {name!r}: shape {_text(shape)} is too large: its non-zero dimensions "
            f"multiply past 2**63 bytes of {datatype}"
        )


def _text(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 100 else text[:96] + " ...]"


def array_from_bytes(
    name: str, datatype: str, shape: list[int], raw: bytes | memoryview
) -> np.ndarray:
    """A tensor from its binary form (also gRPC's raw_input_contents); no copy when numeric."""
    count = prod(shape)
    if datatype == "BYTES":
        return _split_bytes(name, raw, count).reshape(shape)
    dtype = DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _split_bytes(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    """Length-prefixed BYTES elements (4-byte little-endian lengths)."""
    view = memoryview(raw)
    items: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise InvalidArgument(f"input {name!r}: truncated BYTES element length")
        (length,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + length > end:
            raise InvalidArgument(f"input {name!r}: BYTES element overruns the data")
        items.append(bytes(view[pos : pos + length]))
        pos += length
    if len(items) != count:
        raise InvalidArgument(
            f"input {name!r}: shape needs {count} BYTES elements, got {len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def bytes_of(array: np.ndarray) -> bytes:
    """A tensor's binary form: raw little-endian data, or length-prefixed BYTES."""
    if array.dtype.kind in "OSU":
        return b"".join(_U32.pack(len(b)) + b for b in byte_elements(array))
    return np.ascontiguousarray(array).tobytes()


def byte_elements(array: np.ndarray) -> list[bytes]:
    """The elements of a BYTES tensor as bytes, whether numpy holds objects, S or U."""
    return [x.encode() if isinstance(x, str) else bytes(x) for x in array.ravel()]


def pack_tensors(tensors: dict[str, np.ndarray]) -> bytes:
    """Named tensors as one blob, losslessly: a u32 length, a JSON header of
    [name, datatype, shape, byte count] per tensor, then each tensor's binary form."""
    header, parts = [], []
    for name, array in tensors.items():
        raw = bytes_of(array)
        header.append((name, datatype_of(array.dtype), array.shape, len(raw)))
        parts.append(raw)
    head = orjson.dumps(header)
    return b"".join((_U32.pack(len(head)), head, *parts))


def unpack_tensors(blob: bytes) -> dict[str, np.ndarray]:
    """The inverse of `pack_tensors`."""
    (length,) = _U32.unpack_from(blob, 0)
    pos = 4 + length
    out = {}
    for name, datatype, shape, size in orjson.loads(blob[4:pos]):
        out[name] = array_from_bytes(name, datatype, shape, blob[pos : pos + size])
        pos += size
    return out
