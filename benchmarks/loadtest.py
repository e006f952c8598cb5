"""Closed-loop load-test runner for fleetserve and the bare Python baselines.

For each target (fleetserve, fleetserve-batched, baseline) it lays out a temporary model
repository (DIR/<model>/1/model.onnx), starts the server, waits until it is ready, sends ONE
real request and checks the answer against onnxruntime, then drives closed-loop load at each
concurrency:

* REST: ``wrk -t1 -cC -dD --latency`` with a Lua script POSTing a V2 JSON batch-1 request;
* gRPC: ``h2load -t1 -cC -m1 -D D`` replaying a pre-serialised, length-prefixed
  ModelInferRequest to /inference.GRPCInferenceService/ModelInfer, with --log-file giving
  per-request times for the percentiles.

Without wrk/h2load it falls back to a built-in asyncio generator (aiohttp / grpc.aio) and says
so. It measures the generator's and the server's CPU (utime+stime, % of one core) over each run,
prints a table and writes a JSON report (see benchmarks/README.md).

    python benchmarks/loadtest.py --targets fleetserve,baseline --protocols rest,grpc \\
        --concurrency 1,8,32 --duration 10
    python benchmarks/loadtest.py --targets fleetserve,fleetserve-batched --protocols rest,grpc \\
        --mlp-layers 256,1024,1024,10 --concurrency 1,8,32,128 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from report import git_commit, machine_info  # noqa: E402

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
# The fleetserve targets: one `python -m fleetserve serve` each, differing only in these flags.
# They go after --fleetserve-args, so that the target's name always says what ran. The
# repository has no config.pbtxt, so these flags alone decide whether the model batches.
FLEETSERVE_TARGETS: dict[str, list[str]] = {
    "fleetserve": ["--no-dynamic-batching"],
    "fleetserve-batched": ["--dynamic-batching"],
    # every prediction logged to the feedback sink (SQLite in a temporary data dir)
    "fleetserve-logged": ["--no-dynamic-batching", "--feedback-sample-rate", "1"],
}
TARGETS = (*FLEETSERVE_TARGETS, "baseline")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ORT_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Model and request payloads
# --------------------------------------------------------------------------------------------


def make_repository(
    repo: Path, name: str, model_path: str | None, mlp_layers: list[int] | None
) -> tuple[Path, str]:
    """Write repo/name/1/model.onnx; returns (path, description of where the model came from).

    No config.pbtxt: the server auto-completes the config, and --(no-)dynamic-batching decides.
    """
    from fleetserve.loaders.testing import mlp, write_model

    if model_path:
        return write_model(repo, name, Path(model_path).read_bytes()), model_path
    if mlp_layers:
        return write_model(repo, name, mlp(layers=mlp_layers)), (
            f"fleetserve.loaders.testing.mlp(layers={mlp_layers})"
        )
    return write_model(repo, name, mlp()), "fleetserve.loaders.testing.mlp()"


@dataclass
class Payload:
    """One batch-1 request in both wire forms, and the outputs onnxruntime gives for it."""

    model_name: str
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    rest_body: bytes
    grpc_message: bytes  # serialised ModelInferRequest (no gRPC frame prefix)

    @property
    def grpc_frame(self) -> bytes:
        """The message as one gRPC length-prefixed frame (uncompressed flag + u32 BE length)."""
        return b"\x00" + struct.pack(">I", len(self.grpc_message)) + self.grpc_message


def build_payload(model_file: Path, model_name: str) -> Payload:
    import onnxruntime as ort
    import orjson
    from baselines import V2_TO_NP, grpc_messages

    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1234)
    inputs: dict[str, np.ndarray] = {}
    v2types: dict[str, str] = {}
    for meta in sess.get_inputs():
        v2 = ORT_TO_V2[meta.type]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in meta.shape]  # batch 1
        arr = rng.standard_normal(shape)
        if v2 == "BOOL":
            arr = arr > 0
        inputs[meta.name] = np.ascontiguousarray(arr.astype(V2_TO_NP[v2]))
        v2types[meta.name] = v2
    expected = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))
    body = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": v2types[n], "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ]
    }
    pb2 = grpc_messages()
    req = pb2.ModelInferRequest(model_name=model_name)
    for n, a in inputs.items():
        t = req.inputs.add()
        t.name, t.datatype = n, v2types[n]
        t.shape.extend(a.shape)
        req.raw_input_contents.append(a.tobytes())
    return Payload(model_name, inputs, expected, orjson.dumps(body), req.SerializeToString())


def _close(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"output {name}: got {got.tolist()} want {want.tolist()}")


def check_rest(url: str, p: Payload, timeout: float = 10.0) -> None:
    """POST the exact body wrk will send and compare with onnxruntime's numbers."""
    req = urllib.request.Request(
        url, data=p.rest_body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        status, raw = r.status, r.read()
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
    outs = {o["name"]: o for o in json.loads(raw)["outputs"]}
    for name, want in p.expected.items():
        if name not in outs:
            raise RuntimeError(f"output {name} missing from {sorted(outs)}")
        o = outs[name]
        got = np.asarray(o["data"], dtype=want.dtype).reshape(o["shape"])
        _close(name, got, want)


def check_grpc(target: str, p: Payload, timeout: float = 10.0) -> int:
    """Send the exact message h2load will replay; check status OK and the numbers.

    Returns the length of the response as one gRPC frame (5 + message bytes), which the h2load
    run uses to infer non-OK grpc-status answers (a failed call carries no DATA).
    """
    import grpc
    from baselines import V2_TO_NP, grpc_messages

    pb2 = grpc_messages()
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(GRPC_PATH)  # bytes in, bytes out
        raw, rpc = call.with_call(p.grpc_message, timeout=timeout)
        if rpc.code() != grpc.StatusCode.OK:
            raise RuntimeError(f"grpc-status {rpc.code()}: {rpc.details()}")
    resp = pb2.ModelInferResponse.FromString(raw)
    index = {o.name: i for i, o in enumerate(resp.outputs)}
    for name, want in p.expected.items():
        if name not in index:
            raise RuntimeError(f"output {name} missing from {sorted(index)}")
        o = resp.outputs[index[name]]
        if resp.raw_output_contents:
            got = np.frombuffer(resp.raw_output_contents[index[name]], dtype=V2_TO_NP[o.datatype])
        else:
            got = np.asarray(o.contents.fp32_contents or o.contents.fp64_contents)
        _close(name, got.reshape(tuple(o.shape)).astype(want.dtype), want)
    return 5 + len(raw)


def check_frame_with_nghttp(url: str, frame_file: Path) -> str:
    """Replay the exact h2load frame file with nghttp and read grpc-status from the trailers."""
    if not shutil.which("nghttp"):
        return "skipped (no nghttp)"
    cmd = [
        "nghttp",
        "-v",
        "-d",
        str(frame_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=30).stdout
    m = re.search(r"grpc-status: (\d+)", out)
    if not m or m.group(1) != "0":
        raise RuntimeError(f"h2load frame replay: grpc-status {m.group(1) if m else '?'}")
    return "grpc-status 0"


# --------------------------------------------------------------------------------------------
# Processes and CPU accounting
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime ticks) for every process."""
    out: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()  # fields from #3 (state) on
        out[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of root and all its descendants, including children they have reaped.

    Counting cutime/cstime makes deltas right even when a worker exits between two samples.
    """
    stats = _read_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, ()))
    return total / CLK_TCK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from the /proc/stat cpu line."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, steal / CLK_TCK


