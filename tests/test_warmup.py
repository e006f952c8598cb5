"""Triton's model_warmup: samples run on the real model before a version takes traffic."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fleetserve.loaders import testing
from fleetserve.loaders.base import LoadedModel, LoadOptions
from fleetserve.loaders.onnx import OnnxLoader
from fleetserve.server.config import parse_model_config
from fleetserve.server.errors import InvalidArgument
from fleetserve.server.types import ModelId
from fleetserve.server.warmup import warm_up
from tests.conftest import start_server, stop_server, test_settings


class Recorder(LoadedModel):
    """A real model that remembers every feed it ran."""

    def __init__(self, model: LoadedModel) -> None:
        self._model, self.feeds = model, []
        self.inputs, self.outputs, self.size_bytes = model.inputs, model.outputs, 0

    def run(self, inputs, output_names=None):  # type: ignore[no-untyped-def]
        self.feeds.append(inputs)
        return self._model.run(inputs, output_names)

    def unload(self) -> None:
        self._model.unload()


def loaded(tmp_path: Path, model: bytes) -> Recorder:
    path = tmp_path / "model.onnx"
    path.write_bytes(model)
    return Recorder(OnnxLoader(path, LoadOptions()).load())


WARMUPS = """
max_batch_size: 8
model_warmup [
  { name: "zeros" batch_size: 2 count: 3
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } },
  { name: "random"
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 16 ] random_data: true } } },
  { name: "file" batch_size: 1
    inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "x.bin" } } }
]
"""


def test_every_sample_runs_count_times_with_its_data(tmp_path: Path) -> None:
    model = loaded(tmp_path, testing.mlp())
    data = np.arange(16, dtype="<f4")
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "x.bin").write_bytes(data.tobytes())
    warm_up(ModelId("m", 1), model, parse_model_config(WARMUPS, "m"), tmp_path / "warmup")
    shapes = [f["INPUT0"].shape for f in model.feeds]
    assert shapes == [(2, 16)] * 3 + [(1, 16), (1, 16)]
    assert not model.feeds[0]["INPUT0"].any() and model.feeds[3]["INPUT0"].any()
    assert np.array_equal(model.feeds[4]["INPUT0"][0], data)


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ('{ data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "../x.bin" }', "plain file name"),
        ('{ data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "none.bin" }', "cannot read"),
        ("{ data_type: TYPE_FP32 dims: [ 15 ] zero_data: true }", "failed"),
        ('{ data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "short.bin" }', "needs 64"),
    ],
)
def test_a_bad_sample_is_an_error_naming_it(tmp_path: Path, inputs: str, problem: str) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "short.bin").write_bytes(b"\0" * 8)
    sample = f'{{ name: "w" inputs {{ key: "INPUT0" value: {inputs} }} }}'
    config = parse_model_config(f"max_batch_size: 8\nmodel_warmup [ {sample} ]", "m")
    with pytest.raises(InvalidArgument, match=problem) as err:
        warm_up(ModelId("m", 1), loaded(tmp_path, testing.mlp()), config, tmp_path / "warmup")
    assert "warm-up 'w'" in str(err.value)


def test_a_version_whose_warm_up_fails_never_serves(tmp_path: Path) -> None:
    # runtime_failure runs batch 1 only: a warm-up at batch 2 fails
    failing = (
        'max_batch_size: 4\nmodel_warmup [ { name: "two" batch_size: 2 inputs { key: "INPUT0" '
        "value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]\n"
    )
    testing.write_model(tmp_path, "bad", testing.runtime_failure(), config=failing)
    server = start_server(test_settings(tmp_path, preload=False))
    try:
        body = json.dumps(
            {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
        ).encode()
        request = urllib.request.Request(f"{server.http_url}/v2/models/bad/infer", data=body)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 503
        assert "warm-up 'two' failed" in json.loads(err.value.read())["error"]
    finally:
        stop_server(server)
