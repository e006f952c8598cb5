"""Server CPU microseconds per request under wrk load, for A/B-ing hot-path changes.

Throughput on a shared 2-core VM swings by 10-20 % between runs; the CPU time a server
process spends per request (utime + stime from /proc, divided by the requests wrk
completed) is far steadier, so hot-path changes are compared with it. Variants are
interleaved, each run starts a fresh server, and every variant runs `--rounds` times.

    python benchmarks/cpu_per_request.py --port 19000 \\
        "base=python benchmarks/baselines.py --model M --kind rest --port 19000" \\
        "fleet=python -m fleetserve serve --model-repository R --http-port 19000 --grpc-port -1"

Every variant must serve POST /v2/models/mlp/infer on --port with the 16->64->4 MLP
(INPUT0 [1,16] FP32). Needs wrk (benchmarks/setup.sh). Load goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
BODY = {
    "inputs": [
        {
            "name": "INPUT0",
            "shape": [1, 16],
            "datatype": "FP32",
            "data": [i / 16 for i in range(16)],
        }
    ]
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_ready(url: str, body: bytes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready in {timeout}s")


def wrk(url: str, script: str, seconds: int, connections: int) -> str:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}", "-s", script, url]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def measure(command: str, url: str, script: str, args: argparse.Namespace) -> tuple[float, float]:
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "exec " + command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(url, json.dumps(BODY).encode())
        wrk(url, script, 1, args.connections)  # warm-up
        before = cpu_seconds(proc.pid)
        out = wrk(url, script, args.duration, args.connections)
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(10)
    done = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return used / done * 1e6, rps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=COMMAND, the server to start")
    ap.add_argument("--port", type=int, required=True, help="port every variant listens on")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds of measured load")
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: run benchmarks/setup.sh")
    variants = dict(v.split("=", 1) for v in args.variants)
    url = f"http://127.0.0.1:{args.port}/v2/models/mlp/infer"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(f'wrk.method="POST"\nwrk.body=[[{json.dumps(BODY)}]]\n')
        lua.write('wrk.headers["Content-Type"]="application/json"\n')
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, command in variants.items():
            results[name].append(measure(command, url, lua.name, args))
    os.unlink(lua.name)
    for name, runs in results.items():
        cpu = " ".join(f"{c:6.1f}" for c, _ in runs)
        rps = " ".join(f"{r:7.0f}" for _, r in runs)
        print(f"{name:12s} cpu us/request {cpu}   req/s {rps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
