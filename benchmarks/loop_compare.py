"""Server CPU per request of the bare REST and gRPC baselines under different event loops.

Reproduces issue 17 with nothing of fleetserve on the request path: the servers are
`baselines.py`'s bare aiohttp + orjson + onnxruntime app and bare grpc.aio servicer, serving
the 16->64->4 MLP from `fleetserve.loaders.testing.mlp()`. (uvloop 0.23 costs more CPU per
REST request than 0.21 and 0.22 because its transport writes each response at once, waking a
client on the same host once per response instead of once per loop iteration.) Run it with
the project's venv (`pip install -e ".[test]"`: the gRPC baseline needs tritonclient's
stubs). Each loop is a spec:

* `asyncio`: the stdlib loop, in this interpreter;
* `uvloop`: the uvloop this interpreter has;
* `uvloop==X`: uvloop X in a venv of its own (created on demand under --venv-dir, with the
  same versions of aiohttp, numpy, onnxruntime, orjson, grpcio and protobuf as this one);
* `/path/to/python`: the uvloop that interpreter has (say, a local build to A/B a patch).

Every (round, protocol, loop) run starts a fresh server, warms it up, then sends exactly
--requests requests over --connections keep-alive connections (wrk with a counting Lua
script / h2load -n; a built-in asyncio client when they are missing, see setup.sh) and
reads the server's utime+stime from /proc. Loops are interleaved within each round, so a
busy neighbour hurts all of them alike; the CPU figure still moves with machine load,
so quote ratios from one run. Two steadier measures are optional:

* --callgrind: the server runs under `valgrind --tool=callgrind` (instrumentation switched
  on after warm-up, dumped after the load) and the table gains instructions per request;
  the dumps stay in --keep for `callgrind_annotate` (where the extra cost is).
* --strace: `strace -c -f` attaches to the server for the measured requests only, and
  the table gains syscalls per request (the busiest ones are listed below it); ptrace
  stops inflate that run's CPU and context-switch columns.

    python benchmarks/loop_compare.py                      # asyncio, 0.21.0, 0.22.1, 0.23.0
    python benchmarks/loop_compare.py --loops uvloop==0.21.0,uvloop==0.23.0 \\
        --protocols rest --rounds 3 --requests 50000
    python benchmarks/loop_compare.py --callgrind --rounds 1 --requests 2000 --keep /tmp/cg

Load goes only to servers it starts on 127.0.0.1. A developer tool: CI never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

REST_PATH = "/v2/models/mlp/infer"
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
# What a server venv pins to this interpreter's versions, so that only uvloop differs.
SAME_AS_HERE = ("aiohttp", "multidict", "yarl", "propcache", "frozenlist", "aiosignal",
                "aiohappyeyeballs", "attrs", "numpy", "onnxruntime", "orjson", "grpcio",
                "protobuf")  # fmt: skip
# tritonclient's gRPC stubs (the baseline's servicer base); installed without its deps.
NO_DEPS = ("tritonclient", "python-rapidjson")


# --------------------------------------------------------------------------------------------
# The server (runs in the loop's interpreter: `loop_compare.py serve ...`)
# --------------------------------------------------------------------------------------------


def serve(loop_name: str, protocol: str, model: str, port: int) -> None:
    import baselines

    if loop_name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    sess = baselines.make_session(model)
    if protocol == "rest":
        from aiohttp import web

        loop = factory()
        asyncio.set_event_loop(loop)
        app = baselines.build_rest_app(sess)
        web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)
    else:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(baselines.serve_grpc(sess, "127.0.0.1", port))


# --------------------------------------------------------------------------------------------
# Interpreters: one venv per uvloop version
# --------------------------------------------------------------------------------------------


def interpreter(spec: str, venv_dir: Path) -> tuple[str, str]:
    """(python executable, loop name) for a loop spec; builds the venv when missing."""
    if spec in ("asyncio", "uvloop"):
        return sys.executable, spec
    if "/" in spec:  # a python that has uvloop, e.g. a venv with a patched build
        return spec, "uvloop"
    name, _, version = spec.partition("==")
    if name != "uvloop" or not version:
        sys.exit(f"unknown loop {spec!r}: asyncio, uvloop or uvloop==VERSION")
    with contextlib.suppress(metadata.PackageNotFoundError):
        if metadata.version("uvloop") == version:
            return sys.executable, "uvloop"
    pins = [f"{p}=={metadata.version(p)}" for p in SAME_AS_HERE] + [spec]
    extra = [f"{p}=={metadata.version(p)}" for p in NO_DEPS]
    venv = venv_dir / f"uvloop-{version}"
    stamp = venv / "loop_compare.pins"
    want = " ".join(pins + extra)
    if not stamp.exists() or stamp.read_text() != want:
        print(f"building {venv} ({spec})", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *pins], check=True)
        subprocess.run([*pip, "--no-deps", *extra], check=True)
        stamp.write_text(want)
    return str(venv / "bin" / "python"), "uvloop"


def loop_version(python: str, loop_name: str) -> str:
    """The row label, e.g. `uvloop 0.23.0 (libuv 1.52.1)` or `asyncio 3.11.7`."""
    if loop_name == "asyncio":
        return "asyncio " + ".".join(map(str, sys.version_info[:3]))
    code = (
        "import uvloop, uvloop.loop as L; v = L.libuv_get_version(); "
        "print(f'uvloop {uvloop.__version__} (libuv {v >> 16}.{v >> 8 & 255}.{v & 255})')"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


# --------------------------------------------------------------------------------------------
# Load: exactly N requests at concurrency C
# --------------------------------------------------------------------------------------------


def wrk_script(path: Path, body: bytes, n: int) -> None:
    """wrk -t1 with a Lua counter that exits after n responses, saying how many were not 200.

    (wrk.thread:stop() would stop the thread, but wrk's main thread sleeps out -d anyway.)
    """
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body.decode()}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "local answered, bad = 0, 0\n"
        "function response(status, headers, body)\n"
        "  answered = answered + 1\n"
        "  if status ~= 200 then bad = bad + 1 end\n"
        f"  if answered == {n} then\n"
        '    io.write(string.format("answered %d bad %d\\n", answered, bad))\n'
        "    io.flush()\n"
        "    os.exit(0)\n"
        "  end\n"
        "end\n"
    )


def drive(protocol: str, port: int, n: int, c: int, files: dict[str, Path]) -> int:
    """Send n requests (c at a time); returns how many got a good answer."""
    url = f"http://127.0.0.1:{port}"
    if protocol == "rest" and shutil.which("wrk"):
        wrk_script(files["lua"], files["body"].read_bytes(), n)
        limit = max(60, n // 10)  # s; the Lua script ends it sooner (>= 10 req/s)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{c}", f"-d{limit}", "-s", str(files["lua"]), url + REST_PATH],
            capture_output=True, text=True, check=True, timeout=limit + 60,
        ).stdout  # fmt: skip
        m = re.search(r"answered (\d+) bad (\d+)", out)
        if not m or m.group(2) != "0":
            sys.exit(f"wrk did not get {n} good answers:\n{out}")
        return int(m.group(1))
    if protocol == "grpc" and shutil.which("h2load"):
        out = subprocess.run(
            ["h2load", "-n", str(n), "-c", str(c), "-m1", "-t1", "-d", str(files["frame"]),
             "-H", "content-type: application/grpc", "-H", "te: trailers", url + GRPC_PATH],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        if not m or m.group(1) != m.group(2):
            sys.exit(f"h2load saw errors:\n{out}")
        return int(m.group(2))
    cmd = [sys.executable, __file__, "client", protocol, str(port), str(n), str(c),
           str(files["body" if protocol == "rest" else "message"])]  # fmt: skip
    return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


async def client(protocol: str, port: int, n: int, c: int, payload: bytes) -> int:
    """The fallback generator: c keep-alive connections (channels) sharing n requests."""
    left = n

    async def rest() -> None:
        nonlocal left
        head = (
            f"POST {REST_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        request = head.encode() + payload
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(request)
            answer = await reader.readuntil(b"\r\n\r\n")
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(answer.decode(errors="replace"))
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
            await reader.readexactly(int(length.group(1)))
        writer.close()

    async def grpc_() -> None:
        nonlocal left
        import grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(GRPC_PATH)
            while left > 0:
                left -= 1
                await call(payload, timeout=30)

    await asyncio.gather(*((rest if protocol == "rest" else grpc_)() for _ in range(c)))
    return n


# --------------------------------------------------------------------------------------------
# One measured run
# --------------------------------------------------------------------------------------------


def usage(pid: int) -> tuple[float, float, int, int]:
    """(user s, system s, voluntary, involuntary context switches): all threads together.

    Involuntary switches are preemptions: e.g. a client the server's write woke up taking
    the CPU from it.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    switches = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in switches:
                    switches[key] += int(value)
    return (int(fields[11]) / tick, int(fields[12]) / tick, *switches.values())


def wait_ready(protocol: str, port: int, files: dict[str, Path], proc: subprocess.Popen,
               log: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + 600  # a server under callgrind imports numpy slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if protocol == "rest":
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}{REST_PATH}", files["body"].read_bytes()
                )
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200 and b'"outputs"' in r.read():
                        return
            else:
                import grpc

                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    ch.unary_unary(GRPC_PATH)(files["message"].read_bytes(), timeout=5)
                    return
        except Exception:  # not listening yet
            time.sleep(0.5)
    sys.exit(f"server not ready in 600 s (log: {log})")


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True)


