"""Server settings, declared once: each field is a flag, a FLEETSERVE_* variable and a
key of the optional TOML config file, with one precedence rule: flag > env > file >
default.

pydantic-settings reads the three sources (its CLI, environment and TOML sources) and
pydantic validates the merged values once, so a bad value from any source is one
message naming where it came from. `Settings(...)` itself reads nothing: only `load`
looks at the command line, the environment and the file.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ByteSize,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    CliSuppress,
    EnvSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fleetserve.server.eviction import POLICIES
from fleetserve.server.sinks import SINKS
from fleetserve.server.types import DEFAULT_DATA_DIR

ENV_PREFIX = "FLEETSERVE_"
CONFIG_ENV = "FLEETSERVE_CONFIG"
# FLEETSERVE_* variables that are not server options but must not stop it: the admin
# CLI's address (its token is the admin_token option), and the variables Kubernetes
# sets for a Service named fleetserve[-...] in every pod of its namespace (NAME_PORT
# only with its tcp:// value, so a misspelt *_PORT option is still caught)
OTHER_ENV = re.compile(
    r"FLEETSERVE_(URL|(\w+_)?(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?))"
)
SERVICE_LINK_PORT = re.compile(r"FLEETSERVE_(\w+_)?PORT=(tcp|udp|sctp)://.*")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class SettingsError(ValueError):
    """A bad option: the message names the option and where its value came from."""


def _duration(value: Any) -> Any:
    """Seconds from 3600, "90s", "45m", "12h" or "7d"."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", value)
    if not match:
        raise PydanticCustomError("duration", "not a duration (e.g. 7d, 12h, 45m, 3600)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _log_level(value: Any) -> Any:
    """Any case; Triton's "verbose" is our DEBUG."""
    if not isinstance(value, str):
        return value
    value = value.strip().upper()
    return "DEBUG" if value == "VERBOSE" else value


def _one_of(*names: Mapping[str, Any] | str) -> AfterValidator:
    """A name in these registries (read when validating: plugins may add names)."""

    def check(value: str) -> str:
        known = [n for group in names for n in ([group] if isinstance(group, str) else group)]
        if value not in known:
            raise PydanticCustomError("name", "must be one of {names}", {"names": ", ".join(known)})
        return value

    return AfterValidator(check)


class Size(ByteSize):
    """Bytes, written 512, 64MiB, 4GiB or 1.5GB (pydantic's ByteSize); shown as 64MiB."""

    def __str__(self) -> str:
        for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if self and self % factor == 0:
                return f"{self // factor}{unit}"
        return int.__repr__(self)


# held as a plain int: a Size would print as "64MiB" in messages that say "bytes"
Bytes = Annotated[Size, Field(ge=0), AfterValidator(int)]
Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
Port = Annotated[int, Field(ge=-1, le=65535)]


class Settings(BaseSettings):
    """Server-wide options. The descriptions are the --help text and the README table."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        validate_default=True,
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_show_env_vars=True,
    )

    model_repository: Path = Field(description="Triton-layout model repository")
    host: str = Field("0.0.0.0", description="bind address of all three listeners")
    http_port: Port = Field(8000, description="REST port; 0 picks a free port")
    grpc_port: Port = Field(8001, description="gRPC port; 0 picks a free port, -1 turns gRPC off")
    grpc_max_concurrent_streams: int = Field(
        256,
        ge=1,
        le=2**31 - 1,
        description="requests one gRPC connection may have in flight (HTTP/2 streams); "
        "grpc-core counts a stream until its call is freed, so a client near the limit has "
        "some refused (UNAVAILABLE)",
    )
    metrics_port: Port = Field(
        8002, description="Prometheus port; 0 picks a free port, -1 turns metrics off"
    )
    max_request_size: Bytes = Field(
        Size(64 * 1024**2),
        description="largest request body (REST) or message (gRPC); larger is 400 / "
        "RESOURCE_EXHAUSTED",
    )
    default_max_batch_size: int = Field(
        64,
        ge=0,
        description="max_batch_size given to a model without config.pbtxt whose inputs and "
        "outputs all have a variable first dimension",
    )
    dynamic_batching: bool = Field(
        False,
        description="batch requests to models that have no config.pbtxt (as "
        "dynamic_batching {}); models with a config batch when their config says so",
    )
    max_queue_size: int = Field(
        1024,
        ge=1,
        description="requests a batching model version may queue when its config sets no "
        "max_queue_size (and requests a version that does not batch may have waiting for "
        "or holding a run thread); more get 503 / UNAVAILABLE",
    )
    max_loaded_bytes: Bytes = Field(
        Size(0),
        description="memory budget for loaded models, e.g. 4GiB (0: no limit); idle models "
        "are evicted to make room, a model larger than the whole budget is 507 / "
        "RESOURCE_EXHAUSTED",
    )
    max_loaded_models: int = Field(
        0, ge=0, description="most model versions loaded at once (0: no limit)"
    )
    eviction_policy: Annotated[str, _one_of(POLICIES)] = Field(
        "lru", description="which idle models make room: lru, or cost (reload cost per byte)"
    )
    reload_policy: Literal["availability", "resources"] = Field(
        "availability",
        description="how a loaded version reloads (TF Serving's two policies): availability "
        "loads the new copy beside the old one, which serves until it is ready (room for "
        "two copies); resources drains and frees the old copy first (room for one; its "
        "requests wait for the new copy)",
    )
    preload: bool = Field(
        False, description="load every servable version at startup (default: on first use)"
    )
    repository_poll_secs: float = Field(
        0,
        ge=0,
        description="rescan the model repository this often to find new, changed or removed "
        "models (0: only on index / load calls); a rescan never unloads a model",
    )
    run_threads: int = Field(2, ge=1, description="threads running models")
    load_threads: int = Field(
        2,
        ge=1,
        description="threads loading models: their file reads overlap, their loads in memory "
        "take turns (each is measured alone)",
    )
    intra_op_threads: int = Field(
        1,
        ge=1,
        description="onnxruntime threads per run, unless the model's config sets "
        "intra_op_thread_count",
    )
    inline_run_us: float | None = Field(
        None,
        ge=0,
        description="models whose warm run is faster than this run on the event loop "
        "(default: the measured cost of a hop to the run pool)",
    )
    shutdown_timeout: float = Field(
        30, ge=0, description="seconds in-flight requests get to finish on SIGTERM / SIGINT"
    )
    http_header_timeout: float = Field(
        60,
        gt=0,
        description="seconds a REST request's headers may take from their first byte; "
        "then 408 and the connection closes (nginx's client_header_timeout)",
    )
    http_body_timeout: float = Field(
        60,
        gt=0,
        description="seconds a REST request's body may pause between two reads; then 408 "
        "and the connection closes (nginx's client_body_timeout)",
    )
    http_keepalive_timeout: float = Field(
        75,
        gt=0,
        description="seconds an idle REST connection stays open for its next request (or "
        "its first); keep it above the idle timeout of a load balancer in front (nginx's "
        "keepalive_timeout)",
    )
    admin_token_file: Path | None = Field(
        None,
        description="file holding the bearer token of the admin API and repository control "
        "(or give the token itself as FLEETSERVE_ADMIN_TOKEN); without a token they answer "
        "loopback clients only",
    )
    # the token itself: from the environment or the config file, never a flag (a command
    # line is visible to every user of the machine)
    admin_token: CliSuppress[str | None] = Field(
        None, repr=False, description="the admin token itself (not a flag)"
    )
    data_dir: Path | None = Field(
        None, description="where routing state is kept (default: MODEL_REPOSITORY/.fleetserve)"
    )
    max_upload_size: Bytes = Field(
        Size(4 * 1024**3), description="largest model file the admin API accepts"
    )
    feedback_sample_rate: float = Field(
        0,
        ge=0,
        le=1,
        description="share of predictions logged to the feedback sink, 0..1 (a model's "
        "feedback_sample_rate parameter overrides it)",
    )
    feedback_sink: Annotated[str, _one_of(SINKS, "none")] = Field(
        "sqlite", description="sqlite (in the data dir) or none"
    )
    feedback_flush_secs: float = Field(
        0.5,
        gt=0,
        description="the sink commits at least this often: at most this much is lost if the "
        "process is killed",
    )
    feedback_buffer: int = Field(10_000, ge=1, description="records buffered for the sink")
    feedback_when_full: Literal["drop", "block"] = Field(
        "drop",
        description="a full buffer drops records (counted) or makes requests wait up to one "
        "flush interval",
    )
    feedback_fsync: bool = Field(
        False, description="commit with fsync: survive power loss, not only a killed process"
    )
    feedback_retention: Duration = Field(
        0, description="drop records older than this, e.g. 7d, 12h, 3600 (0: keep them)"
    )
    feedback_max_size: Bytes = Field(
        Size(0), description="drop the oldest records past this size, e.g. 10GiB (0: no limit)"
    )
    metrics_max_models: int = Field(
        100, ge=0, description="models with metric labels of their own; later ones share other"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="asyncio event loop: uvloop (auto: when installed, as it is on Linux and "
        "macOS) or asyncio's own",
    )
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_log_level)
    ] = Field(
        "INFO", description="DEBUG (or Triton's VERBOSE), INFO, WARNING or ERROR, in any case"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text, or json: one object per line with time, level, logger, message "
        "and the record's extra fields",
    )
    access_log: bool = Field(
        False,
        description="log one line per inference request (logger fleetserve.access): request "
        "id, model, version, protocol, status, duration",
    )

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls: type[BaseSettings], init_settings: Any, **_: Any
    ) -> tuple[Any, ...]:
        return (init_settings,)  # Settings(...) takes its arguments only; `load` reads the rest

    @model_validator(mode="before")
    @classmethod
    def _read_token_file(cls, data: Any) -> Any:
        """The admin token from admin_token_file (stripped), else admin_token, else None."""
        if not isinstance(data, dict):
            return data
        path, token = data.get("admin_token_file"), data.get("admin_token")
        if path is not None:
            if token is not None:
                raise PydanticCustomError("token", "give admin_token or admin_token_file, not both")
            try:
                token = Path(path).read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise PydanticCustomError(
                    "token", "cannot read admin_token_file {path}: {error}",
                    {"path": str(path), "error": str(exc)},
                ) from None  # fmt: skip
            if not token:
                raise PydanticCustomError("token", "admin_token_file {path} is empty",
                                          {"path": str(path)})  # fmt: skip
        elif isinstance(token, str):
            token = token.strip() or None
        return {**data, "admin_token": token}

    @property
    def state_dir(self) -> Path:
        return self.data_dir or self.model_repository / DEFAULT_DATA_DIR


def add_arguments(parser: argparse.ArgumentParser) -> CliSettingsSource[Settings]:
    """Give `parser` a flag for every option (and --config); returns the CLI source."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"TOML file of options, keyed by option name (env var: {CONFIG_ENV})",
    )  # fmt: skip
    return CliSettingsSource(Settings, root_parser=parser)


