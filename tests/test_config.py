"""Model configuration, version policy and the on-disk repository, as pure functions.

config.pbtxt texts go through server.config.parse_model_config (protobuf's own text
parser over our subset of Triton's ModelConfig); versions and names are checked with
tables; the Repository reads a real directory tree in tmp_path.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format

from fleetserve.loaders.onnx import OnnxLoader
from fleetserve.protos import model_config_pb2
from fleetserve.server.config import (
    SUPPORTED_FIELDS,
    BatchPolicy,
    ModelConfig,
    VersionPolicy,
    load_model_config,
    parse_model_config,
)
from fleetserve.server.errors import InvalidArgument, NotFound
from fleetserve.server.repository import Repository, check_model_name
from fleetserve.server.settings import Settings
from fleetserve.server.types import ModelId, TensorSpec
from fleetserve.server.versions import parse_version, servable_versions

FULL_CONFIG = """
name: "resnet"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [ 3, 1 ] } }
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 3, -1 ] },
  { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] }
]
output [ { name: "OUTPUT0" data_type: TYPE_INT64 dims: [ 10 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 2 kind: KIND_CPU }, { count: 3 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "3" } }
parameters { key: "inter_op_thread_count" value: { string_value: "2" } }
optimization { graph { level: 1 } }
default_model_filename: "net.onnx"
"""


def parse(text: str, name: str = "m") -> ModelConfig:
    return parse_model_config(text, name)


# -- parse_model_config ---------------------------------------------------------------


def test_full_triton_config_maps_to_model_config_fields():
    config = parse(FULL_CONFIG, "resnet")
    assert config.name == "resnet"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert config.max_batch_size_set
    assert config.inputs == (
        TensorSpec("INPUT0", "FP32", (3, -1)),
        TensorSpec("TEXT", "BYTES", (1,)),
    )
    assert config.outputs == (TensorSpec("OUTPUT0", "INT64", (10,)),)
    assert config.version_policy == VersionPolicy(kind="specific", versions=(1, 3))
    assert config.dynamic_batching == {
        "preferred_batch_size": [4, 8],
        "max_queue_delay_microseconds": 100,
    }
    assert config.instance_count == 5  # summed over the groups
    assert config.instance_kind == "KIND_CPU"
    assert config.parameters == {"intra_op_thread_count": "3", "inter_op_thread_count": "2"}
    assert config.graph_level == 1
    assert config.default_model_filename == "net.onnx"
    # the source keeps Triton's JSON field names, for the /config endpoints
    assert config.source["input"][1] == {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]}
    assert config.source["optimization"] == {"graph": {"level": 1}}


def test_empty_config_gives_defaults():
    config = parse("")
    assert config == ModelConfig(name="m")
    assert config.max_batch_size == 0
    assert not config.max_batch_size_set
    assert config.version_policy == VersionPolicy(kind="latest", num_versions=1)
    assert config.instance_kind == "KIND_AUTO"
    assert config.dynamic_batching is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version_policy: { latest: { num_versions: 2 } }", VersionPolicy("latest", 2)),
        ("version_policy: { latest: {} }", VersionPolicy("latest", 1)),
        ("version_policy: { all: {} }", VersionPolicy("all")),
        (
            "version_policy: { specific: { versions: [ 5, 2, 9 ] } }",
            VersionPolicy("specific", versions=(2, 5, 9)),
        ),
        ("", VersionPolicy("latest", 1)),
    ],
    ids=["latest-2", "latest-default", "all", "specific-sorted", "absent"],
)
def test_version_policy_is_parsed(text, expected):
    assert parse(text).version_policy == expected


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("instance_group [ { kind: KIND_CPU } ]", "KIND_CPU"),
        ("instance_group [ { kind: KIND_CPU }, { kind: KIND_GPU } ]", "KIND_GPU"),
        ("", "KIND_AUTO"),
    ],
)
def test_instance_kind_is_gpu_when_any_group_asks_for_it(text, kind):
    assert parse(text).instance_kind == kind


def test_instance_group_without_count_counts_one_instance():
    assert parse("instance_group [ { kind: KIND_CPU }, { kind: KIND_CPU } ]").instance_count == 2


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("max_batch_size: 4\nfoo: 1\n", '"foo"'),
        ('input [ { name: "a" data_type: TYPE_FP32 dims: [ 1 ] bogus: 2 } ]', '"bogus"'),
        ("dynamic_batching { max_queue_delay: 3 }", '"max_queue_delay"'),
    ],
    ids=["top-level", "in-input", "in-dynamic-batching"],
)
def test_unknown_field_is_invalid_argument_naming_the_field(text, field):
    with pytest.raises(InvalidArgument) as err:
        parse(text, "bad_config")
    assert field in err.value.message
    assert "bad_config" in err.value.message
    assert "config.pbtxt" in err.value.message


def test_malformed_value_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="max_batch_size"):
        parse('max_batch_size: "eight"')


def test_name_that_differs_from_directory_is_invalid_argument():
    with pytest.raises(InvalidArgument, match=r"names the model 'other'.*directory name"):
        parse('name: "other"', "mine")
    assert parse('name: "mine"', "mine").name == "mine"


@pytest.mark.parametrize(
    "text",
    [
        'platform: "tensorflow_savedmodel"',
        'platform: "pytorch_libtorch"',
        'backend: "python"',
    ],
)
def test_unsupported_platform_is_invalid_argument(text):
    with pytest.raises(InvalidArgument, match="is not supported"):
        parse(text)


@pytest.mark.parametrize("text", ['platform: "onnxruntime_onnx"', 'backend: "onnxruntime"', ""])
def test_onnxruntime_platform_spellings_are_accepted(text):
    assert parse(text).platform == "onnxruntime_onnx"


@pytest.mark.parametrize(
    ("config_type", "datatype"),
    [
        ("TYPE_STRING", "BYTES"),
        ("TYPE_BOOL", "BOOL"),
        ("TYPE_FP16", "FP16"),
        ("TYPE_FP32", "FP32"),
        ("TYPE_FP64", "FP64"),
        ("TYPE_INT8", "INT8"),
        ("TYPE_UINT64", "UINT64"),
    ],
)
def test_config_datatypes_map_to_v2_datatypes(config_type, datatype):
    config = parse(f'input [ {{ name: "x" data_type: {config_type} dims: [ 2 ] }} ]')
    assert config.inputs == (TensorSpec("x", datatype, (2,)),)
    assert config.to_triton()["input"][0]["data_type"] == config_type


@pytest.mark.parametrize("config_type", ["TYPE_BF16", "TYPE_INVALID"])
def test_datatype_fleetserve_cannot_serve_is_invalid_argument(config_type):
    with pytest.raises(InvalidArgument, match=f"tensor 'x' has data_type {config_type}"):
        parse(f'output [ {{ name: "x" data_type: {config_type} dims: [ 2 ] }} ]')


# -- the supported subset: everything else is an error naming the field ----------------

UNSUPPORTED = [
    ("response_cache { enable: true }", "response_cache"),
    ("response_cache { }", "response_cache"),
    ("model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
    (
        "optimization { execution_accelerators {\n"
        '  cpu_execution_accelerator: [ { name: "openvino" } ] } }',
        "optimization.execution_accelerators.cpu_execution_accelerator['openvino']",
    ),
    (
        "optimization { execution_accelerators {\n"
        '  gpu_execution_accelerator: [ { name: "tensorrt" } ] } }',
        "optimization.execution_accelerators.gpu_execution_accelerator['tensorrt']",
    ),
    (
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]',
        "output['y'].label_filename",
    ),
    (
        "max_batch_size: 4\ndynamic_batching { preserve_ordering: true }",
        "dynamic_batching.preserve_ordering",
    ),
    (
        "max_batch_size: 4\ndynamic_batching { priority_levels: 2 }",
        "dynamic_batching.priority_levels",
    ),
    (
        "max_batch_size: 4\ndynamic_batching { priority_queue_policy { key: 1 value: { } } }",
        "dynamic_batching.priority_queue_policy[1]",
    ),
    (
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]',
        "input['x'].reshape",
    ),
    (
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]',
        "input['x'].optional",
    ),
    (
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] allow_ragged_batch: true } ]',
        "input['x'].allow_ragged_batch",
    ),
    (
        'output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] is_shape_tensor: true } ]',
        "output['y'].is_shape_tensor",
    ),
    ("instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]", "instance_group.gpus"),
    ("optimization { priority: PRIORITY_MAX }", "optimization.priority"),
    ("optimization { input_pinned_memory { enable: false } }", "optimization.input_pinned_memory"),
]


@pytest.mark.parametrize(("text", "field"), UNSUPPORTED, ids=[f for _, f in UNSUPPORTED])
def test_a_field_fleetserve_does_not_act_on_is_invalid_argument_naming_it(text, field):
    with pytest.raises(InvalidArgument) as err:
        parse(text, "strict")
    message = err.value.message
    assert f"model 'strict': config.pbtxt: {field} is set" in message
    assert "does not act on it" in message


@pytest.mark.parametrize(
    "text",
    [
        "model_transaction_policy { decoupled: false }",
        "max_batch_size: 4\ndynamic_batching { preserve_ordering: false priority_levels: 0 }",
        "optimization { execution_accelerators { } priority: PRIORITY_DEFAULT }",
        'input [ { name: "x" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 8, 8 ] } ]',
        'instance_group [ { name: "cpu_group" kind: KIND_MODEL count: 2 } ]',
    ],
    ids=["decoupled-false", "batching-defaults", "empty-accelerators", "format", "group-name"],
)
def test_defaults_and_labels_that_ask_for_nothing_are_accepted(text):
    parse(text)


def _all_paths(descriptor, prefix=""):
    """Every field path of a message type, as SUPPORTED_FIELDS spells them."""
    for fd in descriptor.fields:
        path = prefix + fd.name
        yield path
        message = fd.message_type
        if message is not None and message.GetOptions().map_entry:
            message = message.fields_by_name["value"].message_type
        if message is not None:
            yield from _all_paths(message, path + ".")


def _set(message, parts):
    """Set the field at `parts` to something other than its default (building the way)."""
    fd = message.DESCRIPTOR.fields_by_name[parts[0]]
    container = getattr(message, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        key = 1 if fd.message_type.fields_by_name["key"].type != value_fd.TYPE_STRING else "k"
        if value_fd.message_type is None:
            container[key] = "v"
            return
        target = container[key]
    elif fd.message_type is not None:
        target = container.add() if fd.is_repeated else container
        target.SetInParent()
    else:
        value = {fd.TYPE_BOOL: True, fd.TYPE_STRING: "x"}.get(fd.type, 1)
        if fd.is_repeated:
            container.append(value)
        else:
            setattr(message, fd.name, value)
        return
    if len(parts) > 1:
        _set(target, parts[1:])


def test_every_field_of_the_schema_outside_the_subset_is_refused_by_its_path():
    """The audit, over protos/model_config.proto itself: a field added to the schema
    and not to SUPPORTED_FIELDS is refused, never silently accepted."""
    paths = list(_all_paths(model_config_pb2.ModelConfig.DESCRIPTOR))
    assert set(paths) >= SUPPORTED_FIELDS  # the table names real fields only
    refused = [p for p in paths if p not in SUPPORTED_FIELDS]
    assert "response_cache" in refused and "model_transaction_policy.decoupled" in refused
    for path in refused:
        message = model_config_pb2.ModelConfig()
        _set(message, path.split("."))
        with pytest.raises(InvalidArgument, match="does not act on it") as err:
            parse(text_format.MessageToString(message))
        shown = re.sub(r"\[[^]]*\]", "", err.value.message.split("config.pbtxt: ")[1])
        assert shown.split(" is set")[0] in (path, path.rsplit(".", 1)[0]), err.value.message
    for path in SUPPORTED_FIELDS:  # never refused as unsupported (other checks may apply)
        message = model_config_pb2.ModelConfig()
        _set(message, path.split("."))
        try:
            parse(text_format.MessageToString(message))
        except InvalidArgument as exc:
            assert "does not act on it" not in exc.message, path


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("intra_op_threads", "2", "parameters key 'intra_op_threads' is not one fleetserve"),
        ("execution_mode", "0", "parameters key 'execution_mode'"),
        ("intra_op_thread_count", "many", "'intra_op_thread_count' must be a whole number"),
        ("inter_op_thread_count", "-1", "'inter_op_thread_count' must be a whole number"),
        ("graph_optimization_level", "max", "must be disable, basic, extended or all"),
        ("feedback_sample_rate", "2", "'feedback_sample_rate' must be a number in 0..1"),
        ("feedback_sample_rate", "often", "'feedback_sample_rate' must be a number in 0..1"),
        ("pinned", "yes", "'pinned' must be true or false"),
    ],
)
def test_unknown_parameter_or_bad_value_is_invalid_argument_naming_it(key, value, problem):
    text = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    with pytest.raises(InvalidArgument) as err:
        parse(text)
    assert problem in err.value.message
    if "is not one" in problem:
        assert "known: intra_op_thread_count" in err.value.message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("optimization { graph { level: 2 } }", "optimization.graph.level must be -1"),
        ("instance_group [ { count: -1 } ]", "instance_group count must be >= 0"),
    ],
)
def test_values_fleetserve_cannot_act_on_are_invalid_argument(text, problem):
    with pytest.raises(InvalidArgument, match=re.escape(problem)):
        parse(text)


def test_known_parameters_are_acted_on():
    config = parse(
        'parameters { key: "pinned" value: { string_value: "TRUE" } }\n'
        'parameters { key: "feedback_sample_rate" value: { string_value: "0.25" } }'
    )
    assert config.pinned and config.feedback_rate(1.0) == 0.25
    assert not parse("").pinned and parse("").feedback_rate(0.5) == 0.5


def test_negative_max_batch_size_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="max_batch_size must be >= 0"):
        parse("max_batch_size: -1")


def test_inputs_without_max_batch_size_count_as_an_explicit_zero():
    config = parse('input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]')
    assert config.max_batch_size == 0
    assert config.max_batch_size_set


def test_load_model_config_without_file_gives_defaults(tmp_path):
    (tmp_path / "plain").mkdir()
    assert load_model_config(tmp_path / "plain") == ModelConfig(name="plain")


def test_load_model_config_with_non_utf8_file_is_invalid_argument(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.pbtxt").write_bytes(b'name: "\xff\xfe"')
    with pytest.raises(InvalidArgument, match=r"cannot read config\.pbtxt"):
        load_model_config(model)


# -- load_options ---------------------------------------------------------------------


def test_load_options_use_triton_onnxruntime_parameters():
    options = parse(FULL_CONFIG, "resnet").load_options(
        Settings(model_repository=Path("m"), intra_op_threads=1)
    )
    assert options.intra_op_threads == 3
    assert options.inter_op_threads == 2
    assert options.graph_optimization_level == "extended"
    assert options.execution_providers == ("CPUExecutionProvider",)
    assert options.extra == {"intra_op_thread_count": "3", "inter_op_thread_count": "2"}


def test_load_options_default_to_server_settings():
    options = ModelConfig(name="m").load_options(
        Settings(model_repository=Path("m"), intra_op_threads=4)
    )
    assert options.intra_op_threads == 4
    assert options.inter_op_threads == 1
    assert options.graph_optimization_level == "all"
    assert options.execution_providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize(("level", "name"), [(-1, "basic"), (0, "all"), (1, "extended")])
def test_graph_level_maps_to_onnxruntime_level(level, name):
    config = parse(f"optimization {{ graph {{ level: {level} }} }}")
    assert (
        config.load_options(Settings(model_repository=Path("m"))).graph_optimization_level == name
    )


def test_graph_optimization_level_parameter_overrides_graph_level():
    text = (
        "optimization { graph { level: 1 } }\n"
        'parameters { key: "graph_optimization_level" value: { string_value: "disable" } }'
    )
    assert (
        parse(text).load_options(Settings(model_repository=Path("m"))).graph_optimization_level
        == "disable"
    )


def test_kind_gpu_puts_cuda_first_with_cpu_fallback():
    config = parse("instance_group [ { count: 1 kind: KIND_GPU } ]")
    assert config.load_options(Settings(model_repository=Path("m"))).execution_providers == (
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )


# -- completed ------------------------------------------------------------------------


def test_completed_gives_batchable_model_without_config_the_default_max_batch():
    inputs = [TensorSpec("INPUT0", "FP32", (-1, 16))]
    outputs = [TensorSpec("OUTPUT0", "FP32", (-1, 4)), TensorSpec("AUX", "BYTES", (-1,))]
    done = ModelConfig(name="m").completed(inputs, outputs, default_max_batch=64)
    assert done.max_batch_size == 64
    # config dims leave out the batch dimension
    assert done.inputs == (TensorSpec("INPUT0", "FP32", (16,)),)
    assert done.outputs == (TensorSpec("OUTPUT0", "FP32", (4,)), TensorSpec("AUX", "BYTES", ()))
    assert done.source["max_batch_size"] == 64
    assert done.source["input"] == [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}]
    assert done.source["output"][1]["data_type"] == "TYPE_STRING"


@pytest.mark.parametrize(
    ("input_shape", "output_shape"),
    [((3, 4), (3, 4)), ((-1, 4), (3, 4)), ((), ()), ((-1, 4), ())],
    ids=["fixed", "fixed-output", "scalars", "scalar-output"],
)
def test_completed_gives_model_that_cannot_batch_max_batch_zero(input_shape, output_shape):
    inputs = [TensorSpec("INPUT0", "FP32", input_shape)]
    outputs = [TensorSpec("OUTPUT0", "FP32", output_shape)]
    done = ModelConfig(name="m").completed(inputs, outputs, default_max_batch=64)
    assert done.max_batch_size == 0
    assert done.inputs == tuple(inputs)  # nothing stripped
    assert done.outputs == tuple(outputs)


def test_completed_keeps_explicit_max_batch_and_strips_batch_dim():
    config = parse("max_batch_size: 4")
    done = config.completed(
        [TensorSpec("INPUT0", "FP32", (-1, 16))], [TensorSpec("OUTPUT0", "FP32", (-1, 2))], 64
    )
    assert done.max_batch_size == 4
    assert done.inputs == (TensorSpec("INPUT0", "FP32", (16,)),)
    assert done.outputs == (TensorSpec("OUTPUT0", "FP32", (2,)),)


def test_completed_keeps_declared_tensors():
    config = parse(FULL_CONFIG, "resnet")
    done = config.completed([TensorSpec("ignored", "FP32", (-1, 1))], [], 64)
    assert done.inputs == config.inputs
    assert done.outputs == config.outputs
    assert done.max_batch_size == 8
    assert done.source["dynamic_batching"] == config.dynamic_batching
    assert done.source["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert done.source["instance_group"] == config.source["instance_group"]


# -- versions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "on_disk", "servable"),
    [
        (VersionPolicy("latest", 1), [1, 2, 3], [3]),
        (VersionPolicy("latest", 2), [3, 1, 2], [2, 3]),
        (VersionPolicy("latest", 5), [2, 7], [2, 7]),
        (VersionPolicy("latest", 1), [], []),
        (VersionPolicy("latest", 1), [4, 4], [4]),
        (VersionPolicy("all"), [3, 1, 2], [1, 2, 3]),
        (VersionPolicy("all"), [], []),
        (VersionPolicy("specific", versions=(1, 3)), [1, 2, 3], [1, 3]),
        (VersionPolicy("specific", versions=(2, 9)), [1, 2, 3], [2]),
        (VersionPolicy("specific", versions=(8, 9)), [1, 2, 3], []),
        (VersionPolicy("specific", versions=()), [1, 2], []),
    ],
    ids=[
        "latest-1",
        "latest-2-unsorted",
        "latest-more-than-exist",
        "latest-empty",
        "latest-duplicates",
        "all",
        "all-empty",
        "specific",
        "specific-some-missing",
        "specific-all-missing",
        "specific-none",
    ],
)
def test_servable_versions(policy, on_disk, servable):
    assert servable_versions(policy, on_disk) == servable


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("", None),
        ("3", 3),
        ("03", 3),
        ("0", 0),
        ("-1", None),
        ("+3", None),
        (" 3", None),
        ("3.0", None),
        ("abc", None),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, None),
        ("1" * 400, None),
    ],
)
def test_parse_version(text, version):
    assert parse_version(text) == version


@pytest.mark.parametrize("text", ["\u00b2", "\u0663"], ids=["superscript-two", "arabic-three"])
def test_parse_version_rejects_non_ascii_digits(text):
    assert parse_version(text) is None


# -- model names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mlp", "resnet-50", "a.b_c", "_private", "X", "9lives", "a" * 128]
)
def test_check_model_name_accepts_safe_names(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "../x", "..", "a/b", "a\\b", ".hidden", "-flag", "a..b", "a b", "é", "a" * 129, "a\x00"],
    ids=[
        "empty",
        "parent",
        "dotdot",
        "slash",
        "backslash",
        "hidden",
        "dash-first",
        "inner-dotdot",
        "space",
        "non-ascii",
        "too-long",
        "nul",
    ],
)
def test_check_model_name_rejects_unsafe_names(name):
    with pytest.raises(InvalidArgument, match="invalid model name"):
        check_model_name(name)


def test_check_model_name_rejects_trailing_newline():
    with pytest.raises(InvalidArgument):
        check_model_name("abc\n")


# -- Repository -----------------------------------------------------------------------


def make_repo(root: Path, layout: dict[str, str | None]) -> Repository:
    """Directories (value None) and files (value = text) under root."""
    for rel, text in layout.items():
        path = root / rel
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return Repository(Settings(model_repository=root))


def test_scan_lists_model_directories_only(tmp_path):
    repo = make_repo(
        tmp_path,
        {
            "mlp/1": None,
            "simple/1": None,
            "simple/config.pbtxt": "max_batch_size: 8",
            "empty": None,
            ".git/1": None,
            "bad name/1": None,
            "README.md": "not a model",
        },
    )
    assert repo.scan() == ["empty", "mlp", "simple"]
    assert repo.names == ["empty", "mlp", "simple"]


def test_entry_reads_versions_and_config(tmp_path):
    repo = make_repo(
        tmp_path,
        {
            "m/1": None,
            "m/3": None,
            "m/12": None,
            "m/latest": None,
            "m/7": "a file, not a version",
            "m/config.pbtxt": "max_batch_size: 8\nversion_policy: { latest: { num_versions: 2 } }",
        },
    )
    repo.scan()
    entry = repo.entry("m")
    assert entry.name == "m"
    assert entry.path == tmp_path / "m"
    assert entry.error == ""
    assert entry.config is not None
    assert entry.config.max_batch_size == 8
    assert entry.versions == (1, 3, 12)  # numeric order, not string order
    assert entry.servable == (3, 12)


def test_model_without_versions_has_nothing_servable(tmp_path):
    repo = make_repo(tmp_path, {"empty": None})
    repo.scan()
    entry = repo.entry("empty")
    assert entry.config == ModelConfig(name="empty")
    assert entry.versions == ()
    assert entry.servable == ()


def test_config_is_read_lazily_and_bad_config_sets_error(tmp_path):
    repo = make_repo(tmp_path, {"good/1": None, "bad_config/1": None})
    assert repo.scan() == ["bad_config", "good"]
    # written after the scan: the scan has not read any config yet
    (tmp_path / "bad_config" / "config.pbtxt").write_text("max_batch_size: 4\nfoo: 1\n")
    entry = repo.entry("bad_config")
    assert entry.config is None
    assert '"foo"' in entry.error
    assert entry.versions == (1,)
    assert entry.servable == ()  # no policy without a config
    assert repo.entry("good").config == ModelConfig(name="good")


def test_entry_is_cached_between_scans(tmp_path):
    repo = make_repo(tmp_path, {"m/1": None})
    repo.scan()
    first = repo.entry("m")
    (tmp_path / "m" / "2").mkdir()
    assert repo.entry("m") is first
    assert first.versions == (1,)


def test_rescan_rereads_config_and_versions(tmp_path):
    repo = make_repo(tmp_path, {"m/1": None})
    repo.scan()
    assert repo.entry("m").versions == (1,)
    (tmp_path / "m" / "2").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: 2")
    repo.scan()
    entry = repo.entry("m")
    assert entry.versions == (1, 2)
    assert entry.config is not None
    assert entry.config.max_batch_size == 2


def test_rescan_forgets_removed_models(tmp_path):
    repo = make_repo(tmp_path, {"a/1": None, "b/1": None})
    repo.scan()
    repo.entry("a")
    (tmp_path / "a" / "1").rmdir()
    (tmp_path / "a").rmdir()
    assert repo.scan() == ["b"]
    with pytest.raises(NotFound):
        repo.entry("a")


def test_version_directories_must_be_positive_without_leading_zero(tmp_path):
    repo = make_repo(tmp_path, {"m/0": None, "m/01": None, "m/1": None, "m/2": None})
    repo.scan()
    assert repo.entry("m").versions == (1, 2)


def test_odd_version_directory_name_does_not_break_the_model(tmp_path):
    repo = make_repo(tmp_path, {"m/1": None, "m/\u00b2": None})
    repo.scan()
    assert repo.entry("m").versions == (1,)


def test_entry_of_unknown_model_is_not_found(tmp_path):
    repo = make_repo(tmp_path, {"m/1": None})
    repo.scan()
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        repo.entry("nope")


def test_entry_before_scan_is_not_found(tmp_path):
    repo = make_repo(tmp_path, {"m/1": None})
    with pytest.raises(NotFound):
        repo.entry("m")


def test_scan_of_missing_repository_is_not_found(tmp_path):
    repo = Repository(Settings(model_repository=tmp_path / "missing"))
    with pytest.raises(NotFound, match="is not a directory"):
        repo.scan()


def test_loader_points_at_the_version_file_with_config_options(tmp_path):
    repo = make_repo(tmp_path, {"m/2": None})
    repo.scan()
    config = parse(
        'default_model_filename: "net.onnx"\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "2" } }',
        "m",
    )
    loader = repo.loader(ModelId("m", 2), config, Settings(model_repository=Path("m")))
    assert isinstance(loader, OnnxLoader)
    assert loader.path == tmp_path / "m" / "2" / "net.onnx"
    assert loader.options.intra_op_threads == 2


# -- dynamic batching policy -----------------------------------------------------------

BATCH_IO = ([TensorSpec("INPUT0", "FP32", (-1, 16))], [TensorSpec("OUTPUT0", "FP32", (-1, 4))])


def test_batch_policy_reads_triton_dynamic_batching_and_queue_policy():
    config = parse(
        "max_batch_size: 16\n"
        "dynamic_batching { preferred_batch_size: [ 8, 4 ] max_queue_delay_microseconds: 250\n"
        "  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 5000\n"
        "    allow_timeout_override: true max_queue_size: 7 } }\n"
        "instance_group [ { count: 2 kind: KIND_CPU } ]"
    )
    policy = config.completed(*BATCH_IO, 64).batch_policy(default_queue_size=1024)
    assert policy == BatchPolicy(
        max_batch_size=16, preferred=(4, 8), max_delay_s=0.00025, max_queue_size=7,
        timeout_s=0.005, delay_on_timeout=True, allow_timeout_override=True, instances=2,
    )  # fmt: skip
    assert policy.target_rows == 4


def test_batch_policy_defaults_follow_triton_except_the_bounded_queue():
    empty = parse("max_batch_size: 8\ndynamic_batching { }").completed(*BATCH_IO, 64)
    policy = empty.batch_policy(default_queue_size=99)
    assert (policy.max_queue_size, policy.timeout_s, policy.max_delay_s) == (99, 0.0, 0.0)
    assert policy.delay_on_timeout is False and policy.target_rows == 8
    # no queue policy at all: a request's own timeout is honoured
    assert policy.allow_timeout_override is True
    # a queue policy that does not allow it (Triton's default) keeps the request's out
    strict = parse("max_batch_size: 8\ndynamic_batching { default_queue_policy { } }")
    assert strict.completed(*BATCH_IO, 64).batch_policy(99).allow_timeout_override is False


@pytest.mark.parametrize(
    "text",
    ["max_batch_size: 8", "max_batch_size: 0\ndynamic_batching { }", "dynamic_batching { }"],
    ids=["no-dynamic-batching", "max-batch-0", "max-batch-unset"],
)
def test_no_batch_policy_without_dynamic_batching_or_a_batch_dimension(text):
    done = parse(text).completed([TensorSpec("INPUT0", "FP32", (3,))], [], 64)
    assert done.batch_policy(1024) is None


def test_an_explicit_max_batch_size_0_is_kept_for_a_model_that_could_batch():
    # proto3 cannot tell "max_batch_size: 0" from no value; the text can
    done = parse("max_batch_size: 0\ndynamic_batching { }").completed(*BATCH_IO, 64)
    assert done.max_batch_size == 0 and done.batch_policy(1024) is None
    assert parse("dynamic_batching { }").completed(*BATCH_IO, 64).max_batch_size == 64


@pytest.mark.parametrize("sizes", ["[ 0 ]", "[ 4, 9 ]"])
def test_preferred_batch_size_outside_1_to_max_is_invalid_argument(sizes):
    config = parse(f"max_batch_size: 8\ndynamic_batching {{ preferred_batch_size: {sizes} }}")
    with pytest.raises(InvalidArgument, match="preferred_batch_size"):
        config.completed(*BATCH_IO, 64).batch_policy(1024)


def test_server_default_batches_only_models_without_a_config_file():
    done = ModelConfig(name="m").completed(*BATCH_IO, 64, default_batching=True)
    assert done.dynamic_batching == {} and done.source["dynamic_batching"] == {}
    assert done.batch_policy(1024) is not None
    with_file = parse("max_batch_size: 8").completed(*BATCH_IO, 64, default_batching=True)
    assert with_file.batch_policy(1024) is None
    off = ModelConfig(name="m").completed(*BATCH_IO, 64, default_batching=False)
    assert off.batch_policy(1024) is None and "dynamic_batching" not in off.source


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "a/b.onnx", "..", "x\\\\y"])
def test_default_model_filename_must_be_a_plain_file_name(name):
    with pytest.raises(InvalidArgument, match="plain file name"):
        parse(f'default_model_filename: "{name}"')
