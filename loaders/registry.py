"""Loader kinds by name, imported lazily so an unused runtime costs nothing."""

from __future__ import annotations

import importlib

from fleetserve.loaders.base import Loader

# platform / backend name (Triton's spelling) -> "module:Class"
LOADERS: dict[str, str] = {
    "onnxruntime_onnx": "fleetserve.loaders.onnx:OnnxLoader",
    "onnxruntime": "fleetserve.loaders.onnx:OnnxLoader",
}

# the file a loader kind reads inside a version directory, when the config names none
DEFAULT_FILENAMES: dict[str, str] = {"onnxruntime_onnx": "model.onnx", "onnxruntime": "model.onnx"}


def warm_up_all() -> None:
    """Start every registered runtime once (see Loader.warm_up)."""
    for path in set(LOADERS.values()):
        module_name, _, class_name = path.partition(":")
        getattr(importlib.import_module(module_name), class_name).warm_up()


def loader_class(kind: str) -> type[Loader]:
    """The Loader class for a platform or backend name; KeyError when unknown."""
    module_name, _, class_name = LOADERS[kind].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