def wait_for_idle(max_wait: float, threshold_pct: float = 10.0) -> float:
    """Wait (up to max_wait s) for a 1 s window with < threshold_pct of one core busy.

    The servers are idle between runs, so anything busy then is someone else's work, which
    would take CPU from the run. Returns the seconds waited.
    """
    t0 = time.monotonic()
    while True:
        b0, _ = machine_cpu_seconds()
        time.sleep(1.0)
        b1, _ = machine_cpu_seconds()
        waited = time.monotonic() - t0
        if 100 * (b1 - b0) < threshold_pct or waited >= max_wait:
            return waited


def _affinity(cpus: str | None) -> Any:
    if not cpus:
        return None
    ids = set()
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        ids.update(range(int(lo), int(hi or lo) + 1))
    return lambda: os.sched_setaffinity(0, ids)


class Server:
    """A server process started in its own session; stopped by signalling that group only."""

    def __init__(self, name: str, cmd: list[str], logdir: Path, pin: str | None) -> None:
        self.name, self.cmd = name, cmd
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_affinity(pin),
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def wait_until(what: str, server: Server, probe: Any, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited ({server.proc.returncode}) "
                f"while waiting for {what}:\n{server.log_tail()}"
            )
        try:
            if probe():
                return
        except Exception as exc:  # connection refused etc. while starting
            last = exc
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.name}: {what} not reached in {timeout}s ({last})\n{server.log_tail()}"
    )


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def grpc_probe(target: str, p: Payload) -> bool:
    check_grpc(target, p, timeout=2)
    return True


# --------------------------------------------------------------------------------------------
# Load generators
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    protocol: str
    concurrency: int
    generator: str
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    mean_ms: float = float("nan")
    max_ms: float = float("nan")
    errors: int = 0
    error_detail: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    generator_cpu_pct: float = float("nan")
    server_cpu_pct: float = float("nan")
    other_cpu_pct: float = float("nan")  # everything else on the machine (noise), incl. steal
    steal_cpu_pct: float = float("nan")
    failed: str | None = None
    tries: list[dict[str, Any]] = field(default_factory=list)  # with --repeat


WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "LOADTEST_JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d,"
    .. "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50\\":%d,\\"p90\\":%d,"
    .. "\\"p99\\":%d,\\"mean\\":%f,\\"max\\":%d}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


@dataclass
class GenRun:
    text: str  # the generator's output
    wall_s: float
    gen_cpu_s: float
    server_cpu_s: float
    other_cpu_s: float  # the rest of the machine over the same window (noise), incl. steal
    steal_s: float


