"""The command line as a user runs it (`python -m fleetserve`, real processes): the
version, bad options, a busy port, and where options come from."""

from __future__ import annotations

import importlib.metadata
import json
import socket
from pathlib import Path

import pytest

from fleetserve.loaders import testing
from fleetserve.server.settings import Settings
from tests.server_process import Server, environment, run


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    testing.write_model(root, "mlp", testing.mlp(seed=1))
    return root


def test_version_is_the_installed_distributions():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"fleetserve {importlib.metadata.version('fleetserve')}\n"


def test_serve_help_lists_every_option_with_its_variable():
    result = run("serve", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fleetserve serve") and result.stderr == ""
    for key in Settings.model_fields:
        if key != "admin_token":  # the token itself is never a flag
            assert f"--{key.replace('_', '-')}" in result.stdout
        assert f"FLEETSERVE_{key.upper()}" in result.stdout


BAD = [
    ([], {}, "", "fleetserve: error: the following arguments are required: command"),
    (["launch"], {}, "", "invalid choice: 'launch'"),
    (["serve"], {}, "", "--model-repository is required"),
    (["serve", "-m", "."], {}, "", "unrecognized arguments: -m"),
    (["serve", "--model-repository", ".", "--log-level", "loud"], {}, "",
     "--log-level 'loud': input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    (["serve", "--model-repository", ".", "--http-port", "eighty"], {}, "",
     "--http-port 'eighty': input should be a valid integer"),
    (["serve", "--model-repository", "."], {"FLEETSERVE_MAX_LOADED_BYTE": "4GiB"}, "",
     "unknown environment variable(s) FLEETSERVE_MAX_LOADED_BYTE"),
    (["serve"], {"FLEETSERVE_MODEL_REPOSITORY": ".", "FLEETSERVE_PRELOAD": "maybe"}, "",
     "FLEETSERVE_PRELOAD='maybe': input should be a valid boolean"),
    (["serve"], {}, 'model_repository = "."\nmax_loaded_byte = "4GiB"\n',
     "max_loaded_byte: unknown key"),
    (["serve"], {}, 'model_repository = "."\nmax_loaded_bytes = "4 parsecs"\n',
     "max_loaded_bytes = '4 parsecs': could not interpret byte unit: parsecs"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "env", "config", "message"), BAD)
def test_a_bad_option_is_one_line_and_exit_2(argv, env, config, message, tmp_path):
    if config:
        (tmp_path / "fleetserve.toml").write_text(config)
        argv = [*argv, "--config", str(tmp_path / "fleetserve.toml")]
    result = run(*argv, env=environment(**env))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize("listener", ["http", "grpc", "metrics"])
def test_a_busy_port_is_one_line_naming_it_and_exit_1(listener, repo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"http": "0", "grpc": "0", "metrics": "0", listener: str(port)}
        argv = [f"--{name}-port={value}" for name, value in ports.items()]
        with Server("--model-repository", str(repo), "--host", "127.0.0.1", *argv) as server:
            code = server.wait()
    assert code == 1, server.lines
    errors = [line for line in server.lines if "ERROR" in line or line.startswith("E")]
    assert len(errors) == 1, server.lines
    assert f"port {port} on 127.0.0.1: Address already in use" in errors[0]
    assert not any("Traceback" in line for line in server.lines)


def test_flag_beats_env_beats_file_beats_default_in_a_server(repo, tmp_path):
    config = tmp_path / "fleetserve.toml"
    config.write_text(
        f'model_repository = "{repo}"\nhost = "127.0.0.1"\n'
        'http_port = 1\ngrpc_port = 1\nmetrics_port = -1\nlog_format = "json"\n'
    )
    env = environment(
        FLEETSERVE_CONFIG=str(config),
        FLEETSERVE_HTTP_PORT="0",  # beats the file's 1
        FLEETSERVE_GRPC_PORT="2",  # loses to the flag
    )
    with Server("--grpc-port", "-1", env=env) as server:
        http_port, grpc_port, metrics_port = server.wait_ready()
    assert http_port not in (0, 1) and (grpc_port, metrics_port) == (0, 0), server.lines
    ready = next(json.loads(line) for line in server.lines if "fleetserve ready" in line)
    assert ready["message"].startswith("fleetserve ready: http 127.0.0.1:")  # file's host
