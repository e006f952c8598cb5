"""Per-model configuration (Triton's config.pbtxt).

config.pbtxt is Triton's `ModelConfig` in protobuf text format, so it is parsed with
protobuf's own text parser and our subset of Triton's message (protos/): a field
Triton's schema lacks is a parse error naming the field. Of the fields the schema has,
only those in `SUPPORTED_FIELDS` (and the parameters in `PARAMETERS`) may be set: any
other is an error naming it, so a config never asks for something fleetserve silently
does not do. `parse_model_config` is the one check every entry point goes through
(repository index and load read configs with it, admin uploads parse with it).

This is the one module below the edges that touches a generated proto, and only to read
a file format; what leaves it is the plain `ModelConfig` dataclass and Triton's JSON
shape of the config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import text_format

from fleetserve.loaders.base import LoadOptions
from fleetserve.protos import model_config_pb2
from fleetserve.server.errors import InvalidArgument
from fleetserve.server.types import DTYPES, TensorSpec

if TYPE_CHECKING:
    from fleetserve.server.settings import Settings

CONFIG_FILENAME = "config.pbtxt"


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which versions on disk are servable: the latest N, all, or a specific list."""

    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model version batches and queues (Triton's dynamic_batching).

    A batch starts as soon as an instance is free and the model is idle; while other
    batches run, a free instance waits up to `max_delay_s` for `target_rows`.
    """

    max_batch_size: int
    preferred: tuple[int, ...] = ()
    max_delay_s: float = 0.0
    max_queue_size: int = 1024  # requests waiting; a full queue rejects at once
    timeout_s: float = 0.0  # queue timeout of a request; 0 = none
    delay_on_timeout: bool = False  # timeout_action DELAY: a timed-out request goes last
    allow_timeout_override: bool = True  # a request's "timeout" parameter may shorten it
    instances: int = 1  # batches of this version that may run at once

    @property
    def target_rows(self) -> int:
        return min(self.preferred) if self.preferred else self.max_batch_size


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The subset of Triton's ModelConfig that fleetserve acts on.

    `inputs` / `outputs` give dims without the batch dimension, as config.pbtxt does;
    empty means "complete them from the model file". `source` is the config as Triton
    JSON (field names as in model_config.proto), echoed by the config endpoints.
    """

    name: str
    platform: str = "onnxruntime_onnx"
    max_batch_size: int = 0
    max_batch_size_set: bool = False
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    version_policy: VersionPolicy = VersionPolicy()
    default_model_filename: str = "model.onnx"
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"
    parameters: Mapping[str, str] = field(default_factory=dict)
    graph_level: int = 0
    dynamic_batching: Mapping[str, Any] | None = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def load_options(self, settings: Settings) -> LoadOptions:
        """onnxruntime options, using Triton's onnxruntime backend parameter names."""
        params = self.parameters  # checked by parse_model_config
        intra = int(params.get("intra_op_thread_count", settings.intra_op_threads))
        inter = int(params.get("inter_op_thread_count", 1))
        level = {-1: "basic", 1: "extended"}.get(self.graph_level, "all")
        providers = ("CPUExecutionProvider",)
        if self.instance_kind == "KIND_GPU":
            providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
        return LoadOptions(
            intra_op_threads=intra,
            inter_op_threads=inter,
            graph_optimization_level=params.get("graph_optimization_level", level),
            execution_providers=providers,
            extra=dict(params),
        )

    def completed(
        self,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        default_max_batch: int,
        default_batching: bool = False,
    ) -> ModelConfig:
        """This config with the model's own signature filled in where the file is silent.

        Specs passed in are the model's, with full shapes. Returns a config whose
        tensors carry config dims (batch dimension stripped when max_batch_size > 0).
        A batchable model with no config at all gets `dynamic_batching {}` when
        `default_batching` is on.
        """
        max_batch = self.max_batch_size
        batching = self.dynamic_batching
        if not self.max_batch_size_set and not self.inputs:
            batchable = all(s.shape and s.shape[0] == -1 for s in [*inputs, *outputs])
            max_batch = default_max_batch if batchable else 0
            if batchable and default_batching and not self.source:
                batching = {}
        strip = 1 if max_batch > 0 else 0
        new_inputs = self.inputs or tuple(
            TensorSpec(s.name, s.datatype, s.shape[strip:]) for s in inputs
        )
        new_outputs = self.outputs or tuple(
            TensorSpec(s.name, s.datatype, s.shape[strip:]) for s in outputs
        )
        done = replace(
            self,
            max_batch_size=max_batch,
            inputs=new_inputs,
            outputs=new_outputs,
            dynamic_batching=batching,
        )
        return replace(done, source=done.to_triton())

    def feedback_rate(self, default: float) -> float:
        """The share of predictions to log: parameter "feedback_sample_rate", else `default`."""
        text = self.parameters.get("feedback_sample_rate")  # checked by parse_model_config
        return default if text is None else float(text)

    @property
    def pinned(self) -> bool:
        """Never evicted: parameter "pinned" is "true"."""
        return self.parameters.get("pinned", "").lower() == "true"

    def batch_policy(self, default_queue_size: int) -> BatchPolicy | None:
        """The batching of a completed config; None when the model does not batch."""
        db = self.dynamic_batching
        if db is None or self.max_batch_size == 0:
            return None
        name, max_batch = self.name, self.max_batch_size
        preferred = tuple(sorted(set(db.get("preferred_batch_size", ()))))
        if any(p < 1 or p > max_batch for p in preferred):
            raise InvalidArgument(
                f"model {name!r}: preferred_batch_size {list(preferred)} must lie within "
                f"1..max_batch_size ({max_batch})"
            )
        queue = db.get("default_queue_policy")
        return BatchPolicy(
            max_batch_size=max_batch,
            preferred=preferred,
            max_delay_s=db.get("max_queue_delay_microseconds", 0) / 1e6,
            max_queue_size=(queue or {}).get("max_queue_size") or default_queue_size,
            timeout_s=(queue or {}).get("default_timeout_microseconds", 0) / 1e6,
            delay_on_timeout=(queue or {}).get("timeout_action") == "DELAY",
            # without a queue policy a request's own timeout is honoured
            allow_timeout_override=queue is None or queue.get("allow_timeout_override", False),
            instances=self.instance_count,
        )

    def to_triton(self) -> dict[str, Any]:
        """Triton's JSON form of the config (what /config answers)."""
        out = dict(self.source)
        if self.dynamic_batching is not None:
            out["dynamic_batching"] = dict(self.dynamic_batching)
        out.update(
            name=self.name,
            platform=self.platform,
            backend="onnxruntime",
            max_batch_size=self.max_batch_size,
            input=[_tensor_json(s) for s in self.inputs],
            output=[_tensor_json(s) for s in self.outputs],
        )
        policy = self.version_policy
        out["version_policy"] = (
            {"latest": {"num_versions": policy.num_versions}}
            if policy.kind == "latest"
            else {"all": {}}
            if policy.kind == "all"
            else {"specific": {"versions": list(policy.versions)}}
        )
        out.setdefault("instance_group", [{"count": self.instance_count, "kind": "KIND_CPU"}])
        out.setdefault("default_model_filename", self.default_model_filename)
        return out


def _tensor_json(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data_type": f"TYPE_{_CONFIG_TYPES[spec.datatype]}",
        "dims": list(spec.shape),
    }


# V2 datatype -> the TYPE_* suffix of Triton's config (BYTES is TYPE_STRING there)
_CONFIG_TYPES = {name: "STRING" if name == "BYTES" else name for name in DTYPES}
_V2_TYPES = {f"TYPE_{v}": k for k, v in _CONFIG_TYPES.items()}


# The subset of Triton's ModelConfig fleetserve acts on, declared once: the fields a
# config.pbtxt may set, as paths of proto field names (a repeated field's or a map's
# entries share its path). Any other field of protos/model_config.proto set to anything
# but its default (`decoupled: true`, a `response_cache` block, an execution accelerator,
# `label_filename`, `preserve_ordering: true`, priority levels, ...) is an error naming
# it. Labels that ask for no behaviour (names, an input's `format`) are accepted and
# echoed by /config. A block listed without its fields (model_transaction_policy,
# execution_accelerators) may appear only empty or with defaults, so the error names
# what is inside it (`decoupled`, the accelerator). When a feature lands (a response
# cache), its fields join here.
SUPPORTED_FIELDS = frozenset({
    "name", "platform", "backend", "max_batch_size", "default_model_filename",
    "parameters", "parameters.string_value",
    "version_policy", "version_policy.latest", "version_policy.latest.num_versions",
    "version_policy.all", "version_policy.specific", "version_policy.specific.versions",
    "input", "input.name", "input.data_type", "input.format", "input.dims",
    "output", "output.name", "output.data_type", "output.dims",
    "instance_group", "instance_group.name", "instance_group.kind", "instance_group.count",
    "optimization", "optimization.graph", "optimization.graph.level",
    "optimization.execution_accelerators",
    "dynamic_batching", "dynamic_batching.preferred_batch_size",
    "dynamic_batching.max_queue_delay_microseconds", "dynamic_batching.default_queue_policy",
    "dynamic_batching.default_queue_policy.timeout_action",
    "dynamic_batching.default_queue_policy.default_timeout_microseconds",
    "dynamic_batching.default_queue_policy.allow_timeout_override",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "model_warmup", "model_warmup.name", "model_warmup.batch_size", "model_warmup.count",
    "model_warmup.inputs", "model_warmup.inputs.data_type", "model_warmup.inputs.dims",
    "model_warmup.inputs.zero_data", "model_warmup.inputs.random_data",
    "model_warmup.inputs.input_data_file",
    "model_transaction_policy",
})  # fmt: skip


def _whole(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 4


def _rate(text: str) -> bool:
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


# The `parameters` keys fleetserve acts on (Triton's onnxruntime backend names where it
# has them), each with its check and what it expects. Triton hands unknown keys to the
# backend, which ignores them; here an unknown key is an error, so a typo
# ("intra_op_threads") is caught instead of silently changing nothing.
PARAMETERS: dict[str, tuple[Callable[[str], bool], str]] = {
    "intra_op_thread_count": (_whole, "a whole number (0: onnxruntime's default)"),
    "inter_op_thread_count": (_whole, "a whole number (0: onnxruntime's default)"),
    "graph_optimization_level": (
        lambda v: v in ("disable", "basic", "extended", "all"),
        "disable, basic, extended or all",
    ),
    "feedback_sample_rate": (_rate, "a number in 0..1"),
    "pinned": (lambda v: v.lower() in ("true", "false"), "true or false"),
}


_MAX_BATCH = re.compile(r"^\s*max_batch_size\s*:", re.MULTILINE)


def parse_model_config(text: str, model_name: str) -> ModelConfig:
    """Parse config.pbtxt text; raises InvalidArgument naming the problem."""
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise InvalidArgument(f"model {model_name!r}: {CONFIG_FILENAME}: {exc}") from None
    _check_supported(message, f"model {model_name!r}: {CONFIG_FILENAME}: ")
    source = message_json(message)
    if message.name and message.name != model_name:
        raise InvalidArgument(
            f"model {model_name!r}: {CONFIG_FILENAME} names the model {message.name!r}; "
            "it must match the directory name"
        )
    platform = message.platform or message.backend or "onnxruntime_onnx"
    if platform not in ("onnxruntime_onnx", "onnxruntime"):
        raise InvalidArgument(
            f"model {model_name!r}: platform/backend {platform!r} is not supported "
            "(fleetserve serves onnxruntime_onnx)"
        )
    if message.max_batch_size < 0:
        raise InvalidArgument(f"model {model_name!r}: max_batch_size must be >= 0")
    if message.optimization.graph.level not in (-1, 0, 1):
        raise InvalidArgument(
            f"model {model_name!r}: optimization.graph.level must be -1 (basic), 0 (all) "
            f"or 1 (extended), got {message.optimization.graph.level}"
        )
    if any(g.count < 0 for g in message.instance_group):
        raise InvalidArgument(f"model {model_name!r}: instance_group count must be >= 0")
    parameters = {k: v.string_value for k, v in message.parameters.items()}
    _check_parameters(parameters, model_name)
    return ModelConfig(
        name=model_name,
        platform="onnxruntime_onnx",
        max_batch_size=message.max_batch_size,
        # proto3 cannot tell an explicit 0 from no value: look at the text
        max_batch_size_set=bool(message.input) or _MAX_BATCH.search(text) is not None,
        inputs=tuple(_tensor_spec(model_name, t) for t in message.input),
        outputs=tuple(_tensor_spec(model_name, t) for t in message.output),
        version_policy=_version_policy(message.version_policy),
        default_model_filename=_plain_filename(model_name, message.default_model_filename),
        instance_count=sum(g.count or 1 for g in message.instance_group) or 1,
        instance_kind=_instance_kind(message),
        parameters=parameters,
        graph_level=message.optimization.graph.level,
        dynamic_batching=source.get("dynamic_batching"),
        source=source,
    )


def _check_supported(message: Any, where: str, path: str = "", shown: str = "") -> None:
    """InvalidArgument naming the first field set that is not in SUPPORTED_FIELDS.

    `path` is the field path checked against the table; `shown` the same with the names
    (or map keys) of the entries on the way, for the message: `input['x'].reshape`.
    """
    for fd, value in message.ListFields():
        field_path, field_shown = path + fd.name, shown + fd.name
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        if fd.message_type is None:
            entries = []
        elif is_map:
            value_fd = fd.message_type.fields_by_name["value"]
            entries = list(value.items()) if value_fd.message_type is not None else []
        elif fd.is_repeated:
            entries = [(_entry_name(item), item) for item in value]
        else:
            entries = [("", value)]
        if field_path not in SUPPORTED_FIELDS:
            label = _label(entries[0][0]) if entries else ""
            raise InvalidArgument(
                f"{where}{field_shown}{label} is set, but fleetserve does not act on it: "
                'remove it (README.md "Model repository" lists the supported fields)'
            )
        for key, item in entries:
            _check_supported(item, where, field_path + ".", f"{field_shown}{_label(key)}.")


def _label(key: str | int) -> str:
    """How an entry of a repeated field or map shows in a field path: its name or key."""
    if isinstance(key, str):
        return f"[{key[:60]!r}]" if key else ""
    return f"[{key}]"


def _entry_name(item: Any) -> str:
    return item.name if "name" in item.DESCRIPTOR.fields_by_name else ""


def _check_parameters(parameters: Mapping[str, str], model_name: str) -> None:
    for key, value in parameters.items():
        known = PARAMETERS.get(key)
        if known is None:
            raise InvalidArgument(
                f"model {model_name!r}: {CONFIG_FILENAME}: parameters key {key[:80]!r} is not "
                f"one fleetserve acts on (known: {', '.join(PARAMETERS)})"
            )
        check, expected = known
        if not check(value):
            raise InvalidArgument(
                f"model {model_name!r}: {CONFIG_FILENAME}: parameter {key!r} must be "
                f"{expected}, got {value[:40]!r}"
            )


def message_json(message: Any) -> dict[str, Any]:
    """A message as Triton's JSON: proto field names, enum names, 64-bit ints as numbers.

    (protobuf's MessageToDict writes int64 as strings; Triton's /config writes numbers.)
    """
    return {fd.name: _field_json(fd, value) for fd, value in message.ListFields()}


def _field_json(fd: Any, value: Any) -> Any:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        return {k: _value_json(value_fd, v) for k, v in value.items()}
    if fd.is_repeated:
        return [_value_json(fd, v) for v in value]
    return _value_json(fd, value)


def _value_json(fd: Any, value: Any) -> Any:
    if fd.type == fd.TYPE_MESSAGE:
        return message_json(value)
    if fd.type == fd.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    return value


def _plain_filename(model_name: str, name: str) -> str:
    """default_model_filename: a file in the version directory, nothing that walks out."""
    if not name:
        return "model.onnx"
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise InvalidArgument(
            f"model {model_name!r}: default_model_filename {name[:80]!r} must be a plain "
            "file name (no directories)"
        )
    return name


def _tensor_spec(model_name: str, tensor: Any) -> TensorSpec:
    type_name = model_config_pb2.DataType.Name(tensor.data_type)
    datatype = _V2_TYPES.get(type_name)
    if datatype is None:
        raise InvalidArgument(
            f"model {model_name!r}: tensor {tensor.name!r} has data_type {type_name}, "
            "which fleetserve does not serve"
        )
    return TensorSpec(tensor.name, datatype, tuple(tensor.dims))


def _version_policy(policy: Any) -> VersionPolicy:
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy(kind="all")
    if which == "specific":
        return VersionPolicy(kind="specific", versions=tuple(sorted(policy.specific.versions)))
    if which == "latest":
        return VersionPolicy(kind="latest", num_versions=max(1, policy.latest.num_versions))
    return VersionPolicy()


def _instance_kind(message: Any) -> str:
    kinds = {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in message.instance_group}
    return "KIND_GPU" if "KIND_GPU" in kinds else "KIND_CPU" if kinds else "KIND_AUTO"


def load_model_config(model_dir: Path) -> ModelConfig:
    """The config of the model in `model_dir`: its config.pbtxt, or the defaults."""
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ModelConfig(name=model_dir.name)
    except (OSError, UnicodeDecodeError) as exc:
        # the OS's reason, not the absolute path it names: the message reaches clients
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise InvalidArgument(
            f"model {model_dir.name!r}: cannot read {CONFIG_FILENAME}: {reason}"
        ) from None
    return parse_model_config(text, model_dir.name)