def run_generator(
    cmd: list[str], timeout: float, pin: str | None, server_pid: int | None, workdir: Path
) -> GenRun:
    """Run a generator to completion and account for the CPU used meanwhile.

    The generator's CPU comes from wait4()'s rusage: the same utime+stime the kernel shows in
    /proc/PID/stat, but including the very end of the run. The server's CPU is the delta of
    /proc/PID/stat utime+stime over its whole process tree across the same window, and "other"
    is the machine's busy time (/proc/stat) minus both: other sessions, the runner, steal.
    """
    out_path = workdir / "gen.out"
    with open(out_path, "wb") as out:
        srv0 = tree_cpu_seconds(server_pid) if server_pid else 0.0
        busy0, steal0 = machine_cpu_seconds()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_affinity(pin),
        )
        deadline = t0 + timeout
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    pid, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
        except BaseException:  # interrupted: don't leave the generator running
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - t0
        srv1 = tree_cpu_seconds(server_pid) if server_pid else 0.0
        busy1, steal1 = machine_cpu_seconds()
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}:\n{text[-2000:]}")
    gen_cpu, srv_cpu = ru.ru_utime + ru.ru_stime, srv1 - srv0
    other = max(0.0, busy1 - busy0 - gen_cpu - srv_cpu)
    return GenRun(text, wall, gen_cpu, srv_cpu, other, steal1 - steal0)


