"""Triton's `model_warmup`: sample requests a version runs before it takes traffic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.random import default_rng  # imported now: its ~2.5 MB is not a model's size

from fleetserve.loaders.base import LoadedModel
from fleetserve.server.config import ModelConfig
from fleetserve.server.errors import InvalidArgument
from fleetserve.server.types import DTYPES, ModelId

# config.pbtxt data_type -> V2 datatype (TYPE_STRING is BYTES)
_CONFIG_DATATYPES = {f"TYPE_{'STRING' if d == 'BYTES' else d}": d for d in DTYPES}


def warm_up(model_id: ModelId, model: LoadedModel, config: ModelConfig, folder: Path) -> None:
    """Run Triton's `model_warmup` samples before the version takes traffic (load pool).

    zero_data, random_data, or input_data_file (raw little-endian tensor bytes in the
    model's warmup/ folder). A sample that fails fails the load: a version whose
    warm-up breaks never serves.
    """
    rng = default_rng(0)
    for sample in config.source.get("model_warmup", ()):
        what = f"model {model_id}: warm-up {sample.get('name', '')!r}"
        rows = sample.get("batch_size") or 1
        batch = (rows,) if config.max_batch_size > 0 else ()
        feed = {}
        for name, spec in sample.get("inputs", {}).items():
            datatype = _CONFIG_DATATYPES.get(spec.get("data_type", ""))
            if datatype is None:
                raise InvalidArgument(f"{what}: input {name!r} has no supported data_type")
            shape = batch + tuple(spec.get("dims", ()))
            feed[name] = _warm_up_tensor(what, name, datatype, shape, spec, rng, folder)
        try:
            for _ in range(sample.get("count") or 1):
                model.run(feed)
        except Exception as exc:
            raise InvalidArgument(f"{what} failed: {exc}") from None


def _warm_up_tensor(
    what: str, name: str, datatype: str, shape: tuple[int, ...], spec: dict,
    rng: np.random.Generator, folder: Path,
) -> np.ndarray:  # fmt: skip
    dtype = DTYPES[datatype]
    if datatype == "BYTES":
        if "input_data_file" in spec:
            raise InvalidArgument(f"{what}: input {name!r}: BYTES warm-up files are not supported")
        return np.full(shape, b"", dtype=object)
    if "input_data_file" in spec:
        filename = spec["input_data_file"]
        if "/" in filename or filename.startswith("."):
            raise InvalidArgument(f"{what}: input_data_file {filename!r} must be a plain file name")
        try:
            raw = (folder / filename).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"{what}: cannot read {filename!r}: {exc.strerror}") from None
        count = int(np.prod(shape))
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{what}: {filename!r} holds {len(raw)} bytes, shape {list(shape)} needs "
                f"{count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    if spec.get("random_data"):
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 100, shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)
