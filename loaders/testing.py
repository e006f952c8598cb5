"""Tiny, deterministic ONNX models for tests, benchmarks and the shipped examples.

Tests need real models with known behaviour (datatypes, batch dimensions, run-time failures)
without checking binary blobs into the repository, so they are built here with
``onnx.helper`` and serialized to bytes.

``onnx`` is a test/dev dependency (the ``test`` extra), not a runtime one: the server itself
only needs onnxruntime. It is therefore imported lazily inside the functions, and importing
this module costs nothing in production.

All models use opset 17 and IR version 8 so that every onnxruntime the project supports
(1.18+) can load them, and all weights come from a seeded numpy generator so the same call
always yields byte-identical output.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "IR_VERSION",
    "OPSET",
    "V2_DATATYPES",
    "add_sub",
    "fixed_shape",
    "identity",
    "mlp",
    "runtime_failure",
    "slow",
    "write_model",
]

OPSET = 17
IR_VERSION = 8
_PRODUCER = "fleetserve.loaders.testing"

# V2 (Open Inference Protocol) datatype -> (onnx.TensorProto enum name, numpy dtype).
# The enum names are resolved lazily so this table does not need onnx at import time.
V2_DATATYPES: dict[str, tuple[str, Any]] = {
    "BOOL": ("BOOL", np.bool_),
    "INT8": ("INT8", np.int8),
    "INT16": ("INT16", np.int16),
    "INT32": ("INT32", np.int32),
    "INT64": ("INT64", np.int64),
    "UINT8": ("UINT8", np.uint8),
    "UINT16": ("UINT16", np.uint16),
    "UINT32": ("UINT32", np.uint32),
    "UINT64": ("UINT64", np.uint64),
    "FP16": ("FLOAT16", np.float16),
    "FP32": ("FLOAT", np.float32),
    "FP64": ("DOUBLE", np.float64),
    "BYTES": ("STRING", np.object_),
}

Dim = int | str


def _elem_type(datatype: str) -> int:
    import onnx

    try:
        return getattr(onnx.TensorProto, V2_DATATYPES[datatype.upper()][0])
    except KeyError:
        raise ValueError(
            f"unknown V2 datatype {datatype!r}; expected one of {sorted(V2_DATATYPES)}"
        ) from None


def _shape(dims: Sequence[Dim]) -> list[Dim]:
    """Map -1 to a symbolic dim so ORT accepts any size there (first one is "batch")."""
    out: list[Dim] = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d < 0:
            out.append("batch" if i == 0 else f"dim{i}")
        else:
            out.append(d)
    return out


def _finish(graph: onnx.GraphProto) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=_PRODUCER,
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def mlp(
    in_dim: int = 16,
    hidden: int = 64,
    out_dim: int = 4,
    *,
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> bytes:
    """Float32 MLP: a realistic compute-bound model whose size is tunable for benchmarks.

    ``layers`` lists every width including input and output, e.g. ``[256, 1024, 1024, 10]``;
    when given it overrides ``in_dim``/``hidden``/``out_dim``. Different seeds give different
    weights, which is how tests tell two versions of the same model apart.
    Input ``INPUT0`` is ``[batch, in]`` FP32, output ``OUTPUT0`` is ``[batch, out]`` FP32.
    """
    from onnx import TensorProto, helper, numpy_helper

    widths = [int(w) for w in layers] if layers is not None else [in_dim, hidden, out_dim]
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"need at least two positive widths, got {widths!r}")
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cur = "INPUT0"
    n_gemm = len(widths) - 1
    for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
        # He-style scaling keeps activations O(1) however deep the net is.
        w = (rng.standard_normal((w_in, w_out)) * np.sqrt(2.0 / w_in)).astype(np.float32)
        b = (rng.standard_normal(w_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == n_gemm - 1
        gemm_out = "OUTPUT0" if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [gemm_out], f"Gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"], f"Relu{i}"))
            cur = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", widths[-1]])],
        initializer=inits,
    )
    return _finish(graph)


def add_sub(dtype: str = "INT32", dims: int = 16) -> bytes:
    """Triton's classic "simple" model, so Triton clients and docs work against us unchanged.

    OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1, all ``[batch, dims]``.
    Any numeric V2 datatype is accepted; onnxruntime 1.32's CPU kernels run all of them, but
    older releases may lack the 8/16-bit and unsigned Add/Sub kernels (INT32 is always safe).
    """
    from onnx import helper

    if dtype.upper() in ("BOOL", "BYTES"):
        raise ValueError(f"add_sub needs a numeric datatype, got {dtype!r}")
    et = _elem_type(dtype)
    shape = ["batch", dims]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], "Add"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], "Sub"),
        ],
        "add_sub",
        [helper.make_tensor_value_info(n, et, shape) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, et, shape) for n in ("OUTPUT0", "OUTPUT1")],
    )
    return _finish(graph)


def identity(datatype: str, dims: Sequence[int] = (-1, 4)) -> bytes:
    """Pass-through model: lets tests round-trip every V2 datatype through the codecs.

    ``BYTES`` becomes an ONNX string tensor. ``-1`` in ``dims`` is a symbolic (any-size)
    dimension; a leading -1 is named ``batch``.
    """
    from onnx import helper

    et = _elem_type(datatype)
    shape = _shape(dims)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], "Identity")],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", et, shape)],
        [helper.make_tensor_value_info("OUTPUT0", et, shape)],
    )
    return _finish(graph)


def fixed_shape(dims: Sequence[int] = (3, 4), factor: float = 2.0) -> bytes:
    """FP32 model with no batch dimension, for max_batch_size 0 behaviour.

    ``OUTPUT0 = INPUT0 * factor``, both exactly ``dims``; the server must neither add nor
    strip a batch dimension and must not batch requests together.
    """
    from onnx import TensorProto, helper, numpy_helper

    if any(int(d) < 1 for d in dims):
        raise ValueError(f"fixed_shape needs concrete positive dims, got {tuple(dims)!r}")
    shape = [int(d) for d in dims]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "factor"], ["OUTPUT0"], "Mul")],
        "fixed_shape",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")],
    )
    return _finish(graph)


def runtime_failure() -> bytes:
    """Model that loads and validates fine but raises inside ``InferenceSession.run``.

    Lets tests check that an execution error becomes a clean per-request error (and, with
    dynamic batching, that it reaches every request of the failed batch) without crashing
    the server.

    Input ``INPUT0`` is FP32 ``[batch, 4]`` and is reshaped to the constant shape ``[1, 4]``,
    so: batch 1 (``[1, 4]``) succeeds and returns the input unchanged; any batch > 1
    (e.g. ``[2, 4]``, or two ``[1, 4]`` requests merged by the dynamic batcher) fails at run
    time with an onnxruntime "cannot be reshaped" error. Output ``OUTPUT0`` is declared
    ``[batch, 4]`` so the model looks like an ordinary batchable one.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["INPUT0", "shape"], ["OUTPUT0"], "Reshape")],
        "runtime_failure",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "shape")],
    )
    return _finish(graph)