def wrk_cmd(url: str, c: int, d: float, script: Path) -> list[str]:
    return [
        "wrk",
        "-t1",
        f"-c{c}",
        f"-d{d:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def parse_wrk(text: str, r: Result) -> None:
    m = re.search(r"^LOADTEST_JSON (\{.*\})$", text, re.M)
    if not m:
        raise RuntimeError(f"no summary in wrk output:\n{text[-2000:]}")
    s = json.loads(m.group(1))
    r.requests, r.duration_s = s["requests"], s["duration_us"] / 1e6
    r.rps = r.requests / r.duration_s if r.duration_s else 0.0
    r.p50_ms, r.p90_ms, r.p99_ms = (s[k] / 1000 for k in ("p50", "p90", "p99"))
    r.mean_ms, r.max_ms = s["mean"] / 1000, s["max"] / 1000
    r.error_detail = {k: s[k] for k in ("status", "connect", "read", "write", "timeout") if s[k]}
    r.errors = sum(r.error_detail.values())


def h2load_cmd(url: str, c: int, d: float, frame: Path, logfile: Path) -> list[str]:
    return [
        "h2load",
        "-D",
        f"{d:g}",
        "-c",
        str(c),
        "-m",
        "1",
        "-t",
        "1",
        "-d",
        str(frame),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        str(logfile),
        url,
    ]


def parse_h2load(text: str, logfile: Path, resp_frame_len: int, r: Result) -> None:
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    reqs = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    traffic = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?\((\d+)\) data", text)
    if not (m and reqs and traffic):
        raise RuntimeError(f"cannot parse h2load output:\n{text[-2000:]}")
    r.duration_s = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    r.rps = float(m.group(3))
    done, succeeded = int(reqs.group(3)), int(reqs.group(4))
    r.requests = done
    detail = {"http": done - succeeded, "timeout": int(reqs.group(7))}
    # h2load cannot see trailers, so a non-OK grpc-status (HTTP 200, no DATA) looks like a
    # success; every OK answer to this request is one DATA payload of resp_frame_len bytes.
    data_bytes = int(traffic.group(3))
    detail["grpc_status"] = max(0, succeeded - data_bytes // resp_frame_len)
    r.error_detail = {k: v for k, v in detail.items() if v}
    r.errors = sum(r.error_detail.values())
    lat = np.loadtxt(logfile, usecols=2, ndmin=1) if logfile.stat().st_size else np.array([])
    if abs(lat.size - done) > max(10, done // 100):
        raise RuntimeError(f"h2load log has {lat.size} requests, its summary says {done}")
    if lat.size:
        p = np.percentile(lat, [50, 90, 99]) / 1000
        r.p50_ms, r.p90_ms, r.p99_ms = (float(x) for x in p)
        r.mean_ms, r.max_ms = float(lat.mean() / 1000), float(lat.max() / 1000)


# Built-in generator (fallback): run as `loadtest.py _gen ...` in its own process so that its CPU
# is measured like wrk's or h2load's and it never shares an interpreter with the runner.


async def _gen_rest(a: argparse.Namespace, body: bytes) -> tuple[list[float], int, float]:
    import aiohttp

    lat: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    conn = aiohttp.TCPConnector(limit=a.concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t_start = time.perf_counter()
        end = t_start + a.duration

        async def worker() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < end:
                try:
                    async with session.post(a.url, data=body, headers=headers) as resp:
                        await resp.read()
                        ok = 200 <= resp.status < 300
                except Exception:
                    ok = False
                lat.append(time.perf_counter() - t0)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        return lat, errors, time.perf_counter() - t_start


async def _gen_grpc(a: argparse.Namespace, body: bytes) -> tuple[list[float], int, float]:
    import grpc

    lat: list[float] = []
    errors = 0
    # One connection per client, like h2load -c C -m 1.
    channels = [
        grpc.aio.insecure_channel(a.url, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(a.concurrency)
    ]
    calls = [ch.unary_unary(GRPC_PATH) for ch in channels]
    for call in calls:  # connect before the clock starts
        await call(body, timeout=10)
    t_start = time.perf_counter()
    end = t_start + a.duration

    async def worker(call: Any) -> None:
        nonlocal errors
        while (t0 := time.perf_counter()) < end:
            try:
                await call(body, timeout=10)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
            lat.append(time.perf_counter() - t0)
            errors += not ok

    await asyncio.gather(*(worker(c) for c in calls))
    elapsed = time.perf_counter() - t_start
    for ch in channels:
        await ch.close()
    return lat, errors, elapsed


def _self_cpu() -> float:
    with open("/proc/self/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def builtin_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="loadtest.py _gen")
    ap.add_argument("--protocol", choices=("rest", "grpc"), required=True)
    ap.add_argument("--url", required=True, help="REST: full infer URL; gRPC: host:port")
    ap.add_argument("--body", required=True, help="file with the JSON body / request message")
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--server-pid", type=int, help="account this process tree's CPU too")
    a = ap.parse_args(argv)
    run = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        run = uvloop.run
    body = Path(a.body).read_bytes()
    fn = _gen_rest if a.protocol == "rest" else _gen_grpc
    # The CPU windows open after start-up and imports, when the load starts; connecting takes
    # a few ms of them, so they are a little longer than the load window itself.
    cpu0, busy0, steal0 = _self_cpu(), *machine_cpu_seconds()
    srv0 = tree_cpu_seconds(a.server_pid) if a.server_pid else 0.0
    t0 = time.perf_counter()
    lat, errors, elapsed = run(fn(a, body))
    window = time.perf_counter() - t0
    cpu = _self_cpu() - cpu0
    srv = tree_cpu_seconds(a.server_pid) - srv0 if a.server_pid else 0.0
    busy1, steal1 = machine_cpu_seconds()
    arr = np.asarray(lat) * 1000
    pct = np.percentile(arr, [50, 90, 99]).tolist() if arr.size else [float("nan")] * 3
    print(
        "LOADTEST_JSON "
        + json.dumps(
            {
                "requests": len(lat),
                "errors": errors,
                "duration_s": elapsed,
                "cpu_s": cpu,
                "window_s": window,
                "server_cpu_s": srv,
                "steal_s": steal1 - steal0,
                "other_cpu_s": max(0.0, busy1 - busy0 - cpu - srv),
                "p50": pct[0],
                "p90": pct[1],
                "p99": pct[2],
                "mean": float(arr.mean()) if arr.size else float("nan"),
                "max": float(arr.max()) if arr.size else float("nan"),
            }
        ),
        flush=True,
    )
    return 0


def parse_builtin(text: str, r: Result) -> dict[str, float]:
    m = re.search(r"^LOADTEST_JSON (\{.*\})$", text, re.M)
    if not m:
        raise RuntimeError(f"no summary from the built-in generator:\n{text[-2000:]}")
    s = json.loads(m.group(1))
    r.requests, r.errors, r.duration_s = s["requests"], s["errors"], s["duration_s"]
    r.rps = r.requests / r.duration_s if r.duration_s else 0.0
    r.p50_ms, r.p90_ms, r.p99_ms, r.mean_ms, r.max_ms = (
        s[k] for k in ("p50", "p90", "p99", "mean", "max")
    )
    if r.errors:
        r.error_detail = {"failed": r.errors}
    return s


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """Where one protocol of one target listens, and the server process behind it."""

    target: str
    protocol: str
    server: Server
    rest_url: str = ""  # full infer URL
    grpc_target: str = ""  # host:port
    resp_frame_len: int = 0  # gRPC only, see check_grpc


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.a = args
        self.work = workdir
        self.repo = workdir / "repo"
        self.generators = self._pick_generators()
        self.results: list[Result] = []
        self.servers: list[Server] = []  # every server started, to stop them all at the end
        self.checks: list[dict[str, str]] = []

    def _pick_generators(self) -> dict[str, str]:
        gens = {}
        for proto, tool in (("rest", "wrk"), ("grpc", "h2load")):
            if self.a.generator == "builtin":
                gens[proto] = "builtin"
            elif shutil.which(tool):
                gens[proto] = tool
            elif self.a.generator == "native":
                raise SystemExit(f"{tool} not found (run benchmarks/setup.sh)")
            else:
                lib = "aiohttp" if proto == "rest" else "grpc.aio"
                print(
                    f"NOTE: {tool} not found; {proto.upper()} load comes from the built-in "
                    f"asyncio generator ({lib}), which needs far more CPU than {tool} and "
                    "takes it from the server. Run benchmarks/setup.sh for real numbers."
                )
                gens[proto] = "builtin"
        return gens

    # ---- servers ---------------------------------------------------------------------------

    def start_fleetserve(self, target: str) -> list[Endpoint]:
        http, grpc_port, metrics = free_port(), free_port(), free_port()
        cmd = [
            self.a.python,
            "-m",
            "fleetserve",
            "serve",
            "--model-repository",
            str(self.repo),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics),
            "--data-dir",
            str(self.work / f"data-{target}"),
            *shlex.split(self.a.fleetserve_args),
            *FLEETSERVE_TARGETS[target],
        ]
        srv = Server(target, cmd, self.work, self.a.pin_server)
        self.servers.append(srv)
        base = f"http://127.0.0.1:{http}"
        try:
            wait_until(
                "GET /v2/health/ready == 200",
                srv,
                lambda: http_status(f"{base}/v2/health/ready") == 200,
                self.a.startup_timeout,
            )
            wait_until(
                f"model {self.a.model_name} ready",
                srv,
                lambda: http_status(f"{base}/v2/models/{self.a.model_name}/ready") == 200,
                self.a.startup_timeout,
            )
        except Exception:
            srv.stop()
            raise
        eps = []
        for proto in self.a.protocols:
            eps.append(
                Endpoint(
                    target,
                    proto,
                    srv,
                    rest_url=f"{base}/v2/models/{self.a.model_name}/infer",
                    grpc_target=f"127.0.0.1:{grpc_port}",
                )
            )
        return eps

    def start_baseline(self, proto: str) -> Endpoint:
        port = free_port()
        cmd = [
            self.a.python,
            str(HERE / "baselines.py"),
            "--model",
            str(self.model_file),
            "--kind",
            proto,
            "--port",
            str(port),
        ]
        srv = Server(f"baseline-{proto}", cmd, self.work, self.a.pin_server)
        self.servers.append(srv)
        ep = Endpoint(
            "baseline",
            proto,
            srv,
            rest_url=f"http://127.0.0.1:{port}/v2/models/{self.a.model_name}/infer",
            grpc_target=f"127.0.0.1:{port}",
        )
        try:
            if proto == "rest":
                wait_until(
                    "a 200 infer answer",
                    srv,
                    lambda: check_rest(ep.rest_url, self.payload, timeout=2) is None,
                    self.a.startup_timeout,
                )
            else:
                wait_until(
                    "an OK ModelInfer answer",
                    srv,
                    lambda: grpc_probe(ep.grpc_target, self.payload),
                    self.a.startup_timeout,
                )
        except Exception:
            srv.stop()
            raise
        return ep

    def verify(self, ep: Endpoint) -> None:
        """ONE real request with the exact bytes the generator will send; numbers must match."""
        if ep.protocol == "rest":
            check_rest(ep.rest_url, self.payload)
            note = "HTTP 200, outputs match onnxruntime"
        else:
            ep.resp_frame_len = check_grpc(ep.grpc_target, self.payload)
            replay = check_frame_with_nghttp(f"http://{ep.grpc_target}{GRPC_PATH}", self.frame_file)
            note = f"grpc-status 0, outputs match onnxruntime; h2load frame replay: {replay}"
        self.checks.append({"target": ep.target, "protocol": ep.protocol, "check": note})
        log(f"[{ep.target}/{ep.protocol}] check: {note}")

    # ---- load ------------------------------------------------------------------------------

    def _gen_cmd(self, ep: Endpoint, c: int, d: float) -> tuple[list[str], str]:
        gen = self.generators[ep.protocol]
        if gen == "wrk":
            return wrk_cmd(ep.rest_url, c, d, self.wrk_script), gen
        if gen == "h2load":
            # h2load appends to an existing --log-file: start each run with a fresh one.
            (self.work / "h2load.log").unlink(missing_ok=True)
            return h2load_cmd(
                f"http://{ep.grpc_target}{GRPC_PATH}",
                c,
                d,
                self.frame_file,
                self.work / "h2load.log",
            ), gen
        url, body = (
            (ep.rest_url, self.body_file)
            if ep.protocol == "rest"
            else (ep.grpc_target, self.msg_file)
        )
        return [
            self.a.python,
            str(Path(__file__).resolve()),
            "_gen",
            "--protocol",
            ep.protocol,
            "--url",
            url,
            "--body",
            str(body),
            "--concurrency",
            str(c),
            "--duration",
            f"{d:g}",
            "--server-pid",
            str(ep.server.proc.pid),
        ], gen

    def measure(self, ep: Endpoint, c: int) -> Result:
        d = self.a.duration
        if self.a.warmup > 0:
            cmd, _ = self._gen_cmd(ep, c, self.a.warmup)
            run_generator(cmd, self.a.warmup + 60, self.a.pin_generator, None, self.work)
        if self.a.wait_idle > 0:
            waited = wait_for_idle(self.a.wait_idle)
            if waited > 1.5:
                log(f"  waited {waited:.0f}s for the machine to be idle")
        cmd, gen = self._gen_cmd(ep, c, d)
        r = Result(ep.target, ep.protocol, c, gen)
        run = run_generator(cmd, d + 60, self.a.pin_generator, ep.server.proc.pid, self.work)
        wall, gen_cpu = run.wall_s, run.gen_cpu_s
        if gen == "wrk":
            parse_wrk(run.text, r)
        elif gen == "h2load":
            parse_h2load(run.text, self.work / "h2load.log", ep.resp_frame_len, r)
        else:
            # The interpreter's start-up is not load: it accounts CPU (its own /proc/self/stat,
            # the server tree's, the machine's) over its load window itself.
            s = parse_builtin(run.text, r)
            wall, gen_cpu = s["window_s"], s["cpu_s"]
            run.server_cpu_s, run.other_cpu_s, run.steal_s = (
                s["server_cpu_s"],
                s["other_cpu_s"],
                s["steal_s"],
            )
            run.wall_s = wall
        r.generator_cpu_pct = 100 * gen_cpu / wall
        r.server_cpu_pct = 100 * run.server_cpu_s / run.wall_s
        r.other_cpu_pct = 100 * run.other_cpu_s / run.wall_s
        r.steal_cpu_pct = 100 * run.steal_s / run.wall_s
        if not ep.server.alive():
            r.failed = f"server exited during the run:\n{ep.server.log_tail()}"
        return r

    def measure_point(self, ep: Endpoint, c: int) -> None:
        tries: list[Result] = []
        for i in range(self.a.repeat):
            rep = f" (try {i + 1}/{self.a.repeat})" if self.a.repeat > 1 else ""
            log(
                f"[{ep.target}/{ep.protocol}] c={c} for {self.a.duration:g}s "
                f"({self.generators[ep.protocol]}){rep}..."
            )
            try:
                r = self.measure(ep, c)
            except Exception as exc:
                r = Result(ep.target, ep.protocol, c, self.generators[ep.protocol], failed=str(exc))
            log(
                "  "
                + (
                    f"FAILED: {r.failed}"
                    if r.failed
                    else f"{r.rps:.0f} req/s p50 {r.p50_ms:.3f} ms p99 {r.p99_ms:.3f} ms "
                    f"errors {r.errors} other {r.other_cpu_pct:.0f}%"
                )
            )
            tries.append(r)
            if r.failed or r.other_cpu_pct <= 10:
                break  # a failure, or a run that had the machine to itself: done
        # Keep the try least disturbed by other work on the machine.
        best = min(tries, key=lambda t: (t.failed is not None, t.other_cpu_pct))
        best.tries = [
            {
                "rps": t.rps,
                "p50_ms": t.p50_ms,
                "p99_ms": t.p99_ms,
                "other_cpu_pct": t.other_cpu_pct,
                "failed": t.failed,
            }
            for t in tries
        ]
        self.results.append(best)

    def prepare(self) -> None:
        self.model_file, self.model_origin = make_repository(
            self.repo, self.a.model_name, self.a.model, self.a.mlp_layers
        )
        self.payload = build_payload(self.model_file, self.a.model_name)
        self.body_file = self.work / "body.json"
        self.body_file.write_bytes(self.payload.rest_body)
        self.msg_file = self.work / "request.pb"
        self.msg_file.write_bytes(self.payload.grpc_message)
        self.frame_file = self.work / "request.grpc"
        self.frame_file.write_bytes(self.payload.grpc_frame)
        self.wrk_script = self.work / "infer.lua"
        self.wrk_script.write_text(WRK_LUA.format(body=self.payload.rest_body.decode()))

    def start_all(self) -> dict[tuple[str, str], Endpoint]:
        """Start every target's server(s) and check each endpoint with one real request."""
        eps: dict[tuple[str, str], Endpoint] = {}
        groups: list[tuple[str, list[str], Any]] = []  # (target, protocols, starter)
        for target in self.a.targets:
            if target in FLEETSERVE_TARGETS:
                groups.append((target, self.a.protocols, lambda t=target: self.start_fleetserve(t)))
            else:
                for proto in self.a.protocols:
                    groups.append((target, [proto], lambda p=proto: [self.start_baseline(p)]))
        for target, protos, starter in groups:
            try:
                started = starter()
            except Exception as exc:
                log(f"[{target}/{','.join(protos)}] START FAILED: {exc}")
                self._fail_all(target, f"start: {exc}", protos)
                continue
            for ep in started:
                try:
                    self.verify(ep)
                except Exception as exc:
                    log(f"[{ep.target}/{ep.protocol}] CHECK FAILED: {exc}")
                    self._fail_all(target, f"check: {exc}", [ep.protocol])
                    continue
                eps[(target, ep.protocol)] = ep
        return eps

    def run(self) -> None:
        """Targets are interleaved per (protocol, concurrency) point, so that a ratio compares
        runs minutes apart at most and slow drifts of the machine hit both sides alike. The
        servers not under load meanwhile sit idle."""
        self.prepare()
        try:
            eps = self.start_all()
            for proto in self.a.protocols:
                for c in self.a.concurrency:
                    for target in self.a.targets:
                        ep = eps.get((target, proto))
                        if ep is not None:
                            self.measure_point(ep, c)
        finally:
            for srv in self.servers:
                srv.stop()

    def _fail_all(self, target: str, why: str, protos: list[str] | None = None) -> None:
        for proto in protos or self.a.protocols:
            for c in self.a.concurrency:
                self.results.append(Result(target, proto, c, self.generators[proto], failed=why))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def tool_versions(gens: dict[str, str]) -> dict[str, str]:
    out = {}
    for proto, gen in gens.items():
        if gen == "wrk":
            txt = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
            out[proto] = txt.split(" [")[0].strip() or "wrk"
        elif gen == "h2load":
            txt = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout
            out[proto] = txt.strip() or "h2load"
        else:
            lib = "aiohttp" if proto == "rest" else "grpc.aio"
            out[proto] = f"builtin asyncio generator ({lib}) - fallback"
    return out


def _f(x: float, nd: int = 2) -> str:
    return "-" if x != x else f"{x:.{nd}f}"  # NaN -> "-"


def print_table(results: list[Result]) -> None:
    hdr = [
        "target",
        "proto",
        "conc",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        "generator",
        "gen CPU%",
        "srv CPU%",
        "other%",
    ]
    rows = []
    for r in results:
        if r.failed:
            first = r.failed.strip().splitlines()[0] if r.failed.strip() else "failed"
            rows.append([r.target, r.protocol, str(r.concurrency), "FAILED", first[:60]])
            continue
        rows.append(
            [
                r.target,
                r.protocol,
                str(r.concurrency),
                f"{r.rps:.0f}",
                _f(r.p50_ms, 3),
                _f(r.p90_ms, 3),
                _f(r.p99_ms, 3),
                str(r.errors),
                r.generator,
                _f(r.generator_cpu_pct, 0),
                _f(r.server_cpu_pct, 0),
                _f(r.other_cpu_pct, 0),
            ]
        )
    widths = [
        max([len(h), *(len(row[i]) for row in rows if len(row) > i)]) for i, h in enumerate(hdr)
    ]
    print("  ".join(h.rjust(w) for h, w in zip(hdr, widths, strict=True)))
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=False)))


def ratios(results: list[Result], num: str, den: str) -> list[dict[str, Any]]:
    """num / den per protocol and concurrency where both succeeded (same run, interleaved)."""
    by = {(r.target, r.protocol, r.concurrency): r for r in results if not r.failed}
    out = []
    for (t, proto, c), top in by.items():
        ref = by.get((den, proto, c))
        if t != num or ref is None or not ref.rps:
            continue
        out.append(
            {
                "protocol": proto,
                "concurrency": c,
                "rps_ratio": top.rps / ref.rps,
                "p50_ratio": top.p50_ms / ref.p50_ms if ref.p50_ms else float("nan"),
                "p99_ratio": top.p99_ms / ref.p99_ms if ref.p99_ms else float("nan"),
            }
        )
    return out


def print_ratios(title: str, rs: list[dict[str, Any]]) -> None:
    if not rs:
        return
    print(f"\n{title} (same run):")
    print(f"{'proto':>5}  {'conc':>4}  {'req/s':>6}  {'p50':>6}  {'p99':>6}")
    for x in rs:
        print(
            f"{x['protocol']:>5}  {x['concurrency']:>4}  {x['rps_ratio']:>6.2f}  "
            f"{_f(x['p50_ratio']):>6}  {_f(x['p99_ratio']):>6}"
        )


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _csv(kind: Any) -> Any:
    def parse(s: str) -> list[Any]:
        return [kind(x.strip()) for x in s.split(",") if x.strip()]

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_gen"]:
        return builtin_main(argv[1:])
    ap = argparse.ArgumentParser(
        description="Closed-loop load test of fleetserve and/or the bare baselines "
        "(see benchmarks/README.md)."
    )
    ap.add_argument(
        "--targets",
        type=_csv(str),
        default=["fleetserve"],
        help="comma list of fleetserve,fleetserve-batched,baseline (default: fleetserve)",
    )
    ap.add_argument(
        "--protocols",
        type=_csv(str),
        default=["rest", "grpc"],
        help="comma list of rest,grpc (default: both)",
    )
    ap.add_argument(
        "--concurrency",
        type=_csv(int),
        default=[1, 8, 32],
        help="comma list of closed-loop client counts (default: 1,8,32)",
    )
    ap.add_argument(
        "--duration",
        type=int,
        default=10,
        help="whole seconds per run (default 10; wrk takes whole seconds)",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of untimed load before each run (default 1; 0 = none)",
    )
    ap.add_argument(
        "--model",
        help="ONNX file to serve (default: loaders.testing.mlp(), the 16->64->4 FP32 MLP)",
    )
    ap.add_argument(
        "--mlp-layers",
        type=_csv(int),
        metavar="W0,W1,...",
        help="serve fleetserve.loaders.testing.mlp(layers=[...]) instead, every width from "
        "input to output, e.g. 256,1024,1024,10",
    )
    ap.add_argument("--model-name", default="mlp")
    ap.add_argument(
        "--generator",
        choices=("auto", "native", "builtin"),
        default="auto",
        help="auto: wrk/h2load when installed, else built-in; native: require them",
    )
    ap.add_argument("--pin-server", metavar="CPUS", help="e.g. 1 or 0-1 (default: no pinning)")
    ap.add_argument("--pin-generator", metavar="CPUS", help="e.g. 0 (default: no pinning)")
    ap.add_argument(
        "--fleetserve-args",
        default="",
        help="extra arguments appended to `python -m fleetserve serve`",
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter for the servers")
    ap.add_argument("--startup-timeout", type=float, default=60.0)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="on a shared machine: retry a point up to N times while other work "
        "took > 10%% of a core, keeping the least disturbed try (default 1)",
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the machine to be idle "
        "(other work < 10%% of a core over 1 s); default 0 = don't wait",
    )
    ap.add_argument("--out", help="JSON report path (default benchmarks/out/<UTC time>.json)")
    ap.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temp dir (model repository, server logs, payloads)",
    )
    a = ap.parse_args(argv)
    bad = set(a.targets) - set(TARGETS) or set(a.protocols) - {"rest", "grpc"}
    if bad or not a.concurrency or min(a.concurrency) < 1:
        ap.error(f"bad --targets/--protocols/--concurrency ({bad or a.concurrency})")
    if a.duration < 1 or a.warmup < 0 or a.repeat < 1:
        ap.error("need --duration >= 1, --warmup >= 0, --repeat >= 1")
    if a.mlp_layers is not None and (len(a.mlp_layers) < 2 or min(a.mlp_layers) < 1):
        ap.error(f"--mlp-layers needs at least two positive widths ({a.mlp_layers})")
    if a.mlp_layers and a.model:
        ap.error("--model and --mlp-layers exclude each other")
    if not a.model:
        try:
            import onnx  # noqa: F401  (builds the MLP; the server itself never needs it)
        except ModuleNotFoundError:
            ap.error(
                "building the MLP needs the onnx package: pip install -e '.[bench]' from the "
                "checkout (or serve a model file of your own with --model FILE.onnx)"
            )

    def _terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwind, so that the servers we started are stopped

    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="fleetserve-loadtest-"))
    runner = Runner(a, workdir)
    try:
        runner.run()
    finally:
        if a.keep_workdir:
            log(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    order = {
        (p, c, t): i
        for i, (p, c, t) in enumerate(
            (p, c, t) for p in a.protocols for c in a.concurrency for t in a.targets
        )
    }
    runner.results.sort(key=lambda r: order.get((r.protocol, r.concurrency, r.target), 0))
    print()
    print_table(runner.results)
    rs = ratios(runner.results, "fleetserve", "baseline")
    print_ratios("fleetserve / baseline", rs)
    rs_batched = ratios(runner.results, "fleetserve-batched", "fleetserve")
    print_ratios("fleetserve-batched / fleetserve", rs_batched)
    rs_logged = ratios(runner.results, "fleetserve-logged", "fleetserve")
    print_ratios("fleetserve-logged / fleetserve", rs_logged)
    noisy = [r for r in runner.results if not r.failed and r.other_cpu_pct > 10]
    if noisy:
        print(
            f"\nWARNING: {len(noisy)} run(s) shared the CPUs with other work (other% > 10): "
            "their numbers are low; rerun on a quiet machine (see --wait-idle)."
        )
    gens = tool_versions(runner.generators)
    report = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "generators": {p: gens[p] for p in a.protocols},
        "settings": {
            "targets": a.targets,
            "protocols": a.protocols,
            "concurrency": a.concurrency,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "model": runner.model_origin,
            "mlp_layers": a.mlp_layers,
            "model_name": a.model_name,
            "request": "batch 1, inputs "
            + ", ".join(f"{n}{list(v.shape)} {v.dtype}" for n, v in runner.payload.inputs.items()),
            "pin_server": a.pin_server,
            "pin_generator": a.pin_generator,
            "fleetserve_args": a.fleetserve_args,
            "fleetserve_target_args": {
                t: FLEETSERVE_TARGETS[t] for t in a.targets if t in FLEETSERVE_TARGETS
            },
            "wait_idle_s": a.wait_idle,
            "repeat": a.repeat,
        },
        "checks": runner.checks,
        "results": [asdict(r) for r in runner.results],
        "ratios_fleetserve_over_baseline": rs,
        "ratios_fleetserve_batched_over_fleetserve": rs_batched,
        "ratios_fleetserve_logged_over_fleetserve": rs_logged,
    }
    out = Path(a.out) if a.out else HERE / "out" / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")
    print(
        f"\nreport: {out}\nplots: {shlex.join([sys.executable, str(HERE / 'plot.py'), str(out)])}"
    )
    failed = [r for r in runner.results if r.failed]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
