"""The contract between the server and whatever runs a model.

A `Loader` is cheap to make and knows where a model lives; `load()` is the expensive
part. The server calls `load()` and `LoadedModel.unload()` only from a worker thread,
never on the event loop, and never twice at once for one Loader. `LoadedModel.run`
may be called from several threads at once (onnxruntime sessions are thread-safe);
the server calls it inline on the event loop only for models it measured to be
faster than a thread hop. Errors: `load()` raises `LoadError` with a reason fit for
an operator; `run()` raises `RunError` for a failure inside the runtime. Anything
else escaping them is a bug in the loader.

This package knows nothing of server/: dependencies point from the server to here.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# loaded size / file size assumed before a load has measured it
ESTIMATE_FACTOR = 2


class LoadError(Exception):
    """The model could not be loaded; the message says why."""


class RunError(Exception):
    """The runtime failed while running a batch."""


class InputError(Exception):
    """The inputs cannot be given to this runtime (e.g. non-UTF-8 text for a string tensor)."""


@dataclass(frozen=True, slots=True)
class TensorSig:
    """A tensor of a loaded model's signature; -1 marks a variable dimension.

    `dtype` is numpy's; string tensors are `object` and carry `bytes` elements.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Runtime options for one model, from its config with server-wide defaults.

    intra_op_threads 0 lets the runtime pick (one per core); 1 is the server default
    because concurrent requests already keep the cores busy.
    """

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    extra: dict[str, str] = field(default_factory=dict)


class LoadedModel(abc.ABC):
    """A model in memory, ready to run batches of named arrays.

    `size_bytes` is the loader's own figure (its estimate); the server counts what it
    measured the load to allocate.
    """

    inputs: list[TensorSig]
    outputs: list[TensorSig]
    size_bytes: int

    @abc.abstractmethod
    def run(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; returns the asked outputs (all when None) by name."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Free the model's memory; the object is unusable afterwards."""


class Loader(abc.ABC):
    """Knows one model version on disk; cheap to construct, expensive to `load()`."""

    def __init__(self, path: Path, options: LoadOptions | None = None) -> None:
        self.path = path
        self.options = options or LoadOptions()

    @classmethod
    def warm_up(cls) -> None:
        """Pay the runtime's one-time start-up cost now (called once, off the loop, at
        server start), so it is not measured as part of the first model's size."""
        return None  # most runtimes have nothing to start

    def estimate_bytes(self) -> int:
        """An upper-bound guess of the loaded size, before loading (weights times 2)."""
        return ESTIMATE_FACTOR * self.path.stat().st_size

    def prefetch(self) -> None:
        """Read the model's files through once, so that `load()` finds them in the page
        cache: the server calls it before a load's turn in memory, so loads overlap their
        file I/O while their loads in memory take turns. Raises OSError."""
        chunk = bytearray(64 * 1024)  # small: it is held while another load is measured
        with open(self.path, "rb", buffering=0) as f:
            while f.readinto(chunk):
                pass

    @abc.abstractmethod
    def load(self) -> LoadedModel:
        """Load the model; raises LoadError with the reason."""
