"""Domain objects shared by every layer of the server.

A leaf module: stdlib and numpy only, nothing of ours, nothing of the wire. The
edges decode wire formats into these objects and the core works only on them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

# V2 datatype name -> numpy dtype. BYTES tensors are object arrays of `bytes`.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
DATATYPES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


# the server's state (routing, feedback) lives here under the model repository by default
DEFAULT_DATA_DIR = ".fleetserve"


def datatype_of(dtype: np.dtype) -> str:
    """The V2 datatype name of a numpy dtype (numpy string dtypes count as BYTES)."""
    name = DATATYPES.get(dtype)
    if name is None and dtype.kind in "SUO":
        return "BYTES"
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
    return name


class ModelId(NamedTuple):
    """One servable: a model name and an integer version (a tuple: cheap to make and hash)."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class ModelState(enum.Enum):
    """Lifecycle of one model version.

    UNLOADED -> LOADING -> READY -> DRAINING -> UNLOADED; LOADING -> FAILED (with a
    reason); FAILED -> LOADING on a later load attempt. Only READY serves requests.
    """

    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor in a model's signature; -1 marks a variable dimension.

    For a batching model (max_batch_size > 0) `shape` includes the leading batch
    dimension as -1, as the protocol's metadata reports it.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.datatype]


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary (None = default)."""

    name: str
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """A decoded inference request: named numpy arrays plus the protocol's extras.

    `datatypes` holds the wire datatype of each input, which the core checks against
    the model's signature (numpy alone cannot tell BYTES from a string dtype mix-up).
    """

    model_name: str
    model_version: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: every output


@dataclass(slots=True)
class InferResponse:
    """The result of one request, in the order the outputs are returned."""

    model_name: str
    model_version: str
    id: str
    outputs: dict[str, np.ndarray]
    requested: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One served prediction for the feedback sink, its tensors already packed
    (`server.tensors.pack_tensors`): a record keeps its own few hundred bytes alive while
    it waits for the sink, not the request's and response's arrays and buffers."""

    request_id: str
    model: str
    version: int
    timestamp: float  # seconds since the epoch
    inputs: bytes
    outputs: bytes


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """Ground truth posted for a request id: a label, tensors, or both, and metadata."""

    request_id: str
    model: str
    timestamp: float
    label: Any = None  # a JSON scalar
    truth: dict[str, np.ndarray] | None = None
    metadata: dict[str, Any] | None = None