def slow(dim: int = 512, depth: int = 8, out_cols: int | None = None) -> bytes:
    """FP32 model whose run time grows with the batch: ``depth`` chained [dim, dim] MatMuls.

    For tests that need a request still running (graceful shutdown, draining): a batch of
    B rows costs about ``2 * B * dim * dim * depth`` flops. The weight is the identity, so
    ``OUTPUT0`` equals ``INPUT0`` and results stay checkable. One shared initializer keeps
    the file at ``dim * dim * 4`` bytes. With ``out_cols``, ``OUTPUT0`` is only the first
    ``out_cols`` columns of that (``[batch, out_cols]``): the same run, a small response.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    prev = "INPUT0"
    for i in range(depth):
        out = "OUTPUT0" if i == depth - 1 and out_cols is None else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "W"], [out], f"MatMul{i}"))
        prev = out
    initializers = [numpy_helper.from_array(np.eye(dim, dtype=np.float32), "W")]
    if out_cols is not None:
        nodes.append(helper.make_node("Slice", [prev, "starts", "ends", "axes"], ["OUTPUT0"]))
        for name, value in (("starts", 0), ("ends", out_cols), ("axes", 1)):
            initializers.append(numpy_helper.from_array(np.array([value], np.int64), name))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", dim])],
        [
            helper.make_tensor_value_info(
                "OUTPUT0", TensorProto.FLOAT, ["batch", dim if out_cols is None else out_cols]
            )
        ],
        initializer=initializers,
    )
    return _finish(graph)


def write_model(
    repo_dir: str | Path,
    name: str,
    model_bytes: bytes,
    version: int = 1,
    config: str | None = None,
) -> Path:
    """Lay a model out the way a Triton model repository expects; returns the model.onnx path.

    Writes ``repo_dir/name/version/model.onnx`` and, if given, ``repo_dir/name/config.pbtxt``
    (otherwise the server auto-completes the config from the model).
    """
    model_dir = Path(repo_dir) / name
    version_dir = model_dir / str(int(version))
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / "model.onnx"
    path.write_bytes(model_bytes)
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    return path
