"""Settings: one declaration read from flags, FLEETSERVE_* variables and a TOML file.

In-process tables of settings.load (the real-process checks are in test_cli.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fleetserve.server import settings
from fleetserve.server.cli import build_parser
from fleetserve.server.eviction import POLICIES
from fleetserve.server.settings import Settings, SettingsError
from fleetserve.server.sinks import SINKS

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in os.environ:
        if name.upper().startswith("FLEETSERVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def load(*flags: str, environ: dict[str, str] | None = None) -> Settings:
    """settings.load as `fleetserve serve FLAGS` with these FLEETSERVE_* variables."""
    parser, cli = build_parser(["serve"])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (environ or {}).items():
            patch.setenv(name, value)
        return settings.load(cli, parser.parse_args(["serve", *flags]))


def test_defaults_are_the_declared_ones():
    assert load("--model-repository", "models") == Settings(model_repository=Path("models"))
    assert Settings(model_repository=Path("m")).max_request_size == 64 * 1024**2


def test_every_option_is_a_flag_an_env_var_and_a_file_key(tmp_path):
    """One value per option, given each way: all three ways reach the same field."""
    values = {
        "host": ("127.0.0.1", "127.0.0.1"),
        "http_port": ("9000", 9000),
        "grpc_port": ("-1", -1),
        "max_request_size": ("8MiB", 8 * 1024**2),
        "dynamic_batching": ("true", True),
        "feedback_retention": ("7d", 7 * 86400.0),
        "feedback_sample_rate": ("0.25", 0.25),
        "feedback_when_full": ("block", "block"),
        "eviction_policy": ("cost", "cost"),
        "log_level": ("warning", "WARNING"),
        "log_format": ("json", "json"),
        "inline_run_us": ("12.5", 12.5),
        "shutdown_timeout": ("4.5", 4.5),
    }
    flags = [f"--{k.replace('_', '-')}={v}" for k, (v, _) in values.items() if v != "true"]
    flags += ["--dynamic-batching"]
    by_flag = load("--model-repository", "m", *flags)
    env = {f"FLEETSERVE_{k.upper()}": v for k, (v, _) in values.items()}
    by_env = load(environ={**env, "FLEETSERVE_MODEL_REPOSITORY": "m"})
    config = tmp_path / "fleetserve.toml"
    config.write_text(
        'model_repository = "m"\n' + "".join(f'{k} = "{v}"\n' for k, (v, _) in values.items())
    )
    by_file = load("--config", str(config))
    for key, (_, expected) in values.items():
        assert getattr(by_flag, key) == getattr(by_env, key) == getattr(by_file, key) == expected


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("0", 0), ("64MiB", 64 * 1024**2), ("64mib", 64 * 1024**2),
     ("64MB", 64 * 1000**2), ("1.5GB", 1_500_000_000), ("4GiB", 4 * 1024**3),
     (" 8 MiB ", 8 * 1024**2)],
)  # fmt: skip
def test_sizes_as_the_readme_writes_them(text, size):
    assert load("--model-repository", "m", "--max-loaded-bytes", text).max_loaded_bytes == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("90s", 90), ("45m", 2700), ("12h", 43200), ("7d", 604800)],
)
def test_durations_as_the_readme_writes_them(text, seconds):
    assert load("--model-repository", "m", "--feedback-retention", text).feedback_retention == (
        seconds
    )


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        'model_repository = "from-file"\nhttp_port = 1\ngrpc_port = 2\nmetrics_port = 3\n'
    )
    env = {
        "FLEETSERVE_CONFIG": str(config),
        "FLEETSERVE_HTTP_PORT": "10",
        "FLEETSERVE_GRPC_PORT": "20",
    }
    options = load("--http-port", "100", environ=env)
    assert (options.http_port, options.grpc_port, options.metrics_port) == (100, 20, 3)
    assert options.model_repository == Path("from-file")
    assert options.host == "0.0.0.0"  # nobody set it


def test_config_flag_beats_its_env_var(tmp_path):
    (tmp_path / "a.toml").write_text('model_repository = "a"\n')
    (tmp_path / "b.toml").write_text('model_repository = "b"\n')
    env = {"FLEETSERVE_CONFIG": str(tmp_path / "a.toml")}
    assert load("--config", str(tmp_path / "b.toml"), environ=env).model_repository == Path("b")


def test_admin_token_and_its_file_are_one_option(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(" from-file \n")
    env = {"FLEETSERVE_ADMIN_TOKEN": " from-env "}
    repo = ("--model-repository", "m")
    assert load(*repo, environ=env).admin_token == "from-env"
    # a flag beats the environment, though the two spell the option differently
    assert load(*repo, "--admin-token-file", str(token_file), environ=env).admin_token == (
        "from-file"
    )
    config = tmp_path / "c.toml"
    config.write_text(f'admin_token_file = "{token_file}"\n')
    assert load(*repo, "--config", str(config), environ=env).admin_token == "from-env"
    assert load(*repo).admin_token is None
    assert "from-env" not in repr(load(*repo, environ=env))  # never printed


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        ((), {}, "--model-repository is required (or FLEETSERVE_MODEL_REPOSITORY"),
        (("--http-port", "eighty"), {}, "--http-port 'eighty': input should be a valid integer"),
        (("--http-port", "70000"), {}, "--http-port '70000': input should be less than"),
        (("--max-request-size", "lots"), {}, "--max-request-size 'lots': could not parse"),
        (("--max-loaded-bytes", "4 parsecs"), {}, "could not interpret byte unit: parsecs"),
        (("--feedback-retention", "a week"), {}, "--feedback-retention 'a week': not a duration"),
        (
            ("--feedback-sample-rate", "1.5"),
            {},
            "--feedback-sample-rate '1.5': input should be less",
        ),
        (
            ("--feedback-when-full", "wait"),
            {},
            "--feedback-when-full 'wait': input should be 'drop'",
        ),
        (("--eviction-policy", "fifo"), {}, "--eviction-policy 'fifo': must be one of lru, cost"),
        (("--feedback-sink", "kafka"), {}, "must be one of sqlite, none"),
        (("--log-level", "loud"), {}, "--log-level 'loud': input should be 'DEBUG', 'INFO'"),
        (("--max-queue-size", "0"), {}, "--max-queue-size '0': input should be greater than"),
        ((), {"FLEETSERVE_RUN_THREADS": "x"}, "FLEETSERVE_RUN_THREADS='x': input should be"),
        ((), {"FLEETSERVE_HTTP_PROT": "1"}, "unknown environment variable(s) FLEETSERVE_HTTP_PROT"),
        (
            (),
            {"FLEETSERVE_HTP_PORT": "9000"},
            "unknown environment variable(s) FLEETSERVE_HTP_PORT",
        ),
        ((), {"FLEETSERVE_GRPC_PORT": "tcp://10.0.0.9:8001"}, "Kubernetes service link"),
        (("--admin-token-file", "/no/such/token"), {}, "cannot read admin_token_file /no/such"),
        (("--config", "/no/such.toml"), {}, "config file /no/such.toml: not a file"),
        (("--admin-token", "s3cret"), {}, "--admin-token: a command line is visible"),
    ],
)
def test_bad_values_are_one_message_naming_where_they_came_from(flags, environ, message):
    repo = () if not flags and not environ else ("--model-repository", "m")
    with pytest.raises(SettingsError) as error:
        load(*repo, *flags, environ=environ)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_file_errors_name_the_file_and_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('model_repository = "m"\nhttp_prot = 1\nmax_loaded_bytes = "lots"\n')
    with pytest.raises(SettingsError) as error:
        load("--config", str(config))
    assert f"{config}: http_prot: unknown key" in str(error.value)
    assert f"{config}: max_loaded_bytes = 'lots'" in str(error.value)
    config.write_text("http_port = \n")
    with pytest.raises(SettingsError, match=f"config file {re.escape(str(config))}: Invalid"):
        load("--config", str(config))


def test_other_commands_variables_and_kubernetes_service_links_are_not_unknown():
    environ = {
        "FLEETSERVE_URL": "http://127.0.0.1:8000",  # the admin CLI's
        "FLEETSERVE_ADMIN_TOKEN": "t",  # an option
        "FLEETSERVE_SERVICE_HOST": "10.0.0.9",  # a Service named fleetserve
        "FLEETSERVE_SERVICE_PORT_HTTP": "8000",
        "FLEETSERVE_PORT": "tcp://10.0.0.9:8000",
        "FLEETSERVE_CANARY_PORT": "tcp://10.0.0.10:8000",
        "FLEETSERVE_PORT_8000_TCP_ADDR": "10.0.0.9",
        "FLEETSERVE_CANARY_SERVICE_HOST": "10.0.0.10",  # a Service named fleetserve-canary
        "FLEETSERVE_MODEL_REPOSITORY": "m",
    }
    assert load(environ=environ).admin_token == "t"


def test_verbose_is_tritons_name_for_debug():
    assert load("--model-repository", "m", "--log-level", "verbose").log_level == "DEBUG"


def test_name_options_list_every_registered_name():
    """eviction_policy and feedback_sink check names against the registries themselves."""
    for policy in POLICIES:
        assert load("--model-repository", "m", "--eviction-policy", policy).eviction_policy
    for sink in [*SINKS, "none"]:
        assert load("--model-repository", "m", "--feedback-sink", sink).feedback_sink == sink


def test_readme_table_is_the_declaration():
    """The README's "Command line" table is generated from the declaration: no option is
    missing, none is stale, every default and env var is the declared one."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    table = settings.options_table()
    assert "\n".join(rows) + "\n" == table, (
        "README.md's options table differs from the declaration; paste the output of\n"
        "  python -c 'from fleetserve.server.settings import options_table; "
        'print(options_table(), end="")\'\n' + table
    )
    for key in Settings.model_fields:
        assert f"`FLEETSERVE_{key.upper()}`" in table
