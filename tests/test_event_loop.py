"""Which event loop serves: uvloop by default where installed, asyncio on request or where
uvloop is missing; the choice is in the startup log and the fleetserve_build_info metric."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import urllib.request
from pathlib import Path

import pytest

from fleetserve.loaders import testing
from tests.server_process import Server, environment, run

ARGS = ("--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0")
# a path entry that makes `import uvloop` fail, as on a platform without its wheel
NO_UVLOOP = "import sys; sys.modules['uvloop'] = None"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    testing.write_model(root, "mlp", testing.mlp(seed=1))
    return root


def build_info(metrics_port: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("fleetserve_build_info{"))
    return dict(re.findall(r'(\w+)="([^"]*)"', line))


def serve_and_read(repo: Path, *argv: str, env: dict[str, str] | None = None):
    with Server("--model-repository", str(repo), *ARGS, *argv, env=env) as server:
        metrics_port = server.wait_ready()[2]
        info = build_info(metrics_port)
    logged = [line for line in server.lines if " on event loop " in line]
    return info, logged


def test_uvloop_serves_by_default_and_says_so(repo):
    version = importlib.metadata.version("uvloop")
    info, logged = serve_and_read(repo)
    assert info == {
        "version": importlib.metadata.version("fleetserve"),
        "event_loop": "uvloop",
        "event_loop_version": version,
    }
    assert len(logged) == 1 and logged[0].endswith(f"on event loop uvloop {version}"), logged


def test_the_installed_uvloop_is_within_the_declared_range():
    """pyproject keeps uvloop below 0.23 (its write path costs 1.3-1.5x the CPU per REST
    request); what the test extra installed must be what users get."""
    major, minor = map(int, importlib.metadata.version("uvloop").split(".")[:2])
    assert (0, 21) <= (major, minor) < (0, 23)


def test_asyncio_on_request(repo):
    info, logged = serve_and_read(repo, "--event-loop", "asyncio")
    assert (info["event_loop"], info["event_loop_version"]) == (
        "asyncio",
        platform.python_version(),
    )
    assert logged[0].endswith(f"on event loop asyncio {platform.python_version()}"), logged


def test_without_uvloop_auto_falls_back_to_asyncio_and_uvloop_is_refused(repo, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_UVLOOP + "\n")
    env = environment(PYTHONPATH=str(tmp_path))
    info, _ = serve_and_read(repo, env=env)
    assert info["event_loop"] == "asyncio"
    result = run("serve", "--model-repository", str(repo), *ARGS, "--event-loop", "uvloop",
                 env=env)  # fmt: skip
    assert result.returncode == 2
    assert "uvloop is not installed" in result.stderr and "Traceback" not in result.stderr
