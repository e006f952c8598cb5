"""CI step: fleetserve as a user installs it, next to the newest `tritonclient[all]`.

In a fresh venv, ONE pip command installs fleetserve from this checkout (a wheel, not
editable) and `tritonclient[all]`. Then: tritonclient is the newest release on the index;
the distribution claims the one top-level name `fleetserve` and carries LICENSE;
`fleetserve serve` starts on free ports and answers one inference over HTTP and one over
gRPC from tritonclient, equal to onnxruntime's result; it stops cleanly on SIGTERM.

Run as `python3.11 .ci/install_check.py` after the README's test command: the model is
built with the checkout's `.venv` (it has onnx), the rest runs in the fresh venv.
Standard library only. Prints one line per check, then `install-check: N passed, N failed`.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_PYTHON = ROOT / ".venv" / "bin" / "python"
READY_LINE = re.compile(r"fleetserve ready: http \S+:(\d+) grpc \S+:(\d+)")
READY_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
PIP_TIMEOUT_S = 1200

BUILD_MODEL = """
import sys
from pathlib import Path
from fleetserve.loaders import testing
testing.write_model(Path(sys.argv[1]), "mlp", testing.mlp(seed=1))
"""

# Run with the fresh venv's python: what a user's client does, checked against onnxruntime.
INFER = """
import sys
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

model, http, grpc = sys.argv[1:4]
x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
expected = session.run(["OUTPUT0"], {"INPUT0": x})[0]
for name, mod, address in (("HTTP", httpclient, http), ("gRPC", grpcclient, grpc)):
    client = mod.InferenceServerClient(address)
    try:
        tensor = mod.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("mlp", [tensor]).as_numpy("OUTPUT0")
    finally:
        client.close()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    print(f"{name} inference: OUTPUT0 {got.shape} equals onnxruntime's")
"""


class Failed(Exception):
    """A check failed; the message says what was seen."""


def run(cmd: list[str], timeout: float, **kwargs: object) -> str:
    """Run a command; its output, or Failed with the output's tail."""
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,  # type: ignore[arg-type]
        )
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{cmd[0]} ... timed out after {timeout} s") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise Failed(f"exit {result.returncode}: {' '.join(map(str, cmd))}\n{tail}")
    return result.stdout


