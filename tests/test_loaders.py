"""The onnxruntime loader against real models from loaders.testing, written to tmp_path.

Every check goes through a real onnxruntime session: signatures, results compared with
a session made directly, the bytes <-> text conversion of string tensors, and the error
contract of loaders.base (LoadError from load(), RunError / InputError from run()).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleetserve.loaders import testing
from fleetserve.loaders.base import InputError, LoadedModel, LoadError, LoadOptions, RunError
from fleetserve.loaders.onnx import SESSION_BYTES, OnnxLoader
from fleetserve.loaders.registry import loader_class

DATATYPES = list(testing.V2_DATATYPES)
REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, model_bytes: bytes, name: str = "m") -> Path:
    return testing.write_model(tmp_path, name, model_bytes)


def load(path: Path, **options: object) -> LoadedModel:
    return OnnxLoader(path, LoadOptions(**options)).load()  # type: ignore[arg-type]


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = testing.V2_DATATYPES[datatype][1]
    count = int(np.prod(shape))
    if datatype == "BYTES":
        values = np.empty(count, dtype=object)
        values[:] = [f"s{i}".encode() for i in range(count)]
        return values.reshape(shape)
    if datatype == "BOOL":
        return (np.arange(count) % 2 == 0).reshape(shape)
    return (np.arange(count) % 100).astype(dtype).reshape(shape)


# -- signatures -----------------------------------------------------------------------


def test_mlp_signature(tmp_path):
    model = load(write(tmp_path, testing.mlp(in_dim=16, hidden=8, out_dim=4)))
    assert [(s.name, s.dtype, s.shape) for s in model.inputs] == [
        ("INPUT0", np.dtype(np.float32), (-1, 16))
    ]
    assert [(s.name, s.dtype, s.shape) for s in model.outputs] == [
        ("OUTPUT0", np.dtype(np.float32), (-1, 4))
    ]


@pytest.mark.parametrize("datatype", DATATYPES)
def test_identity_signature_has_numpy_dtype_and_variable_dims(tmp_path, datatype):
    model = load(write(tmp_path, testing.identity(datatype, dims=(-1, -1, 3))))
    expected = np.dtype(testing.V2_DATATYPES[datatype][1])
    for sigs, name in ((model.inputs, "INPUT0"), (model.outputs, "OUTPUT0")):
        assert len(sigs) == 1
        assert sigs[0].name == name
        assert sigs[0].dtype == expected
        assert sigs[0].shape == (-1, -1, 3)  # both symbolic dims are -1


def test_fixed_shape_signature_keeps_concrete_dims(tmp_path):
    model = load(write(tmp_path, testing.fixed_shape((3, 4))))
    assert model.inputs[0].shape == (3, 4)
    assert model.outputs[0].shape == (3, 4)


def test_size_bytes_is_the_estimate_from_the_file(tmp_path):
    path = write(tmp_path, testing.mlp())
    loader = OnnxLoader(path)
    assert loader.estimate_bytes() == 2 * path.stat().st_size + SESSION_BYTES
    assert loader.load().size_bytes == loader.estimate_bytes()


def test_unservable_tensor_type_is_load_error(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "bf16",
        [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, ["batch", 2])],
        [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, ["batch", 2])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", testing.OPSET)],
        ir_version=testing.IR_VERSION,
    )
    with pytest.raises(LoadError, match=r"input 'X' has type tensor\(bfloat16\)"):
        load(write(tmp_path, model.SerializeToString()))


# -- running --------------------------------------------------------------------------


def test_mlp_run_equals_a_direct_onnxruntime_session(tmp_path):
    model_bytes = testing.mlp(seed=7)
    model = load(write(tmp_path, model_bytes))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    direct = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    out = model.run({"INPUT0": x})
    assert list(out) == ["OUTPUT0"]
    np.testing.assert_array_equal(out["OUTPUT0"], direct.run(None, {"INPUT0": x})[0])
    assert out["OUTPUT0"].shape == (5, 4)


def test_two_seeds_give_different_results(tmp_path):
    a = load(write(tmp_path, testing.mlp(seed=1), "a"))
    b = load(write(tmp_path, testing.mlp(seed=2), "b"))
    x = np.ones((1, 16), dtype=np.float32)
    assert not np.array_equal(a.run({"INPUT0": x})["OUTPUT0"], b.run({"INPUT0": x})["OUTPUT0"])


def test_run_returns_only_the_outputs_asked_for(tmp_path):
    model = load(write(tmp_path, testing.add_sub("INT32", dims=4)))
    a = np.arange(8, dtype=np.int32).reshape(2, 4)
    b = np.full((2, 4), 3, dtype=np.int32)
    out = model.run({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"])
    assert list(out) == ["OUTPUT1"]
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    both = model.run({"INPUT0": a, "INPUT1": b})
    assert list(both) == ["OUTPUT0", "OUTPUT1"]
    np.testing.assert_array_equal(both["OUTPUT0"], a + b)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_identity_round_trips_every_datatype(tmp_path, datatype):
    model = load(write(tmp_path, testing.identity(datatype)))
    x = sample(datatype, (3, 4))
    out = model.run({"INPUT0": x})["OUTPUT0"]
    assert out.dtype == x.dtype
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, x)


def test_bytes_round_trip_as_bytes_including_non_ascii_utf8(tmp_path):
    model = load(write(tmp_path, testing.identity("BYTES")))
    words = ["plain", "é", "日本語", "", "emoji \U0001f600", "nul\x00inside", "tab\t", "Ωmega"]
    x = np.empty(8, dtype=object)
    x[:] = [w.encode() for w in words]
    out = model.run({"INPUT0": x.reshape(2, 4)})["OUTPUT0"]
    assert out.dtype == np.object_
    assert out.shape == (2, 4)
    assert all(type(v) is bytes for v in out.ravel())
    assert [v.decode() for v in out.ravel()] == words


def test_bytes_input_as_numpy_bytes_dtype_is_accepted(tmp_path):
    model = load(write(tmp_path, testing.identity("BYTES")))
    out = model.run({"INPUT0": np.array([[b"a", b"bc", b"def", b""]])})["OUTPUT0"]
    assert out.tolist() == [[b"a", b"bc", b"def", b""]]


def test_non_utf8_bytes_input_is_input_error(tmp_path):
    model = load(write(tmp_path, testing.identity("BYTES")))
    x = np.array([[b"ok", b"\xff\xfe", b"c", b"d"]], dtype=object)
    with pytest.raises(InputError, match=r"input 'INPUT0'.*UTF-8"):
        model.run({"INPUT0": x})


def test_failure_inside_onnxruntime_is_run_error(tmp_path):
    model = load(write(tmp_path, testing.runtime_failure()))
    one = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(model.run({"INPUT0": one})["OUTPUT0"], one)
    with pytest.raises(RunError, match="reshape"):
        model.run({"INPUT0": np.zeros((2, 4), dtype=np.float32)})
    # the model still serves after a failed run
    np.testing.assert_array_equal(model.run({"INPUT0": one})["OUTPUT0"], one)


@pytest.mark.parametrize(
    ("feed", "outputs"),
    [
        ({"INPUT0": np.ones((1, 15), np.float32)}, None),
        ({"INPUT0": np.ones((1, 16), np.float64)}, None),
        ({}, None),
        ({"INPUT0": np.ones((1, 16), np.float32)}, ["NOPE"]),
    ],
    ids=["wrong-shape", "wrong-dtype", "missing-input", "unknown-output"],
)
def test_bad_feed_is_a_loader_error_not_an_onnxruntime_exception(tmp_path, feed, outputs):
    model = load(write(tmp_path, testing.mlp()))
    # data onnxruntime calls INVALID_ARGUMENT is the client's fault (InputError -> 400)
    with pytest.raises((RunError, InputError)):
        model.run(feed, outputs)


# -- load errors ----------------------------------------------------------------------


def test_corrupt_file_is_load_error_with_a_clear_message(tmp_path):
    path = tmp_path / "corrupt" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an onnx model")
    with pytest.raises(LoadError, match=r"onnxruntime cannot load model\.onnx"):
        OnnxLoader(path).load()


def test_missing_file_is_load_error(tmp_path):
    with pytest.raises(LoadError, match=r"cannot read model\.onnx: No such file or directory"):
        OnnxLoader(tmp_path / "1" / "model.onnx").load()


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="needs a CPU-only build"
)
def test_unavailable_execution_provider_is_load_error_naming_it(tmp_path):
    path = write(tmp_path, testing.mlp())
    with pytest.raises(LoadError) as err:
        load(path, execution_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    message = str(err.value)
    assert "CUDAExecutionProvider" in message
    assert "not available" in message
    assert "CPUExecutionProvider" in message.split("available:")[1]  # lists what there is


def test_unknown_graph_optimization_level_is_load_error(tmp_path):
    with pytest.raises(LoadError, match="fast"):
        load(write(tmp_path, testing.mlp()), graph_optimization_level="fast")


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_every_graph_optimization_level_loads_and_runs(tmp_path, level):
    model = load(write(tmp_path, testing.add_sub("INT32", dims=2)), graph_optimization_level=level)
    a = np.array([[5, 7]], dtype=np.int32)
    np.testing.assert_array_equal(model.run({"INPUT0": a, "INPUT1": a})["OUTPUT0"], a * 2)


# -- threads and unload ---------------------------------------------------------------


# Run in a fresh interpreter: this process may hold a test server whose gRPC threads come
# and go, which would make a thread count here ambiguous.
THREAD_PROBE = """
import os, sys
from pathlib import Path
import numpy as np
from fleetserve.loaders.base import LoadOptions
from fleetserve.loaders.onnx import OnnxLoader

