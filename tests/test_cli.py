"""The command line: sizes, flags -> Settings, and `python -m fleetserve serve --help`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fleetserve.server.cli import build_parser, parse_size, settings_from_args
from fleetserve.server.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("0", 0),
        ("512b", 512),
        ("64MiB", 64 * 1024**2),
        ("64mib", 64 * 1024**2),
        ("64MB", 64 * 1000**2),
        ("64M", 64 * 1000**2),
        ("1.5GB", 1_500_000_000),
        ("4gib", 4 * 1024**3),
        ("4GiB", 4 * 1024**3),
        ("2KiB", 2048),
        ("2k", 2000),
        ("1TiB", 1024**4),
        (" 8 MiB ", 8 * 1024**2),
        ("0.5KiB", 512),
    ],
)
def test_parse_size_accepts_human_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    ["", "MiB", "-1", "-1MiB", "1e6", "1,000", "12 parsecs", "1.5.2GB", "0x10", "4 GiB B", ".5GB"],
)
def test_parse_size_rejects_bad_strings(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)


def test_bad_size_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(
            ["serve", "--model-repository", "m", "--max-request-size", "lots"]
        )
    assert exit_.value.code == 2
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_defaults_map_to_default_settings():
    args = build_parser().parse_args(["serve", "--model-repository", "models"])
    assert args.command == "serve"
    assert settings_from_args(args) == Settings(model_repository=Path("models"))


def test_every_flag_maps_to_its_setting():
    args = build_parser().parse_args(
        [
            "serve",
            "--model-repository", "/srv/models",
            "--host", "127.0.0.1",
            "--http-port", "9000",
            "--grpc-port", "9001",
            "--metrics-port", "-1",
            "--max-request-size", "8MiB",
            "--default-max-batch-size", "16",
            "--dynamic-batching",
            "--max-queue-size", "77",
            "--run-threads", "6",
            "--load-threads", "3",
            "--intra-op-threads", "2",
            "--inline-run-us", "12.5",
            "--shutdown-timeout", "4.5",
            "--log-level", "debug",
        ]
    )  # fmt: skip
    assert settings_from_args(args) == Settings(
        model_repository=Path("/srv/models"),
        host="127.0.0.1",
        http_port=9000,
        grpc_port=9001,
        metrics_port=-1,
        max_request_bytes=8 * 1024**2,
        default_max_batch_size=16,
        dynamic_batching=True,
        max_queue_size=77,
        run_threads=6,
        load_threads=3,
        intra_op_threads=2,
        inline_run_us=12.5,
        shutdown_timeout_s=4.5,
        log_level="DEBUG",
        metrics_max_models=Settings().metrics_max_models,
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["serve"],
        ["serve", "--model-repository", "m", "--http-port", "eighty"],
        ["serve", "--model-repository", "m", "--no-such-flag"],
        ["launch", "--model-repository", "m"],
        ["serve", "--model-repository", "m", "--max-queue-size", "0"],
    ],
    ids=[
        "no-command",
        "no-repository",
        "bad-int",
        "unknown-flag",
        "unknown-command",
        "unbounded-queue",
    ],
)
def test_bad_command_lines_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "usage: fleetserve" in capsys.readouterr().err


def test_serve_help_runs_as_a_module_and_lists_the_flags():
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve", "serve", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fleetserve serve")
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--shutdown-timeout"):
        assert flag in result.stdout
    assert result.stderr == ""
