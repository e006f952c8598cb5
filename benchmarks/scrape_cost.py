"""Server CPU and wall time per /metrics scrape with N loaded model versions.

Builds a repository of N tiny models, starts each variant on it (every version loaded),
sends one request to each version (so every per-version series has data) and scrapes
`--scrapes` times, reading the server's CPU time (utime + stime) from /proc around them.
Variants are interleaved, each run starts a fresh server.

    python benchmarks/scrape_cost.py --models 1000 --port 19480 --metrics-port 19481 \\
        "fleet=python -m fleetserve serve --model-repository {repo} --http-port 19480 \\
         --grpc-port -1 --metrics-port 19481 --preload"

`{repo}` in a command is replaced by the repository's path. Load goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
).encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(command: str, args: argparse.Namespace) -> tuple[float, float, int]:
    """(server CPU ms, wall ms, bytes) of one scrape, averaged over `--scrapes`."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "exec " + command],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{args.port}/v2"
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise TimeoutError(f"not ready in {args.timeout}s: {command}")
            time.sleep(0.5)
        for i in range(args.models):
            url = f"{base}/models/m{i:05d}/infer"
            urllib.request.urlopen(urllib.request.Request(url, BODY), timeout=30).read()
        url = f"http://127.0.0.1:{args.metrics_port}/metrics"
        size = len(urllib.request.urlopen(url, timeout=30).read())
        before, started = cpu_seconds(proc.pid), time.perf_counter()
        for _ in range(args.scrapes):
            urllib.request.urlopen(url, timeout=30).read()
        wall = time.perf_counter() - started
        used = cpu_seconds(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(30)
    return used / args.scrapes * 1e3, wall / args.scrapes * 1e3, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=COMMAND, the server to start")
    ap.add_argument("--models", type=int, default=1000, help="model versions to load")
    ap.add_argument("--port", type=int, required=True, help="REST port of every variant")
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for ready")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fleetserve.loaders import testing

    variants = dict(v.split("=", 1) for v in args.variants)
    with tempfile.TemporaryDirectory() as repo:
        model = testing.mlp(in_dim=4, hidden=4, out_dim=2, seed=1)
        for i in range(args.models):
            testing.write_model(repo, f"m{i:05d}", model)
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, command in variants.items():
                results[name].append(measure(command.replace("{repo}", repo), args))
    for name, runs in results.items():
        cpu = " ".join(f"{c:6.1f}" for c, _, _ in runs)
        wall = " ".join(f"{w:6.1f}" for _, w, _ in runs)
        print(f"{name:12s} server CPU ms/scrape {cpu}   wall ms {wall}   {runs[0][2]} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
