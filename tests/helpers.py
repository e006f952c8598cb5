"""Oracle tables and reference helpers shared by the edge tests (REST, gRPC, tritonclient).

Written independently of the server's own tables and codecs, so that a mistake there
shows up as a failing test rather than being copied into the expectation. Each lives
here once: `from tests.helpers import ...`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import struct
import threading
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort

from fleetserve.loaders.base import LoadedModel

# V2 datatype -> numpy type (PROTOCOL.md 2.4); BYTES tensors are object arrays of bytes.
NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


# --------------------------------------------------------------------------------------
# onnxruntime, run directly on the repository's model files: the reference for results


@functools.cache
def _session(path: str) -> ort.InferenceSession:
    # one thread each, as the server runs its sessions by default
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def ort_run(
    repo: Path, model: str, version: int, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the model file with onnxruntime; BYTES go in as str and come back as bytes."""
    session = _session(str(repo / model / str(version) / "model.onnx"))
    feed = {k: _text(v) if v.dtype == np.object_ else v for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feed)
    return {
        n: _utf8(r) if r.dtype == np.object_ else r for n, r in zip(names, results, strict=True)
    }


def _text(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.size, dtype=np.object_)
    out[:] = [b.decode() for b in array.ravel()]
    return out.reshape(array.shape)


def _utf8(array: np.ndarray) -> np.ndarray:
    out = np.empty(array.size, dtype=np.object_)
    out[:] = [s.encode() for s in array.ravel()]
    return out.reshape(array.shape)


def assert_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bytes (so -0.0, NaN payloads and extremes all count)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == np.object_:
        assert actual.ravel().tolist() == expected.ravel().tolist()
    else:
        assert actual.tobytes() == expected.tobytes()


# --------------------------------------------------------------------------------------
# Triton's binary tensor layout (raw_*_contents, binary_data): little-endian, row-major,
# each BYTES element prefixed with its length as a little-endian uint32


def raw_bytes(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(b)) + b for b in array.ravel())
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a length-prefixed BYTES tensor."""
    items, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(raw), "BYTES elements overrun the binary data"
    return items


# --------------------------------------------------------------------------------------
# inputs


def mlp_input(rows: int = 3, seed: int = 0) -> np.ndarray:
    """A batch for the `mlp` models (16 features)."""
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def extremes(datatype: str, finite_only: bool = False) -> np.ndarray:
    """A [3, 4] tensor with the extreme values of `datatype`.

    Integers: both ends of the range and their neighbours. Floats: the largest finite
    values, the smallest normal and subnormal, -0.0 and inf, -inf, NaN (or, with
    `finite_only`, for JSON, which has no non-finite numbers: 0.0, 1.0, -1.5 instead).
    BYTES: empty, long, multi-byte UTF-8 and text that needs escaping.
    """
    if datatype == "BOOL":
        values: list[Any] = [True, False, False, True, True, True, False, False, True, False]
        values += [True, False]
        return np.array(values, dtype=np.bool_).reshape(3, 4)
    if datatype == "BYTES":
        values = [
            b"",
            b"plain ascii",
            "héllo wörld".encode(),
            "日本語のテキスト".encode(),
            "emoji 🙂👍🏽".encode(),
            "Ελληνικά".encode(),
            "mixed: ü€𝄞".encode(),
            b"x" * 1000,
            b"tab\tand\nnewline",
            b'quote " and backslash \\',
            "Кириллица".encode(),
            b"last",
        ]
        array = np.empty(12, dtype=np.object_)
        array[:] = values
        return array.reshape(3, 4)
    dtype = np.dtype(NUMPY[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
        values = [lo, hi, 0, 1, lo + 1, hi - 1, hi // 2, hi // 3, 7, lo // 2, hi // 5, 42]
        return np.array(values, dtype=dtype).reshape(3, 4)
    finfo = np.finfo(dtype)
    values = [finfo.max, -finfo.max, finfo.tiny, finfo.smallest_subnormal, -0.0]
    values += [0.0, 1.0, -1.5] if finite_only else [np.inf, -np.inf, np.nan]
    values += [finfo.eps, 1 / 3, np.pi, -np.e]
    return np.array(values, dtype=dtype).reshape(3, 4)


# --------------------------------------------------------------------------------------
# a model whose runs the test releases: makes batching deterministic

WAIT_S = 30  # upper bound on any single wait in a gated test; they finish long before it


class Gate(LoadedModel):
    """A real model whose runs wait for `open()`; records the shape of every run."""

    def __init__(self, model: LoadedModel) -> None:
        self._model = model
        self.inputs, self.outputs, self.size_bytes = model.inputs, model.outputs, 0
        self._open = threading.Event()
        self.started = threading.Semaphore(0)  # released once per run started
        self.runs: list[dict[str, tuple[int, ...]]] = []

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> Any:
        self.runs.append({k: v.shape for k, v in inputs.items()})
        self.started.release()
        assert self._open.wait(WAIT_S), "gate never opened"
        return self._model.run(inputs, output_names)

    def open(self) -> None:
        self._open.set()

    def unload(self) -> None:
        self._model.unload()


# --------------------------------------------------------------------------------------
# the admin API's upload of a version with its config: one multipart request (aiohttp's
# own form encoder, not the server's or the CLI's code)


def upload_with_config(
    url: str, model: bytes, config: str | None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """PUT a version as multipart/form-data: a "config" part (when given), then "model"."""

    async def main() -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData()
        if config is not None:
            form.add_field("config", config, filename="config.pbtxt", content_type="text/plain")
        form.add_field(
            "model", model, filename="model.onnx", content_type="application/octet-stream"
        )
        async with aiohttp.ClientSession() as http, http.put(url, data=form, headers=headers) as r:
            return r.status, await r.json()

    return asyncio.run(main())


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under `root`: its size and the SHA-256 of its contents (-1 for a
    directory), to show that something left a repository exactly as it was."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir():
            out[key] = (-1, "")
        else:
            data = path.read_bytes()
            out[key] = (len(data), hashlib.sha256(data).hexdigest())
    return out