def tids():
    return set(os.listdir("/proc/self/task"))

path = Path(sys.argv[1])
for threads in (1, 2, 3):
    before = tids()
    model = OnnxLoader(path, LoadOptions(intra_op_threads=threads)).load()
    started = tids() - before
    out = model.run({"INPUT0": np.ones((4, 16), dtype=np.float32)})["OUTPUT0"]
    model.unload()
    print(threads, len(started), len(started & tids()), out.shape == (4, 4))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_intra_op_threads_sizes_the_pool_and_unload_frees_it(tmp_path):
    path = write(tmp_path, testing.mlp())
    result = subprocess.run(
        [sys.executable, "-c", THREAD_PROBE, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # onnxruntime runs on the caller plus intra_op_threads - 1 pool threads, and unload
    # ends them: columns are threads, started by load, still alive after unload, ran ok
    assert result.stdout.split("\n")[:3] == ["1 0 0 True", "2 1 0 True", "3 2 0 True"]


def test_unloaded_model_is_unusable(tmp_path):
    model = load(write(tmp_path, testing.mlp()))
    x = np.ones((1, 16), dtype=np.float32)
    model.run({"INPUT0": x})
    model.unload()
    with pytest.raises(RunError):
        model.run({"INPUT0": x})


def test_loader_loads_afresh_each_time(tmp_path):
    loader = OnnxLoader(write(tmp_path, testing.fixed_shape((2,), factor=3.0)))
    first = loader.load()
    first.unload()
    second = loader.load()
    out = second.run({"INPUT0": np.array([1.0, 2.0], dtype=np.float32)})["OUTPUT0"]
    np.testing.assert_array_equal(out, [3.0, 6.0])


# -- registry -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["onnxruntime_onnx", "onnxruntime"])
def test_registry_maps_onnxruntime_names_to_onnx_loader(kind):
    assert loader_class(kind) is OnnxLoader


@pytest.mark.parametrize("kind", ["tensorflow_savedmodel", "", "ONNXRUNTIME_ONNX"])
def test_registry_unknown_kind_is_key_error(kind):
    with pytest.raises(KeyError):
        loader_class(kind)
