"""onnxruntime loader: one InferenceSession per model version."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from fleetserve.loaders.base import InputError, LoadedModel, Loader, LoadError, RunError, TensorSig

# onnxruntime's INVALID_ARGUMENT at run time: the data, not the model, is at fault
_RejectedInput = getattr(
    getattr(ort.capi, "onnxruntime_pybind11_state", None), "InvalidArgument", ()
)

# onnxruntime's type strings -> numpy
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(string)": np.dtype(np.object_),
}

GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _signature(args: list[ort.NodeArg], what: str) -> list[TensorSig]:
    sigs = []
    for arg in args:
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise LoadError(
                f"{what} {arg.name!r} has type {arg.type}, which fleetserve cannot serve"
            )
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
        sigs.append(TensorSig(arg.name, dtype, shape))
    return sigs


def _to_text(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime wants str for string tensors; the protocol carries bytes."""
    try:
        text = [b.decode() if isinstance(b, bytes) else str(b) for b in array.ravel()]
    except UnicodeDecodeError as exc:
        raise InputError(f"input {name!r}: ONNX string tensors hold UTF-8 text ({exc})") from None
    return np.array(text, dtype=object).reshape(array.shape)


def _to_bytes(array: np.ndarray) -> np.ndarray:
    flat = [s.encode() if isinstance(s, str) else bytes(s) for s in array.ravel()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


class OnnxModel(LoadedModel):
    def __init__(self, session: ort.InferenceSession, size_bytes: int) -> None:
        self._session = session
        self.inputs = _signature(session.get_inputs(), "input")
        self.outputs = _signature(session.get_outputs(), "output")
        self.size_bytes = size_bytes
        self._text_inputs = {s.name for s in self.inputs if s.dtype == np.object_}
        self._text_outputs = {s.name for s in self.outputs if s.dtype == np.object_}
        self._all_outputs = [s.name for s in self.outputs]
        # onnxruntime's Python wrapper re-validates inputs the server already checked; call
        # the session underneath when this build exposes it (saves ~1.5us a run)
        inner = getattr(session, "_sess", None)
        self._run = inner.run if hasattr(inner, "run") else session.run

    def run(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        if self._text_inputs:
            inputs = {k: _to_text(k, v) if k in self._text_inputs else v for k, v in inputs.items()}
        names = output_names or self._all_outputs
        try:
            results = self._run(names, inputs, None)
        except _RejectedInput as exc:  # the model refused this data (an index out of range)
            raise InputError(f"the model rejected the input: {exc}") from None
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RunError(str(exc)) from None
        out = dict(zip(names, results, strict=True))
        if self._text_outputs:
            for name in self._text_outputs.intersection(out):
                out[name] = _to_bytes(out[name])
        return out

    def unload(self) -> None:
        del self._session, self._run


# a 1-1-1 MLP (Gemm, Relu, Gemm on FP32 [batch, 1]; fleetserve.loaders.testing.mlp),
# loaded and run once at start: onnxruntime's first session and first run cost ~600 KB
# that later ones do not, and the first model's measured size must not include them
_WARM_UP_MODEL = (
    b'\x08\x08\x12\x00:\xe1\x01\n\x1f\n\x06INPUT0\n\x02W0\n\x02B0\x12\x05gemm0\x1a\x00"\x04Gemm'
    b'\n\x16\n\x05gemm0\x12\x05relu0\x1a\x00"\x04Relu\n \n\x05relu0\n\x02W1\n\x02B1\x12\x07'
    b'OUTPUT0\x1a\x00"\x04Gemm\x12\x01w*\x10\x08\x01\x08\x01\x10\x01B\x02W0J\x04\xaa\x136>*\x0e'
    b"\x08\x01\x10\x01B\x02B0J\x04\xccpX\xbc*\x10\x08\x01\x08\x01\x10\x01B\x02W1J\x04\x97\xdbg?*"
    b"\x0e\x08\x01\x10\x01B\x02B1J\x04L\xde+<Z\x1d\n\x06INPUT0\x12\x13\n\x11\x08\x01\x12\r\n\x07"
    b"\x12\x05batch\n\x02\x08\x01b\x1e\n\x07OUTPUT0\x12\x13\n\x11\x08\x01\x12\r\n\x07\x12\x05"
    b"batch\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


# what an onnxruntime session allocates beside its weights, measured: 1.13 MiB for a
# 5.6 KB model (fleetserve.loaders.testing.mlp), most of it the 1 MiB arena its runs use
SESSION_BYTES = 1536 * 1024


class OnnxLoader(Loader):
    """Loads model.onnx with onnxruntime, honouring threads, graph level and providers."""

    def estimate_bytes(self) -> int:
        """The weights twice (they and their pre-packed copy: MLPs of 1-50 MB measured
        2 x the file plus 1.1-1.2 MiB) and the session's own memory."""
        return super().estimate_bytes() + SESSION_BYTES

    @classmethod
    def warm_up(cls) -> None:
        """onnxruntime's first session and run cost ~10 MB of one-time set-up: pay it here."""
        # its failures reach the server as exceptions, logged there once (with the
        # request id); onnxruntime's own stderr lines would repeat them outside the
        # server's log format (and break JSON logs)
        ort.set_default_logger_severity(4)  # FATAL only
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(_WARM_UP_MODEL, options, providers=["CPUExecutionProvider"])
        session.run(None, {"INPUT0": np.zeros((1, 1), np.float32)})

    def load(self) -> LoadedModel:
        opts = self.options
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.intra_op_threads
        so.inter_op_num_threads = opts.inter_op_threads
        level = GRAPH_LEVELS.get(opts.graph_optimization_level)
        if level is None:
            raise LoadError(
                f"unknown graph_optimization_level {opts.graph_optimization_level!r} "
                f"(one of {', '.join(GRAPH_LEVELS)})"
            )
        so.graph_optimization_level = level
        available = set(ort.get_available_providers())
        missing = [p for p in opts.execution_providers if p not in available]
        if missing:
            raise LoadError(
                f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
                f"build (available: {', '.join(sorted(available))})"
            )
        try:
            model_bytes = self.path.read_bytes()
        except OSError as exc:
            raise LoadError(f"cannot read {self.path.name}: {exc.strerror}") from None
        try:
            session = ort.InferenceSession(
                model_bytes, sess_options=so, providers=list(opts.execution_providers)
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise LoadError(f"onnxruntime cannot load {self.path.name}: {exc}") from None
        return OnnxModel(session, self.estimate_bytes())
