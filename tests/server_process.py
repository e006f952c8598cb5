"""`python -m fleetserve ...` as a real process, its stderr read line by line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"fleetserve ready: http \S+:(\d+) grpc \S+:(\d+) metrics \S+:(\d+)")


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without FLEETSERVE_* variables, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEETSERVE_")}
    return {**env, **variables}


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m fleetserve ARGV` to its end."""
    return subprocess.run(
        [sys.executable, "-m", "fleetserve", *argv], cwd=REPO_ROOT, env=env or environment(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


class Server:
    """`python -m fleetserve serve ARGV` in the background; stop() ends it (SIGTERM)."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetserve", "serve", *argv], cwd=REPO_ROOT,
            env=env or environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.ports: tuple[int, int, int] | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match and self.ports is None:
                self.ports = (int(match[1]), int(match[2]), int(match[3]))
                self._ready.set()
        self._ready.set()  # stderr closed: the process ended

    def wait_ready(self, timeout: float = 60) -> tuple[int, int, int]:
        if not self._ready.wait(timeout) or self.ports is None:
            self.stop()
            raise AssertionError("server not ready:\n" + "\n".join(self.lines))
        return self.ports

    def wait(self, timeout: float = 60) -> int:
        """The exit status of a process that ends by itself, once its lines are read."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status once every line has been read."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