def load(cli: CliSettingsSource[Settings], args: argparse.Namespace) -> Settings:
    """Settings from flags > FLEETSERVE_* variables > config file > defaults."""
    environ = os.environ
    fields = Settings.model_fields
    unknown = [
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() != CONFIG_ENV
        and name.upper()[len(ENV_PREFIX) :].lower() not in fields
        and not OTHER_ENV.fullmatch(name.upper())
        and not SERVICE_LINK_PORT.fullmatch(f"{name.upper()}={environ[name]}")
    ]
    if unknown:
        raise SettingsError(f"unknown environment variable(s) {', '.join(sorted(unknown))}")
    flags = cli(parsed_args=args)()
    if "admin_token" in flags:  # CliSuppress hides it from --help only
        raise SettingsError(
            "--admin-token: a command line is visible to every user of the machine; give "
            f"the token in {ENV_PREFIX}ADMIN_TOKEN or a file (--admin-token-file)"
        )
    path = args.config or environ.get(CONFIG_ENV)
    sources: list[tuple[dict[str, Any], str]] = []  # lowest precedence first
    if path:
        sources.append((_read_file(Path(path)), f"{path}: {{key}} = {{value!r}}"))
    sources.append((EnvSettingsSource(Settings)(), "{env}={value!r}"))
    sources.append((flags, "{flag} {value!r}"))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for source, form in sources:
        if source.keys() & {"admin_token", "admin_token_file"}:  # one option, two spellings
            values.pop("admin_token", None)
            values.pop("admin_token_file", None)
        for key, value in source.items():
            values[key] = value
            shown = "<secret>" if key == "admin_token" else value  # never in a message
            origins[key] = form.format(
                key=key, value=shown, env=ENV_PREFIX + key.upper(), flag=_flag(key)
            )
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError("; ".join(_problem(e, origins) for e in exc.errors())) from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file {path}: not a file")
    try:
        return TomlConfigSettingsSource(Settings, toml_file=path)()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from None


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _problem(error: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    """One validation error as `where: what`."""
    key = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "missing":
        return f"{_flag(key)} is required (or {ENV_PREFIX}{key.upper()}, or {key} in --config)"
    if error["type"] == "extra_forbidden":
        return f"{origins[key].partition(' = ')[0]}: unknown key"
    where = origins.get(key) or ("admin_token" if error["type"] == "token" else key)
    hint = ""
    if error["type"].startswith("byte_size"):
        hint = " (e.g. 512KiB, 64MiB, 4GiB)"
    elif isinstance(error.get("input"), str) and error["input"].startswith("tcp://"):
        hint = " (a Kubernetes service link? set enableServiceLinks: false in the pod spec)"
    return f"{where}: {error['msg'][:1].lower()}{error['msg'][1:]}{hint}"


def options_table() -> str:
    """The README's table of options (tests/test_settings.py keeps it in sync)."""
    rows = [
        "| option | environment variable | default | meaning |",
        "|---|---|---|---|",
        f"| `--config FILE` | `{CONFIG_ENV}` | none | TOML file of options, keyed by option "
        "name (`http_port = 9000`) |",
    ]
    for key, field in Settings.model_fields.items():
        flag = "(not a flag)" if key == "admin_token" else f"`{_flag(key)}`"
        if field.is_required():
            default = "required"
        elif field.default is None:
            default = "none"
        elif isinstance(field.default, bool):
            default = "on" if field.default else "off"
        else:
            default = f"`{field.default}`"
        description = field.description or ""
        rows.append(f"| {flag} | `{ENV_PREFIX}{key.upper()}` | {default} | {description} |")
    return "\n".join(rows) + "\n"