def instructions(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def syscalls(report: Path) -> dict[str, int]:
    """strace -c table -> {syscall: calls}."""
    out: dict[str, int] = {}
    for line in report.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[-1] != "total":
            out[f[-1]] = int(f[3])
    return out


def run_once(python: str, loop_name: str, protocol: str, args: argparse.Namespace,
             files: dict[str, Path], tag: str) -> dict[str, float | dict[str, int]]:  # fmt: skip
    from loadtest import free_port

    port = free_port()
    cmd = [python, __file__, "serve", loop_name, protocol, str(files["model"]), str(port)]
    out_file = Path(args.keep) / f"callgrind.{tag}" if args.callgrind else None
    if out_file:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out_file}", *cmd]  # fmt: skip
    log = Path(args.keep) / f"server.{tag}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    result: dict[str, float | dict[str, int]] = {}
    try:
        wait_ready(protocol, port, files, proc, log)
        drive(protocol, port, args.warmup, args.connections, files)
        if out_file:
            callgrind_control("-i", "on", str(proc.pid))
            drive(protocol, port, min(args.warmup, 200), args.connections, files)
            callgrind_control("-z", str(proc.pid))
        tracer = None
        if args.strace:
            trace_file = Path(args.keep) / f"strace.{tag}"
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(trace_file),
                                       "-p", str(proc.pid)], stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1)  # let it attach to every thread
        t0, before = time.monotonic(), usage(proc.pid)
        done = drive(protocol, port, args.requests, args.connections, files)
        after, wall = usage(proc.pid), time.monotonic() - t0
        user, system, vol, invol = (a - b for a, b in zip(after, before, strict=True))
        result = {"us": (user + system) / done * 1e6, "rps": done / wall,
                  "user": user / done * 1e6, "sys": system / done * 1e6,
                  "vol": vol / done, "invol": invol / done}  # fmt: skip
        if tracer:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
            result["syscalls"] = {k: v / done for k, v in syscalls(trace_file).items()}
        if out_file:
            callgrind_control("-d", str(proc.pid))
            result["ir"] = instructions(Path(f"{out_file}.1")) / done
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120 if out_file else 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return result


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def table(runs: dict[tuple[str, str], list[dict]], labels: dict[str, str]) -> str:
    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    lines = [
        "| protocol | loop | server CPU us/request (each round) | median | vs first "
        "| user / sys us | context switches/request (vol / invol) | req/s | instructions/request "
        "| syscalls/request |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    first: dict[str, float] = {}
    for (protocol, spec), rs in runs.items():
        us = med(rs, "us")
        first.setdefault(protocol, us)
        each = " / ".join(f"{r['us']:.1f}" for r in rs)
        ir = f"{med(rs, 'ir'):,.0f}" if "ir" in rs[0] else ""
        calls = ""
        if "syscalls" in rs[0]:
            calls = f"{statistics.median(sum(r['syscalls'].values()) for r in rs):.2f}"
        lines.append(
            f"| {protocol} | {labels[spec]} | {each} | {us:.1f} | {us / first[protocol]:.2f} "
            f"| {med(rs, 'user'):.1f} / {med(rs, 'sys'):.1f} "
            f"| {med(rs, 'vol'):.2f} / {med(rs, 'invol'):.2f} "
            f"| {med(rs, 'rps'):,.0f} | {ir} | {calls} |"
        )
    for (protocol, spec), rs in runs.items():
        if "syscalls" in rs[0]:
            top = sorted(rs[0]["syscalls"].items(), key=lambda kv: -kv[1])[:6]
            busiest = ", ".join(f"{k} {v:.2f}" for k, v in top)
            lines.append(f"\nsyscalls/request, {protocol} {labels[spec]}: {busiest}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", default="asyncio,uvloop==0.21.0,uvloop==0.22.1,uvloop==0.23.0")
    ap.add_argument("--protocols", default="rest,grpc")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=30000, help="measured requests per run")
    ap.add_argument("--warmup", type=int, default=2000, help="untimed requests first")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--venv-dir", default=str(Path.home() / ".cache" / "fleetserve-loops"))
    ap.add_argument("--callgrind", action="store_true", help="also count instructions")
    ap.add_argument("--strace", action="store_true", help="also count syscalls")
    ap.add_argument("--keep", help="folder for the callgrind / strace files (default: temp)")
    ap.add_argument("--out", help="append the markdown table to this file (e.g. RESULTS.md)")
    args = ap.parse_args()

    from loadtest import build_payload, make_repository

    specs = args.loops.split(",")
    interps = {s: interpreter(s, Path(args.venv_dir)) for s in specs}
    labels = {s: loop_version(*interps[s]) for s in specs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.keep = args.keep or str(work)
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        model, _ = make_repository(work / "repo", "mlp", None, None)
        payload = build_payload(model, "mlp")
        files = {"model": model, "body": work / "body.json", "message": work / "message.bin",
                 "frame": work / "request.grpc", "lua": work / "count.lua"}  # fmt: skip
        files["body"].write_bytes(payload.rest_body)
        files["message"].write_bytes(payload.grpc_message)
        files["frame"].write_bytes(payload.grpc_frame)
        runs: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(args.rounds):
            for protocol in args.protocols.split(","):
                for spec in specs:
                    name = re.sub(r"[^\w.=-]+", "_", spec.strip("/"))  # a file name
                    tag = f"{protocol}.{name}.r{rnd}"
                    r = run_once(*interps[spec], protocol, args, files, tag)
                    runs.setdefault((protocol, spec), []).append(r)
                    print(f"round {rnd + 1} {protocol:4s} {labels[spec]:16s} {r['us']:7.1f} us/req "
                          f"{r['rps']:8.0f} req/s", file=sys.stderr, flush=True)  # fmt: skip
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("aiohttp", "onnxruntime", "grpcio"))
    text = (
        f"\nServer CPU per request, bare baselines, {args.requests} requests at "
        f"c={args.connections}, {args.rounds} interleaved rounds (benchmarks/loop_compare.py, "
        f"{time.strftime('%Y-%m-%d')}; Python {sys.version.split()[0]}, {versions}):\n\n"
        + table(runs, labels)
    )
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1:2] == ["client"]:
        proto, port, n, c, payload = sys.argv[2:7]
        print(asyncio.run(client(proto, int(port), int(n), int(c), Path(payload).read_bytes())))
    else:
        sys.exit(main())