class Check:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.venv = work / "venv"
        self.python = self.venv / "bin" / "python"
        self.repo = work / "models"
        self.site: Path | None = None

    def ask(self, code: str) -> str:
        """What `code`, run by the fresh venv's python outside the checkout, prints."""
        return run([str(self.python), "-c", code], 60, cwd=self.work).strip()

    def install(self) -> str:
        run([sys.executable, "-m", "venv", str(self.venv)], 120)
        t0 = time.monotonic()
        run(
            [str(self.python), "-m", "pip", "install", str(ROOT), "tritonclient[all]"],
            PIP_TIMEOUT_S,
            cwd=self.work,
        )
        self.site = Path(self.ask("import sysconfig; print(sysconfig.get_path('purelib'))"))
        versions = self.ask(
            "from importlib.metadata import version as v; "
            "print(*(f'{p} {v(p)}' for p in ('fleetserve', 'tritonclient', 'protobuf', "
            "'grpcio', 'perf-analyzer', 'cuda-python')), sep=', ')"
        )
        return f"one pip command in {time.monotonic() - t0:.0f} s: {versions}"

    def newest_tritonclient(self) -> str:
        report = self.work / "report.json"
        run(
            [
                str(self.python), "-m", "pip", "install", "--dry-run", "--ignore-installed",
                "--no-deps", "--quiet", "--report", str(report), "tritonclient",
            ],
            300,
            cwd=self.work,
        )  # fmt: skip
        newest = json.loads(report.read_text())["install"][0]["metadata"]["version"]
        installed = self.ask(
            "from importlib.metadata import version; print(version('tritonclient'))"
        )
        if installed != newest:
            raise Failed(f"tritonclient {installed} installed, but {newest} is the newest")
        return f"tritonclient {installed} is the newest on the index"

    def top_level(self) -> str:
        assert self.site is not None
        (dist_info,) = self.site.glob("fleetserve-*.dist-info")
        top_level = (dist_info / "top_level.txt").read_text().split()
        if top_level != ["fleetserve"]:
            raise Failed(f"top_level.txt lists {top_level}, not only fleetserve")
        record = [line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines()]
        names = {
            path.split("/")[0]
            for path in record
            if not path.startswith("../") and not path.startswith(dist_info.name + "/")
        }
        if names != {"fleetserve"}:
            raise Failed(f"RECORD installs top-level names {sorted(names)}, not only fleetserve")
        if f"{dist_info.name}/licenses/LICENSE" not in record:
            raise Failed(f"the wheel carries no LICENSE ({dist_info.name}/licenses/)")
        where = Path(self.ask("import fleetserve; print(fleetserve.__file__)"))
        if not where.is_relative_to(self.site):
            raise Failed(f"fleetserve imports from {where}, not from the venv")
        return (
            f"{dist_info.name}: top-level name fleetserve only "
            f"({len(record)} RECORD entries), LICENSE carried"
        )

    def serve(self) -> str:
        if not MODEL_PYTHON.exists():
            raise Failed(f"{MODEL_PYTHON} is missing: run the README's test command first")
        run([str(MODEL_PYTHON), "-c", BUILD_MODEL, str(self.repo)], 120, cwd=ROOT)
        proc = subprocess.Popen(
            [
                str(self.venv / "bin" / "fleetserve"), "serve",
                "--model-repository", str(self.repo), "--host", "127.0.0.1",
                "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
            ],
            cwd=self.work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines: list[str] = []
        ports: list[tuple[int, int]] = []
        ready = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                match = READY_LINE.search(line)
                if match and not ports:
                    ports.append((int(match[1]), int(match[2])))
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not ready.wait(READY_TIMEOUT_S) or not ports:
                code = proc.poll()
                how = f"exited {code}" if code is not None else f"not ready in {READY_TIMEOUT_S} s"
                raise Failed(f"{how}:\n{''.join(lines)}")
            http, grpc = (f"127.0.0.1:{port}" for port in ports[0])
            model = str(self.repo / "mlp" / "1" / "model.onnx")
            try:
                out = run([str(self.python), "-c", INFER, model, http, grpc], 120, cwd=self.work)
            except Failed as exc:
                raise Failed(f"{exc}\nserver log:\n{''.join(lines)}") from None
        finally:
            proc.send_signal(signal.SIGTERM)  # by its pid
            try:
                code = proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                code = None
            reader.join(10)
        log = "".join(lines)
        if code != 0:
            raise Failed(f"fleetserve serve (pid {proc.pid}) exited {code} on SIGTERM:\n{log}")
        if "Traceback" in log:
            raise Failed(f"traceback in the server log:\n{log}")
        said = out.strip().replace("\n", "; ")
        return f"pid {proc.pid} on {http} and {grpc}: {said}; stopped by SIGTERM, exit 0"


def main() -> int:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fleetserve-install-check-"))
    check = Check(work)
    steps: list[tuple[str, Callable[[], str]]] = [
        ("install fleetserve and tritonclient[all]", check.install),
        ("newest tritonclient", check.newest_tritonclient),
        ("one top-level import name", check.top_level),
        ("serve HTTP and gRPC", check.serve),
    ]
    passed = failed = 0
    try:
        for name, step in steps:
            try:
                print(f"install-check: {name}: {step()}", flush=True)
                passed += 1
            except Failed as exc:
                print(f"install-check: {name}: FAILED\n{exc}", flush=True)
                failed += 1
                if step == check.install:
                    break  # nothing else can run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"install-check: took {time.monotonic() - t0:.0f} s")
    print(f"install-check: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
