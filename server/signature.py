"""A loaded model's own signature against its config: the config completed from it
(Triton's auto-complete), and any disagreement named."""

from __future__ import annotations

from fleetserve.loaders.base import LoadedModel, TensorSig
from fleetserve.server.config import ModelConfig
from fleetserve.server.errors import InvalidArgument
from fleetserve.server.settings import Settings
from fleetserve.server.types import ModelId, TensorSpec, datatype_of


def _spec(sig: TensorSig) -> TensorSpec:
    return TensorSpec(sig.name, datatype_of(sig.dtype), sig.shape)


def checked_config(
    model_id: ModelId, config: ModelConfig, model: LoadedModel, settings: Settings
) -> ModelConfig:
    """The config completed from the model's own signature; InvalidArgument naming the
    tensor where they disagree."""
    inputs = [_spec(s) for s in model.inputs]
    outputs = [_spec(s) for s in model.outputs]
    config = config.completed(
        inputs, outputs, settings.default_max_batch_size, settings.dynamic_batching
    )
    _check(model_id, "input", config.inputs, inputs, config.max_batch_size)
    _check(model_id, "output", config.outputs, outputs, config.max_batch_size)
    return config


def _check(
    model_id: ModelId,
    what: str,
    declared: tuple[TensorSpec, ...],
    actual: list[TensorSpec],
    max_batch: int,
) -> None:
    """A config that disagrees with the model file fails the load, naming the tensor."""
    by_name = {s.name: s for s in actual}
    for spec in declared:
        real = by_name.get(spec.name)
        if real is None:
            raise InvalidArgument(
                f"model {model_id}: config {what} {spec.name!r} is not in the model "
                f"(it has {', '.join(sorted(by_name))})"
            )
        if real.datatype != spec.datatype:
            raise InvalidArgument(
                f"model {model_id}: config {what} {spec.name!r} is {spec.datatype}, "
                f"the model's is {real.datatype}"
            )
        shape = ((-1,) if max_batch > 0 else ()) + spec.shape
        if len(real.shape) != len(shape) or any(
            r != -1 and d != -1 and r != d for r, d in zip(real.shape, shape, strict=True)
        ):
            raise InvalidArgument(
                f"model {model_id}: config {what} {spec.name!r} has shape {list(shape)} "
                f"(max_batch_size {max_batch}), the model's is {list(real.shape)}"
            )
